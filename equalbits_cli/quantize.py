"""Pure tensor math for binary and ternary weight codes. No nn.Module here.

The Equal Bits quantizer (Li, Pintea, van Gemert, AAAI 2022) maps each output filter's real weights to
a target distribution over {-1, 0, +1} with optimal transport. In one dimension the optimal transport
plan is the monotone (quantile) map: sort the filter and give the lowest share -1, the next share 0
and the rest +1. The forward pass uses ``scale * codes``; the backward pass is the straight-through
estimator (identity), which lives in :mod:`equalbits_cli.layers`.

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

import torch

from .counts import entropy_of_counts, ot_counts

__all__ = [
    "binary_weight",
    "code_offsets",
    "ot_spec",
    "ot_weights_cpu",
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
    total = c.sum(dim=1, dtype=torch.int64)
    nonzero = c.ne(0).sum(dim=1)
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


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, center: bool = False, offset: float | None = None
) -> torch.Tensor:
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
    if not center or offset == 0:  # ``offset``: the filters' common mu when known (ot), saves a pass
        c = codes.to(scale.dtype)
    elif offset is not None:
        c = codes.to(scale.dtype)
        c = c - offset * c.abs() if bool(codes.eq(0).any()) else c - offset
    else:
        c = centered_codes(codes, scale.dtype)
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
    """Per-row thresholds carried from one call of :func:`ot_codes` to the next (one per weight tensor).

    Between training steps weights move little, so last step's threshold usually still splits each
    filter at exactly the right count: then one comparison and one count decide the codes, and only
    the filters whose count is off are selected again. The result is identical either way.
    """

    def __init__(self) -> None:
        self.thresholds: dict[int, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        # When most filters missed last time (large steps), checking the old thresholds is wasted
        # work: skip the check for a few calls (doubling up to 8) before trying again.
        self.skip = 0
        self.backoff = 0
        self.scratch: dict = {}  # numpy buffers binary_weight reuses between steps on the CPU

    def clear(self) -> None:
        self.thresholds.clear()


def _count(mask: torch.Tensor) -> torch.Tensor:
    # Summing a bool tensor through a uint8 view with an int32 accumulator is about 2x faster on CPU.
    return mask.view(torch.uint8).sum(dim=1, dtype=torch.int32)


def _kth_numpy(w, ks: list[int]) -> dict[int, tuple]:
    # numpy's introselect is several times faster than torch.kthvalue on CPU, but partitions once per
    # kth: so one kth per call, the (k+1)-th as the minimum of the part above it, and each larger k
    # selected within that part (whose rank offset is the previous k).
    found = {}
    cur, base = w, 0
    for k in sorted(set(ks)):
        j = k - base  # rank of the k-th smallest within cur (1-based)
        part = cur.copy()  # ndarray.partition in place on a copy is faster than np.partition here
        part.partition(j - 1, axis=1)
        found[k] = (part[:, j - 1 : j].copy(), part[:, j:].min(axis=1, keepdims=True))
        cur, base = part[:, j:], k
    return found


@functools.cache
def _selection_pool(threads: int):
    """Threads for the row-parallel selection (numpy releases the GIL while it partitions)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads, thread_name_prefix="equalbits-select")


_PARALLEL_MIN = 1 << 17  # weights per layer below which one thread is faster than handing work out


def _kth_smallest(w: torch.Tensor, ks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's ``k``-th and ``(k+1)``-th smallest values (1-based ``k < n``), as ``(rows, 1)`` tensors.

    Large layers are split by rows over the CPU threads torch uses (numpy releases the GIL while it
    partitions): 1.5x faster on two cores (resnet18's convolutions, 10.8 -> 7.0 ms).
    """
    if w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64):
        import numpy as np

        a = w.numpy()
        threads = min(torch.get_num_threads(), a.shape[0])
        if threads > 1 and a.size >= _PARALLEL_MIN:
            chunks = np.array_split(a, threads, axis=0)
            parts = list(_selection_pool(threads).map(lambda c: _kth_numpy(c, ks), chunks))
            return [
                (
                    torch.from_numpy(np.concatenate([p[k][0] for p in parts])),
                    torch.from_numpy(np.concatenate([p[k][1] for p in parts])),
                )
                for k in ks
            ]
        found = _kth_numpy(a, ks)
        return [(torch.from_numpy(found[k][0]), torch.from_numpy(found[k][1])) for k in ks]
    return [
        (torch.kthvalue(w, k, dim=1, keepdim=True).values, torch.kthvalue(w, k + 1, dim=1, keepdim=True).values)
        for k in ks
    ]


def _ot_weight_numpy(a, out, n_minus: int, n_zero: int, mu: float, scratch: dict | None = None) -> None:
    """Write ``scale * (codes - mu * |codes|)`` of the ``ot`` codes of each row of ``a`` into ``out``
    (numpy, float32 or float64), selection included, in one thread's worth of numpy calls.

    Each row's ``k`` lowest come from introselect on a copy; the scale needs no codes: with the row
    partitioned, the sums of its ``k1`` lowest and its values above the ``k2``-th are slice sums (the
    same whichever of tied values are taken), and ``<w, c> = S_plus - S_minus``,
    ``<w, |c|> = S_plus + S_minus``. The weight is then a few elementwise passes over the masks.
    ``scratch`` (arrays of ``a``'s shape, kept between training steps) saves fresh memory, whose
    first touch costs more than the arithmetic on it.
    """
    import numpy as np

    rows, n = a.shape
    scratch = {} if scratch is None else scratch

    def buffer(name: str, dtype) -> np.ndarray:
        buf = scratch.get(name)
        if buf is None or buf.shape != a.shape or buf.dtype != dtype:
            buf = scratch[name] = np.empty(a.shape, dtype=dtype)
        return buf

    part = buffer("part", a.dtype)
    np.copyto(part, a)
    ks = [n_minus, n_minus + n_zero] if n_zero else [n_minus]
    # Float masks (1.0 for the k lowest), written straight by the comparison: later arithmetic on
    # them is same-dtype and fast, unlike on bool or uint8 with per-row operands.
    masks, base = [], 0
    for i, k in enumerate(ks):
        mask = out if i == 0 else buffer("mask", a.dtype)
        if k <= 0 or k >= n:
            mask[...] = 1.0 if k > 0 else 0.0
            masks.append(mask)
            continue
        seg = part[:, base:]  # its k - base lowest are the next ones (the lower ones are left of it)
        j = k - base
        seg.partition(j - 1, axis=1)
        kth = seg[:, j - 1 : j]
        np.less_equal(a, kth, out=mask, casting="unsafe")
        # w <= kth holds exactly k entries unless the next value ties with the k-th: only such rows
        # need the tie-break by index (the lowest-index entries equal to the k-th value go).
        tied = np.flatnonzero(seg[:, j:].min(axis=1) == kth[:, 0])
        if tied.size:
            sub, v = a[tied], kth[tied]
            equal = sub == v
            need = k - (sub < v).sum(axis=1, keepdims=True)
            mask[tied] = (sub < v) | (equal & (np.cumsum(equal, axis=1) <= need))
        masks.append(mask)
        base = k
    k1, k2 = ks[0], ks[-1]
    s_minus = part[:, :k1].sum(axis=1).astype(np.float64)
    s_plus = part[:, k2:].sum(axis=1).astype(np.float64)
    n_plus = n - k2
    hi, lo = 1.0 - mu, -1.0 - mu  # the levels of +1 and -1
    den = hi * hi * n_plus + lo * lo * n_minus
    num = (s_plus - s_minus) - mu * (s_plus + s_minus)
    scale = num / den if den > 0 else np.zeros(rows)
    w_hi = (scale * hi).astype(a.dtype)[:, None]
    if n_zero:  # out holds the -1 mask: lo * m1 + hi * (1 - m2), one non-zero term per entry
        out *= (scale * lo).astype(a.dtype)[:, None]
        nonpos = masks[1]
        np.subtract(1, nonpos, out=nonpos)
        nonpos *= w_hi
        out += nonpos
    else:  # hi + m * (lo - hi): exactly hi where m is 0, within a rounding of lo where it is 1
        out *= (scale * (lo - hi)).astype(a.dtype)[:, None]
        out += w_hi


def ot_weights_cpu(
    weights: list[torch.Tensor], specs: list[tuple[int, int, float]], scratches: list[dict] | None = None
) -> list[torch.Tensor]:
    """Training weights of many 2-D float32/float64 CPU weights (:func:`_ot_weight_numpy`, spec
    ``(n_minus, n_zero, mu)`` each) in one round of the selection threads: large layers are split by
    rows over the threads torch uses, small ones go whole to the least loaded thread. One hand-off per
    call, not per layer: torch's own worker threads spin for a while after each operation, and a
    hand-off per layer would meet them every time (measured: 23 ms against 15 ms for resnet18)."""
    import numpy as np

    arrays = [w.numpy() for w in weights]
    outs = [np.empty_like(a) for a in arrays]
    scratches = scratches if scratches is not None else [{} for _ in weights]
    threads = min(torch.get_num_threads(), max(1, sum(a.size for a in arrays) // _PARALLEL_MIN))
    work: list[list[tuple]] = [[] for _ in range(threads)]
    load = [0] * threads
    for a, out, spec, scratch in zip(arrays, outs, specs, scratches):
        if threads > 1 and a.size >= _PARALLEL_MIN and a.shape[0] >= threads:
            bounds = np.linspace(0, a.shape[0], threads + 1).astype(int)
            for t, (i, j) in enumerate(zip(bounds[:-1], bounds[1:])):
                work[t].append((a[i:j], out[i:j], *spec, scratch.setdefault(t, {})))
                load[t] += (j - i) * a.shape[1]
        else:
            t = load.index(min(load))
            work[t].append((a, out, *spec, scratch.setdefault("whole", {})))
            load[t] += a.size

    def run(items: list[tuple]) -> None:
        for item in items:
            _ot_weight_numpy(*item)

    if threads > 1:
        list(_selection_pool(threads).map(run, work))
    else:
        run(work[0])
    return [torch.from_numpy(out) for out in outs]


def _select_rows(w: torch.Tensor, ks: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Exact lowest-``k`` masks of every row, ties to the lower index, and thresholds for next time.

    The threshold kept is the midpoint between the k-th and (k+1)-th values, the split most likely
    to stay exact after the weights move a little.
    """
    masks, taus = [], []
    for k, (kth, next_) in zip(ks, _kth_smallest(w, ks)):
        mask = w <= kth
        # w <= kth holds exactly k entries unless the (k+1)-th value equals the k-th (a tie across
        # the boundary): only those rows need the index tie-break.
        tied = (next_ == kth).squeeze(1).nonzero().squeeze(1)
        if tied.numel():
            # Keep the lowest-index entries equal to the k-th value (as a stable sort would).
            sub, v = w[tied], kth[tied]
            equal = sub == v
            need = k - _count(sub < v).unsqueeze(1)
            mask[tied] = (sub < v) | (equal & (equal.cumsum(dim=1) <= need))
        masks.append(mask)
        taus.append(kth + (next_ - kth) / 2)
    return masks, taus


def _lowest_k_syncfree(w: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of each row's ``k`` lowest entries, ties to the lower index, with no host synchronization
    (no ``nonzero``, no data-dependent shapes): the k-th value from ``kthvalue``, the ties at it settled
    by a cumulative count. For accelerators without the Triton kernel."""
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


def _selected_codes(w: torch.Tensor, n_minus: int, n_zero: int, cache: OTCache | None) -> torch.Tensor:
    """Int8 ``ot`` codes of the 2-D ``w``: its ``n_minus`` lowest per row -1, the next ``n_zero`` 0."""
    if n_zero:
        minus, nonpos = _lowest_k_masks(w, [n_minus, n_minus + n_zero], cache)
        return 1 - minus.view(torch.int8) - nonpos.view(torch.int8)
    (minus,) = _lowest_k_masks(w, [n_minus], cache)
    return torch.sub(1, minus.view(torch.int8), alpha=2)


def _use_triton(device: torch.device, n: int, dtype: torch.dtype = torch.float32) -> bool:
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


def _lowest_k_masks(w: torch.Tensor, ks: list[int], cache: OTCache | None) -> list[torch.Tensor]:
    """Boolean masks of each row's ``k`` lowest entries for each ``k`` (ties to the lower index).

    On the CPU: numpy's introselect, and last call's thresholds (``cache``) where they still split
    exactly. Elsewhere the sync-free path: the threshold check and the repair of the rows it misses
    need host reads, which cost more on an accelerator than they save."""
    if w.device.type != "cpu":
        return [_lowest_k_syncfree(w, k) for k in ks]
    rows, n = w.shape
    masks: list[torch.Tensor | None] = [None] * len(ks)
    todo = []
    for i, k in enumerate(ks):
        if k <= 0:
            masks[i] = torch.zeros_like(w, dtype=torch.bool)
        elif k >= n:
            masks[i] = torch.ones_like(w, dtype=torch.bool)
        else:
            todo.append(i)
    if not todo:
        return masks  # type: ignore[return-value]
    ks_todo = [ks[i] for i in todo]
    cached = cache is not None and all(
        ks[i] in cache.thresholds and cache.thresholds[ks[i]].shape == (rows, 1) for i in todo
    )
    if cached and cache is not None and cache.skip > 0:
        cache.skip -= 1
        cached = False
    if not cached:
        new_masks, taus = _select_rows(w, ks_todo)
        for i, m in zip(todo, new_masks):
            masks[i] = m
        if cache is not None:
            cache.misses += rows
            cache.thresholds = {k: t for k, t in zip(ks_todo, taus)}
        return masks  # type: ignore[return-value]
    assert cache is not None
    warm = []
    bad = torch.zeros(rows, dtype=torch.bool, device=w.device)
    for k in ks_todo:
        # Exactly k entries below the old threshold means they are the k lowest, ties or not: every
        # entry below it is strictly smaller than every entry at or above it.
        m = w < cache.thresholds[k]
        bad |= _count(m) != k
        warm.append(m)
    bad_rows = bad.nonzero().squeeze(1)
    cache.hits += rows - bad_rows.numel()
    cache.misses += bad_rows.numel()
    if 2 * bad_rows.numel() > rows:
        # Most filters moved past their threshold: selecting all rows beats gathering and scattering.
        cache.backoff = min(8, 2 * cache.backoff or 1)
        cache.skip = cache.backoff
        new_masks, taus = _select_rows(w, ks_todo)
        cache.thresholds = {k: t for k, t in zip(ks_todo, taus)}
        warm = new_masks
    else:
        cache.backoff = 0
    if 2 * bad_rows.numel() <= rows and bad_rows.numel():
        fixed, taus = _select_rows(w[bad_rows], ks_todo)
        for k, m, f, t in zip(ks_todo, warm, fixed, taus):
            m[bad_rows] = f
            cache.thresholds[k][bad_rows] = t
    for i, m in zip(todo, warm):
        masks[i] = m
    return masks  # type: ignore[return-value]


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
        cache: An :class:`OTCache` kept between calls on the same (slowly changing) weight, as in
            training: it makes the call cheaper, never different.
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
    if method == "ot" and _use_triton(w.device, w.shape[1], w.dtype):
        from .kernels.ot_triton import ot_rows

        n_minus, n_zero, _, mu = ot_spec(w.shape[1], ratio, prune, center)
        codes, scale, _ = ot_rows(w, n_minus, n_zero, mu)
        return codes.reshape(weight.shape), scale.to(w.dtype)  # type: ignore[union-attr]
    if method == "ot":
        n_minus, n_zero, _ = ot_counts(w.shape[1], ratio, prune)
        codes = _selected_codes(w, n_minus, n_zero, cache)
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
    if center and (method != "ot" or ot_offset(w.shape[1], ratio, prune) != 0):
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
    ``b = -1 - mu``, their counts fixed by the ratio, so with float codes ``c``

        scale = (<w, c> - mu <w, |c|>) / (a^2 n_plus + b^2 n_minus)

    and the weight is ``c`` scaled in place: no extra tensor beyond the float codes.

    On CUDA one Triton launch computes the codes, the scale and the weight, for every method; there is
    no host synchronization on any path outside the CPU's.

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
    n = w.shape[1]
    n_minus, n_zero, n_plus, mu = ot_spec(n, ratio, prune, center) if method == "ot" else (0, 0, 0, 0.0)
    if _use_triton(
        w.device, w.shape[1], w.dtype
    ):  # one launch: codes, scale and the weight, straight in the compute dtype
        from .kernels.ot_triton import binary_rows

        out = binary_rows(w, method, n_minus, n_zero, mu, center=center, codes=False, scale=False, out_dtype=dtype)
        return out[2].reshape(weight.shape)  # type: ignore[union-attr]
    if method != "ot":
        codes, scale = ot_codes(weight, ratio, prune, method, cache=cache, center=center)
        if center:
            return dequantize(codes, scale.to(dtype), center)
        # one cast and an in-place multiply: 1.5x faster than dequantize's out-of-place product here
        return codes.reshape(w.shape).to(dtype).mul_(scale.to(dtype)[:, None]).reshape(weight.shape)
    if w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64):
        (q,) = ot_weights_cpu([w], [(n_minus, n_zero, mu)], [cache.scratch] if cache is not None else None)
        return (q if q.dtype == dtype else q.to(dtype)).reshape(weight.shape)
    # Same-dtype ops only (see least_squares_scale): the codes cast once, then a per-row dot product
    # for the scale and an in-place multiply(-add) for the weight.
    c = _selected_codes(w, n_minus, n_zero, cache).to(w.dtype)
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
