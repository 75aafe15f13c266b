"""The Triton quantizer kernel, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1), against the
sort reference; the sync-free torch path; the training weight built without codes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from equalbits_cli import quantize
from equalbits_cli.config import BinarizeConfig
from equalbits_cli.layers import BinaryConv2d
from equalbits_cli.quantize import (
    _lowest_k_syncfree,
    binary_weight,
    dequantize,
    ot_codes,
    ot_codes_reference,
    ot_counts,
    ot_offset,
)


@pytest.fixture(scope="module")
def ot_rows():
    """The kernel, interpreted on the CPU (conftest sets TRITON_INTERPRET=1 there), compiled on CUDA."""
    pytest.importorskip("triton")
    from equalbits_cli.kernels import ot_triton

    if not torch.cuda.is_available():
        assert type(ot_triton._ot_rows_kernel).__name__ == "InterpretedFunction"
        return ot_triton.ot_rows

    def on_cuda(w, *args, **kwargs):
        out = ot_triton.ot_rows(w.cuda(), *args, **kwargs)
        return tuple(None if t is None else t.cpu() for t in out)

    return on_cuda


def _hard_weights(rows: int, n: int, seed: int) -> torch.Tensor:
    """Normal weights with runs of ties, both zeros (-0.0 and +0.0 must tie), and a constant row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g)
    w[:, ::3] = w[:, :1].clone()  # a third of each row tied with its first value
    if n >= 8:
        w[0, 1:4] = -0.0
        w[0, 4:8] = 0.0
    if rows > 1:
        w[-1] = 0.25
    return w


GRID = [(r, p) for r in (0.3, 0.5, 0.7) for p in (0.0, 0.2)]


@pytest.mark.parametrize("n", [1, 2, 9, 37, 576, 4608, 16384])
@pytest.mark.parametrize("ratio,prune", GRID)
def test_kernel_codes_are_the_reference(ot_rows, n, ratio, prune):
    rows = 3 if n >= 4608 else 5
    w = _hard_weights(rows, n, seed=n)
    k_minus, k_zero, _ = ot_counts(n, ratio, prune)
    for center in (False, True):
        mu = ot_offset(n, ratio, prune) if center else 0.0
        codes, scale, weight = ot_rows(w, k_minus, k_zero, mu, out_dtype=torch.float32)
        ref_codes, _ = ot_codes_reference(w, ratio, prune)
        assert torch.equal(codes, ref_codes)
        _, ref_scale = ot_codes(w, ratio, prune, center=center)
        torch.testing.assert_close(scale, ref_scale, rtol=2e-5, atol=1e-7)
        want = dequantize(ref_codes, ref_scale, center, mu if center else None)
        torch.testing.assert_close(weight, want, rtol=2e-5, atol=1e-7)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 300),
    ratio=st.floats(0.01, 0.99),
    prune=st.one_of(st.just(0.0), st.floats(0.0, 0.9)),
    seed=st.integers(0, 2**31 - 1),
    grid=st.booleans(),
)
def test_kernel_exact_for_any_shape_ratio_prune(ot_rows, rows, n, ratio, prune, seed, grid):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, (rows, n), generator=g).float() * 0.1 if grid else torch.randn(rows, n, generator=g)
    k_minus, k_zero, _ = ot_counts(n, ratio, prune)
    codes, _, _ = ot_rows(w, k_minus, k_zero)
    assert torch.equal(codes, ot_codes_reference(w, ratio, prune)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_writes_the_weight_in_the_compute_dtype(ot_rows, dtype):
    w = torch.randn(6, 288, generator=torch.Generator().manual_seed(0))
    codes, scale, weight = ot_rows(w, *ot_counts(288, 0.3, 0.0)[:2], ot_offset(288, 0.3), out_dtype=dtype)
    assert weight.dtype == dtype
    want = dequantize(codes, scale, True, ot_offset(288, 0.3))
    # the same float32 product, rounded once to dtype: at most one unit in the last place apart
    torch.testing.assert_close(weight.float(), want, rtol=torch.finfo(dtype).eps, atol=0)
    half = w.to(dtype)  # a half-precision latent is selected exactly too
    assert torch.equal(ot_rows(half, 144, 0)[0], ot_codes_reference(half.float(), 0.5)[0])


def test_kernel_refuses_filters_wider_than_its_registers(ot_rows):
    from equalbits_cli.kernels.ot_triton import MAX_FILTER

    with pytest.raises(ValueError, match="wider"):
        ot_rows(torch.zeros(1, MAX_FILTER + 1), 1, 0)


def test_layer_trains_through_the_kernel_path_like_the_torch_path(ot_rows, monkeypatch):
    """The dispatch the layers use on CUDA, forced onto the interpreted kernel: same forward, same grads."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels need CUDA tensors
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).to(device)
    x = torch.randn(2, 8, 6, 6, device=device)
    results = []
    for use_kernel in (False, True):
        monkeypatch.setattr(quantize, "_use_triton", lambda w, k=use_kernel: k)
        layer = BinaryConv2d.from_float(conv, BinarizeConfig(ratio=0.3)).train()
        conv.weight.grad = None
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), conv.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    # scales summed in another order: float rounding, amplified a little by the square
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ratio,prune", GRID)
def test_syncfree_masks_are_the_reference(ratio, prune):
    w = _hard_weights(5, 97, seed=1)
    n_minus, n_zero, _ = ot_counts(97, ratio, prune)
    ref, _ = ot_codes_reference(w, ratio, prune)
    minus = _lowest_k_syncfree(w, n_minus)
    nonpos = _lowest_k_syncfree(w, n_minus + n_zero)
    assert torch.equal(1 - minus.to(torch.int8) - nonpos.to(torch.int8), ref)


@pytest.mark.parametrize("method", ["ot", "sign", "irnet"])
@pytest.mark.parametrize("ratio,prune", GRID)
def test_binary_weight_is_the_dequantized_codes(method, ratio, prune):
    w = _hard_weights(7, 45, seed=2)
    center = method == "ot"
    for dtype in (torch.float32, torch.bfloat16):
        got = binary_weight(w, ratio, prune, method, center=center, dtype=dtype)
        codes, scale = ot_codes(w, ratio, prune, method, center=center)
        want = dequantize(codes, scale, center)
        assert got.dtype == dtype
        big = want.abs() > 1e-6  # the constant row's scale is 0 up to rounding: its signs are noise
        assert torch.equal(torch.sign(got.float())[big], torch.sign(want)[big])
        torch.testing.assert_close(got.float(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_in_a_training_step_on_cuda():
    import timm

    from equalbits_cli import binarize_

    model = timm.create_model("resnet18", pretrained=False, num_classes=10).cuda()
    binarize_(model, BinarizeConfig(ratio=0.3, prune=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    model(x).sum().backward()  # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().sum()
        loss.backward()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
