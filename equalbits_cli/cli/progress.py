"""Rich progress display implementing :class:`equalbits_cli.progress.Progress` (on stderr)."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .options import with_flags
from .render import stderr


class RichProgress:
    """One bar per phase (epoch, evaluation, calibration) with loss, img/s and ETA."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> RichProgress:
        return self

    def _start(self) -> None:
        # Started on the first phase, so that an error raised before any work prints its one line alone.
        if self.enabled and self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}", markup=False),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=stderr(),
                transient=False,
            )
            self._progress.start()

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def phase(self, text: str, total: int | None = None) -> None:
        self._start()
        if self._progress is not None:
            self._task = self._progress.add_task(text, total=total, info="")

    def advance(self, n: int = 1, **fields: Any) -> None:
        if self._progress is None or self._task is None:
            return
        info = ""
        if "loss" in fields:
            info = f"loss {fields['loss']:.4f}  "
        if "img_s" in fields:
            info += f"{fields['img_s']:.0f} img/s"
        self._progress.update(self._task, advance=n, info=info)

    def done(self) -> None:
        pass

    def note(self, text: str) -> None:
        """A line above the bars (the data config, warnings), on stderr."""
        if not self.enabled:
            return
        text = with_flags(text)
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            stderr().print(text)
