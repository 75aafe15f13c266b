"""Rich rendering of statistics (the CLI is the only place that prints)."""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ..report.stats import ModelStats


def stdout() -> Console:
    # Piped output is not squeezed to 80 columns: layer names stay whole in logs.
    return Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 140)


def stderr() -> Console:
    return Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    """Exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def stats_table(stats: ModelStats, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    show_inputs = any(s.inputs is not None for s in stats.layers)  # a 1W/1A model
    show_act = any(s.act_plus_share is not None for s in stats.layers)  # inspect --data
    for col, justify in (
        ("layer", "left"),
        ("kind", "left"),
        ("shape", "left"),
        ("binary", "center"),
        ("+1 / 0 / -1", "right"),
        ("ratio", "right"),
        ("entropy", "right"),
        ("SQNR dB", "right"),
        ("exact", "center"),
        *((("inputs", "left"),) if show_inputs else ()),
        *((("act +1", "right"),) if show_act else ()),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in stats.layers:
        counts = f"{s.n_plus}/{s.n_zero}/{s.n_minus}" if s.binarized else "-"
        exact = "-" if s.exact_filters is None else ("yes" if s.exact_filters else "NO")
        table.add_row(
            s.name,
            s.kind,
            "x".join(map(str, s.shape)),
            "yes" if s.binarized else (f"fp32 ({s.kept_because})" if s.kept_because else "fp32"),
            counts,
            _fmt(s.ratio, ".4f"),
            _fmt(s.entropy_bits, ".4f"),
            _fmt(s.sqnr_db, ".2f"),
            exact,
            *((s.inputs or "-",) if show_inputs else ()),
            *((_fmt(s.act_plus_share, ".3f"),) if show_act else ()),
        )
    return table


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column what/value table."""
    table = Table(title=title, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in rows:
        table.add_row(what, value)
    return table


def totals_table(stats: ModelStats, file_bytes: int | None = None) -> Table:
    t = stats.totals()
    table = Table(show_header=False, title="totals", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{t['params']:,}")
    table.add_row("binarized parameters", f"{t['binarized_params']:,} in {t['binarized_layers']} layers")
    table.add_row("entropy (bits / binary weight)", _fmt(t["entropy_bits"], ".4f"))
    table.add_row("fp32 size", human_bytes(t["fp32_bytes"]))
    table.add_row("packed size (1 bit / binary weight)", human_bytes(t["packed_bytes"]))
    table.add_row("compression", f"{t['compression']:.2f}x")
    if file_bytes is not None:
        table.add_row("this file", human_bytes(file_bytes))
    return table


def show_stats(stats: ModelStats, title: str, file_bytes: int | None = None) -> None:
    con = stdout()
    con.print(stats_table(stats, title))
    con.print(totals_table(stats, file_bytes))
