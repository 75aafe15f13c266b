"""Bit packing of weight codes, bit-exact, and the packed safetensors file.

Layout (see docs/format.md): codes are flattened in C order over the weight's original shape and packed
8 per byte, least significant bit first (``numpy.packbits(bitorder="little")``). The sign plane holds
1 for a -1 code and 0 otherwise; ternary (pruned) layers add a non-zero plane with 1 for a non-zero
code. Decoding: ``code = nonzero ? (sign ? -1 : +1) : 0`` (binary layers: ``sign ? -1 : +1``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["pack_bits", "unpack_bits", "pack_codes", "unpack_codes", "save_packed", "load_packed_into"]

SIGN_SUFFIX = ".weight.sign"
NONZERO_SUFFIX = ".weight.nonzero"
SCALE_SUFFIX = ".weight.scale"
SHAPE_SUFFIX = ".weight.shape"


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor, flattened in C order, 8 per byte, LSB first. Returns a uint8 tensor.

    Example:
        >>> pack_bits(torch.tensor([True, False, False, False, False, False, False, False, True])).tolist()
        [1, 1]
    """
    flat = bits.detach().reshape(-1).cpu().numpy().astype(np.bool_)
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a flat boolean tensor.

    Raises:
        ValueError: if ``packed`` does not hold exactly ``ceil(count / 8)`` bytes.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 7) // 8:
        raise ValueError(f"bit plane must be {(count + 7) // 8} uint8 bytes for {count} codes, got {packed.numel()}")
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(np.bool_))


def pack_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sign_plane, nonzero_plane)`` of int8 codes; ``nonzero_plane`` is None when no code is 0."""
    sign = pack_bits(codes == -1)
    nonzero = pack_bits(codes != 0) if bool((codes == 0).any()) else None
    return sign, nonzero


def unpack_codes(sign: torch.Tensor, nonzero: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """Int8 codes of ``shape`` from their bit planes (inverse of :func:`pack_codes`)."""
    count = int(np.prod(shape)) if shape else 1
    s = unpack_bits(sign, count)
    codes = torch.where(s, -1, 1).to(torch.int8)
    if nonzero is not None:
        nz = unpack_bits(nonzero, count)
        if bool((s & ~nz).any()):
            raise ValueError("sign bit set on a zero code")
        codes = codes * nz.to(torch.int8)
    return codes.reshape(shape)


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
    from ..paths import atomic_write
    from .files import PACKED_FORMAT, base_metadata, tensors_for_saving

    tensors: dict[str, torch.Tensor] = {}
    ternary = []
    binary_weights = set()
    for name, module in model.named_modules():
        if isinstance(module, BinaryLayer):
            codes, scale = module.quantize()
            sign, nonzero = pack_codes(codes)
            tensors[name + SIGN_SUFFIX] = sign
            if nonzero is not None:
                tensors[name + NONZERO_SUFFIX] = nonzero
                ternary.append(name)
            tensors[name + SCALE_SUFFIX] = scale.detach().float().cpu().contiguous()
            tensors[name + SHAPE_SUFFIX] = torch.tensor(list(codes.shape), dtype=torch.int64)
            binary_weights.add(name + ".weight")
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


def read_packed_layer(state: dict[str, torch.Tensor], name: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one layer's ``(codes, scale)`` from a packed file's tensors, checking every field.

    Raises:
        ValueError: naming the file, the layer and the problem.
    """

    def fail(problem: str) -> ValueError:
        return ValueError(f"{path}: layer {name!r}: {problem}")

    for suffix in (SIGN_SUFFIX, SCALE_SUFFIX, SHAPE_SUFFIX):
        if name + suffix not in state:
            raise fail(f"missing tensor {name + suffix!r}")
    shape_t = state[name + SHAPE_SUFFIX]
    if shape_t.dtype != torch.int64 or shape_t.dim() != 1 or not 1 <= shape_t.numel() <= 8:
        raise fail("shape must be a 1-D int64 tensor of 1 to 8 dimensions")
    shape = tuple(int(d) for d in shape_t.tolist())
    if any(d < 1 or d > 2**31 for d in shape):
        raise fail(f"invalid weight shape {shape}")
    count = int(np.prod(shape))
    scale = state[name + SCALE_SUFFIX]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (shape[0],):
        raise fail(f"scale must be float32 of shape ({shape[0]},), got {scale.dtype} {tuple(scale.shape)}")
    if not bool(torch.isfinite(scale).all()):
        raise fail("scale holds NaN or inf values")
    sign = state[name + SIGN_SUFFIX]
    nonzero = state.get(name + NONZERO_SUFFIX)
    for plane, label in ((sign, "sign"), (nonzero, "nonzero")):
        if plane is not None and (plane.dtype != torch.uint8 or plane.dim() != 1 or plane.numel() != (count + 7) // 8):
            raise fail(f"{label} plane must be {(count + 7) // 8} uint8 bytes for shape {shape}")
    try:
        codes = unpack_codes(sign, nonzero, shape)
    except ValueError as exc:
        raise fail(str(exc)) from None
    return codes, scale


def load_packed_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, version: str | None = None) -> None:
    """Fill a freshly built binarized ``model`` from a packed file's tensors (codes pinned exactly);
    ``version`` is the format version the file was written in."""
    from ..nn.layers import BinaryLayer
    from ..quant.quantize import dequantize
    from .files import load_state_into

    plain = {}
    binary = {n: m for n, m in model.named_modules() if isinstance(m, BinaryLayer)}
    packed_keys = set()
    decoded = {}
    for name, module in binary.items():
        codes, scale = read_packed_layer(state, name, path)
        if tuple(codes.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"{path}: layer {name!r} has shape {tuple(codes.shape)}, model expects {tuple(module.weight.shape)}"
            )
        decoded[name] = (codes, scale)
        packed_keys.update(name + s for s in (SIGN_SUFFIX, NONZERO_SUFFIX, SCALE_SUFFIX, SHAPE_SUFFIX))
    for k, v in state.items():
        if k not in packed_keys:
            plain[k] = v
    for name, (codes, scale) in decoded.items():
        plain[name + ".weight"] = dequantize(codes, scale.float(), bool(binary[name].config.center))
    load_state_into(model, plain, path, version)
    for name, (codes, scale) in decoded.items():
        binary[name].pin_codes(codes, scale)
