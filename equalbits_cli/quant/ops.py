"""The quantizer as a torch custom op, so ``torch.compile`` traces a binary model without a graph break
per layer.

``equalbits::binary_weight`` wraps :func:`equalbits_cli.quant.quantize.binary_weight` (the CPU
selection, the Triton kernel on CUDA): opaque to the compiler, described to it by a fake (meta)
implementation, and differentiated straight through (STE, Bengio et al. 2013): the gradient of the
quantized weight reaches the latent weight unchanged, in the latent's dtype.
"""

from __future__ import annotations

import torch

from .quantize import binary_weight

__all__ = ["binary_weight_op"]


@torch.library.custom_op("equalbits::binary_weight", mutates_args=())
def binary_weight_op(
    weight: torch.Tensor, ratio: float, prune: float, method: str, center: bool, dtype: torch.dtype
) -> torch.Tensor:
    """``scale * levels`` of ``weight`` in ``dtype`` (:func:`binary_weight`), with a straight-through
    gradient to ``weight``.

    Example:
        >>> w = torch.tensor([[0.3, -0.1, 0.2, -0.4]], requires_grad=True)
        >>> q = binary_weight_op(w, 0.5, 0.0, "ot", False, torch.float32)
        >>> q.tolist()
        [[0.25, -0.25, 0.25, -0.25]]
        >>> q.sum().backward(); w.grad.tolist()
        [[1.0, 1.0, 1.0, 1.0]]
    """
    return binary_weight(weight, ratio, prune, method, center=center, dtype=dtype)


@binary_weight_op.register_fake
def _(weight: torch.Tensor, ratio: float, prune: float, method: str, center: bool, dtype: torch.dtype):
    return weight.new_empty(weight.shape, dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    ctx.latent_dtype = inputs[0].dtype


def _backward(ctx, grad: torch.Tensor):
    return grad.to(ctx.latent_dtype), None, None, None, None, None


binary_weight_op.register_autograd(_backward, setup_context=_setup_context)
