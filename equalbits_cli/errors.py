"""The project's own exception types (no torch here: the CLI maps them before importing anything heavy)."""

from __future__ import annotations

import signal

__all__ = ["ExportMismatch", "Interrupted", "SettingError"]


class SettingError(ValueError):
    """A setting (an argument of a library call) out of range or inconsistent with another. Messages
    name settings as Python parameters in backquotes (`` `img_size` ``); the CLI shows its flag instead
    (``--img-size``) and exits 2."""


class ExportMismatch(RuntimeError):
    """An exported file would not compute what the model computes: a limitation of the export for that
    model, not a fault of the user's input. The CLI exits 1 with the message (nothing is written)."""


class Interrupted(Exception):
    """Work stopped by Ctrl-C or SIGTERM; the message says what was kept and how to continue.

    The CLI exits with ``128 + signum`` (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int = signal.SIGINT, rows: list | None = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.rows = rows  # what a sweep finished before it was stopped
