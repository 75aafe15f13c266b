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


RESUME_VALUES = ("yes", "auto")


def _optional_values(args: list[str]) -> list[str]:
    """``--resume`` alone means ``--resume yes``: click options take a value or none, not either, so the
    bare form gets its value here (a following token that is not a value stays an argument).

    Example:
        >>> _optional_values(["finetune", "--resume", "--json"])
        ['finetune', '--resume', 'yes', '--json']
        >>> _optional_values(["finetune", "--resume", "auto"])
        ['finetune', '--resume', 'auto']
    """
    out = []
    for i, a in enumerate(args):
        out.append(a)
        if a == "--resume" and (i + 1 == len(args) or args[i + 1] not in RESUME_VALUES):
            out.append("yes")
    return out


def main() -> None:
    """Console-script entry point."""
    import sys

    app(args=_optional_values(sys.argv[1:]), prog_name="equalbits")


__all__ = ["app", "main"]
