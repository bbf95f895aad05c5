"""The operator CLI: ``cluster up`` for the local stack, plus admin sub-commands.

Sub-command groups live next to the code they drive and are mounted here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster.config.catalog import load_catalog
from cluster.config.settings import Profile, Settings
from cluster.tools import admin_cli, billing_cli
from cluster.tools.k8s import k8s_app

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Run and operate the OpenAI-compatible LLM cluster.")
admin_cli.mount(app)  # keys, users, spend
billing_cli.mount(app)  # usage (and keys budget)
app.add_typer(k8s_app, name="k8s")
models_app = typer.Typer(no_args_is_help=True, help="The built-in models.")
app.add_typer(models_app, name="models")


@app.command()
def up(
    profile: Annotated[Profile | None, typer.Option(help="Deployment files to serve.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8000).")] = None,
    host: Annotated[str | None, typer.Option(
        help="Address the API listens on (default 127.0.0.1). 0.0.0.0 opens it to the "
             "network (requests still need a key); Ray's own ports stay on 127.0.0.1.",
    )] = None,
    deployments_dir: Annotated[Path | None, typer.Option(help="Deployment files.")] = None,
) -> None:
    """Start Redis, a local Ray cluster and every model of the profile; Ctrl-C stops all."""
    from cluster.tools.up import run_up

    overrides = {"profile": profile, "port": port, "host": host,
                 "deployments_dir": deployments_dir}
    run_up(Settings().model_copy(update={k: v for k, v in overrides.items() if v is not None}))


@models_app.command("prepare")
def prepare(
    profile: Annotated[Profile | None, typer.Option(help="Deployment files to prepare.")] = None,
) -> None:
    """Build the profile's built-in models into the cache (replicas never build them)."""
    from cluster.tools.builtin_models import prepare_models

    settings = Settings()
    prepare_models(load_catalog(settings.deployments_dir, profile or settings.profile),
                   settings.cache_dir, progress=print)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
