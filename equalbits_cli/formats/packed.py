"""The packed safetensors file: 1 bit per binary weight (2 if ternary), fp32 per-filter scales, the rest as is.

The bit planes and their decoder are in :mod:`equalbits_cli.formats.planes` (numpy); docs/format.md is
the specification.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .planes import NONZERO, SCALE, SHAPE, SIGN, SUFFIXES, decode_layer, pack_codes

__all__ = ["field_array", "load_packed", "save_packed"]


def save_packed(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a packed file: 1 bit per binary weight (2 if ternary), fp32 per-filter scales, the rest as is.

    Args:
        model: A binarized model (from :func:`equalbits_cli.binarize_model` or ``load_model``).
        path: Output ``.safetensors`` path (written atomically).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    from ..nn.layers import BinaryLayer
    from ..nn.packed import PackedBinary
    from ..paths import atomic_write
    from . import PACKED_FORMAT
    from .files import base_metadata, tensors_for_saving

    tensors: dict[str, torch.Tensor] = {}
    ternary = []
    binary_weights = set()
    for name, module in model.named_modules():
        if isinstance(module, (BinaryLayer, PackedBinary)):
            codes, scale = module.quantize() if isinstance(module, BinaryLayer) else (module.codes(), module.scale)
            sign, nonzero = pack_codes(codes.cpu().numpy())
            tensors[name + SIGN] = torch.from_numpy(sign)
            if nonzero is not None:
                tensors[name + NONZERO] = torch.from_numpy(nonzero)
                ternary.append(name)
            tensors[name + SCALE] = scale.detach().float().cpu().contiguous()
            tensors[name + SHAPE] = torch.tensor(list(codes.shape), dtype=torch.int64)
            # the training form's latent weight, the packed form's own fields
            binary_weights.update(f"{name}.{field}" for field in ("weight", "sign", "nonzero", "scale", "mu"))
    for k, v in tensors_for_saving(model.state_dict()).items():
        if k not in binary_weights:
            tensors[k] = v
    meta = base_metadata(model, PACKED_FORMAT)
    meta["bit_order"] = "little"
    meta["sign_convention"] = "sign bit 1 = code -1; nonzero bit 1 = code != 0"
    meta["ternary"] = json.dumps(ternary)
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_packed(model: nn.Module, state: dict[str, torch.Tensor], path: Path, version: str | None = None) -> nn.Module:
    """The packed inference form of a freshly built binarized ``model``, filled from a packed file's
    tensors: each binarized layer a :class:`equalbits_cli.nn.packed.PackedBinary` with exactly the
    file's codes and scales. ``version`` is the format version the file was written in.

    Raises:
        ValueError: a damaged field, or a layer of another shape than the model's.
    """
    from ..nn.layers import BinaryLayer
    from ..nn.packed import PackedBinary
    from ..quant.quantize import dequantize
    from .files import load_state_into

    plain = {}
    binary = {n: m for n, m in model.named_modules() if isinstance(m, BinaryLayer)}
    packed_keys = set()
    decoded = {}
    for name, module in binary.items():
        fields = {name + s: field_array(state[name + s]) for s in SUFFIXES if name + s in state}
        codes, scale = (torch.from_numpy(a) for a in decode_layer(fields, name, path))
        if tuple(codes.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"{path}: layer {name!r} has shape {tuple(codes.shape)}, model expects {tuple(module.weight.shape)}"
            )
        decoded[name] = (codes, scale)
        packed_keys.update(name + s for s in SUFFIXES)
    for k, v in state.items():
        if k not in packed_keys:
            plain[k] = v
    for name, (codes, scale) in decoded.items():
        plain[name + ".weight"] = dequantize(codes, scale.float(), bool(binary[name].config.center))
    load_state_into(model, plain, path, version)  # biases, thresholds and every full-precision tensor
    for name, (codes, scale) in decoded.items():
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model, child, PackedBinary.from_layer(binary[name], codes, scale)
        )
    return model


def field_array(t: torch.Tensor) -> np.ndarray:
    """A packed field as numpy, for :func:`equalbits_cli.formats.planes.decode_layer`. numpy has no
    bfloat16: a field of another dtype is wrong anyway, and the decoder names it as float64."""
    return t.numpy() if t.dtype in (torch.uint8, torch.int64, torch.float32) else t.double().numpy()
