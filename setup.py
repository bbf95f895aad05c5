"""Ships ``deployments/`` inside the wheel as ``cluster/config/deployments``, so an installed
``cluster`` finds the default catalog without the source checkout (an editable install
reads the checkout's own ``deployments/``). Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCatalog(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "cluster" / "config" / "deployments"
        target.mkdir(parents=True, exist_ok=True)
        for spec in sorted(Path("deployments").glob("*.yaml")):
            shutil.copy2(spec, target / spec.name)


setup(cmdclass={"build_py": BuildPyWithCatalog})
