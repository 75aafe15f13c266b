"""Exact Equal Bits codes in one GPU launch per layer: a Triton kernel, one program per output filter.

Each program holds its filter in registers and finds the ``k``-th smallest weight by bisection on an
order-preserving integer key of the float's bits (32 halvings of the key range, each a compare and a
count over the row; no sort, no host synchronization). Ties at the k-th value go to the lower index
by a cumulative count, exactly as a stable sort would (:func:`equalbits_cli.quantize.ot_codes_reference`).
The same program writes the int8 codes, the least-squares scale and, if asked, the weight the layer
computes with, ``scale * (codes - mu * |codes|)``, in the dtype the convolution runs in.

The key: for a float32 with bits ``b`` (as int32), ``b ^ ((b >> 31) & 0x7FFFFFFF)`` orders like the
float (negative floats have their magnitude bits flipped); ``-0.0`` is first turned into ``+0.0`` so
that the two zeros tie, as they do in a float comparison.

Import this module only where Triton is usable (CUDA, or ``TRITON_INTERPRET=1`` for the CPU tests):
:func:`equalbits_cli.quantize.ot_codes` falls back to pure torch otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_FILTER", "ot_rows"]

MAX_FILTER = 16384  # widest filter one program keeps in registers; wider ones use the torch path


@triton.jit
def _lowest_k(key, valid, k, n):
    """Mask of the ``k`` lowest keys of the row (ties to the lower index); ``key`` is int64."""
    lo = tl.min(tl.where(valid, key, 2147483647), axis=0) - 1  # count(key <= lo) == 0 < k
    hi = tl.max(tl.where(valid, key, -2147483648), axis=0)  # count(key <= hi) == n >= k
    for _ in range(32):  # the key range is at most 2**32 wide: 32 halvings leave hi == the k-th key
        mid = lo + (hi - lo) // 2
        enough = tl.sum((valid & (key <= mid)).to(tl.int32), axis=0) >= k
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid)
    less = valid & (key < hi)
    equal = valid & (key == hi)
    need = k - tl.sum(less.to(tl.int32), axis=0)
    rank = tl.cumsum(equal.to(tl.int32), axis=0)  # 1-based position among the tied entries
    mask = less | (equal & (rank <= need))
    mask = mask & (k > 0)
    return mask | (valid & (k >= n))


@triton.jit
def _ot_rows_kernel(
    W,
    CODES,
    SCALE,
    OUT,
    n,
    stride_w,
    k_minus,
    k_nonpos,
    mu,
    TERNARY: tl.constexpr,
    WRITE_CODES: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(W + row.to(tl.int64) * stride_w + offs, mask=valid, other=0.0).to(tl.float32)
    bits = (x + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns -0.0 into +0.0
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
    minus = _lowest_k(key, valid, k_minus, n)
    if TERNARY:
        nonpos = _lowest_k(key, valid, k_nonpos, n)
        codes = 1 - minus.to(tl.int32) - nonpos.to(tl.int32)
    else:
        codes = 1 - 2 * minus.to(tl.int32)
    codes = tl.where(valid, codes, 0)
    c = codes.to(tl.float32)
    levels = c - mu * tl.abs(c)
    num = tl.sum(x * levels, axis=0)
    den = tl.sum(levels * levels, axis=0)
    scale = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(SCALE + row, scale)
    if WRITE_CODES:
        tl.store(CODES + row.to(tl.int64) * n + offs, codes.to(tl.int8), mask=valid)
    if WRITE_OUT:
        tl.store(OUT + row.to(tl.int64) * n + offs, (scale * levels).to(OUT.dtype.element_ty), mask=valid)


def ot_rows(
    w: torch.Tensor,
    k_minus: int,
    k_zero: int,
    mu: float = 0.0,
    *,
    codes: bool = True,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Codes, scales and (optionally) the dequantized weight of each row of a 2-D weight, in one launch.

    Args:
        w: ``(rows, n)`` float weights (any float dtype; computed in float32), ``n <= MAX_FILTER``.
        k_minus: Number of -1 codes per row (the lowest weights).
        k_zero: Number of 0 codes per row (the next lowest).
        mu: Offset of the centred levels ``codes - mu * |codes|`` (0: plain codes).
        codes: Also return the int8 codes.
        out_dtype: Also return ``scale * levels`` in this dtype.

    Returns:
        ``(codes or None, scale (float32, (rows,)), weight or None)``.
    """
    rows, n = w.shape
    if n > MAX_FILTER:
        raise ValueError(f"filters wider than {MAX_FILTER} weights are not handled by the Triton kernel")
    w = w if w.stride(1) == 1 else w.contiguous()
    scale = torch.empty(rows, device=w.device, dtype=torch.float32)
    out_codes = torch.empty((rows, n), device=w.device, dtype=torch.int8) if codes else scale
    out = torch.empty((rows, n), device=w.device, dtype=out_dtype) if out_dtype is not None else scale
    block = max(16, triton.next_power_of_2(n))
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _ot_rows_kernel[(rows,)](
        w,
        out_codes,
        scale,
        out,
        n,
        w.stride(0),
        k_minus,
        k_minus + k_zero,
        float(mu),
        TERNARY=k_zero > 0,
        WRITE_CODES=codes,
        WRITE_OUT=out_dtype is not None,
        BLOCK=block,
        num_warps=warps,
    )
    return (out_codes if codes else None), scale, (out if out_dtype is not None else None)
