"""Reusable option aliases and the error wrapper every command shares."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout instead of tables.")]
OutOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Output file path.", show_default=False)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output file if it exists.")]
RatioOpt = Annotated[
    float, typer.Option(help="Share of +1 codes among each filter's unpruned weights; 0.5 = equal bits. (0, 1)")
]
PruneOpt = Annotated[float, typer.Option(help="Share of each filter's weights set to 0 (ternary codes). [0, 1)")]
MethodOpt = Annotated[
    str, typer.Option(help="ot: exact-ratio optimal transport (Equal Bits); sign: BWN/XNOR; irnet: IR-Net.")
]
ActivationsOpt = Annotated[
    str, typer.Option(help="none: full-precision activations; sign: also binarize layer inputs (1W/1A).")
]
NumClassesOpt = Annotated[
    int | None, typer.Option(help="Classifier size (default: from the checkpoint, or the model's).", show_default=False)
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(help="Local .safetensors or .pth state dict of the full-precision model.", show_default=False),
]
PretrainedOpt = Annotated[
    bool, typer.Option("--pretrained/--no-pretrained", help="Download pretrained weights from the hub.")
]


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit with ``code`` (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Map library errors to one line on stderr and exit code 2; Ctrl-C to exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fail(msg)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
