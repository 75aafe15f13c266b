"""Exact per-filter code counts of the Equal Bits quantizer: pure arithmetic, no torch.

Counts per filter of ``n`` weights, with ``r`` the ratio and ``k`` the prune share (rounding half up):

    n_zero  = round(k * n)
    n_minus = round((1 - r) * (n - n_zero))
    n_plus  = n - n_zero - n_minus
"""

from __future__ import annotations

import math

__all__ = ["ot_counts", "entropy_of_counts"]


def _round_half_up(x: float) -> int:
    # 1e-9 absorbs float noise such as (1 - 0.7) * 10 = 3.0000000000000004 or 2.9999999999999996.
    return int(math.floor(x + 0.5 + 1e-9))


def ot_counts(n: int, ratio: float = 0.5, prune: float = 0.0) -> tuple[int, int, int]:
    """Exact per-filter code counts for a filter of ``n`` weights.

    Args:
        n: Number of weights in the filter.
        ratio: Share of +1 among unpruned weights.
        prune: Share of weights set to 0.

    Returns:
        ``(n_minus, n_zero, n_plus)``, summing to ``n``.

    Example:
        >>> ot_counts(10, ratio=0.3, prune=0.2)
        (6, 2, 2)
        >>> ot_counts(9)
        (5, 0, 4)
    """
    n_zero = min(n, _round_half_up(prune * n))
    m = n - n_zero
    n_minus = min(m, _round_half_up((1.0 - ratio) * m))
    return n_minus, n_zero, m - n_minus


def entropy_of_counts(counts: tuple[int, ...]) -> float:
    """Shannon entropy in bits per weight of a code distribution given by its counts.

    Example:
        >>> entropy_of_counts((2, 0, 2)), entropy_of_counts((4, 0, 0))
        (1.0, 0.0)
    """
    n = sum(counts)
    h = 0.0
    for count in counts:
        if count:
            p = count / n
            h -= p * math.log2(p)
    return h + 0.0  # turns -0.0 into 0.0
