"""The packed inference form of a binarized layer: bit planes, per-filter scales, centring and activation
thresholds as buffers, and a forward that unpacks them.

Every export starts from it (:func:`pack_model`): the ONNX graph gets its unpack subgraph by tracing
:meth:`PackedBinary.weight` with torch's exporter, and float exports materialize the same weight
(:func:`float_model`). Decoding follows docs/format.md: codes flattened in C order, 8 per byte, least
significant bit first; sign bit 1 = code -1, nonzero bit 1 = code != 0.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.planes import pack_codes
from ..quant.quantize import code_offsets
from .layers import BinaryLayer, conv_kwargs, thresholds_for

__all__ = ["PackedBinary", "float_model", "pack_model"]


class PackedBinary(nn.Module):
    """A binarized Conv2d or Linear in its packed form: ``y = op(sign(x - t)?, scale * levels) + bias``.

    ``levels`` are the codes, or with centring ``codes - mu * |codes|`` (``mu`` per filter, see
    :func:`equalbits_cli.quant.quantize.code_offsets`). Buffers: ``sign`` and ``nonzero`` (uint8 bit planes,
    ``nonzero`` only for pruned layers), ``scale`` (float32 per output channel), ``mu`` (float32 per
    output channel, only where a filter's levels are centred away from 0), ``bias`` and ``act_threshold``
    (1W/1A layers) where the layer has them.

    Example:
        >>> from equalbits_cli import BinarizeConfig, BinaryConv2d
        >>> layer = BinaryConv2d(4, 8, 3, config=BinarizeConfig()).eval()
        >>> packed = PackedBinary.from_layer(layer)
        >>> torch.equal(packed.weight(), layer.quantized_weight())
        True
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        *,
        center: bool,
        bias: torch.Tensor | None = None,
        act_threshold: torch.Tensor | None = None,
        conv: dict | None = None,
    ) -> None:
        super().__init__()
        sign, nonzero = pack_codes(codes.cpu().numpy())
        self.shape = tuple(codes.shape)
        self.count = codes.numel()
        self.conv = conv
        self.register_buffer("sign", torch.from_numpy(sign))
        self.register_buffer("nonzero", None if nonzero is None else torch.from_numpy(nonzero))
        self.register_buffer("scale", scale.detach().float().cpu().clone())
        mu = _offsets(codes, center)
        self.register_buffer("mu", None if mu is None else mu.cpu())
        self.register_buffer("bias", None if bias is None else bias.detach().float().cpu().clone())
        self.register_buffer("act_threshold", None if act_threshold is None else act_threshold.detach().float().clone())
        self.register_buffer("bit_masks", torch.tensor([1 << i for i in range(8)], dtype=torch.uint8), persistent=False)

    @classmethod
    def from_layer(
        cls, layer: BinaryLayer, codes: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> PackedBinary:
        """The packed form of a binarized layer, on its device: its current codes and scales, or the
        ``codes`` and ``scale`` given (those of a packed file)."""
        if codes is None or scale is None:
            codes, scale = layer.quantize()
        conv = _conv_settings(layer)
        packed = cls(
            codes,
            scale,
            center=bool(layer.config.center),
            bias=layer.bias,
            act_threshold=layer.act_threshold,
            conv=conv,
        )
        return packed.to(layer.weight.device)

    def _codes(self, dtype: torch.dtype) -> torch.Tensor:
        """The codes, flat, in ``dtype``: ``1 - 2 * sign`` (times ``nonzero``), each plane's bits read with
        the eight masks."""

        def bits(plane: torch.Tensor) -> torch.Tensor:
            return torch.bitwise_and(plane.unsqueeze(1), self.bit_masks).ne(0).reshape(-1)[: self.count].to(dtype)

        codes = 1 - 2 * bits(self.sign)
        return codes if self.nonzero is None else codes * bits(self.nonzero)

    def weight(self) -> torch.Tensor:
        """``scale * levels``, float32, of the layer's weight shape."""
        return _scaled(self._codes(self.scale.dtype), self.mu, self.scale, self.shape)

    def codes(self) -> torch.Tensor:
        """The int8 codes in {-1, 0, +1}."""
        return self._codes(torch.int8).reshape(self.shape)

    def threshold_for(self, x: torch.Tensor) -> torch.Tensor:
        """The activation thresholds shaped to broadcast over the layer's input ``x`` (1W/1A layers)."""
        return thresholds_for(self.act_threshold, x, self.conv is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _binarize_input(x, self.act_threshold, self.conv is not None)
        w = self.weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.conv is None:
            return F.linear(x, w, bias)
        c = self.conv
        return F.conv2d(x, w, bias, c["stride"], c["padding"], c["dilation"], c["groups"])

    def extra_repr(self) -> str:
        kind = "conv" if self.conv is not None else "linear"
        return f"{kind}, shape={self.shape}, ternary={self.nonzero is not None}, centred={self.mu is not None}"


def _conv_settings(layer: BinaryLayer) -> dict | None:
    """The convolution settings a packed form of ``layer`` keeps (None for a Linear)."""
    if not isinstance(layer, nn.Conv2d):
        return None
    conv = conv_kwargs(layer)
    if conv["padding_mode"] != "zeros":
        raise ValueError(f"padding mode {conv['padding_mode']!r} has no packed form; only 'zeros' padding")
    return {k: conv[k] for k in ("stride", "padding", "dilation", "groups")}


def _offsets(codes: torch.Tensor, center: bool) -> torch.Tensor | None:
    """The per-filter ``mu`` a packed layer stores, on the codes' device: None unless centred and some
    filter's is not 0."""
    mu = code_offsets(codes) if center else None
    return mu if mu is not None and bool(mu.any()) else None


def _scaled(codes: torch.Tensor, mu: torch.Tensor | None, scale: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``scale * (codes - mu * |codes|)`` of float ``codes`` (``mu`` None: no centring), of ``shape``: the
    one formula behind :meth:`PackedBinary.weight` and the float form made straight from a layer."""
    levels = codes.reshape(shape[0], -1)
    if mu is not None:
        levels = levels - mu.unsqueeze(1) * levels.abs()
    return (levels * scale.unsqueeze(1)).reshape(shape)


def _binarize_input(x: torch.Tensor, threshold: torch.Tensor | None, conv: bool) -> torch.Tensor:
    """``sign(x - t)`` with sign(0) = +1 and ``t`` per channel (1W/1A layers), else ``x``."""
    if threshold is None:
        return x
    return torch.where(x - thresholds_for(threshold, x, conv) >= 0, 1.0, -1.0).to(x.dtype)


class _FloatBinary(nn.Module):
    """A packed layer with its weight materialized as the float parameter ``weight`` (float exports and
    the input of int8 quantization). A Linear holds it transposed, ``[in, out]``, and computes
    ``x @ weight``: the graph then has no Transpose of the weight for an optimizer to fold into a
    constant under a generated name, so the weight keeps its name through onnxruntime's tools."""

    def __init__(self, packed: PackedBinary | BinaryLayer) -> None:
        super().__init__()
        if isinstance(packed, PackedBinary):
            w, self.conv = packed.weight().detach(), packed.conv
        else:  # the weight its packed form would unpack to, without the bit planes in between
            layer = packed
            codes, scale = layer.quantize()
            mu = _offsets(codes, bool(layer.config.center))
            w = _scaled(codes.to(torch.float32), mu, scale.detach().float(), tuple(codes.shape))
            self.conv = _conv_settings(layer)
        self.weight = nn.Parameter(w if self.conv is not None else w.T.contiguous(), requires_grad=False)
        self.register_buffer("bias", None if packed.bias is None else packed.bias.detach().float().clone())
        threshold = packed.act_threshold
        self.register_buffer("act_threshold", None if threshold is None else threshold.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _binarize_input(x, self.act_threshold, self.conv is not None)
        if self.conv is None:
            y = torch.matmul(x, self.weight)
            return y if self.bias is None else y + self.bias
        c = self.conv
        return F.conv2d(x, self.weight, self.bias, c["stride"], c["padding"], c["dilation"], c["groups"])


def _replace(model: nn.Module, kind: type | tuple[type, ...], make) -> nn.Module:
    """A copy of ``model`` in eval mode with each ``kind`` module replaced by ``make(module)``: the
    replacements are made from the originals and handed to the copy (``deepcopy``'s memo), so the
    replaced modules are never copied (resnet18's latent weights: 45 MB a validation)."""
    memo = {id(m): make(m) for m in model.modules() if isinstance(m, kind)}
    return copy.deepcopy(model, memo).eval()


def pack_model(model: nn.Module) -> nn.Module:
    """A copy of a binarized ``model`` in eval mode with each binarized layer in its packed form
    (:class:`PackedBinary`); the model itself is left as it is.

    Example:
        >>> import timm
        >>> from equalbits_cli import BinarizeConfig, binarize_
        >>> m = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> binarize_(m, BinarizeConfig())
        >>> type(pack_model(m).layer1[0].conv1).__name__
        'PackedBinary'
    """
    return _replace(model, BinaryLayer, PackedBinary.from_layer)


def float_model(model: nn.Module) -> nn.Module:
    """A copy of a packed model (:func:`pack_model`), or of a binarized one, whose binarized layers hold
    their weight ``scale * levels`` as a float parameter named ``weight`` (``[in, out]`` for a Linear):
    what float and int8 exports trace and evaluation runs. From a binarized model the weights are those
    its packed form unpacks to, bit for bit, made without the bit planes in between."""
    return _replace(model, (PackedBinary, BinaryLayer), _FloatBinary)
