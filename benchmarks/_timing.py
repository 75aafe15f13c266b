"""Shared timing helper for the benchmarks: best-of-N wall time, after a warm-up call."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch


def best_ms(fn: Callable[[], object], reps: int = 10, warmup: int = 1) -> float:
    """Best wall time of ``fn`` over ``reps`` calls, in milliseconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
