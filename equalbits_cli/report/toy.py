"""The paper's 2-D toy example: how many decision boundaries can a tiny binary network draw?

A 2-3-1 network (two inputs, three sigmoid hidden units with biases, one output without bias) has
12 weights. With binary weights there are 2^12 = 4096 sign patterns. Each draws a decision
boundary (output pre-activation > 0) on a grid over [-2, 2]^2; a boundary and its label-flipped
twin count once, constant outputs count not at all. The full binary network draws 76 distinct
boundaries; restricted to equal bits (six -1 and six +1: C(12, 6) = 924 patterns) it still draws 66,
from under a quarter of the patterns: the equal-bit subnetworks keep most of the expressiveness.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["sign_patterns", "count_boundaries", "boundary_labels"]


def sign_patterns(equal_bits: bool = False) -> np.ndarray:
    """All sign patterns of the 12 weights, ``(count, 12)``; with ``equal_bits`` only six -1 / six +1."""
    patterns = np.array(list(itertools.product((-1.0, 1.0), repeat=12)))
    if equal_bits:
        patterns = patterns[(patterns > 0).sum(axis=1) == 6]
    return patterns


def boundary_labels(patterns: np.ndarray, points_per_side: int = 100) -> np.ndarray:
    """Boolean labels ``(count, points^2)``: output pre-activation > 0 at each grid point.

    Weight layout per pattern: hidden weights ``w[0:6]`` as (3, 2), hidden biases ``w[6:9]``, output
    weights ``w[9:12]``.
    """
    axis = np.linspace(-2.0, 2.0, points_per_side)
    xx, yy = np.meshgrid(axis, axis)
    grid = np.stack([xx.ravel(), yy.ravel()], axis=1)  # (P, 2)
    w_hidden = patterns[:, 0:6].reshape(-1, 3, 2)
    b_hidden = patterns[:, 6:9]
    w_out = patterns[:, 9:12]
    pre = np.einsum("pi,nhi->nph", grid, w_hidden) + b_hidden[:, None, :]
    hidden = 1.0 / (1.0 + np.exp(-pre))
    out = np.einsum("nph,nh->np", hidden, w_out)
    return out > 0


def count_boundaries(equal_bits: bool = False, points_per_side: int = 100) -> tuple[int, int]:
    """``(patterns, distinct non-constant boundaries up to a label flip)``.

    Example:
        >>> count_boundaries(points_per_side=50)
        (4096, 76)
        >>> count_boundaries(equal_bits=True, points_per_side=50)
        (924, 66)
    """
    patterns = sign_patterns(equal_bits)
    labels = boundary_labels(patterns, points_per_side)
    distinct = set()
    for row in labels:
        if row.all() or not row.any():
            continue
        flipped = ~row
        distinct.add(min(np.packbits(row).tobytes(), np.packbits(flipped).tobytes()))
    return len(patterns), len(distinct)
