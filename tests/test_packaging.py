"""The wheel carries what an installed ``cluster`` needs outside the checkout: the default
catalog (``deployments/``, copied by ``setup.py``) and the gate's Lua scripts."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cluster.config.catalog import BUILTIN_READY, CatalogError, Source
from cluster.tools.checkout import REPO_ROOT


@pytest.mark.timeout(300)
def test_the_wheel_ships_the_catalog_and_the_scripts(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(REPO_ROOT)], check=True, cwd=tmp_path)
    [wheel] = tmp_path.glob("cluster-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    specs = {p.name for p in (REPO_ROOT / "deployments").glob("*.yaml")}
    assert specs and {f"cluster/config/deployments/{s}" for s in specs} <= names
    assert {f"cluster/gate/lua/{s}.lua" for s in ("admit", "settle", "reject")} <= names


def test_a_replica_never_builds_a_builtin_model(tmp_path: Path) -> None:
    source = Source(builtin="smollm2-135m-instruct")
    with pytest.raises(CatalogError, match="cluster models prepare"):
        source.resolve(tmp_path)
    ready = tmp_path / "models" / "smollm2-135m-instruct"
    ready.mkdir(parents=True)
    (ready / BUILTIN_READY).write_text("{}")
    assert source.resolve(tmp_path) == str(ready)
