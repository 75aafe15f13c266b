"""StepWeights: how a model's binary layers are grouped for their training weights, and when that
grouping is worked out again. The weights themselves are tested against the layers' own in
test_kernels.py (grouped Triton launches, numpy rounds)."""

from __future__ import annotations

import pytest
import torch

from equalbits_cli import BinarizeConfig, binarize_
from equalbits_cli.nn.step_weights import StepWeights
from equalbits_cli.quant import quantize
from equalbits_cli.quant.quantize import binary_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on CUDA, interpreted on the CPU


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 10),
    )
    binarize_(net, BinarizeConfig(ratio=0.3, prune=0.1), filter_fn=lambda m, fqn: True)  # all three
    return net.train()


@pytest.fixture
def path_calls(monkeypatch):
    """How often each layer's path was decided: once per regrouping."""
    calls = []
    original = StepWeights._path

    def counted(layer):
        calls.append(layer)
        return original(layer)

    monkeypatch.setattr(StepWeights, "_path", staticmethod(counted))
    return calls


def _step(net, opt, x):
    opt.zero_grad()
    net(x).square().sum().backward()
    opt.step()


def test_grouping_is_reused_while_the_latents_keep_their_storage(path_calls):
    net = _net()
    group = net[1]._step_weights
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 3, 4, 4)
    _step(net, opt, x)
    first = len(path_calls)
    assert first >= len(group.layers)  # worked out layer by layer once
    for _ in range(3):  # every latent changed in place: rebuilt, in the same groups
        _step(net, opt, x)
    assert len(path_calls) == first + 3  # the first layer's own "can it be grouped" check, per step
    assert group.launches == 4
    net[1].weight.data = net[1].weight.data.clone()  # new storage behind the autograd's back
    net(x)
    assert len(path_calls) > first + 3 + 1  # worked out again
    torch.testing.assert_close(group.entries[1].weight, binary_weight(net[1].weight, 0.3, 0.1, center=True))


def test_a_latent_swapped_for_another_layout_leaves_the_triton_group(monkeypatch):
    """A latent swapped (through .data) for a layout the kernels do not read leaves the Triton group:
    on the CPU it is regrouped into the numpy round, on CUDA the layer builds its own weight; either way
    it is exactly the layer's own."""
    pytest.importorskip("triton")
    monkeypatch.setattr(quantize, "use_triton", lambda *args: True)  # interpreted on the CPU
    net = _net().to(DEVICE)
    group = net[3]._step_weights
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    net(x)
    assert [g.key[4] for g in group.groupings[torch.float32].groups] == ["triton"]
    net[3].weight.data = net[3].weight.data.t().contiguous().t()  # transposed storage: not contiguous
    assert not net[3].weight.is_contiguous()
    out = net(x)
    want = binary_weight(net[3].weight, 0.3, 0.1, center=True)
    if DEVICE == "cpu":
        paths = {g.key[4]: g.members for g in group.groupings[torch.float32].groups}
        assert paths == {"numpy": (2,)}  # the others were fresh: only the swapped one was rebuilt
        torch.testing.assert_close(group.entries[2].weight, want)
    else:
        assert group.weight(net[3], torch.float32) is None  # no grouped path takes it on CUDA
    hidden = torch.flatten(net[1](net[0](x)), 1)
    torch.testing.assert_close(out, torch.nn.functional.linear(hidden, want, net[3].bias), rtol=1e-5, atol=1e-5)


def test_frozen_layers_keep_their_weights_and_the_rest_regroup_once(path_calls):
    net = _net()
    net[0].weight.requires_grad_(False)
    group = net[1]._step_weights
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 3, 4, 4)
    _step(net, opt, x)
    frozen = group.entries[0].weight
    _step(net, opt, x)  # only the trained layers are stale: a new grouping for them, made once
    calls = len(path_calls)
    _step(net, opt, x)
    assert group.entries[0].weight is frozen
    assert len(path_calls) == calls + 1
    assert len(group.groupings[torch.float32].stale) == 2


def _grads(net, x, grouped: bool, passes: int = 1, autocast: bool = False) -> list:
    if not grouped:
        for layer in net[1]._step_weights.layers:
            layer._step_weights = None
    for _ in range(passes):  # several backward passes through the same weights: gradient accumulation
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net[3](torch.flatten(net[1](net[0](x)), 1))  # net[2] is Flatten
        out.float().square().sum().backward()
    return [p.grad for p in net.parameters()]


@pytest.mark.parametrize("autocast", [False, True])
def test_tied_weights_pass_gradients_straight_through_like_a_node_per_layer(autocast):
    """All binary layers' weights tied to their latents by one autograd node: the same gradients as a
    straight-through node per layer, in the latent's dtype (under bf16 autocast too), accumulated over
    backward passes through the same weights."""
    x = torch.randn(2, 3, 4, 4)
    grouped = _grads(_net(), x, grouped=True, passes=2, autocast=autocast)
    alone = _grads(_net(), x, grouped=False, passes=2, autocast=autocast)
    for got, want in zip(grouped, alone):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    once = _grads(_net(), x, grouped=True, passes=1, autocast=autocast)
    torch.testing.assert_close(grouped[0], 2 * once[0], rtol=1e-5, atol=1e-6)


def test_a_layer_left_out_of_the_forward_gets_no_gradient():
    net = _net()
    group = net[1]._step_weights
    x = torch.randn(2, 3, 4, 4)
    net[1](net[0](x)).square().sum().backward()  # the Linear is not run
    assert net[0].weight.grad is not None and net[1].weight.grad is not None
    assert net[3].weight.grad is None  # as with a node of its own: None, not zeros
    assert set(group.ties[torch.float32]) == {0, 1, 2}  # all three were tied, the Linear left unused


def test_a_distributed_run_keeps_a_node_per_layer(tmp_path):
    """Under torch.distributed, each layer keeps its own straight-through node, so that DDP can reduce
    gradients while the backward goes on; the gradients are the same."""
    import torch.distributed as dist

    x = torch.randn(2, 3, 4, 4)
    want = _grads(_net(), x, grouped=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        net = _net()
        got = _grads(net, x, grouped=True)
        assert net[1]._step_weights.ties[torch.float32] == {}
        assert net[1]._step_weights.launches == 1  # still built together
    finally:
        dist.destroy_process_group()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_a_model_copied_after_a_step_copies_no_stored_weights():
    """copy.deepcopy of a model in training (EMA helpers do it every step) works with weights tied into
    the graph; the copy builds its own and trains like the original."""
    import copy

    net = _net()
    x = torch.randn(2, 3, 4, 4)
    net(x).square().sum().backward()
    assert net[1]._step_weights.ties  # the tied weights exist now
    twin = copy.deepcopy(net)
    group = twin[1]._step_weights
    assert group is not net[1]._step_weights and group.layers[1] is twin[1]
    assert all(e is None for e in group.entries) and not group.ties
    for p in net.parameters():
        p.grad = None
    net(x).square().sum().backward()
    twin(x).square().sum().backward()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad)
    assert net[1]._step_weights.entries[1] is not None  # the original kept its own


@pytest.mark.parametrize("reentrant", [False, True])
def test_tied_weights_under_gradient_checkpointing(reentrant):
    """A checkpointed layer recomputes its forward in the backward (reentrant: a backward of its own);
    the tied node still passes each gradient once, as nodes per layer do."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 3, 4, 4)
    grads = []
    for grouped in (True, False):
        net = _net()
        if not grouped:
            for layer in net[1]._step_weights.layers:
                layer._step_weights = None
        hidden = checkpoint(net[1], net[0](x), use_reentrant=reentrant)
        net[3](torch.flatten(hidden, 1)).square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_stale_member_gets_no_tied_weight():
    """tied() checks that the stored weight is still built from the latent as it is now: a latent
    changed in place after the build gets None (its layer builds its own node), not its old weight."""
    net = _net()
    group = net[1]._step_weights
    if group._path(net[1]) is None:
        pytest.skip("no grouped path on this device")
    assert group.weight(net[1], torch.float32) is not None
    assert group.tied(net[1], torch.float32) is not None
    with torch.no_grad():
        net[1].weight.add_(1.0)  # bumps the version counter
    assert group.tied(net[1], torch.float32) is None
    assert group.tied(net[0], torch.float32) is not None  # the others are still fresh


@pytest.mark.parametrize("fused", [False, True], ids=["per-parameter", "fused"])
def test_weights_are_rebuilt_after_every_optimizer_step(fused):
    """torch's fused AdamW writes the parameters without bumping their version counters (on the CPU and
    on CUDA). The stored training weights must still follow every step: after each one, the layer
    computes with what its latent holds now, as a fresh copy of the model does."""
    import copy

    net = _net()
    params = [p for p in net.parameters() if p.device.type == "cpu"]
    opt = torch.optim.AdamW(params, lr=0.05, fused=fused)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        before = net(x).detach()
        versions = [p._version for p in params]
        _step(net, opt, x)
        if fused:
            assert [p._version for p in params] == versions, "fused AdamW now bumps versions: the hook may go"
        after, fresh = net(x).detach(), copy.deepcopy(net)(x).detach()
        assert not torch.equal(after, before)
        torch.testing.assert_close(after, fresh, rtol=0, atol=0)
