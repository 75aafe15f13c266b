"""How the loops report progress: a protocol the CLI implements with rich, and a silent default."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["NullProgress", "Progress"]


class Progress(Protocol):
    """Receives progress from the loops. Every method may be a no-op."""

    def phase(self, text: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1, **fields: Any) -> None: ...
    def done(self) -> None: ...
    def note(self, text: str) -> None: ...


class NullProgress:
    def phase(self, text: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def done(self) -> None:
        pass

    def note(self, text: str) -> None:
        pass
