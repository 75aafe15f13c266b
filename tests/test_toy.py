"""The paper's 2-D toy example, reproduced exactly."""

from __future__ import annotations

import pytest

from equalbits_cli.report.toy import count_boundaries, sign_patterns


@pytest.mark.parametrize("points", [50, 100])
def test_full_and_equal_bit_boundary_counts(points):
    assert count_boundaries(equal_bits=False, points_per_side=points) == (4096, 76)
    assert count_boundaries(equal_bits=True, points_per_side=points) == (924, 66)


def test_equal_bit_patterns():
    p = sign_patterns(equal_bits=True)
    assert p.shape == (924, 12) and ((p > 0).sum(1) == 6).all()
