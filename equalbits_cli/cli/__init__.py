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
    """Console-script entry point. A usage error (a bad value, an unknown option) is one line on stderr,
    exit 2, like every other error: the boxed usage text would bury it."""
    import sys

    try:
        code = app(args=_optional_values(sys.argv[1:]), prog_name="equalbits", standalone_mode=False)
    except Exception as exc:  # click's (or typer's vendored click's) exceptions, matched by their shape
        kind = type(exc).__name__
        ctx = getattr(exc, "ctx", None)
        if kind == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            code = 0
        elif kind == "Abort":
            print("error: interrupted", file=sys.stderr)
            code = 130
        elif hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
            where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
            print(f"error: {exc.format_message().rstrip('.')}{where}", file=sys.stderr)
            code = exc.exit_code
        else:
            raise
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
