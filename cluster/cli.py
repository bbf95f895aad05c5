"""The operator CLI: ``cluster up`` for the local stack, plus admin sub-commands.

Sub-command groups live next to the code they drive and are mounted here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster import cli_admin
from cluster.k8s import k8s_app
from cluster.settings import Profile, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Run and operate the OpenAI-compatible LLM cluster.")
cli_admin.mount(app)  # keys, users, spend
app.add_typer(k8s_app, name="k8s")


@app.command()
def up(
    profile: Annotated[Profile | None, typer.Option(help="Deployment files to serve.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8000).")] = None,
    deployments_dir: Annotated[Path | None, typer.Option(help="Deployment files.")] = None,
) -> None:
    """Start Redis, a local Ray cluster and every model of the profile; Ctrl-C stops all."""
    from cluster.up import run_up

    settings = get_settings()
    overrides = {"profile": profile, "port": port, "deployments_dir": deployments_dir}
    run_up(settings.model_copy(update={k: v for k, v in overrides.items() if v is not None}))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
