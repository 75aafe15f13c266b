"""Binary layers: forward is scale * codes, gradients pass straight through, parameters are shared."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from equalbits_cli import BinarizeConfig, BinaryConv2d, BinaryLinear
from equalbits_cli.nn.layers import binarize_input


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize(("ratio", "center"), [(0.5, False), (0.5, True), (0.3, True)])
def test_conv_forward_uses_quantized_weight(groups, ratio, center):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=groups, bias=True)
    bconv = BinaryConv2d.from_float(conv, BinarizeConfig(ratio=ratio, center=center))
    assert bconv.weight is conv.weight and bconv.bias is conv.bias
    x = torch.randn(2, 8, 6, 6)
    codes, scale = bconv.quantize()
    c = codes.float().reshape(16, -1)
    if center:  # two levels per filter, averaging to zero over the filter
        c = c - c.mean(dim=1, keepdim=True)
        assert c.sum(dim=1).abs().max() < 1e-5
    weight = (c * scale[:, None]).reshape(codes.shape)
    want = nn.functional.conv2d(x, weight, conv.bias, padding=1, groups=groups)
    torch.testing.assert_close(bconv(x), want, rtol=1e-6, atol=1e-6)
    # the scale is the least-squares factor of those levels
    w = conv.weight.detach().reshape(16, -1)
    torch.testing.assert_close(scale, (w * c).sum(1) / (c * c).sum(1), rtol=1e-6, atol=1e-7)


def test_straight_through_gradient_reaches_latent():
    torch.manual_seed(0)
    lin = BinaryLinear.from_float(nn.Linear(6, 4), BinarizeConfig())
    x = torch.randn(3, 6)
    lin(x).sum().backward()
    # d/dW of sum(x W_q^T) is the same matrix whatever W_q is: sum over the batch of x.
    torch.testing.assert_close(lin.weight.grad, x.sum(0).expand(4, 6), rtol=1e-6, atol=1e-6)


def test_codes_follow_latent_updates():
    lin = BinaryLinear.from_float(nn.Linear(4, 1, bias=False), BinarizeConfig())
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert lin.quantize()[0].tolist() == [[-1, -1, 1, 1]]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
    assert lin.quantize()[0].tolist() == [[1, 1, -1, -1]]


def test_sign_activations():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = binarize_input(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    lin = BinaryLinear.from_float(nn.Linear(5, 2), BinarizeConfig(activations="sign", center=False))
    codes, scale = lin.quantize()
    torch.testing.assert_close(lin(x.detach()[None]), y.detach()[None] @ (codes.float() * scale[:, None]).T + lin.bias)


@pytest.mark.parametrize("method", ["ot", "sign", "irnet"])
def test_eval_follows_writes_through_data(method):
    """A write through .data leaves the version counter alone; evaluation must still see it (no stale codes)."""
    cfg = BinarizeConfig(method=method)
    lin = BinaryLinear.from_float(nn.Linear(8, 3), cfg).eval()
    x = torch.randn(2, 8)
    lin(x)
    new = torch.randn(3, 8)
    lin.weight.data.copy_(new)
    fresh = BinaryLinear.from_float(nn.Linear(8, 3), cfg).eval()
    fresh.weight.data.copy_(new)
    fresh.bias.data.copy_(lin.bias.data)
    torch.testing.assert_close(lin(x), fresh(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["ot", "sign", "irnet"])
def test_packed_model_survives_dtype_round_trip(tmp_path, method):
    import timm

    from equalbits_cli import binarize_, load_model, save_packed

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    binarize_(model, BinarizeConfig(method=method))
    path = save_packed(model.eval(), tmp_path / "m.packed.safetensors")
    loaded = load_model(path)
    x = torch.randn(1, 3, 32, 32)
    want = loaded(x)
    again = loaded.double().float()
    torch.testing.assert_close(again(x), want, rtol=0, atol=0)
