"""The Typer application and its global options (--debug, --version)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="equalbits",
    help=(
        "Binary networks from timm models with exactly equally distributed weights (Equal Bits, AAAI 2022).\n\n"
        "Typical path: binarize -> finetune -> eval -> export. Every command takes --json for scripts."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"equalbits {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of errors (also EQUALBITS_DEBUG=1).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Binary networks from timm models with exactly equally distributed weights (Equal Bits, AAAI 2022).

    Typical path: binarize -> finetune -> eval -> export. Every command takes --json for scripts.
    """
    import os
    import warnings

    if debug:
        os.environ["EQUALBITS_DEBUG"] = "1"
    else:  # library warnings (torch, timm) would break the one-line error promise; --debug shows them
        warnings.filterwarnings("ignore")


def default_output(source: str, suffix: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.split("/")[-1].removeprefix("hf-hub:"))
    return Path(f"{stem}{suffix}")
