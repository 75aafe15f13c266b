"""Statistics of models and files (the records are in :mod:`equalbits_cli.report.stats`), computed with torch.

``inspect`` of a packed file skips this module: :mod:`equalbits_cli.report.packed_report` reads the bit
planes with numpy alone.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ..quant.quantize import code_counts, dequantize, entropy_bits, sqnr_db
from .stats import FileReport, LayerStats, ModelStats, packed_layer_bytes

__all__ = [
    "FileReport",
    "LayerStats",
    "ModelStats",
    "collect_stats",
    "inspect_file",
    "layer_stats",
    "packed_layer_bytes",
]


def layer_stats(
    name: str,
    kind: str,
    codes: torch.Tensor,
    scale: torch.Tensor,
    latent: torch.Tensor | None = None,
    expected: tuple[int, int, int] | None = None,
    center: bool = False,
) -> LayerStats:
    """Statistics of one binarized layer from its codes, scales and (optionally) latent weights.

    Args:
        expected: ``(n_minus, n_zero, n_plus)`` every filter should have; sets ``exact_filters``.
    """
    n_minus, n_zero, n_plus = code_counts(codes)
    unpruned = n_plus + n_minus
    exact = None
    if expected is not None:
        flat = codes.reshape(codes.shape[0], -1)
        exact = bool(
            ((flat == -1).sum(1) == expected[0]).all()
            and ((flat == 0).sum(1) == expected[1]).all()
            and ((flat == 1).sum(1) == expected[2]).all()
        )
    sqnr = None
    if latent is not None:
        sqnr = sqnr_db(latent, dequantize(codes, scale, center))
    s = scale.detach().double()
    return LayerStats(
        name=name,
        kind=kind,
        binarized=True,
        shape=tuple(codes.shape),
        params=codes.numel(),
        n_plus=n_plus,
        n_minus=n_minus,
        n_zero=n_zero,
        ratio=n_plus / unpruned if unpruned else None,
        entropy_bits=entropy_bits(codes),
        scale_min=float(s.min()),
        scale_mean=float(s.mean()),
        scale_max=float(s.max()),
        sqnr_db=sqnr,
        exact_filters=exact,
    )


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
    from ..nn.layers import BinaryLayer
    from ..quant.quantize import ot_counts

    layers = []
    binary_weight_keys: dict[str, int] = {}
    kept = (getattr(model, "equalbits_meta", None) or {}).get("kept", {})
    for name, module in model.named_modules():
        if isinstance(module, BinaryLayer):
            codes, scale = module.quantize()
            cfg = module.config
            expected = ot_counts(codes[0].numel(), cfg.ratio, cfg.prune) if cfg.method == "ot" else None
            st = layer_stats(name, _kind(module), codes, scale, module.weight, expected, bool(cfg.center))
            layers.append(st)
            binary_weight_keys[name + ".weight"] = packed_layer_bytes(codes.numel(), codes.shape[0], bool(st.n_zero))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight
            layers.append(
                LayerStats(name, _kind(module), False, tuple(w.shape), w.numel(), kept_because=kept.get(name))
            )
    return _totals(layers, model.state_dict(), binary_weight_keys, sum(p.numel() for p in model.parameters()))


def _totals(
    layers: list[LayerStats], state: dict[str, torch.Tensor], binary_bytes: dict[str, int], params: int
) -> ModelStats:
    fp32 = packed = 0
    for k, v in state.items():
        stored = v.numel() * v.element_size()
        fp32 += stored
        packed += binary_bytes.get(k, stored)
    return ModelStats(
        layers=layers,
        params=params,
        binarized_params=sum(s.params for s in layers if s.binarized),
        fp32_bytes=fp32,
        packed_bytes=packed,
    )


def _packed_stats(model: nn.Module, state: dict[str, torch.Tensor], binarized: set[str], path: Any) -> ModelStats:
    """Statistics read straight from a packed file's bit planes (no latent weights: SQNR is None)."""
    from ..formats.packed import NONZERO_SUFFIX, SCALE_SUFFIX, SHAPE_SUFFIX, SIGN_SUFFIX, read_packed_layer
    from ..quant.quantize import ot_counts

    layers = []
    sizes: dict[str, int] = {}
    fp32_extra: dict[str, int] = {}
    kept = (getattr(model, "equalbits_meta", None) or {}).get("kept", {})
    for name, module in model.named_modules():
        if name in binarized:
            codes, scale = read_packed_layer(state, name, path)
            cfg = module.config  # type: ignore[union-attr]
            expected = ot_counts(codes[0].numel(), cfg.ratio, cfg.prune) if cfg.method == "ot" else None
            st = layer_stats(name, _kind(module), codes, scale, None, expected)
            layers.append(st)
            sizes[name + ".weight"] = packed_layer_bytes(codes.numel(), codes.shape[0], bool(st.n_zero))
            fp32_extra[name + ".weight"] = 4 * codes.numel()
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight
            layers.append(
                LayerStats(name, _kind(module), False, tuple(w.shape), w.numel(), kept_because=kept.get(name))
            )
    suffixes = (SIGN_SUFFIX, NONZERO_SUFFIX, SCALE_SUFFIX, SHAPE_SUFFIX)
    plain = {k: v for k, v in state.items() if not any(k.endswith(s) and k[: -len(s)] in binarized for s in suffixes)}
    fp32 = sum(v.numel() * v.element_size() for v in plain.values()) + sum(fp32_extra.values())
    packed = sum(v.numel() * v.element_size() for v in plain.values()) + sum(sizes.values())
    params = sum(p.numel() for p in model.parameters())
    return ModelStats(layers, params, sum(s.params for s in layers if s.binarized), fp32, packed)


def _onnx_report(path: Any) -> FileReport:
    import os

    from onnx import numpy_helper

    from ..formats.files import build_model
    from ..formats.onnx_file import read_onnx_info
    from ..formats.packed import pack_bits

    onnx_info = read_onnx_info(path)  # the checks eval makes too
    m, meta, info = onnx_info.graph, onnx_info.meta, onnx_info.info
    model = build_model(info)
    state: dict[str, torch.Tensor] = {}
    binarized = set(info.binarized)
    for init in m.graph.initializer:
        if init.name.startswith("eb::"):
            parts = init.name.split("::", 2)
            if len(parts) != 3 or parts[1] not in binarized:
                raise ValueError(f"{path}: initializer {init.name[:100]!r} names no binarized layer of the model")
            _, layer, field = parts
            field = field.removeprefix("w_")  # int8 files of 1W/1A models: the weight's planes
            arr = numpy_helper.to_array(init)
            if field in ("sign", "nonzero"):
                state[f"{layer}.weight.{field}"] = torch.from_numpy(arr.copy())
            elif field == "factor":
                state[f"{layer}.weight.scale"] = torch.from_numpy(arr.reshape(-1).copy())
                state[f"{layer}.weight.shape"] = torch.tensor(list(model.get_submodule(layer).weight.shape))
        else:
            state[init.name] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for layer in binarized:  # int8 files keep the scale in the quantizer's DequantizeLinear, BatchNorm folded in
        if f"{layer}.weight.sign" in state and f"{layer}.weight.scale" not in state:
            shape = model.get_submodule(layer).weight.shape
            state[f"{layer}.weight.scale"] = torch.ones(shape[0])
            state[f"{layer}.weight.shape"] = torch.tensor(list(shape))
    if meta.get("onnx_weights") == "float":
        # Float weights are factor * levels: recover codes as their signs, factors as the row maxima.
        # Transformer Linear weights sit under generated names, transposed; the file says where.
        import json

        try:
            where = json.loads(meta.get("float_weights") or "{}")
            where = {k: (str(v[0]), bool(v[1])) for k, v in where.items()}
        except (json.JSONDecodeError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{path}: metadata 'float_weights' is not valid") from None
        for layer, (init_name, transposed) in where.items():
            if layer in binarized and init_name in state and f"{layer}.weight" not in state:
                w = state.pop(init_name)
                state[f"{layer}.weight"] = w.T if transposed and w.dim() == 2 else w
        for layer in binarized:
            w = state.get(f"{layer}.weight")
            if w is None:
                raise ValueError(f"{path}: initializer {layer}.weight of a binarized layer is missing")
            codes = torch.sign(w).to(torch.int8)
            state[f"{layer}.weight.sign"] = pack_bits(codes == -1)
            if bool((codes == 0).any()):
                state[f"{layer}.weight.nonzero"] = pack_bits(codes != 0)
            state[f"{layer}.weight.scale"] = w.reshape(w.shape[0], -1).abs().amax(dim=1).float()
            state[f"{layer}.weight.shape"] = torch.tensor(list(w.shape))
            del state[f"{layer}.weight"]
    stats = _packed_stats(model, state, binarized, path)
    return FileReport(str(path), "equalbits.onnx", info.model, asdict(info.config), stats, os.path.getsize(path))


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
    from ..formats.files import LATENT_FORMAT, PACKED_FORMAT, build_model, file_info
    from ..formats.latent import load_model
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
            state = load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: cannot read tensors ({exc})") from None
        stats = _packed_stats(model, state, set(info.binarized), path)
        return FileReport(str(path), fmt, info.model, asdict(info.config), stats, size)
    if fmt is not None:
        file_info(path, meta)  # raises the precise error for an unknown format or version
    if model_name is None:
        raise ValueError(f"{path} is a plain state dict: pass --model NAME (the timm architecture) to inspect it")
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

    shares: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, BinaryLayer) and module.act_threshold is not None:

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
