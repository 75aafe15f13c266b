"""The Triton quantizer kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1), against the
sort reference and the torch quantizers; the grouped launches and the model's StepWeights; the sync-free
torch path; the training weight built without codes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from equalbits_cli.config import BinarizeConfig
from equalbits_cli.nn.layers import BinaryConv2d
from equalbits_cli.quant import quantize
from equalbits_cli.quant.quantize import (
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
    from equalbits_cli.quant.kernels import ot_triton

    if not torch.cuda.is_available():
        assert type(ot_triton._binary_rows_kernel).__name__ == "InterpretedFunction"
        return ot_triton.ot_rows
    return _on_cuda(ot_triton.ot_rows)


def _to(x, device: str):
    """``x`` with every tensor in it (nested in lists and tuples too) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return type(x)(_to(v, device) for v in x) if isinstance(x, (list, tuple)) else x


def _on_cuda(fn):
    """``fn`` run on CUDA copies of its tensor arguments, its tensor results brought back."""

    def run(*args, **kwargs):
        return _to(fn(*_to(args, "cuda"), **kwargs), "cpu")

    return run


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on CUDA, interpreted on the CPU


@pytest.fixture(scope="module")
def kernels():
    """``(binary_rows, binary_rows_grouped)``, interpreted on the CPU, compiled on CUDA."""
    pytest.importorskip("triton")
    from equalbits_cli.quant.kernels import ot_triton

    if not torch.cuda.is_available():
        return ot_triton.binary_rows, ot_triton.binary_rows_grouped
    return _on_cuda(ot_triton.binary_rows), lambda *a, **k: (_on_cuda(ot_triton.binary_rows_grouped)(*a, **k)[0], None)


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
        want = dequantize(ref_codes, ref_scale, center)
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
    want = dequantize(codes, scale, True)
    # the same float32 product, rounded once to dtype: at most one unit in the last place apart
    torch.testing.assert_close(weight.float(), want, rtol=torch.finfo(dtype).eps, atol=0)
    half = w.to(dtype)  # a half-precision latent is selected exactly too
    assert torch.equal(ot_rows(half, 144, 0)[0], ot_codes_reference(half.float(), 0.5)[0])


@pytest.mark.parametrize("method", ["sign", "irnet"])
@pytest.mark.parametrize("n", [1, 2, 37, 576])
def test_kernel_sign_and_irnet_are_the_torch_quantizers(kernels, method, n):
    binary_rows, _ = kernels
    w = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    w[0, : n // 2] = -0.0  # sign(-0.0) = +1, as torch's w < 0 has it
    for center in (False, True):
        codes, scale, weight = binary_rows(w, method, center=center, out_dtype=torch.float32)
        ref_codes, ref_scale = ot_codes(w, method=method, center=center)
        assert torch.equal(codes, ref_codes)
        torch.testing.assert_close(scale, ref_scale, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(weight, dequantize(ref_codes, ref_scale, center), rtol=2e-5, atol=1e-7)


def _mixed_weights(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4, 3, 3), (16, 8, 1, 1), (3, 300), (5, 9), (4, 1030), (6, 4, 3, 3)]
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("method", ["ot", "sign", "irnet"])
@pytest.mark.parametrize("ratio,prune", [(0.5, 0.0), (0.3, 0.2)])
def test_grouped_launches_give_each_layers_own_weight(kernels, method, ratio, prune):
    """Layers of mixed widths and counts in one call: each gets exactly what it would get alone."""
    binary_rows, grouped = kernels
    ws = _mixed_weights(3)
    flat = [w.view(w.shape[0], -1) for w in ws]
    specs = []
    for w in flat:
        k_minus, k_zero, _ = ot_counts(w.shape[1], ratio, prune)
        specs.append((k_minus, k_zero, ot_offset(w.shape[1], ratio, prune)) if method == "ot" else (0, 0, 0.0))
    for dtype in (torch.float32, torch.float16):
        outs, _ = grouped(flat, specs, method, center=True, out_dtype=dtype)
        assert len(outs) == len(ws)
        for w, (k_minus, k_zero, mu), q in zip(flat, specs, outs):
            alone = binary_rows(w, method, k_minus, k_zero, mu, center=True, out_dtype=dtype)[2]
            assert q.dtype == dtype and q.shape == w.shape
            assert torch.equal(q, alone)
            want = binary_weight(w, ratio, prune, method, center=True)
            torch.testing.assert_close(q.float(), want, rtol=2e-5 if dtype == torch.float32 else 1e-3, atol=1e-6)


def test_grouped_plan_is_reused_until_a_weight_moves():
    pytest.importorskip("triton")
    from equalbits_cli.quant.kernels.ot_triton import binary_rows_grouped

    flat = [w.view(w.shape[0], -1).to(DEVICE) for w in _mixed_weights(4)]
    specs = [(*ot_counts(w.shape[1])[:2], 0.0) for w in flat]
    _, plan = binary_rows_grouped(flat, specs)
    assert len(plan.launches) == 4  # widths 36, 8, 300, 9, 1030: blocks 64, 16, 512, 2048
    assert binary_rows_grouped(flat, specs, plan=plan)[1] is plan
    moved = [w.clone() for w in flat]  # new storage: the tables must be rebuilt
    outs, plan2 = binary_rows_grouped(moved, specs, plan=plan)
    assert plan2 is not plan
    assert all(torch.equal(a, b) for a, b in zip(outs, binary_rows_grouped(flat, specs, plan=plan)[0]))
    with pytest.raises(ValueError, match="contiguous"):
        binary_rows_grouped([torch.randn(4, 6).T], [(1, 0, 0.0)])
    with pytest.raises(ValueError, match="one dtype"):
        binary_rows_grouped([torch.randn(4, 6), torch.randn(4, 6).double()], [(1, 0, 0.0)] * 2)
    with pytest.raises(ValueError, match="wider"):
        binary_rows_grouped([torch.randn(1, 16385)], [(1, 0, 0.0)])


@pytest.mark.parametrize("method", ["ot", "sign"])
def test_grouped_channels_last_weights_keep_their_layout_and_ties(method):
    """A channels-last latent is read and written in its own layout, its ties still broken by the
    logical index: the same numbers as the contiguous latent gives."""
    pytest.importorskip("triton")
    from equalbits_cli.quant.kernels.ot_triton import binary_rows_grouped

    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 5, 3, 3, generator=g)
    w[:, :, :, 0] = w[:, :1, :1, 0]  # ties across channels and positions
    w = w.to(DEVICE)
    other = torch.randn(4, 7, generator=g).to(DEVICE)
    cl = w.contiguous(memory_format=torch.channels_last)
    specs = [(*ot_counts(45, 0.3, 0.1)[:2], ot_offset(45, 0.3, 0.1)), (*ot_counts(7)[:2], 0.0)]
    (got, got_other), plan = binary_rows_grouped([cl, other], specs, method, center=True)
    (want, want_other), _ = binary_rows_grouped([w, other], specs, method, center=True)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert torch.equal(got, want) and torch.equal(got_other, want_other)
    assert len(plan.launches) == 2  # a channels-last member gets a launch of its own
    if method == "ot":
        codes, _ = ot_codes_reference(w.cpu(), 0.3, 0.1)
        assert torch.equal(torch.sign(got.cpu()), codes.float())


def _tiny_net() -> torch.nn.Module:
    from equalbits_cli import binarize_

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 1),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 16, 10),
    )
    binarize_(net, BinarizeConfig(ratio=0.3, prune=0.1), filter_fn=lambda m, fqn: fqn != "0")
    return net


@pytest.mark.parametrize("path", ["triton", "numpy"])
def test_step_weights_train_like_layer_by_layer(monkeypatch, path):
    """A model's StepWeights (grouped Triton launches, interpreted on the CPU; or the CPU's numpy
    selection in one round of threads): the same forward and gradients as each layer on its own;
    weights reused while the latents stay, rebuilt after an optimizer step."""
    pytest.importorskip("triton")
    from equalbits_cli.nn import step_weights

    if path == "numpy" and DEVICE != "cpu":
        pytest.skip("the numpy path is the CPU's")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = []
    for grouped in (False, True):
        monkeypatch.setattr(quantize, "use_triton", lambda *args: path == "triton")
        net = _tiny_net().to(DEVICE).train()
        group = net[2]._step_weights
        assert isinstance(group, step_weights.StepWeights) and len(group.layers) == 3
        if not grouped:
            for layer in group.layers:
                layer._step_weights = None
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        outs = []
        for _ in range(2):
            opt.zero_grad()
            out = net(x)
            out.square().sum().backward()
            outs.append((out.detach(), net[2].weight.grad.clone()))
            opt.step()
        results.append(outs)
        per_build = 3 if path == "triton" else 1  # widths 72, 16, 256: a launch per width class; one round
        assert group.launches == (2 * per_build if grouped else 0)
        if grouped:
            with torch.no_grad():
                net(x)  # after the step: rebuilt
                net(x)  # latents unchanged since: the stored weights serve
            assert group.launches == 3 * per_build
            stored = group.weight(net[4], torch.float32)
            alone = binary_weight(net[4].weight, 0.3, 0.1, center=True)
            torch.testing.assert_close(stored, alone, rtol=1e-6, atol=1e-7)
            assert torch.equal(torch.sign(stored), torch.sign(alone))
    for (a_out, a_grad), (b_out, b_grad) in zip(*results):
        torch.testing.assert_close(b_out, a_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b_grad, a_grad, rtol=1e-4, atol=1e-5)


def test_step_weights_follow_moves_modes_and_loads(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(quantize, "use_triton", lambda *args: True)
    net = _tiny_net().to(DEVICE).train()
    group = net[2]._step_weights
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    net(x)
    assert all(e is not None for e in group.entries)
    net.double()  # a move: stored weights are dropped, and rebuilt in the new dtype
    assert all(e is None for e in group.entries)
    assert net(x.double()).dtype == torch.float64
    with torch.no_grad():
        net[2].weight.mul_(-1)  # an in-place write (as optimizers do) bumps the version: rebuilt
    want = binary_weight(net[2].weight, 0.3, 0.1, center=True)
    net(x.double())
    torch.testing.assert_close(group.entries[0].weight, want, rtol=1e-12, atol=1e-14)
    net.load_state_dict(_tiny_net().double().state_dict())
    assert all(e is None for e in group.entries)
    net.to(memory_format=torch.channels_last)  # channels-last latents stay in the grouped launches
    net(x.double())
    assert net[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert group.entries[0].weight.is_contiguous(memory_format=torch.channels_last)
    net.train()
    assert all(e is None for e in group.entries)
    net.eval()
    net(x.double())  # eval mode: the layers' own quantized weights, nothing stored
    assert all(e is None for e in group.entries)


def test_kernel_refuses_filters_wider_than_its_registers(ot_rows):
    from equalbits_cli.quant.kernels.ot_triton import MAX_FILTER

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
        monkeypatch.setattr(quantize, "use_triton", lambda *args, k=use_kernel: k)
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
    with torch.autocast("cuda", dtype=torch.float16):
        model(x).float().sum().backward()  # warm-up: kernels compiled, launch tables built
    opt.step()
    torch.cuda.synchronize()
    group = model.layer1[0].conv1._step_weights
    assert group.launches > 0  # the grouped launches served the step
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().sum()
        loss.backward()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ((built,),) = [g.groups for g in group.groupings.values()]  # one dtype, one group of layers
    plan = built.plan
    assert group.launches == 2 * len(plan.launches)  # warm-up and the step: one grouped build each
