"""Exact Equal Bits selection on the CPU, in numpy: each filter's ``k`` lowest weights.

One thread's work on a block of rows (:func:`_ot_rows_numpy`): find per row a threshold under which
exactly ``k`` weights lie (:func:`_kth`), compare the rows with it (ties at the k-th value settled by
index, as a stable sort would), and take the least-squares scale from the masked row sums. It writes
what is asked: int8 codes, the scale, or the weight a training step computes with,
``scale * (codes - mu * |codes|)``. Rows are split over the threads torch uses (numpy releases the GIL).

Where the caller keeps a ``scratch`` dict between calls (a layer's :class:`~equalbits_cli.quant.
quantize.OTCache`: training steps, and the codes of a validation), it holds arrays of the
weight's shape (fresh memory's first touch costs more than the arithmetic on it) and each row's last
threshold. A training step moves every weight a little, so the k-th value moves past the old threshold
in nearly every row, but not far: counting the weights under the old threshold and under one probe
beyond it (a pass each, about 20x cheaper than numpy's introselect, ``ndarray.partition``) brackets
the new k-th value between two thresholds with a few dozen values between them, which are sorted. Rows
not bracketed so, and every row on a first call, go through introselect. Measured on resnet18's
weights in a fine-tune (``benchmarks/quantizer.py``): see docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["ot_codes_cpu", "ot_weights_cpu"]

PARALLEL_MIN = 1 << 17  # weights in a layer below which one thread is faster than handing work out
MAX_BAND = 1024  # most values between two counted thresholds that are sorted to find the k-th among them


@functools.cache
def _pool(threads: int):
    """Threads for the row-parallel selection (numpy releases the GIL while it partitions)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads, thread_name_prefix="equalbits-select")


def _buffer(scratch: dict, name: str, shape: tuple, dtype) -> np.ndarray:
    buf = scratch.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = scratch[name] = np.empty(shape, dtype=dtype)
    return buf


def _count_le(a: np.ndarray, t: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """Per row, how many entries of ``a`` are ``<= t`` (``buf``: a bool array of ``a``'s shape)."""
    np.less_equal(a, t[:, None], out=buf)
    return buf.view(np.uint8).sum(axis=1, dtype=np.int32)  # 2x faster than count_nonzero or an int64 sum


def _partitioned(a: np.ndarray, k: int, rows: np.ndarray, scratch: dict) -> tuple[np.ndarray, np.ndarray]:
    """The ``k``-th and ``k+1``-th lowest values of the given rows of ``a``, by introselect on a copy
    (``inf`` for a ``k+1``-th past the row's end)."""
    if len(rows) == a.shape[0]:  # all of them (a first call): into the kept buffer, no gather
        sub = _buffer(scratch, "part", a.shape, a.dtype)
        np.copyto(sub, a)
    else:
        sub = a[rows]
    sub.partition(k - 1, axis=1)
    nxt = sub[:, k:].min(axis=1) if k < a.shape[1] else np.full(len(rows), np.inf, a.dtype)
    return sub[:, k - 1].copy(), nxt


def _from_hint(a, k, hint, rho, buf, buf2):
    """The rows' ``k``-th lowest values found near last step's (``hint``, the local density of values
    ``rho``): ``(t, kth, nxt, found)``. Two counts of the entries under a threshold (a pass each, 20x
    cheaper than introselect): at the hint, and one step beyond the k-th value's predicted place. A row
    whose count hits ``k`` is found (``t``: exactly ``k`` entries ``<= t``); a row whose k-th value lies
    between the two is found among the few values between them (sorted); others are not found."""
    R, n = a.shape
    c0 = _count_le(a, hint, buf)
    d = k + 0.5 - c0  # ranks to go; the step overshoots by a few standard deviations of the rank error
    with np.errstate(invalid="ignore", over="ignore"):
        probe = (hint + (d + np.sign(d) * (2 * np.sqrt(np.abs(d)) + 4)) / rho).astype(a.dtype)
    probe = np.where(np.isfinite(probe), probe, hint)
    c1 = _count_le(a, probe, buf2)  # buf still holds a <= hint
    moved = (c1 != c0) & (probe != hint)
    rho[moved] = np.abs(c1 - c0)[moved] / np.abs(probe.astype(np.float64) - hint)[moved]
    up = probe > hint
    clo, chi = np.where(up, c0, c1), np.where(up, c1, c0)
    t = np.where(c0 == k, hint, probe)
    kth, nxt = t.copy(), np.full(R, np.inf, a.dtype)  # a row counted at k ties nothing: its nxt is above t
    found = (c0 == k) | (c1 == k)
    band = ~found & (clo < k) & (k <= chi) & (chi - clo <= MAX_BAND)  # the k-th value lies between the two thresholds
    rows = np.flatnonzero(band)
    if rows.size:
        np.logical_xor(buf, buf2, out=buf)  # (a <= hint) != (a <= probe): lo < a <= hi, either way round
        if rows.size < R:
            buf[~band] = False  # the other rows give no values
        values = a[buf]  # row by row
        sizes = chi[rows] - clo[rows]
        if values.size == sizes.sum():  # (NaNs are in no count and no band; anything else: not found)
            width = int(sizes.max())
            grid = np.full((rows.size, width), np.inf, a.dtype)
            starts = np.cumsum(sizes) - sizes
            grid[np.repeat(np.arange(rows.size), sizes), np.arange(values.size) - np.repeat(starts, sizes)] = values
            grid.sort(axis=1)
            j = k - clo[rows]  # the k-th value is the j-th (from 1) of its band
            kth[rows] = t[rows] = grid[np.arange(rows.size), j - 1]
            inside = j < sizes
            nxt[rows[inside]] = grid[np.flatnonzero(inside), j[inside]]
            found[rows] = True
    return t, kth, nxt, found


def _kth(a: np.ndarray, k: int, scratch: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``a`` a threshold ``t`` and the rows whose ``k``-th and ``k+1``-th lowest values tie
    (``t`` is then the k-th value; the lowest indices among the tied take the rest of the ``k``); in every
    other row exactly ``k`` entries are ``<= t``. Found near the last call's thresholds, kept in
    ``scratch``, where there are any; the rows not found there (and all on a first call) by introselect."""
    rows, n = a.shape
    buf = _buffer(scratch, "bool", a.shape, np.bool_)
    hint, rho = scratch.get(f"{name}.hint"), scratch.get(f"{name}.rho")
    warm = hint is not None and hint.shape == (rows,) and hint.dtype == a.dtype
    if warm:
        t, kth, nxt, found = _from_hint(a, k, hint, rho, buf, _buffer(scratch, "bool2", a.shape, np.bool_))
        missing = np.flatnonzero(~found)
    else:
        t, kth, nxt = np.empty(rows, a.dtype), np.empty(rows, a.dtype), np.empty(rows, a.dtype)
        # the density of values near the k-th, roughly (a normal's at its mean), from every 16th column
        rho = n / np.maximum(2.5 * a[:, ::16].std(axis=1), 1e-30)
        missing = np.arange(rows)
    if missing.size:
        kth[missing], nxt[missing] = _partitioned(a, k, missing, scratch)
        t[missing] = kth[missing]
    scratch[f"{name}.hint"], scratch[f"{name}.rho"] = t, rho
    return t, np.flatnonzero(kth == nxt)


def _ot_rows_numpy(
    a: np.ndarray,
    n_minus: int,
    n_zero: int,
    mu: float,
    scratch: dict,
    weight: np.ndarray | None = None,
    codes: np.ndarray | None = None,
    scale_out: np.ndarray | None = None,
) -> None:
    """Selection, scale and the asked outputs for the rows of ``a`` (float32 or float64, C-contiguous).

    ``weight`` (``a``'s dtype) receives ``scale * (codes - mu * |codes|)``; ``codes`` (int8) the codes;
    ``scale_out`` (float64, one per row) the least-squares scale of the levels ``codes - mu * |codes|``.
    """
    rows, n = a.shape
    ks = [n_minus, n_minus + n_zero] if n_zero else [n_minus]
    # The masks (1 for the k lowest) are written in a's dtype: same-dtype arithmetic is fast (bool or
    # uint8 with per-row operands is not). The first one goes into the output weight itself.
    masks = []
    for i, k in enumerate(ks):
        mask = weight if i == 0 and weight is not None else _buffer(scratch, f"mask{i}", a.shape, a.dtype)
        if k <= 0 or k >= n:
            mask[...] = 1 if k > 0 else 0
        else:
            t, tied = _kth(a, k, scratch, f"k{i}")
            below = np.less_equal(a, t[:, None], out=_buffer(scratch, "bool", a.shape, np.bool_))
            np.copyto(mask, below, casting="unsafe")  # 1.5x faster than comparing straight into floats
            if tied.size:  # the lowest-index entries equal to the k-th value go
                sub, v = a[tied], t[tied][:, None]
                equal = sub == v
                need = k - (sub < v).sum(axis=1, keepdims=True)
                mask[tied] = (sub < v) | (equal & (np.cumsum(equal, axis=1) <= need))
        masks.append(mask)
    low, nonpos = masks[0], masks[-1]
    # The sums come from the masks, never from how a row was selected: every path gives the same scale.
    # Row dot products by vecdot (BLAS's dot, several accumulators: 4e-7 of the sum on 16k weights,
    # where einsum's one running sum was 2e-5 off) and the row total by numpy's pairwise sum.
    s_minus = np.vecdot(a, low).astype(np.float64)
    s_nonpos = np.vecdot(a, nonpos).astype(np.float64) if n_zero else s_minus
    s_plus = a.sum(axis=1, dtype=a.dtype).astype(np.float64) - s_nonpos if ks[-1] < n else np.zeros(rows)
    hi, lo = 1.0 - mu, -1.0 - mu  # the levels of +1 and -1
    den = hi * hi * (n - ks[-1]) + lo * lo * n_minus
    # <w, levels> = S_plus * hi + S_minus * lo (zeros add nothing)
    scale = (s_plus * hi + s_minus * lo) / den if den > 0 else np.zeros(rows)
    if scale_out is not None:
        scale_out[...] = scale
    if codes is not None:  # codes = 1 - m1 - m2 (m1 within m2), or 1 - 2 m1
        np.subtract(1, low + nonpos, out=codes, casting="unsafe")
    if weight is not None:
        w_hi = (scale * hi).astype(a.dtype)[:, None]
        if n_zero:  # weight holds the -1 mask: lo * m1 + hi * (1 - m2), one non-zero term per entry
            weight *= (scale * lo).astype(a.dtype)[:, None]
            np.subtract(1, nonpos, out=nonpos)
            nonpos *= w_hi
            weight += nonpos
        else:  # hi + m * (lo - hi): exactly hi where m is 0, within a rounding of lo where it is 1
            weight *= (scale * (lo - hi)).astype(a.dtype)[:, None]
            weight += w_hi


def _run(jobs: list[tuple[np.ndarray, dict, tuple[int, int, float], dict]]) -> None:
    """Run :func:`_ot_rows_numpy` over ``(a, outputs, (n_minus, n_zero, mu), scratch)`` jobs in one round
    of the threads: large layers split by rows over all threads, small ones whole to the least loaded.
    One hand-off per call, not per layer: torch's own worker threads spin for a while after each
    operation, and a hand-off per layer would meet them every time (resnet18's weights in a training
    step: 23 ms with a hand-off per layer, 18-21 ms in one round)."""
    total = sum(a.size for a, *_ in jobs)
    threads = max(1, min(torch.get_num_threads(), total // PARALLEL_MIN))
    work: list[list[tuple]] = [[] for _ in range(threads)]
    load = [0] * threads
    for a, outs, spec, scratch in jobs:
        if threads > 1 and a.size >= PARALLEL_MIN and a.shape[0] >= threads:
            bounds = np.linspace(0, a.shape[0], threads + 1).astype(int)
            for t, (i, j) in enumerate(zip(bounds[:-1], bounds[1:])):
                part = {name: arr[i:j] for name, arr in outs.items()}
                work[t].append((a[i:j], *spec, scratch.setdefault(t, {}), part))
                load[t] += (j - i) * a.shape[1]
        else:
            t = load.index(min(load))
            work[t].append((a, *spec, scratch.setdefault("whole", {}), outs))
            load[t] += a.size

    def run(items: list[tuple]) -> None:
        for a, n_minus, n_zero, mu, scratch, outs in items:
            _ot_rows_numpy(a, n_minus, n_zero, mu, scratch, **outs)

    # This thread takes the first share itself: one thread fewer to wake, and to compete with
    # torch's for the cores.
    pending = [_pool(threads - 1).submit(run, items) for items in work[1:]] if threads > 1 else []
    run(work[0])
    for future in pending:
        future.result()


def ot_weights_cpu(
    weights: list[torch.Tensor], specs: list[tuple[int, int, float]], scratches: list[dict] | None = None
) -> list[torch.Tensor]:
    """Training weights ``scale * (codes - mu * |codes|)`` of 2-D float32/float64 CPU weights, each with
    its spec ``(n_minus, n_zero, mu)``, in one round of the selection threads."""
    scratches = scratches if scratches is not None else [{} for _ in weights]
    arrays = [w.numpy() for w in weights]
    outs = [np.empty_like(a) for a in arrays]
    _run([(a, {"weight": out}, spec, s) for a, out, spec, s in zip(arrays, outs, specs, scratches)])
    return [torch.from_numpy(out) for out in outs]


def ot_codes_cpu(
    w: torch.Tensor, n_minus: int, n_zero: int, mu: float = 0.0, scratch: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes and the least-squares scale (of the levels ``codes - mu * |codes|``, in ``w``'s dtype)
    of the 2-D float32/float64 CPU ``w``: its ``n_minus`` lowest per row -1, the next ``n_zero`` 0."""
    a = w.numpy()
    codes = np.empty(a.shape, dtype=np.int8)
    scale = np.empty(a.shape[0])
    _run([(a, {"codes": codes, "scale_out": scale}, (n_minus, n_zero, mu), {} if scratch is None else scratch)])
    return torch.from_numpy(codes), torch.from_numpy(scale).to(w.dtype)
