"""The operator CLI: ``cluster up`` for the local stack, plus admin sub-commands.

Sub-command groups live next to the code they drive and are mounted here.
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Run and operate the OpenAI-compatible LLM cluster.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
