"""The git-ignored env files the overlays' secretGenerator reads, overlays/*/secrets/*.env: which
files a kustomization needs, and creating them with fresh (or placeholder) values."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import yaml

REDIS_URL = "redis://:{password}@llm-redis:6379/0"  # the Service of components/redis


def new_secret_values(hf_token: str | None, placeholder: bool = False) -> dict[str, dict[str, str]]:
    """Values for every secret file; ``placeholder`` gives throwaway ones for offline renders."""
    admin = "placeholder" if placeholder else secrets.token_urlsafe(32)
    password = "placeholder" if placeholder else secrets.token_urlsafe(32)
    app = {"CLUSTER_ADMIN_KEY": admin}
    if hf_token or placeholder:
        app["HF_TOKEN"] = hf_token or "placeholder"
    ray_token = "placeholder" if placeholder else secrets.token_hex(32)
    return {"app.env": app, "ray.env": {"auth_token": ray_token},
            "redis.env": {"REDIS_PASSWORD": password,
                          "CLUSTER_REDIS_URL": REDIS_URL.format(password=password)}}


def write_secret_files(directory: Path, names: Iterable[str],
                       values: dict[str, dict[str, str]]) -> list[Path]:
    """Create the missing files among ``names`` (mode 0600); existing files are never touched."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = directory / name
        if path.exists():
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in values.get(name, {}).items())
        written.append(path)
    return written


def secret_sources(kustomization_dir: Path) -> list[Path]:
    """Files the kustomization's secretGenerator reads (``envs`` and ``files``)."""
    names = ("kustomization.yaml", "kustomization.yml", "Kustomization")
    path = next((kustomization_dir / n for n in names if (kustomization_dir / n).exists()), None)
    if path is None:
        return []
    data = yaml.safe_load(path.read_text()) or {}
    sources = []
    for gen in data.get("secretGenerator") or []:
        sources += list(gen.get("envs") or [])
        sources += [f.split("=", 1)[-1] for f in gen.get("files") or []]  # "key=path" or "path"
    return [kustomization_dir / s for s in sources]
