"""Statistics of models and files (the records are in :mod:`equalbits_cli.report.stats`), computed with torch.

``inspect`` of a packed file skips this module: :mod:`equalbits_cli.report.packed_report` reads the bit
planes with numpy alone.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SettingError
from ..quant.quantize import dequantize, sqnr_db
from .stats import (
    FileReport,
    LayerStats,
    ModelStats,
    binary_layer_stats,
    input_label,
    packed_layer_bytes,
    packed_model_stats,
)

__all__ = ["activation_shares", "collect_stats", "inspect_file", "with_activation_shares"]


def _kind(module: nn.Module) -> str:
    return "Conv2d" if isinstance(module, nn.Conv2d) else "Linear"


def collect_stats(model: nn.Module) -> ModelStats:
    """Per-layer statistics of every Conv2d/Linear of ``model`` and size totals.

    Example:
        >>> import timm
        >>> from equalbits_cli import BinarizeConfig, binarize_
        >>> m = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> binarize_(m, BinarizeConfig())
        >>> stats = collect_stats(m)
        >>> stats.layers[1].name, stats.layers[1].entropy_bits
        ('layer1.0.conv1', 1.0)
    """
    from ..formats.files import real_inputs
    from ..nn.layers import BinaryLayer
    from ..nn.packed import PackedBinary

    layers = []
    binary_keys: dict[str, tuple[int, int]] = {}  # state key -> (fp32 bytes, packed bytes) it stands for
    packed_params = 0
    meta = getattr(model, "equalbits_meta", None) or {}
    kept = meta.get("kept", {})
    real = real_inputs(model)  # 1W/1A layers on real inputs, and why
    for name, module in model.named_modules():
        if isinstance(module, (BinaryLayer, PackedBinary)):
            if isinstance(module, BinaryLayer):
                codes, scale = module.quantize()
                cfg = module.config
                sqnr = sqnr_db(module.weight, dequantize(codes, scale, bool(cfg.center)))
                fields = ["weight"]
            else:  # a packed file's layer: no latent weights, so no SQNR
                codes, scale, cfg, sqnr = module.codes(), module.scale, meta.get("config"), None
                fields = ["sign", "nonzero", "scale", "mu"]
                packed_params += codes.numel()
            st = binary_layer_stats(name, codes.cpu().numpy(), scale.detach().float().cpu().numpy(), cfg, sqnr)
            st = replace(st, inputs=input_label(name, cfg, real))
            layers.append(st)
            size = packed_layer_bytes(codes.numel(), codes.shape[0], bool(st.n_zero))
            binary_keys.update({f"{name}.{f}": (0, 0) for f in fields[1:]})
            binary_keys[f"{name}.{fields[0]}"] = (4 * codes.numel(), size)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight
            layers.append(
                LayerStats(name, _kind(module), False, tuple(w.shape), w.numel(), kept_because=kept.get(name))
            )
    params = sum(p.numel() for p in model.parameters()) + packed_params
    return _totals(layers, model.state_dict(), binary_keys, params)


def _totals(
    layers: list[LayerStats], state: dict[str, torch.Tensor], binary: dict[str, tuple[int, int]], params: int
) -> ModelStats:
    fp32 = packed = 0
    for k, v in state.items():
        stored = v.numel() * v.element_size()
        fp32_bytes, packed_bytes = binary.get(k, (stored, stored))
        fp32 += fp32_bytes
        packed += packed_bytes
    return ModelStats(
        layers=layers,
        params=params,
        binarized_params=sum(s.params for s in layers if s.binarized),
        fp32_bytes=fp32,
        packed_bytes=packed,
    )


def _file_stats(model: nn.Module, tensors: dict[str, Any], binarized: set[str], path: Any) -> ModelStats:
    """Statistics of a file's tensors (packed fields of the binarized layers as numpy arrays, the rest
    as stored), with the layer list and parameter count of the model the file describes."""
    from ..formats.planes import decode_layer

    decoded = {name: decode_layer(tensors, name, path) for name in binarized}
    meta = getattr(model, "equalbits_meta", None) or {}
    layers = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    params = sum(p.numel() for p in model.parameters())
    return packed_model_stats(
        layers, decoded, tensors, params, meta.get("config"), meta.get("kept", {}), meta.get("real_inputs", {})
    )


def _onnx_fields(name: str, binarized: set[str], path: Any) -> tuple[str, str] | None:
    """``(layer, field)`` of an initializer holding a binarized layer's packed data, else None. Exports
    since 0.6 name them as the packed module's buffers (``<layer>.sign``, ``.nonzero``, ``.scale``,
    ``.mu``); 0.5 exports and int8 files ``eb::<layer>::sign`` (``w_sign`` in 1W/1A int8 files) and
    ``eb::<layer>::factor``."""
    if name.startswith("eb::"):
        parts = name.split("::", 2)
        if len(parts) != 3 or parts[1] not in binarized:
            raise ValueError(f"{path}: initializer {name[:100]!r} names no binarized layer of the model")
        field = parts[2].removeprefix("w_")
        return parts[1], "scale" if field == "factor" else field
    layer, _, field = name.rpartition(".")
    return (layer, field) if layer in binarized and field in ("sign", "nonzero", "scale", "mu") else None


def _onnx_report(path: Any) -> FileReport:
    import json
    import os

    from onnx import numpy_helper

    from ..formats import ONNX_FORMAT
    from ..formats.files import build_model
    from ..formats.onnx_file import read_onnx_info
    from ..formats.planes import pack_codes

    onnx_info = read_onnx_info(path)  # the checks eval makes too
    m, meta, info = onnx_info.graph, onnx_info.meta, onnx_info.info
    model = build_model(info)
    tensors: dict[str, Any] = {}
    binarized = set(info.binarized)
    for init in m.graph.initializer:
        arr = numpy_helper.to_array(init)
        where = _onnx_fields(init.name, binarized, path)
        if where is None:
            tensors[init.name] = arr
        elif where[1] in ("sign", "nonzero", "scale"):
            tensors[f"{where[0]}.weight.{where[1]}"] = arr.reshape(-1) if where[1] == "scale" else arr
    if meta.get("onnx_weights") == "float":
        # Float weights are factor * levels: recover codes as their signs, factors as the row maxima.
        try:
            found = json.loads(meta.get("float_weights") or "{}")
            found = {k: (str(v[0]), bool(v[1])) for k, v in found.items()}
        except (json.JSONDecodeError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{path}: metadata 'float_weights' is not valid") from None
        for layer in binarized:
            init_name, transposed = found.get(layer, (f"{layer}.weight", False))
            w = tensors.pop(init_name, None)
            if w is None:
                raise ValueError(f"{path}: initializer {init_name} of a binarized layer is missing")
            w = w.T if transposed and w.ndim == 2 else w
            sign, nonzero = pack_codes(np.sign(w))
            tensors[f"{layer}.weight.sign"] = sign
            if nonzero is not None:
                tensors[f"{layer}.weight.nonzero"] = nonzero
            tensors[f"{layer}.weight.scale"] = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float32)
    for layer in binarized:
        shape = model.get_submodule(layer).weight.shape
        tensors[f"{layer}.weight.shape"] = np.array(list(shape), dtype=np.int64)
        if meta.get("onnx_weights") == "int8":  # the scale is in the quantizer's DequantizeLinear, BatchNorm folded in
            tensors.setdefault(f"{layer}.weight.scale", np.ones(shape[0], dtype=np.float32))
    stats = _file_stats(model, tensors, binarized, path)
    return FileReport(str(path), ONNX_FORMAT, info.model, asdict(info.config), stats, os.path.getsize(path))


def inspect_file(path: Any, model_name: str | None = None, config: Any = None) -> FileReport:
    """Statistics of any file equalbits reads: latent checkpoint, packed file, ONNX export, or a plain
    timm state dict (then ``model_name`` is required, and the report shows what would be binarized
    with ``config``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is damaged, or a plain state dict was given without ``model_name``.
    """
    import os

    from safetensors.torch import load_file

    from ..config import BinarizeConfig
    from ..formats import LATENT_FORMAT, PACKED_FORMAT
    from ..formats.files import build_model, file_info
    from ..formats.latent import load_model
    from ..formats.packed import field_array
    from ..formats.planes import SUFFIXES
    from ..model.convert import binarize_, create_model
    from ..paths import read_metadata, require_file

    path = require_file(path)
    if path.suffix == ".onnx":
        return _onnx_report(path)
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    fmt = meta.get("format")
    size = os.path.getsize(path)
    if fmt == LATENT_FORMAT:
        model = load_model(path)
        meta_ = model.equalbits_meta
        return FileReport(str(path), fmt, meta_["model"], asdict(meta_["config"]), collect_stats(model), size)
    if fmt == PACKED_FORMAT:
        info = file_info(path, meta)
        model = build_model(info)
        try:
            state: dict[str, Any] = load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: cannot read tensors ({exc})") from None
        for k, v in state.items():  # the packed fields as numpy arrays
            if k.endswith(SUFFIXES):
                state[k] = field_array(v)
        stats = _file_stats(model, state, set(info.binarized), path)
        return FileReport(str(path), fmt, info.model, asdict(info.config), stats, size)
    if fmt is not None:
        file_info(path, meta)  # raises the precise error for an unknown format or version
    if model_name is None:
        raise SettingError(f"{path} is a plain state dict: pass `model_name` (the timm architecture) to inspect it")
    config = config or BinarizeConfig()
    model = create_model(model_name, checkpoint=path)
    binarize_(model, config)
    return FileReport(str(path), "state_dict", model_name, asdict(config), collect_stats(model), size)


@torch.no_grad()
def activation_shares(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """For each layer with binary activations, the share of +1 bits its input gets on ``images``
    (``sign(x - t)``): near 0.5 means the bits carry information, 0 or 1 means a constant.

    Example:
        >>> import timm
        >>> from equalbits_cli import BinarizeConfig, binarize_
        >>> from equalbits_cli.nn.layers import calibrate_thresholds
        >>> from equalbits_cli.train.evaluate import recalibrate_bn
        >>> m = timm.create_model("resnet10t", pretrained=False, num_classes=3)
        >>> binarize_(m, BinarizeConfig(activations="sign"))
        >>> x = torch.randn(16, 3, 32, 32)
        >>> activation_shares(m.eval(), x)["layer1.0.conv2"] > 0.9  # post-ReLU, threshold 0: all +1
        True
        >>> _ = calibrate_thresholds(m, [x]); recalibrate_bn(m, [(x, None)], 1, torch.device("cpu"))
        >>> 0.3 < activation_shares(m, x)["layer1.0.conv2"] < 0.7
        True
    """
    from ..nn.layers import BinaryLayer
    from ..nn.packed import PackedBinary

    shares: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (BinaryLayer, PackedBinary)) and module.act_threshold is not None:

            def hook(mod, args, name=name):
                shares[name] = float((args[0] - mod.threshold_for(args[0]) >= 0).float().mean())

            handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shares


def with_activation_shares(report: FileReport, shares: dict[str, float]) -> FileReport:
    """``report`` with each layer's ``act_plus_share`` filled in."""
    from dataclasses import replace

    layers = [replace(s, act_plus_share=shares.get(s.name)) for s in report.stats.layers]
    return replace(report, stats=replace(report.stats, layers=layers))
