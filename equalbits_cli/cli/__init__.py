"""The ``equalbits`` command line: one thin command per library call (parse, build config, call, render).

Commands live by topic in ``model_cmds`` (binarize, inspect, export), ``train_cmds`` (finetune, eval) and
``demo_cmds`` (quickstart, sweep); each imports torch and timm only inside its body, so ``--help``,
``--version`` and argument errors answer at once.
"""

from __future__ import annotations

from .app import app

# Importing the modules registers their commands, in the order --help lists them.
# isort: off
from . import model_cmds  # noqa: E402, F401
from . import train_cmds  # noqa: E402, F401
from . import demo_cmds  # noqa: E402, F401

# isort: on


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
