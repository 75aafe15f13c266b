"""Pure tensor math for binary and ternary weight codes. No nn.Module here.

The Equal Bits quantizer (Li, Pintea, van Gemert, AAAI 2022) maps each output filter's real weights to
a target distribution over {-1, 0, +1} with optimal transport. In one dimension the optimal transport
plan is the monotone (quantile) map: sort the filter and give the lowest share -1, the next share 0
and the rest +1. The forward pass uses ``scale * codes``; the backward pass is the straight-through
estimator (identity), which lives in :mod:`equalbits_cli.nn.layers`.

Counts per filter of ``n`` weights, with ``r`` the ratio and ``k`` the prune share (rounding half up):

    n_zero  = round(k * n)
    n_minus = round((1 - r) * (n - n_zero))
    n_plus  = n - n_zero - n_minus

Ties are broken by position: among equal values the one with the lower flat index ranks lower. This
is exactly what a stable sort gives, and what every implementation here reproduces.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .counts import entropy_of_counts, ot_counts
from .cpu_select import ot_codes_cpu, ot_weights_cpu

__all__ = [
    "binary_weight",
    "code_offsets",
    "ot_spec",
    "dequantize",
    "ot_offset",
    "ot_counts",
    "ot_codes",
    "ot_codes_reference",
    "OTCache",
    "least_squares_scale",
    "entropy_bits",
    "code_counts",
    "sqnr_db",
]


def least_squares_scale(weight2d: torch.Tensor, codes2d: torch.Tensor, nonzero: int | None = None) -> torch.Tensor:
    """Per-row factor ``<w, b> / <b, b>``: ``scale * b`` is the closest such tensor to ``w``.

    ``nonzero``, when every row is known to have that many non-zero codes, saves counting them.
    Rows whose codes are all zero get scale 0.
    """
    # Products of mixed dtypes (float weight, int8 codes) take a slow path on the CPU (about 10x): cast
    # the codes first, then one fused multiply-and-sum per row.
    num = torch.linalg.vecdot(weight2d, codes2d.to(weight2d.dtype))
    if codes2d.is_floating_point():
        den = (codes2d * codes2d).sum(dim=1)
    elif nonzero is None:
        den = codes2d.abs().sum(dim=1, dtype=torch.int64).to(weight2d.dtype)
    else:
        den = torch.full_like(num, float(nonzero))
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def code_offsets(codes: torch.Tensor) -> torch.Tensor:
    """Per-filter mean of the non-zero codes, ``mu = (n_plus - n_minus) / (n_plus + n_minus)``.

    A filter whose non-zero codes all have one sign (or that has none) gets 0: centring it would erase it.

    Example:
        >>> code_offsets(torch.tensor([[1, 1, 1, -1], [1, -1, 0, 0]], dtype=torch.int8)).tolist()
        [0.5, 0.0]
    """
    c = codes.reshape(codes.shape[0], -1)
    if c.device.type == "cpu":
        # numpy's buffered reductions: torch's int8 sums take a slow path on the CPU (15 ms against 0.3 for
        # a 512 x 4608 filter bank; resnet18's validations spent most of their packing here)
        a = c.numpy()
        total = torch.from_numpy(a.sum(axis=1, dtype=np.int64))
        nonzero = torch.from_numpy(np.count_nonzero(a, axis=1).astype(np.int64))
    else:
        total, nonzero = c.sum(dim=1, dtype=torch.int64), c.ne(0).sum(dim=1)
    mu = total.double() / nonzero.clamp_min(1).double()
    return torch.where(mu.abs() < 1, mu, torch.zeros_like(mu)).float()


def ot_offset(n: int, ratio: float = 0.5, prune: float = 0.0) -> float:
    """The mean code ``mu`` every filter of ``n`` weights has under ``ot`` (the counts are exact), as
    :func:`code_offsets` would compute it from the codes.

    Example:
        >>> ot_offset(10, ratio=0.7), ot_offset(10), ot_offset(9)
        (0.4, 0.0, -0.1111111111111111)
    """
    n_minus, _, n_plus = ot_counts(n, ratio, prune)
    m = n_minus + n_plus
    mu = (n_plus - n_minus) / m if m else 0.0
    return mu if abs(mu) < 1 else 0.0


def centered_codes(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes - mu * |codes|`` per filter (see :func:`code_offsets`), as ``dtype``: the two levels of a
    binary filter become ``1 - mu`` and ``-1 - mu``, so they average to zero; pruned zeros stay zero."""
    c = codes.reshape(codes.shape[0], -1).to(dtype)
    mu = code_offsets(codes).to(dtype)
    return (c - mu[:, None] * c.abs()).reshape(codes.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, center: bool = False) -> torch.Tensor:
    """The weight a binarized layer computes with: ``scale * codes``, or with ``center``
    ``scale * (codes - mu * |codes|)`` (:func:`centered_codes`), in ``scale``'s dtype.

    Centring matters away from ratio 0.5: with 70% of codes +1, ``scale * codes`` has a mean of
    0.4 * scale per weight, so every output channel carries the same large sum of its inputs, which
    BatchNorm cannot remove sample by sample. Centred levels keep the filter's mean at zero while
    every weight still takes one of two values fixed by its bit. At ratio 0.5 with an even filter size
    ``mu`` is 0 and both forms are the same.

    Example:
        >>> codes = torch.tensor([[1, 1, 1, -1]], dtype=torch.int8)
        >>> dequantize(codes, torch.tensor([2.0]), center=True).tolist()
        [[1.0, 1.0, 1.0, -3.0]]
    """
    shape = (-1,) + (1,) * (codes.dim() - 1)
    c = centered_codes(codes, scale.dtype) if center else codes.to(scale.dtype)
    return c * scale.view(shape)


def ot_codes_reference(
    weight: torch.Tensor, ratio: float = 0.5, prune: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort-based oracle for :func:`ot_codes` (what the authors' code does). Slow, obviously right.

    Args:
        weight: Tensor whose dim 0 indexes output filters; the rest is flattened per filter.
        ratio: Share of +1 among each filter's unpruned weights.
        prune: Share of each filter's weights set to 0.

    Returns:
        ``(codes, scale)``: int8 codes of ``weight``'s shape and float per-filter scale of shape
        ``(weight.shape[0],)``.
    """
    w = weight.detach().reshape(weight.shape[0], -1)
    n = w.shape[1]
    n_minus, n_zero, _ = ot_counts(n, ratio, prune)
    order = torch.argsort(w, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=w.device).expand_as(order))
    codes = torch.ones_like(w, dtype=torch.int8)
    codes[ranks < n_minus + n_zero] = 0
    codes[ranks < n_minus] = -1
    return codes.reshape(weight.shape), least_squares_scale(w, codes)


class OTCache:
    """What :func:`ot_codes` and :func:`binary_weight` keep between calls on one weight tensor (one per
    layer, as in training): the CPU selection's numpy buffers, whose first touch would otherwise cost
    more than the arithmetic on them, and each filter's last threshold, near which the next call looks
    first (:mod:`equalbits_cli.quant.cpu_select`). It makes a call cheaper, never different. Copies and
    pickles start empty.
    """

    def __init__(self) -> None:
        self.scratch: dict = {}

    def clear(self) -> None:
        self.scratch.clear()

    def __getstate__(self) -> dict:
        return {"scratch": {}}


def _count(mask: torch.Tensor) -> torch.Tensor:
    # Summing a bool tensor through a uint8 view with an int32 accumulator is about 2x faster on CPU.
    return mask.view(torch.uint8).sum(dim=1, dtype=torch.int32)


def _lowest_k_syncfree(w: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of each row's ``k`` lowest entries, ties to the lower index, with no host synchronization
    (no ``nonzero``, no data-dependent shapes): the k-th value from ``kthvalue``, the ties at it settled
    by a cumulative count. For what neither the Triton kernel nor the CPU's numpy selection takes:
    CUDA without Triton, half-precision latents on the CPU."""
    rows, n = w.shape
    if k <= 0:
        return torch.zeros_like(w, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(w, dtype=torch.bool)
    kth = torch.kthvalue(w, k, dim=1, keepdim=True).values
    less = w < kth
    equal = w == kth
    need = k - _count(less).unsqueeze(1)
    return less | (equal & (equal.cumsum(dim=1, dtype=torch.int32) <= need))


def _check_ratio_prune(ratio: float, prune: float) -> None:
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must be strictly between 0 and 1, got {ratio}")
    if not 0 <= prune < 1:
        raise ValueError(f"prune must be in [0, 1), got {prune}")


def _selected_codes(w: torch.Tensor, n_minus: int, n_zero: int) -> torch.Tensor:
    """Int8 ``ot`` codes of the 2-D ``w`` in plain torch (any device and dtype; no host reads): its
    ``n_minus`` lowest per row -1, the next ``n_zero`` 0."""
    minus = _lowest_k_syncfree(w, n_minus)
    if n_zero:
        return 1 - minus.view(torch.int8) - _lowest_k_syncfree(w, n_minus + n_zero).view(torch.int8)
    return torch.sub(1, minus.view(torch.int8), alpha=2)


def numpy_selects(w: torch.Tensor) -> bool:
    """Whether the CPU's numpy selection takes the 2-D ``w`` (float32/float64 on the CPU)."""
    return w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64)


def use_triton(device: torch.device, n: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether filters of ``n`` weights on ``device`` go through the Triton kernels (CUDA, Triton
    present, the filter fits in one program's registers, and a dtype the kernels select in exactly:
    they compare float32 keys, which would merge distinct float64 values)."""
    return device.type == "cuda" and dtype != torch.float64 and n <= _triton_max_filter()


def _triton_max_filter() -> int:
    """Widest filter the Triton kernels take; 0 where they cannot run on CUDA. Decided per call (cheap):
    ``EQUALBITS_NO_TRITON`` may change between calls, in tests for one."""
    from .kernels import triton_usable

    if not triton_usable("cuda"):
        return 0
    from .kernels.ot_triton import MAX_FILTER

    return MAX_FILTER


@functools.lru_cache(maxsize=1024)
def ot_spec(n: int, ratio: float, prune: float, center: bool) -> tuple[int, int, int, float]:
    """``(n_minus, n_zero, n_plus, mu)`` of an ``ot`` filter of ``n`` weights (``mu`` 0 unless centred):
    computed once per layer shape, not once per training step."""
    n_minus, n_zero, n_plus = ot_counts(n, ratio, prune)
    return n_minus, n_zero, n_plus, (ot_offset(n, ratio, prune) if center else 0.0)


def ot_codes(
    weight: torch.Tensor,
    ratio: float = 0.5,
    prune: float = 0.0,
    method: str = "ot",
    cache: OTCache | None = None,
    center: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary or ternary codes and per-filter scales of a weight tensor.

    ``method="ot"`` (Equal Bits): per output filter, the lowest ``n_minus`` weights get -1, the next
    ``n_zero`` get 0 and the rest +1 (see :func:`ot_counts`); counts are exact for every filter and ties
    go to the lower index. ``scale`` is the least-squares factor ``<w, b> / <b, b>``.

    ``method="sign"`` (BWN / XNOR-Net, Rastegari et al. 2016): ``b = sign(w)`` with ``sign(0) = +1``,
    ``scale = mean |w|``.

    ``method="irnet"`` (IR-Net Libra-PB, Qin et al. 2020): weights are balanced and standardized per
    filter, ``w_s = (w - mean) / std``, then ``b = sign(w_s)``; the scale is IR-Net's power of two
    ``2^round(log2(mean |w_s|))``, multiplied back by ``std`` so that ``scale * b`` lives on the scale of
    the latent weights.

    ``ratio`` and ``prune`` apply to ``ot`` only.

    Args:
        weight: Tensor whose dim 0 indexes output filters.
        ratio: Share of +1 among each filter's unpruned weights.
        prune: Share of each filter's weights set to 0.
        method: ``ot``, ``sign`` or ``irnet``.
        cache: An :class:`OTCache` kept between calls on the same weight's shape, as in training:
            it makes the call cheaper, never different.
        center: The layer computes with centred levels (:func:`dequantize`): the scale is then the
            least-squares factor for ``codes - mu * |codes|``. The codes are the same either way.

    Returns:
        ``(codes, scale)``: int8 codes in {-1, 0, 1} of ``weight``'s shape, and the float per-filter
        scale of shape ``(weight.shape[0],)``.

    Raises:
        ValueError: for an unknown method or out-of-range ratio/prune.

    Example:
        >>> w = torch.tensor([[0.3, -0.1, 0.2, -0.4]])
        >>> codes, scale = ot_codes(w)
        >>> codes.tolist(), round(scale.item(), 4)
        ([[1, -1, 1, -1]], 0.25)
    """
    _check_ratio_prune(ratio, prune)
    w = weight.detach().reshape(weight.shape[0], -1)
    if method == "ot":
        n_minus, n_zero, _, mu = ot_spec(w.shape[1], ratio, prune, center)
        if use_triton(w.device, w.shape[1], w.dtype):
            from .kernels.ot_triton import ot_rows

            codes, scale, _ = ot_rows(w, n_minus, n_zero, mu)
            return codes.reshape(weight.shape), scale.to(w.dtype)  # type: ignore[union-attr]
        if numpy_selects(w):
            codes, scale = ot_codes_cpu(w, n_minus, n_zero, mu, cache.scratch if cache is not None else None)
            return codes.reshape(weight.shape), scale
        codes = _selected_codes(w, n_minus, n_zero)
        scale = least_squares_scale(w, codes, nonzero=w.shape[1] - n_zero)
    elif method == "sign":
        codes = torch.sub(1, (w < 0).view(torch.int8), alpha=2)
        scale = w.abs().mean(dim=1)
    elif method == "irnet":
        mean = w.mean(dim=1, keepdim=True)
        std = w.std(dim=1, keepdim=True) if w.shape[1] > 1 else torch.ones_like(mean)
        std = torch.where(std > 0, std, torch.ones_like(std))
        ws = (w - mean) / std
        codes = torch.sub(1, (ws < 0).view(torch.int8), alpha=2)
        mean_abs = ws.abs().mean(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
        scale = torch.pow(2.0, torch.round(torch.log2(mean_abs))) * std.squeeze(1)
    else:
        raise ValueError(f"method must be one of ot, sign, irnet, got {method!r}")
    if center and (method != "ot" or mu != 0):
        scale = least_squares_scale(w, centered_codes(codes, w.dtype))
    return codes.reshape(weight.shape), scale


def binary_weight(
    weight: torch.Tensor,
    ratio: float = 0.5,
    prune: float = 0.0,
    method: str = "ot",
    *,
    center: bool = False,
    cache: OTCache | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The weight a binarized layer trains with, ``scale * levels`` of :func:`ot_codes`, built in as few
    passes as the math needs and straight in ``dtype`` (the dtype the convolution runs in).

    The codes are exactly those of :func:`ot_codes`; the scale is the same least-squares factor, summed
    in another order (equal up to float rounding). For ``ot`` the levels are ``a = 1 - mu`` and
    ``b = -1 - mu``, their counts fixed by the ratio, so

        scale = (a <w, 1{c = 1}> + b <w, 1{c = -1}>) / (a^2 n_plus + b^2 n_minus)

    On CUDA one Triton launch computes the codes, the scale and the weight, for every method; on the
    CPU ``ot`` goes through :mod:`equalbits_cli.quant.cpu_select` (the scale from partitioned sums, no
    codes). There is no host synchronization on any path outside the CPU's.

    Example:
        >>> w = torch.tensor([[0.3, -0.1, 0.2, -0.4]])
        >>> binary_weight(w).tolist()
        [[0.25, -0.25, 0.25, -0.25]]
    """
    _check_ratio_prune(ratio, prune)
    dtype = dtype or weight.dtype
    w = weight.detach().reshape(weight.shape[0], -1)
    if method not in ("ot", "sign", "irnet"):
        raise ValueError(f"method must be one of ot, sign, irnet, got {method!r}")
    n_minus, n_zero, n_plus, mu = ot_spec(w.shape[1], ratio, prune, center) if method == "ot" else (0, 0, 0, 0.0)
    if use_triton(w.device, w.shape[1], w.dtype):
        # one launch: codes, scale and the weight, straight in the compute dtype
        from .kernels.ot_triton import binary_rows

        out = binary_rows(w, method, n_minus, n_zero, mu, center=center, codes=False, scale=False, out_dtype=dtype)
        return out[2].reshape(weight.shape)  # type: ignore[union-attr]
    if method != "ot":
        codes, scale = ot_codes(weight, ratio, prune, method, cache=cache, center=center)
        if center:
            return dequantize(codes, scale.to(dtype), center)
        # one cast and an in-place multiply: 1.5x faster than dequantize's out-of-place product here
        return codes.reshape(w.shape).to(dtype).mul_(scale.to(dtype)[:, None]).reshape(weight.shape)
    if numpy_selects(w):
        (q,) = ot_weights_cpu([w], [(n_minus, n_zero, mu)], [cache.scratch] if cache is not None else None)
        return (q if q.dtype == dtype else q.to(dtype)).reshape(weight.shape)
    # Same-dtype ops only (see least_squares_scale): the codes cast once, then a per-row dot product
    # for the scale and an in-place multiply(-add) for the weight.
    c = _selected_codes(w, n_minus, n_zero).to(w.dtype)
    a, b = 1.0 - mu, -1.0 - mu
    den = a * a * n_plus + b * b * n_minus
    num = torch.linalg.vecdot(w, c)
    if mu:  # sum(w * (c - mu |c|)) = <w, c> - mu <w, |c|>
        num = num - mu * (torch.linalg.vecdot(w, c.abs()) if n_zero else w.sum(dim=1))
    scale = (num / den if den > 0 else torch.zeros_like(num)).to(dtype)[:, None]
    q = c.to(dtype) if dtype != w.dtype else c
    if not mu:
        q = q.mul_(scale)
    elif n_zero:
        q = q.sub_(mu * q.abs()).mul_(scale)
    else:
        q = q.mul_(scale).sub_(mu * scale)
    return q.reshape(weight.shape)


def code_counts(codes: torch.Tensor) -> tuple[int, int, int]:
    """``(n_minus, n_zero, n_plus)`` of a code tensor."""
    n_minus = int((codes == -1).sum())
    n_plus = int((codes == 1).sum())
    return n_minus, codes.numel() - n_minus - n_plus, n_plus


def entropy_bits(codes: torch.Tensor) -> float:
    """Shannon entropy, in bits per weight, of the distribution of code values in ``codes``.

    Example:
        >>> entropy_bits(torch.tensor([1, -1, 1, -1], dtype=torch.int8))
        1.0
        >>> entropy_bits(torch.tensor([1, 1, 1, 1], dtype=torch.int8))
        0.0
    """
    if codes.numel() == 0:
        return 0.0
    return entropy_of_counts(code_counts(codes))


def sqnr_db(weight: torch.Tensor, quantized: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|w|^2 / |w - q|^2)`` in dB (inf if exact)."""
    w = weight.detach().double()
    noise = float(((w - quantized.detach().double()) ** 2).sum())
    signal = float((w**2).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
