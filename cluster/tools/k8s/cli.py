"""``cluster k8s``: generate the overlays' Serve configs, validate manifests offline, create the
overlays' secret files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cluster.tools.checkout import REPO_ROOT
from cluster.tools.k8s.generate import OVERLAYS, drift, write_generated
from cluster.tools.k8s.problems import K8sError
from cluster.tools.k8s.render import K8S_DIR
from cluster.tools.k8s.schema import DEFAULT_CRDS, DEFAULT_KUBE_VERSION
from cluster.tools.k8s.secret_files import new_secret_values, secret_sources, write_secret_files
from cluster.tools.k8s.validate import resolve_target, validate_target

k8s_app = typer.Typer(no_args_is_help=True, add_completion=False,
                      help="Kubernetes manifests: generate from deployments/, validate offline.")


@k8s_app.command()
def generate(
    check: Annotated[bool, typer.Option("--check", help="Exit 1 with a diff on drift.")] = False,
    deployments_dir: Annotated[Path, typer.Option(help="The catalog.")] = REPO_ROOT / "deployments",
    k8s_dir: Annotated[Path, typer.Option(help="The Kustomize tree.")] = K8S_DIR,
) -> None:
    """Write each overlay's serve-config.yaml from deployments/ (or check it is current)."""
    if check:
        diffs = drift(deployments_dir, k8s_dir)
        for diff in diffs:
            typer.echo(diff)
        if diffs:
            typer.echo("generated manifests are stale: run `cluster k8s generate` and commit",
                       err=True)
            raise typer.Exit(1)
        typer.echo("generated manifests match deployments/")
        return
    changed = write_generated(deployments_dir, k8s_dir)
    for path in changed:
        typer.echo(f"wrote {path}")
    if not changed:
        typer.echo("generated manifests already match deployments/")


@k8s_app.command()
def validate(
    targets: Annotated[list[str] | None, typer.Argument(
        help="Overlay names or paths (kustomization dirs, manifest files); default: all "
             "overlays.")] = None,
    crds: Annotated[list[Path] | None, typer.Option(
        "--crds", envvar="CLUSTER_K8S_CRDS",
        help=f"CRD files or directories (repeatable); default: {DEFAULT_CRDS}.")] = None,
    kube_version: Annotated[str, typer.Option(help="Kubernetes version of the schemas.")]
    = DEFAULT_KUBE_VERSION,
    placeholder_secrets: Annotated[bool, typer.Option(
        help="Render with throwaway values for missing secret files (in a temp copy).")] = True,
) -> None:
    """Render and check manifests offline; exit 1 on problems, 2 if the check cannot run."""
    try:
        paths = [resolve_target(t) for t in targets or sorted(OVERLAYS)]
        crd_paths = tuple(crds or [DEFAULT_CRDS])
        found = 0
        for path in paths:
            count, problems = validate_target(path, crd_paths, kube_version, placeholder_secrets)
            found += len(problems)
            for problem in problems:
                typer.echo(str(problem))
            typer.echo(f"{path}: {count} objects, {len(problems) or 'no'} problems", err=True)
    except K8sError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if found:
        raise typer.Exit(1)


@k8s_app.command("secrets")
def make_secrets(
    overlay: Annotated[str, typer.Argument(help="The overlay, e.g. gpu.")],
    k8s_dir: Annotated[Path, typer.Option(help="The Kustomize tree.")] = K8S_DIR,
) -> None:
    """Create the overlay's missing secrets/*.env with fresh random values (never overwrites).

    The hub token is read from $HF_TOKEN; the Redis URL points at the in-cluster Redis.
    """
    directory = k8s_dir / "overlays" / overlay
    if not directory.is_dir():
        raise typer.BadParameter(f"no overlay {directory}")
    names = [p.name for p in secret_sources(directory)]
    values = new_secret_values(os.environ.get("HF_TOKEN"))
    written = write_secret_files(directory / "secrets", names, values)
    for path in written:
        typer.echo(f"wrote {path}")
    for name in sorted(set(names) - {p.name for p in written}):
        typer.echo(f"kept {directory / 'secrets' / name}")
    if "HF_TOKEN" not in values["app.env"] and any(p.name == "app.env" for p in written):
        typer.echo("note: HF_TOKEN is not set; gated hub models (Llama) need it", err=True)
