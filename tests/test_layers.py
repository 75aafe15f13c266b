"""Binary layers: forward is scale * codes, gradients pass straight through, parameters are shared."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from equalbits_cli import BinarizeConfig, BinaryConv2d, BinaryLinear
from equalbits_cli.layers import binarize_input


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_conv_forward_uses_quantized_weight(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=groups, bias=True)
    bconv = BinaryConv2d.from_float(conv, BinarizeConfig(ratio=0.5))
    assert bconv.weight is conv.weight and bconv.bias is conv.bias
    x = torch.randn(2, 8, 6, 6)
    codes, scale = bconv.quantize()
    want = nn.functional.conv2d(x, codes.float() * scale.view(-1, 1, 1, 1), conv.bias, padding=1, groups=groups)
    torch.testing.assert_close(bconv(x), want, rtol=0, atol=0)


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
    lin = BinaryLinear.from_float(nn.Linear(5, 2), BinarizeConfig(activations="sign"))
    codes, scale = lin.quantize()
    torch.testing.assert_close(lin(x.detach()[None]), y.detach()[None] @ (codes.float() * scale[:, None]).T + lin.bias)


def test_pin_codes_until_weight_changes():
    lin = BinaryLinear.from_float(nn.Linear(4, 2), BinarizeConfig())
    codes = torch.tensor([[1, 1, -1, -1], [1, -1, 1, -1]], dtype=torch.int8)
    lin.pin_codes(codes, torch.ones(2))
    assert torch.equal(lin.quantize()[0], codes)
    with torch.no_grad():
        lin.weight.add_(0.0)  # any in-place change invalidates the pin
    assert lin.quantize()[0].shape == codes.shape
    with pytest.raises(ValueError):
        lin.pin_codes(codes[:1], torch.ones(1))
