"""Binarized Conv2d and Linear layers.

Each layer keeps its full-precision latent ``weight`` under the original name (a timm state dict loads
unchanged) and computes ``scale * codes`` from it in the forward pass. The gradient passes straight
through the quantizer to the latent weight (STE, Bengio et al. 2013; Courbariaux et al. 2016).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BinarizeConfig
from ..quant.ops import binary_weight_op
from ..quant.quantize import OTCache, binary_weight, dequantize, ot_codes
from .step_weights import StepWeights

__all__ = ["BinaryConv2d", "BinaryLinear", "BinaryLayer", "binarize_input", "calibrate_thresholds", "conv_kwargs"]


def conv_kwargs(conv: nn.Conv2d) -> dict:
    """Constructor arguments that rebuild ``conv``'s geometry (weights not included)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _training_weight(layer: BinaryLayer, dtype: torch.dtype, grad: bool) -> torch.Tensor:
    """The weight ``layer`` trains with, in ``dtype``, attached to the latent's gradient where ``grad``:
    from the model's :class:`StepWeights` (all binary layers in a few grouped launches on CUDA, one round
    of threads on the CPU) where it has one, else built for this layer alone."""
    group = layer._step_weights
    q = group.weight(layer, dtype) if group is not None else None
    if q is not None and grad:
        tied = group.tied(layer, dtype)  # type: ignore[union-attr]
        if tied is not None:
            return tied
    if q is None:
        cfg = layer.config
        q = binary_weight(
            layer.weight, cfg.ratio, cfg.prune, cfg.method, center=bool(cfg.center), cache=layer._ot_cache, dtype=dtype
        )
    return _StraightThrough.apply(layer.weight, q) if grad else q


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight (possibly in the compute dtype). Backward: the incoming gradient,
    unchanged, to the latent (in the latent's dtype)."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.latent_dtype = latent.dtype
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad.to(ctx.latent_dtype), None


class _SignSTE(torch.autograd.Function):
    """Forward: sign(x) with sign(0) = +1. Backward: grad * 1{|x| <= 1} (hardtanh STE, BNN)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def binarize_input(x: torch.Tensor) -> torch.Tensor:
    """Binarize activations: forward ``sign(x)`` (0 -> +1), backward clipped straight-through."""
    return _SignSTE.apply(x)


# Where an activation threshold starts before calibration: just under 0, not on it. A 1W/1A layer's
# inputs are often exactly 0 (sums of +-1 products that cancel, a hard-swish or ReLU below its knee),
# and a threshold on an attainable value lets float rounding decide those bits: onnxruntime, which
# sums in another order and folds BatchNorm, turns such zeros into +-1e-7 and flips them. Just under 0,
# an exact 0 is +1 in every runtime, as sign(0) = +1 always made it.
UNCALIBRATED_THRESHOLD = -1e-3


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    """The dtype a layer's convolution runs in: autocast's where it is on, else the weight's."""
    device = w.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w.dtype


def thresholds_for(threshold: torch.Tensor, x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Per-channel activation thresholds shaped to broadcast over a layer's input ``x``: the channel axis
    is 1 for a convolution, the last one for a linear layer (on 2-D or 3-D input)."""
    shape = (1, -1) + (1,) * (x.dim() - 2) if conv else (-1,)
    return threshold.view(shape).to(x.dtype)


def uncalibrated_thresholds(channels: int, device=None) -> nn.Parameter:
    """Activation thresholds of a layer that was never calibrated (:data:`UNCALIBRATED_THRESHOLD`)."""
    return nn.Parameter(torch.full((channels,), UNCALIBRATED_THRESHOLD, device=device))


class BinaryLayer:
    """Mixin with the quantizer state shared by :class:`BinaryConv2d` and :class:`BinaryLinear`."""

    weight: nn.Parameter
    config: BinarizeConfig

    def _init_binary(self, config: BinarizeConfig, in_features: int, device=None) -> None:
        self.config = config
        if config.activations == "sign":
            # Per-input-channel threshold of the activation sign (ReActNet's RSign, Liu et al. 2020):
            # b = sign(x - t). After a ReLU the input is never negative, so t = 0 would give a constant;
            # calibrate_thresholds() starts t at each channel's median (equal bits for activations).
            self.act_threshold = uncalibrated_thresholds(in_features, device)
        else:
            self.register_parameter("act_threshold", None)
        self._ot_cache = OTCache()  # CPU: numpy buffers and last thresholds, kept between calls: less work
        self._step_weights: StepWeights | None = None  # set by binarize_: the model's grouped weights

    def _forget(self, buffers: bool = False) -> None:
        """Drop the stored training weights; with ``buffers``, the CPU selection's buffers too (they only
        make a call cheaper, never different: they outlive a switch of mode or a load, so that the
        codes of a validation start from the last training step's thresholds)."""
        cache = getattr(self, "_ot_cache", None)
        if cache is not None and buffers:
            cache.clear()
        group = getattr(self, "_step_weights", None)
        if group is not None:
            group.clear()

    def train(self, mode: bool = True):  # type: ignore[override]
        self._forget()
        return super().train(mode)  # type: ignore[misc]

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self._forget(buffers=True)
        return super()._apply(fn, recurse)  # type: ignore[misc]

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        self._forget()
        return super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]

    def quantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scale)`` of the current latent weight (see :func:`equalbits_cli.quant.quantize.ot_codes`).
        Evaluation and export compute them once (:func:`equalbits_cli.nn.packed.float_model`, ``pack_model``)."""
        cfg = self.config
        return ot_codes(self.weight.detach(), cfg.ratio, cfg.prune, cfg.method, cache=self._ot_cache, center=cfg.center)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, ``scale * levels`` (no gradient attached)."""
        codes, scale = self.quantize()
        return dequantize(codes, scale.to(self.weight.dtype), bool(self.config.center))

    def _effective_weight(self) -> torch.Tensor:
        # Runs once per binary layer per forward: a launch-bound GPU step feels every attribute lookup.
        w = self.weight
        grad = w.requires_grad and torch.is_grad_enabled()
        if torch.compiler.is_compiling():
            return self._compiled_weight()
        if self.training:
            # Built once per step, in the dtype the convolution runs in, without materializing codes: what a
            # training step needs and nothing more.
            return _training_weight(self, _compute_dtype(w), grad)
        q = self.quantized_weight()
        return _StraightThrough.apply(w, q) if grad else q

    def _compiled_weight(self) -> torch.Tensor:
        """The weight under ``torch.compile``: the quantizer as one custom op (no graph break); the
        Python-side caches and groups are eager-mode only."""
        cfg = self.config
        w = self.weight
        return binary_weight_op(w, cfg.ratio, cfg.prune, cfg.method, bool(cfg.center), _compute_dtype(w))

    @property
    def binary_inputs(self) -> bool:
        """Whether the layer binarizes its input (1W/1A and not kept real by the input policy)."""
        return self.act_threshold is not None

    def keep_real_inputs(self) -> None:
        """Let the layer compute on its real-valued input although the model has 1-bit activations
        (see :func:`equalbits_cli.model.policy.plan_inputs`)."""
        self.register_parameter("act_threshold", None)

    def _maybe_binarize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_threshold is None:
            return x
        return binarize_input(x - self.threshold_for(x))

    def threshold_for(self, x: torch.Tensor) -> torch.Tensor:
        """The activation thresholds shaped to broadcast over the layer's input ``x``."""
        return thresholds_for(self.act_threshold, x, isinstance(self, nn.Conv2d))

    def binary_extra_repr(self) -> str:
        c = self.config
        return f"method={c.method}, ratio={c.ratio}, prune={c.prune}, activations={c.activations}, center={c.center}"


class BinaryConv2d(BinaryLayer, nn.Conv2d):
    """Conv2d with binary (or ternary) weights ``scale * codes``; grouped and depthwise included.

    Example:
        >>> conv = nn.Conv2d(4, 8, 3, padding=1)
        >>> bconv = BinaryConv2d.from_float(conv, BinarizeConfig())
        >>> bconv(torch.randn(2, 4, 5, 5)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, *args, config: BinarizeConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_binary(config or BinarizeConfig(), self.in_channels, self.weight.device)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: BinarizeConfig) -> BinaryConv2d:
        """A binarized layer that shares ``conv``'s parameters (no copy)."""
        new = cls(**conv_kwargs(conv), device="meta", config=config)
        new.weight = conv.weight
        new.bias = conv.bias
        if new.act_threshold is not None:
            new.act_threshold = uncalibrated_thresholds(new.in_channels, conv.weight.device)
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._maybe_binarize_input(x), self._effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.binary_extra_repr()


class BinaryLinear(BinaryLayer, nn.Linear):
    """Linear with binary (or ternary) weights ``scale * codes``.

    Example:
        >>> lin = BinaryLinear.from_float(nn.Linear(6, 3), BinarizeConfig(ratio=0.5))
        >>> lin(torch.randn(2, 6)).shape
        torch.Size([2, 3])
    """

    def __init__(self, *args, config: BinarizeConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_binary(config or BinarizeConfig(), self.in_features, self.weight.device)

    @classmethod
    def from_float(cls, linear: nn.Linear, config: BinarizeConfig) -> BinaryLinear:
        """A binarized layer that shares ``linear``'s parameters (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", config=config)
        new.weight = linear.weight
        new.bias = linear.bias
        if new.act_threshold is not None:
            new.act_threshold = uncalibrated_thresholds(new.in_features, linear.weight.device)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._maybe_binarize_input(x), self._effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.binary_extra_repr()


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batches, device: torch.device | None = None) -> int:
    """Start every activation threshold at its channel's median input over ``batches`` (an iterable of
    image tensors), so that each channel's activation bits are balanced: half +1, half -1, the most
    information a bit can carry. Returns the number of layers calibrated.

    Each layer's threshold is set just before the layer runs (a pre-hook), to the running mean of the
    per-batch medians over the batch and spatial positions, so deeper layers are calibrated on the
    inputs that the already calibrated layers before them produce. BatchNorm uses batch statistics
    meanwhile (train mode, no gradients), as the BatchNorm re-estimation that should follow will.
    """
    layers = [m for m in model.modules() if isinstance(m, BinaryLayer) and m.act_threshold is not None]
    if not layers:
        return 0
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(module, args):
        x = args[0].detach().float()
        # channels: axis 1 of a convolution's input, the last axis of a linear layer's (2-D or tokens)
        flat = (
            x.transpose(0, 1).reshape(x.shape[1], -1) if isinstance(module, nn.Conv2d) else x.reshape(-1, x.shape[-1]).T
        )
        key = id(module)
        med = flat.median(dim=1).values
        # The threshold goes half-way from the median to the next larger value, never onto a value:
        # after a ReLU, often over half of a channel is exactly 0 and sign(x - 0) would be +1
        # everywhere; and the inputs of a 1W/1A layer take few distinct values (sums of +-1 products),
        # so a threshold on one of them would let float rounding (another runtime, BatchNorm folded)
        # decide the bit of every input equal to it.
        # It also keeps a margin of 1e-3 standard deviations above the median: where the next value is
        # itself rounding noise (tiny positives beside a ReLU's exact zeros), the midpoint would be too.
        above = torch.where(flat > med[:, None], flat, torch.full_like(flat, float("inf"))).min(dim=1).values
        margin = 1e-3 * flat.std(dim=1).nan_to_num(0.0)
        med = torch.where(torch.isfinite(above), torch.maximum((med + above) / 2, med + margin), med)
        sums[key] = sums.get(key, 0) + med
        counts[key] = counts.get(key, 0) + 1
        module.act_threshold.copy_((sums[key] / counts[key]).to(module.act_threshold.dtype))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = model.training
    model.train()
    try:
        for images in batches:
            model(images.to(device) if device is not None else images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return len(sums)
