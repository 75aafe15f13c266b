"""Binary weights in one GPU launch: Triton kernels, one program per output filter.

Each program holds its filter in registers. For ``ot`` (Equal Bits) it finds the ``k``-th smallest
weight by a safeguarded search on an order-preserving integer key of the float's bits: guesses
alternate between interpolation on the filter's empirical distribution (the share of weights below a
value grows about linearly between two bracketing values) and halving the key range; every guess is
one compare and one count over the row, and the search stops as soon as a guess splits off exactly
``k`` weights (on normal or uniform rows of 576 to 4,608 weights 5 to 9 counts on average instead of 32 halvings;
at most 99 even on adversarial rows, about 30 to 45 on rows made of a few tied values).
Ties at the k-th value go to the lower index by a cumulative count, exactly as a stable sort would
(:func:`equalbits_cli.quant.quantize.ot_codes_reference`). No sort, no host synchronization.

``sign`` (BWN) and ``irnet`` (IR-Net's Libra-PB) codes and scales are computed in the same kind of
program. Each program writes, as asked, the int8 codes, the scale, and the weight the layer computes
with, ``scale * (codes - mu * |codes|)``, in the dtype the convolution runs in.

:func:`binary_rows_grouped` quantizes many weight tensors (all binary layers of a model) with one launch
per class of filter width: per-layer sizes, counts, offsets and source addresses live in small device
tables built once and reused for as long as the weights keep their storage.

The key: for a float32 with bits ``b`` (as int32), ``b ^ ((b >> 31) & 0x7FFFFFFF)`` orders like the
float (negative floats have their magnitude bits flipped); ``-0.0`` is first turned into ``+0.0`` so
that the two zeros tie, as they do in a float comparison. The map is its own inverse.

Import this module only where Triton is usable (CUDA, or ``TRITON_INTERPRET=1`` for the CPU tests):
:mod:`equalbits_cli.quant.quantize` falls back to pure torch otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["MAX_FILTER", "METHODS", "GroupPlan", "binary_rows", "binary_rows_grouped", "ot_rows"]

MAX_FILTER = 16384  # widest filter one program keeps in registers; wider ones use the torch path
METHODS = {"ot": 0, "sign": 1, "irnet": 2}


@triton.jit
def _key_of(x):
    """Order-preserving int64 key of float32 values (-0.0 must already be +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _float_of(key):
    """The float32 whose key is ``key`` (keys outside int32 wrap: only ever used as a guess)."""
    bits = key.to(tl.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _lowest_k(key, valid, k, n):
    """Mask of the ``k`` lowest keys of the row, ties to the lower index; ``key`` is int64."""
    # Invariant: count(key <= lo) = clo < k <= chi = count(key <= hi).
    lo = tl.min(tl.where(valid, key, 4294967296), axis=0) - 1
    hi = tl.max(tl.where(valid, key, -4294967296), axis=0)
    hi = tl.where((k <= 0) | (k >= n), lo + 1, hi)  # nothing to search: the mask is settled below
    clo = n * 0
    chi = n + 0
    xlo = _float_of(lo)
    xhi = _float_of(hi)
    step = n * 0
    while (hi - lo > 1) & (chi != k):
        # Two steps of three interpolate the count linearly between the brackets, the third halves the
        # key range: the range at least halves every three steps whatever the data.
        frac = (k - clo).to(tl.float32) / (chi - clo).to(tl.float32)
        guess = _key_of(xlo + (xhi - xlo) * frac + 0.0)
        mid = tl.where(step % 3 != 2, guess, lo + (hi - lo) // 2)
        mid = tl.minimum(tl.maximum(mid, lo + 1), hi - 1)
        c = tl.sum((valid & (key <= mid)).to(tl.int32), axis=0)
        up = c >= k
        xmid = _float_of(mid)
        hi = tl.where(up, mid, hi)
        chi = tl.where(up, c, chi)
        xhi = tl.where(up, xmid, xhi)
        lo = tl.where(up, lo, mid)
        clo = tl.where(up, clo, c)
        xlo = tl.where(up, xlo, xmid)
        step += 1
    # Either exactly k keys are <= hi, or hi is the k-th key and some of its ties go: the lowest-index
    # ones, by a cumulative count (in the first case every tie at hi goes, which the count also gives).
    less = valid & (key < hi)
    equal = valid & (key == hi)
    need = k - tl.sum(less.to(tl.int32), axis=0)
    rank = tl.cumsum(equal.to(tl.int32), axis=0)  # 1-based position among the tied entries
    mask = less | (equal & (rank <= need))
    mask = mask & (k > 0)
    return mask | (valid & (k >= n))


@triton.jit
def _least_squares(x, levels):
    num = tl.sum(x * levels, axis=0)
    den = tl.sum(levels * levels, axis=0)
    return tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def _centred(c):
    """``c - mu * |c|`` with ``mu`` the row's mean non-zero code (0 if all non-zero codes agree)."""
    nonzero = tl.sum(tl.abs(c), axis=0)
    mu = tl.sum(c, axis=0) / tl.where(nonzero > 0, nonzero, 1.0)
    mu = tl.where(tl.abs(mu) < 1, mu, 0.0)
    return c - mu * tl.abs(c)


# Sizes and counts are not specialized: one compiled kernel per block size serves every layer (Triton
# would otherwise compile variants for values of 1 and multiples of 16).
@triton.jit(do_not_specialize=["n_arg", "stride_w", "km_arg", "kn_arg"])
def _binary_rows_kernel(
    W,
    OUT,
    CODES,
    SCALE,
    ROW_LAYER,
    ROW0,
    NS,
    WPTR,
    OFFS,
    KM,
    KN,
    MU,
    GEOM,
    n_arg,
    stride_w,
    km_arg,
    kn_arg,
    mu_arg,
    METHOD: tl.constexpr,
    TERNARY: tl.constexpr,
    CENTER: tl.constexpr,
    GROUPED: tl.constexpr,
    STRIDED: tl.constexpr,
    WRITE_CODES: tl.constexpr,
    WRITE_SCALE: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if GROUPED:  # program -> (layer, row) through the tables; W and OUT give the element types
        layer = tl.load(ROW_LAYER + pid)
        row = (pid - tl.load(ROW0 + layer)).to(tl.int64)
        n = tl.load(NS + layer)
        src = tl.load(WPTR + layer).to(W.dtype) + row * n
        dst = OUT + tl.load(OFFS + layer) + row * n
        km = tl.load(KM + layer)
        kn = tl.load(KN + layer)
        mu = tl.load(MU + layer)
    else:
        row = pid.to(tl.int64)
        n = n_arg
        src = W + row * stride_w
        dst = OUT + row * n
        km = km_arg
        kn = kn_arg
        mu = mu_arg
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    mem = offs
    if STRIDED:  # a channels-last filter: logical index (i, h, w) lives at i*si + h*sh + w*sw
        khw = tl.load(GEOM + 5 * layer)
        kw = tl.load(GEOM + 5 * layer + 1)
        mem = (
            (offs // khw) * tl.load(GEOM + 5 * layer + 2)
            + ((offs % khw) // kw) * tl.load(GEOM + 5 * layer + 3)
            + (offs % kw) * tl.load(GEOM + 5 * layer + 4)
        )
    x = tl.load(src + mem, mask=valid, other=0.0).to(tl.float32) + 0.0  # + 0.0 turns -0.0 into +0.0
    if METHOD == 0:  # ot: the km lowest -1, the next kn 0, the rest +1; centred levels with the given mu
        key = _key_of(x)
        minus = _lowest_k(key, valid, km, n)
        if TERNARY:
            nonpos = _lowest_k(key, valid, km + kn, n)
            codes = 1 - minus.to(tl.int32) - nonpos.to(tl.int32)
        else:
            codes = 1 - 2 * minus.to(tl.int32)
        c = tl.where(valid, codes, 0).to(tl.float32)
        levels = c - mu * tl.abs(c)
        scale = _least_squares(x, levels)
    else:
        if METHOD == 1:  # sign, sign(0) = +1; scale mean |w|
            c = tl.where(valid, tl.where(x < 0, -1.0, 1.0), 0.0)
            plain_scale = tl.sum(tl.abs(x), axis=0) / n
        else:  # irnet: sign of the standardized weight; scale 2^round(log2 mean |ws|) * std
            mean = tl.sum(x, axis=0) / n
            d = tl.where(valid, x - mean, 0.0)
            var = tl.sum(d * d, axis=0) / tl.maximum(n - 1, 1)
            std = tl.where(n > 1, tl.sqrt(var), 1.0)
            std = tl.where(std > 0, std, 1.0)
            ws = d / std
            c = tl.where(valid, tl.where(ws < 0, -1.0, 1.0), 0.0)
            mean_abs = tl.maximum(tl.sum(tl.abs(ws), axis=0) / n, 1.1754943508222875e-38)
            e = tl.log2(mean_abs)
            r = tl.floor(e + 0.5)
            r = tl.where((r - e == 0.5) & (r - 2 * tl.floor(r / 2) != 0), r - 1, r)  # half to even
            plain_scale = tl.exp2(r) * std
        if CENTER:  # centred levels, least-squares scale (the plain one is then unused and dropped)
            levels = _centred(c)
            scale = _least_squares(x, levels)
        else:
            levels = c
            scale = plain_scale
    if WRITE_SCALE:
        tl.store(SCALE + row, scale)
    if WRITE_CODES:
        tl.store(CODES + row * n + offs, c.to(tl.int8), mask=valid)
    if WRITE_OUT:
        tl.store(dst + mem, (scale * levels).to(OUT.dtype.element_ty), mask=valid)


def _launch_shape(n: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for filters of ``n`` weights."""
    block = max(16, triton.next_power_of_2(n))
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def binary_rows(
    w: torch.Tensor,
    method: str = "ot",
    k_minus: int = 0,
    k_zero: int = 0,
    mu: float = 0.0,
    *,
    center: bool = False,
    codes: bool = True,
    scale: bool = True,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Codes, scales and (optionally) the dequantized weight of each row of a 2-D weight, in one launch.

    Args:
        w: ``(rows, n)`` float weights (any float dtype; computed in float32), ``n <= MAX_FILTER``.
        method: ``ot``, ``sign`` or ``irnet`` (see :func:`equalbits_cli.quant.quantize.ot_codes`).
        k_minus: ``ot``: number of -1 codes per row (the lowest weights).
        k_zero: ``ot``: number of 0 codes per row (the next lowest).
        mu: ``ot``: offset of the centred levels ``codes - mu * |codes|`` (0: plain codes).
        center: ``sign``/``irnet``: centre the levels per row (their own ``mu``), least-squares scale.
        codes: Also return the int8 codes.
        scale: Also return the float32 scales, ``(rows,)``.
        out_dtype: Also return ``scale * levels`` in this dtype.

    Returns:
        ``(codes or None, scale or None, weight or None)``.
    """
    rows, n = w.shape
    if n > MAX_FILTER:
        raise ValueError(f"filters wider than {MAX_FILTER} weights are not handled by the Triton kernel")
    w = w if w.stride(1) == 1 else w.contiguous()
    out_scale = torch.empty(rows, device=w.device, dtype=torch.float32) if scale else None
    out_codes = torch.empty((rows, n), device=w.device, dtype=torch.int8) if codes else None
    out = torch.empty((rows, n), device=w.device, dtype=out_dtype) if out_dtype is not None else None
    some = next(t for t in (out, out_scale, out_codes, w) if t is not None)  # stands in for unused ones
    block, warps = _launch_shape(n)
    _binary_rows_kernel[(rows,)](
        w,
        some if out is None else out,
        some if out_codes is None else out_codes,
        some if out_scale is None else out_scale,
        *(some,) * 9,
        n,
        w.stride(0),
        k_minus,
        k_zero,
        float(mu),
        METHOD=METHODS[method],
        TERNARY=k_zero > 0,
        CENTER=center,
        GROUPED=False,
        STRIDED=False,
        WRITE_CODES=codes,
        WRITE_SCALE=scale,
        WRITE_OUT=out is not None,
        BLOCK=block,
        num_warps=warps,
    )
    return out_codes, out_scale, out


def ot_rows(
    w: torch.Tensor,
    k_minus: int,
    k_zero: int,
    mu: float = 0.0,
    *,
    codes: bool = True,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Equal Bits codes of each row: :func:`binary_rows` with ``method="ot"`` (the scale always)."""
    c, s, out = binary_rows(w, "ot", k_minus, k_zero, mu, codes=codes, out_dtype=out_dtype)
    assert s is not None
    return c, s, out


@dataclass(frozen=True)
class _Launch:
    members: tuple[int, ...]  # indices into the plan's weights
    tables: tuple[torch.Tensor, ...]  # ROW_LAYER, ROW0, NS, WPTR, OFFS, KM, KN, MU, GEOM (on the device)
    rows: int
    numel: int  # of the launch's output buffer (each member's part starts 64-element aligned)
    views: tuple[tuple, ...]  # (size, stride, offset) of each member's weight in the output buffer
    ternary: bool
    strided: bool
    block: int
    warps: int


_ALIGN = 64  # elements: every member's weight starts on a 128-byte boundary (fp16), as fresh tensors do


def _channels_last(w: torch.Tensor) -> bool:
    return w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)


def _check_groupable(weights: Sequence[torch.Tensor]) -> None:
    for w in weights:
        if w.dim() < 2 or w.shape[0] == 0 or not (w.is_contiguous() or _channels_last(w)):
            raise ValueError("grouped weights must be contiguous (or channels-last) tensors of 2 or more dims")
        if w.numel() // w.shape[0] > MAX_FILTER:
            raise ValueError(f"filters wider than {MAX_FILTER} weights are not handled by the Triton kernel")
    if len({(w.dtype, w.device) for w in weights}) > 1:
        raise ValueError("grouped weights must share one dtype and device")


class GroupPlan:
    """Launch tables for a fixed list of weights (one dtype and device; each contiguous or channels-last),
    grouped by filter width class: one launch per class. Valid while every weight keeps its storage."""

    def __init__(self, weights: Sequence[torch.Tensor], specs: Sequence[tuple[int, int, float]]) -> None:
        _check_groupable(weights)
        self.key = plan_key(weights, specs)
        device = weights[0].device
        classes: dict[tuple[int, bool, bool], list[int]] = {}
        for i, (w, (_, kz, _)) in enumerate(zip(weights, specs)):
            n = w.numel() // w.shape[0]
            classes.setdefault((_launch_shape(n)[0], kz > 0, _channels_last(w)), []).append(i)
        self.launches = []
        for (block, ternary, strided), members in classes.items():
            row_layer, row0, offsets, geom = [], [], [], []
            rows = numel = 0
            for j, i in enumerate(members):
                w = weights[i]
                r, n = w.shape[0], w.numel() // w.shape[0]
                row_layer += [j] * r
                row0.append(rows)
                offsets.append(numel)
                rows += r
                numel += -(-r * n // _ALIGN) * _ALIGN
                if strided:  # (kh*kw, kw, and the strides of in-channel, row and column within a filter)
                    _, _, kh, kw = w.shape
                    geom += [kh * kw, kw, w.stride(1), w.stride(2), w.stride(3)]
                else:
                    geom += [1, 1, 1, 0, 0]
            ints = lambda v, dt=torch.int32: torch.tensor(v, dtype=dt)  # noqa: E731
            tables = (
                ints(row_layer),
                ints(row0),
                ints([weights[i].numel() // weights[i].shape[0] for i in members]),
                ints([weights[i].data_ptr() for i in members], torch.int64),
                ints(offsets, torch.int64),
                ints([specs[i][0] for i in members]),
                ints([specs[i][1] for i in members]),
                torch.tensor([specs[i][2] for i in members], dtype=torch.float32),
                ints(geom),
            )
            if device.type == "cuda":  # once per plan, asynchronously from pinned memory
                tables = tuple(t.pin_memory().to(device, non_blocking=True) for t in tables)
            _, warps = _launch_shape(block)
            # Each member is written in its latent's own layout (row by row, strided within a row for
            # channels-last), so its view in the buffer has the latent's strides.
            views = tuple((tuple(weights[i].shape), weights[i].stride(), off) for i, off in zip(members, offsets))
            self.launches.append(_Launch(tuple(members), tables, rows, numel, views, ternary, strided, block, warps))

    def run(
        self, weights: Sequence[torch.Tensor], method: str, center: bool, out_dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """``scale * levels`` of every weight, in ``out_dtype``, shaped and laid out like the weight."""
        result: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
        for launch in self.launches:
            first = weights[launch.members[0]]
            out = torch.empty(launch.numel, device=first.device, dtype=out_dtype)
            _binary_rows_kernel[(launch.rows,)](
                first,
                out,
                out,
                out,
                *launch.tables,
                0,
                0,
                0,
                0,
                0.0,
                METHOD=METHODS[method],
                TERNARY=launch.ternary,
                CENTER=center,
                GROUPED=True,
                STRIDED=launch.strided,
                WRITE_CODES=False,
                WRITE_SCALE=False,
                WRITE_OUT=True,
                BLOCK=launch.block,
                num_warps=launch.warps,
            )
            for i, (size, stride, off) in zip(launch.members, launch.views):
                result[i] = out.as_strided(size, stride, off)
        return result


def plan_key(weights: Sequence[torch.Tensor], specs: Sequence[tuple[int, int, float]]) -> tuple:
    """What a :class:`GroupPlan` depends on: storage addresses, shapes, layouts, dtypes and the counts."""
    return tuple((w.data_ptr(), w.shape, w.stride(), w.dtype, s) for w, s in zip(weights, specs))


def binary_rows_grouped(
    weights: Sequence[torch.Tensor],
    specs: Sequence[tuple[int, int, float]],
    method: str = "ot",
    *,
    center: bool = False,
    out_dtype: torch.dtype = torch.float32,
    plan: GroupPlan | None = None,
) -> tuple[list[torch.Tensor], GroupPlan]:
    """The training weights ``scale * levels`` of many weights, one launch per filter-width class.

    Args:
        weights: Weights whose dim 0 indexes filters (any number of dims), each contiguous or
            channels-last, one dtype and device, at most ``MAX_FILTER`` weights per filter.
        specs: Per weight ``(k_minus, k_zero, mu)`` for ``ot`` (ignored otherwise).
        method, center: As for :func:`binary_rows`.
        out_dtype: The dtype of the results.
        plan: The plan from an earlier call, reused when it still fits (saves building the tables).

    Returns:
        ``(weights in out_dtype, each shaped and laid out like its latent; the plan used)``.

    Raises:
        ValueError: a weight of another layout, dtype or device, or a filter too wide.
    """
    if plan is None or plan.key != plan_key(weights, specs):
        plan = GroupPlan(weights, specs)
    return plan.run(weights, method, center, out_dtype), plan
