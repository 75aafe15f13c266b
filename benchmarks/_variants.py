"""Shared by the benchmarks that re-check fine-tune defaults: variants of ``FinetuneConfig`` and their
paired difference from the defaults, seed by seed."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable


def parse_variants(text: str) -> dict[str, dict]:
    """``"lr=0.01;temperature=4,epochs=2"`` -> ``{"defaults": {}, "lr=0.01": {"lr": 0.01}, ...}``: each
    ``;``-separated variant changes one or more ``FinetuneConfig`` fields (values parsed as JSON when
    they parse, else kept as text). The defaults come first.

    Example:
        >>> parse_variants("lr=0.01;augment=light,epochs=2")["augment=light,epochs=2"]
        {'augment': 'light', 'epochs': 2}
    """
    out: dict[str, dict] = {"defaults": {}}
    for variant in filter(None, (v.strip() for v in text.split(";"))):
        changes = {}
        for item in variant.split(","):
            key, _, value = item.partition("=")
            try:
                changes[key.strip()] = json.loads(value)
            except ValueError:
                changes[key.strip()] = value.strip()
        out[variant] = changes
    return out


def paired(variant: Iterable[tuple[int, float]], defaults: Iterable[tuple[int, float]]) -> tuple[float, float, int]:
    """Mean and standard error of ``variant - defaults`` over the seeds both ran: ``(mean, se, n)``,
    ``se`` NaN for fewer than two seeds. Pairs are ``(seed, top1)``.

    Example:
        >>> paired([(0, 95.0), (1, 94.0)], [(0, 94.0), (1, 94.0), (2, 90.0)])
        (0.5, 0.5, 2)
    """
    base = dict(defaults)
    diffs = [top1 - base[seed] for seed, top1 in variant if seed in base]
    if not diffs:
        return float("nan"), float("nan"), 0
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), se, len(diffs)
