"""Exact Equal Bits selection on the CPU, in numpy: each filter's ``k`` lowest weights by introselect.

numpy's introselect (``ndarray.partition``) is several times faster than ``torch.kthvalue`` on the CPU
and releases the GIL, so rows are split over the threads torch uses. One thread's work on a block of
rows (:func:`_ot_rows_numpy`) copies it, partitions the copy once per count, compares the rows with
their k-th values (ties at the k-th value settled by index, as a stable sort would), and takes the
least-squares scale from sums of the partitioned rows: the sum of a row's ``k`` lowest values is the
same whichever of tied values are taken, so no codes are needed for it. It writes what is asked:
int8 codes, the scale, or the weight a training step computes with, ``scale * (codes - mu * |codes|)``.

Arrays of a weight's shape are kept in a ``scratch`` dict between calls where the caller has one
(training steps): fresh memory's first touch costs more than the arithmetic on it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["ot_codes_cpu", "ot_weights_cpu"]

PARALLEL_MIN = 1 << 17  # weights in a layer below which one thread is faster than handing work out


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
    part = _buffer(scratch, "part", a.shape, a.dtype)
    np.copyto(part, a)
    ks = [n_minus, n_minus + n_zero] if n_zero else [n_minus]
    # The masks (1 for the k lowest) are written straight by the comparison in the dtype their use
    # wants: float for the weight (same-dtype arithmetic is fast; bool or uint8 with per-row operands
    # is not), int8 for the codes. The first one goes into the output itself.
    dtype = a.dtype if weight is not None else np.int8
    masks, base = [], 0
    for i, k in enumerate(ks):
        if i == 0 and weight is not None:
            mask = weight
        elif i == 0 and codes is not None:
            mask = codes
        else:
            mask = _buffer(scratch, f"mask{i}", a.shape, dtype)
        if k <= 0 or k >= n:
            mask[...] = 1 if k > 0 else 0
            masks.append(mask)
            continue
        seg = part[:, base:]  # its k - base lowest are the next ones (the lower ones are left of it)
        j = k - base
        seg.partition(j - 1, axis=1)
        kth = seg[:, j - 1 : j]
        # int8 masks take the comparison's bools as they are (a cast to int8 costs 2.5x the comparison)
        np.less_equal(a, kth, out=mask.view(np.bool_) if mask.dtype == np.int8 else mask, casting="unsafe")
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
    # einsum's row sums: 2.5x faster than numpy's pairwise sum along a row here, and single-threaded
    # (a product with a ones vector is faster still, but BLAS would start its own threads in ours)
    s_minus = np.einsum("ij->i", part[:, :k1]).astype(np.float64)
    s_plus = np.einsum("ij->i", part[:, k2:]).astype(np.float64)
    hi, lo = 1.0 - mu, -1.0 - mu  # the levels of +1 and -1
    den = hi * hi * (n - k2) + lo * lo * n_minus
    # <w, levels> = S_plus * hi + S_minus * lo (zeros add nothing)
    scale = (s_plus * hi + s_minus * lo) / den if den > 0 else np.zeros(rows)
    if scale_out is not None:
        scale_out[...] = scale
    if codes is not None:  # codes = 1 - m1 - m2 (m1 within m2), or 1 - 2 m1
        if n_zero:
            codes += masks[1]
            np.subtract(1, codes, out=codes)
        else:
            codes *= -2
            codes += 1
    if weight is not None:
        w_hi = (scale * hi).astype(a.dtype)[:, None]
        if n_zero:  # weight holds the -1 mask: lo * m1 + hi * (1 - m2), one non-zero term per entry
            weight *= (scale * lo).astype(a.dtype)[:, None]
            nonpos = masks[1]
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
