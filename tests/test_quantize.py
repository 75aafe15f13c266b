"""The quantizer: exact counts, monotone (optimal-transport) assignment, ties, scales, entropy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from equalbits_cli.quant.quantize import entropy_bits, ot_codes, ot_codes_reference, ot_counts, sqnr_db

ratios = st.floats(min_value=0.01, max_value=0.99)
prunes = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=0.95))


@st.composite
def weights(draw):
    """Weight tensors of 1-4 dims, with many ties (small integer grids) or continuous values."""
    rows = draw(st.integers(1, 6))
    inner = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    shape = (rows, *inner)
    n = math.prod(shape)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["normal", "ties", "constant"]))
    if kind == "normal":
        w = torch.randn(n, generator=g)
    elif kind == "ties":
        w = torch.randint(-2, 3, (n,), generator=g).float() * 0.1
    else:
        w = torch.full((n,), 0.25)
    return w.reshape(shape)


def assert_scale_close(scale, ref_scale, w, codes):
    """The scale within 1e-6 of the reference, or within four float32 roundings of the row's sum of
    absolute weights over its non-zero count: the CPU sums the +1 weights as the row total less the
    others, which cancels when few weights are +1 (an error of a rounding of the total, not of the +1 sum)."""
    rows = w.reshape(w.shape[0], -1).double()
    nonzero = codes.reshape(w.shape[0], -1).ne(0).sum(1).clamp_min(1)
    bound = 1e-6 * ref_scale.double().abs() + 4 * torch.finfo(torch.float32).eps * rows.abs().sum(1) / nonzero + 1e-7
    err = (scale.double() - ref_scale.double()).abs()
    assert (err <= bound).all(), (err.max().item(), bound.min().item())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=weights(), ratio=ratios, prune=prunes)
def test_ot_codes_exact_counts_and_matches_reference(w, ratio, prune):
    codes, scale = ot_codes(w, ratio, prune)
    ref_codes, ref_scale = ot_codes_reference(w, ratio, prune)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert torch.equal(codes, ref_codes)
    assert_scale_close(scale, ref_scale, w, codes)
    flat = codes.reshape(w.shape[0], -1)
    n_minus, n_zero, n_plus = ot_counts(flat.shape[1], ratio, prune)
    assert ((flat == -1).sum(1) == n_minus).all()
    assert ((flat == 0).sum(1) == n_zero).all()
    assert ((flat == 1).sum(1) == n_plus).all()


@settings(max_examples=200, deadline=None)
@given(w=weights(), ratio=ratios, prune=prunes)
def test_assignment_is_monotone_with_index_tie_break(w, ratio, prune):
    """Optimal transport in 1-D is the quantile map: ranks by (value, index) decide the code."""
    codes, _ = ot_codes(w, ratio, prune)
    flat_w = w.reshape(w.shape[0], -1)
    flat_c = codes.reshape(w.shape[0], -1)
    for row_w, row_c in zip(flat_w, flat_c, strict=True):
        keyed = sorted(range(len(row_w)), key=lambda i: (float(row_w[i]), i))
        ordered = [int(row_c[i]) for i in keyed]
        assert ordered == sorted(ordered)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 10_000), ratio=ratios, prune=prunes)
def test_counts_sum_and_rounding(n, ratio, prune):
    n_minus, n_zero, n_plus = ot_counts(n, ratio, prune)
    assert min(n_minus, n_zero, n_plus) >= 0 and n_minus + n_zero + n_plus == n
    assert abs(n_zero - prune * n) <= 0.5 + 1e-6
    m = n - n_zero
    assert abs(n_minus - (1 - ratio) * m) <= 0.5 + 1e-6


def test_counts_examples():
    assert ot_counts(10, 0.3, 0.2) == (6, 2, 2)
    assert ot_counts(9, 0.5) == (5, 0, 4)  # half up: 4.5 -> 5 minus
    assert ot_counts(10, 0.7) == (3, 0, 7)  # (1 - 0.7) * 10 is 3.0000000000000004 in floating point


@pytest.mark.parametrize("n", [2, 4, 10, 64, 576, 4608])
def test_equal_bits_entropy_is_exactly_one_bit(n):
    w = torch.randn(8, n, generator=torch.Generator().manual_seed(n))
    codes, _ = ot_codes(w, 0.5)
    for row in codes:
        assert entropy_bits(row) == 1.0
    assert entropy_bits(codes) == 1.0


def test_ternary_entropy_matches_formula():
    """At ratio 0.5 and prune k, entropy is h(k) + (1 - k) bits."""
    k = 0.25
    codes, _ = ot_codes(torch.randn(4, 400, generator=torch.Generator().manual_seed(1)), 0.5, k)
    h = -(k * math.log2(k) + (1 - k) * math.log2(1 - k))
    assert entropy_bits(codes) == pytest.approx(h + (1 - k), abs=1e-12)


def test_scale_is_least_squares_optimum():
    w = torch.randn(5, 50, generator=torch.Generator().manual_seed(2))
    codes, scale = ot_codes(w, 0.4, 0.1)
    b = codes.float()
    best = ((w - scale[:, None] * b) ** 2).sum(1)
    for eps in (1e-3, -1e-3):
        assert (((w - (scale[:, None] + eps) * b) ** 2).sum(1) > best).all()


def test_sign_and_irnet_baselines():
    w = torch.tensor([[0.5, -0.2, 0.0, 0.1], [1.0, 2.0, 3.0, 4.0]])
    codes, scale = ot_codes(w, method="sign")
    assert codes.tolist() == [[1, -1, 1, 1], [1, 1, 1, 1]]
    torch.testing.assert_close(scale, w.abs().mean(1))
    codes, scale = ot_codes(w, method="irnet")
    # IR-Net balances each filter first: the second row's mean (2.5) splits it in two halves.
    assert codes[1].tolist() == [-1, -1, 1, 1]
    assert (scale > 0).all()
    log2 = torch.log2(scale / w.std(dim=1))
    torch.testing.assert_close(log2, log2.round())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"prune": 1.0}, "prune"),
        ({"prune": -0.1}, "prune"),
        ({"method": "xnor"}, "method"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ot_codes(torch.randn(2, 4), **kwargs)


def test_sqnr():
    w = torch.tensor([1.0, -1.0])
    assert sqnr_db(w, w) == math.inf
    assert sqnr_db(w, 0.9 * w) == pytest.approx(20.0)


@settings(max_examples=150, deadline=None)
@given(w=weights(), ratio=ratios, prune=prunes, steps=st.lists(st.floats(0, 0.3), min_size=1, max_size=4))
def test_warm_cache_gives_identical_codes(w, ratio, prune, steps):
    """Reusing the kept buffers (as in training) never changes the result."""
    from equalbits_cli.quant.quantize import OTCache

    cache = OTCache()
    g = torch.Generator().manual_seed(len(steps))
    for size in [0.0, *steps]:
        w = w + size * torch.randn(w.shape, generator=g) * (torch.rand(w.shape, generator=g) < 0.5)
        codes, scale = ot_codes(w, ratio, prune, cache=cache)
        ref_codes, ref_scale = ot_codes_reference(w, ratio, prune)
        assert torch.equal(codes, ref_codes)
        assert_scale_close(scale, ref_scale, w, codes)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_every_cpu_dtype_selects_the_reference(dtype):
    """float64 through numpy, half precisions through the plain-torch selection: the same codes."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 97, generator=g).to(dtype)
    w[:, ::4] = w[:, :1]  # ties
    for ratio, prune in [(0.5, 0.0), (0.3, 0.2)]:
        codes, scale = ot_codes(w, ratio, prune)
        ref_codes, ref_scale = ot_codes_reference(w.float(), ratio, prune)  # exact: each value fits a float
        assert torch.equal(codes, ref_codes)
        assert scale.dtype == dtype
        torch.testing.assert_close(scale.float(), ref_scale, rtol=1e-2 if dtype != torch.float64 else 1e-6, atol=0)


@pytest.mark.parametrize(("ratio", "prune"), [(0.3, 0.0), (0.7, 0.2), (0.5, 0.3), (0.5, 0.0), (0.45, 0.1)])
@pytest.mark.parametrize("n", [9, 10, 27, 576])
def test_known_offset_matches_the_codes(ratio, prune, n):
    """mu from the counts (the training weight's, :func:`ot_offset`) is mu read from the codes."""
    from equalbits_cli.quant.quantize import code_offsets, dequantize, ot_offset

    w = torch.randn(6, n, generator=torch.Generator().manual_seed(n))
    codes, scale = ot_codes(w, ratio, prune, center=True)
    mu = ot_offset(n, ratio, prune)
    assert torch.allclose(code_offsets(codes), torch.full((6,), mu), atol=1e-7)
    levels = dequantize(codes, scale, True) / scale[:, None]
    assert levels.sum(dim=1).abs().max() < 1e-4, "centred levels average to zero over each filter"


@pytest.mark.parametrize("ratio,prune", [(0.5, 0.0), (0.3, 0.0), (0.7, 0.2)])
def test_cpu_training_weight_of_large_layers_is_the_reference(ratio, prune):
    """The CPU training weight of a layer large enough to be split over threads, ties in many rows,
    built twice through one cache (its buffers reused): the reference codes, each level one value."""
    from equalbits_cli.quant.quantize import OTCache, binary_weight, dequantize

    torch.set_num_threads(2)  # the row split needs two threads
    cache = OTCache()
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        w = torch.randn(256, 64, 3, 3, generator=g)  # 147,456 weights: split over the threads
        w[::3, :, 0, 0] = w[::3, :1, 1, 1]  # a tie in every third filter
        w[5] = 0.5  # a constant filter: every weight tied
        q = binary_weight(w, ratio, prune, center=True, cache=cache)
        codes, ref_scale = ot_codes_reference(w, ratio, prune)
        got_codes, got_scale = ot_codes(w, ratio, prune, cache=cache)  # codes through the same threads
        assert torch.equal(got_codes, codes)
        torch.testing.assert_close(got_scale, ref_scale, rtol=1e-5, atol=1e-7)
        _, scale = ot_codes(w, ratio, prune, center=True)
        want = dequantize(codes, scale, True)
        torch.testing.assert_close(q, want, rtol=1e-5, atol=1e-6)
        signs = torch.sign(q).flatten(1)
        live = scale.abs() > 1e-6  # the constant filter's scale is 0 up to rounding: its signs are noise
        assert torch.equal(signs[live], torch.sign(want).flatten(1)[live])
        for row in q.flatten(1)[live]:
            assert len(torch.unique(row)) == (3 if prune else 2)
    assert cache.scratch  # the numpy buffers were kept for the next step


@pytest.mark.parametrize(("ratio", "prune"), [(0.5, 0.0), (0.1, 0.0), (0.7, 0.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_from_last_thresholds_is_exact(ratio, prune, dtype, monkeypatch):
    """Steps of every size, from none to a jump past every old threshold, with ties created on the way:
    codes from the last call's thresholds are the reference's at each step, and most rows are found
    without introselect after the first call (so the bracketing path is what this test checks)."""
    from equalbits_cli.quant import cpu_select
    from equalbits_cli.quant.quantize import OTCache

    partitioned = []
    original = cpu_select._partitioned

    def spy(a, k, rows, scratch):
        partitioned.append(len(rows))
        return original(a, k, rows, scratch)

    monkeypatch.setattr(cpu_select, "_partitioned", spy)
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 300, generator=g, dtype=dtype)
    cache = OTCache()
    for step, size in enumerate([0.0, 1e-3, 1e-2, 1e-2, 3e-2, 0.0, 1e-3, 1.0, 1e-3]):
        w = w + size * torch.randn(w.shape, generator=g, dtype=dtype)
        if step == 4:
            w[::4, 10:20] = w[::4, 5:6]  # ties, some at the k-th value
            w[3] = 0.25  # a constant row: no threshold holds exactly k
        codes, scale = ot_codes(w, ratio, prune, cache=cache)
        ref_codes, ref_scale = ot_codes_reference(w, ratio, prune)
        assert torch.equal(codes, ref_codes), f"step {step}"
        torch.testing.assert_close(scale, ref_scale.to(dtype), rtol=1e-5, atol=1e-7)
    thresholds = 2 if prune else 1
    assert sum(partitioned[:thresholds]) == 64 * thresholds  # the first call: every row
    assert sum(partitioned[thresholds:]) < 64 * thresholds * 8 / 4  # later: most rows found near the last
