"""Bit planes of weight codes and the one decoder of a packed layer: numpy only, no torch.

Layout (docs/format.md): codes are flattened in C order over the weight's shape and packed 8 per byte,
least significant bit first (``numpy.packbits(bitorder="little")``). The sign plane holds 1 for a -1
code and 0 otherwise; ternary (pruned) layers add a non-zero plane with 1 for a non-zero code.
Decoding: ``code = nonzero ? (sign ? -1 : +1) : 0`` (binary layers: ``sign ? -1 : +1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["SUFFIXES", "decode_layer", "pack_bits", "pack_codes", "unpack_bits", "unpack_codes"]

SIGN, NONZERO, SCALE, SHAPE = ".weight.sign", ".weight.nonzero", ".weight.scale", ".weight.shape"
SUFFIXES = (SIGN, NONZERO, SCALE, SHAPE)


def pack_bits(bits: Any) -> np.ndarray:
    """Pack booleans, flattened in C order, 8 per byte, LSB first, as uint8.

    Example:
        >>> pack_bits(np.array([True] + [False] * 7 + [True])).tolist()
        [1, 1]
    """
    return np.packbits(np.asarray(bits, dtype=np.bool_).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a flat bool array.

    Raises:
        ValueError: ``packed`` is not exactly ``ceil(count / 8)`` uint8 bytes.
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != (count + 7) // 8:
        raise ValueError(f"bit plane must be {(count + 7) // 8} uint8 bytes for {count} codes, got {packed.size}")
    return np.unpackbits(packed, count=count, bitorder="little").astype(np.bool_)


def pack_codes(codes: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(sign_plane, nonzero_plane)`` of codes in {-1, 0, 1}; ``nonzero_plane`` is None when no code is 0.

    Example:
        >>> [p if p is None else p.tolist() for p in pack_codes(np.array([1, -1, 1]))]
        [[2], None]
    """
    codes = np.asarray(codes)
    return pack_bits(codes == -1), (pack_bits(codes != 0) if (codes == 0).any() else None)


def unpack_codes(sign: np.ndarray, nonzero: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Int8 codes of ``shape`` from their bit planes (inverse of :func:`pack_codes`).

    Raises:
        ValueError: a plane of the wrong size, or a sign bit set on a zero code.
    """
    count = int(np.prod(shape)) if shape else 1
    neg = unpack_bits(sign, count)
    codes = np.where(neg, -1, 1).astype(np.int8)
    if nonzero is not None:
        nz = unpack_bits(nonzero, count)
        if (neg & ~nz).any():
            raise ValueError("sign bit set on a zero code")
        codes *= nz.astype(np.int8)
    return codes.reshape(shape)


def decode_layer(tensors: Mapping[str, np.ndarray], name: str, source: Any) -> tuple[np.ndarray, np.ndarray]:
    """Decode one layer's ``(codes, scale)`` from a packed file's arrays, checking every field.

    Args:
        tensors: The file's arrays by name (``safetensors.numpy.load_file``).
        name: The layer's module name.
        source: What the arrays came from, for messages (the file's path).

    Raises:
        ValueError: naming the file, the layer and the problem.
    """

    def fail(problem: str) -> ValueError:
        return ValueError(f"{source}: layer {name!r}: {problem}")

    for suffix in (SIGN, SCALE, SHAPE):
        if name + suffix not in tensors:
            raise fail(f"missing tensor {name + suffix!r}")
    shape_a = np.asarray(tensors[name + SHAPE])
    if shape_a.dtype != np.int64 or shape_a.ndim != 1 or not 1 <= shape_a.size <= 8:
        raise fail("shape must be a 1-D int64 tensor of 1 to 8 dimensions")
    shape = tuple(int(d) for d in shape_a)
    if any(d < 1 or d > 2**31 for d in shape):
        raise fail(f"invalid weight shape {shape}")
    scale = np.asarray(tensors[name + SCALE])
    if scale.dtype != np.float32 or scale.shape != (shape[0],):
        raise fail(f"scale must be float32 of shape ({shape[0]},), got {scale.dtype} {scale.shape}")
    if not np.isfinite(scale).all():
        raise fail("scale holds NaN or inf values")
    try:
        codes = unpack_codes(tensors[name + SIGN], tensors.get(name + NONZERO), shape)
    except ValueError as exc:
        raise fail(f"{exc} (shape {shape})") from None
    return codes, scale
