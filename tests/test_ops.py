"""The quantizer as a torch custom op: opcheck, and a binarized model under torch.compile."""

from __future__ import annotations

import pytest
import timm
import torch

from equalbits_cli import BinarizeConfig, binarize_
from equalbits_cli.quant.ops import binary_weight_op
from equalbits_cli.quant.quantize import binary_weight


@pytest.mark.parametrize(("method", "ratio", "prune", "center"), [("ot", 0.5, 0.0, False), ("ot", 0.3, 0.2, True),
                                                                 ("sign", 0.5, 0.0, False)])  # fmt: skip
def test_op_is_binary_weight_with_a_straight_through_gradient(method, ratio, prune, center):
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q = binary_weight_op(w, ratio, prune, method, center, torch.float32)
    assert torch.equal(q, binary_weight(w, ratio, prune, method, center=center))
    g = torch.randn_like(q)
    q.backward(g)
    assert torch.equal(w.grad, g)
    torch.library.opcheck(binary_weight_op, (w.detach().requires_grad_(), ratio, prune, method, center, torch.float32))


def test_compiled_binary_resnet_has_no_graph_break_and_matches_eager():
    """fullgraph=True fails on any graph break; the compiled step gives the eager loss and gradients."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    binarize_(model, BinarizeConfig(ratio=0.3, prune=0.1))
    model.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])

    def step(m):
        m.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    eager_loss, eager_grads = step(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, grads = step(compiled)
    assert len(grads) == len(eager_grads)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
