"""How fast an exported ONNX file runs against the float ONNX of the same network, on this machine.

``export`` measures it after every ONNX export, so that nobody ships an int8 model believing it faster
when, for their network and machine, it is not (issue 26: MobileNetV3 int8 ran 0.89x float at 2 threads).
Both files run in the same onnxruntime, the same session options, on the same random batch, in short
blocks of calls taken in turn (:func:`time_onnx`, which ``benchmarks/`` uses too), so that a change in
the machine's load hits both; the median of the calls is reported.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import SettingError

__all__ = ["SpeedResult", "check_threads", "compare_speed", "int8_dot_product", "onnx_session", "time_onnx"]

# /proc/cpuinfo flags of the int8 dot-product instructions onnxruntime's int8 kernels are fastest with.
_DOT_FLAGS = {
    "amx_int8": "AMX-INT8",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "i8mm": "Arm I8MM",
    "asimddp": "Arm dot product",
}


def int8_dot_product(cpuinfo: str | None = None) -> str | None:
    """The int8 dot-product instructions this CPU has (``"AVX-512 VNNI, AVX-VNNI"``), ``""`` when it has
    none, or None when it cannot be told (no ``/proc/cpuinfo``). Without them onnxruntime's int8 kernels
    gain little over float: resnet18 int8 ran 1.05x its float ONNX on an AVX2-only AMD EPYC.

    Example:
        >>> int8_dot_product("flags : fpu sse avx2 avx512_vnni")
        'AVX-512 VNNI'
        >>> int8_dot_product("flags : fpu sse avx2")
        ''
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    line = next((ln for ln in cpuinfo.splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), None)
    if line is None:
        return None
    flags = set(line.split(":", 1)[1].split())
    return ", ".join(name for flag, name in _DOT_FLAGS.items() if flag in flags)


@dataclass(frozen=True)
class SpeedResult:
    """Latencies of the exported file and of its float ONNX baseline, measured in the same run.

    Attributes:
        latency_ms: Median latency of the exported file.
        float_latency_ms: Median latency of the float ONNX of the same model.
        speedup: ``float_latency_ms / latency_ms`` (above 1: the export is faster).
        batch: Images per call.
        threads: onnxruntime's intra-op threads (None: onnxruntime's own choice).
        calls: Timed calls of each file.
        int8_dot: The CPU's int8 dot-product instructions (:func:`int8_dot_product`).
        baseline_ms: Median latencies of further files timed in the same run, by name (an int8 export
            of a 1W/1A model: ``1W/32A int8``, the same network with real-valued activations).
    """

    latency_ms: float
    float_latency_ms: float
    speedup: float
    batch: int
    threads: int | None
    calls: int
    int8_dot: str | None = None
    baseline_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_threads(threads: int | None) -> None:
    """Refuse a thread count onnxruntime cannot take (None: its own choice).

    Raises:
        SettingError: not an integer from 1 to 1024.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024):
        raise SettingError(
            f"`threads` must be between 1 and 1024, got {threads}; leave it out for onnxruntime's own choice"
        )


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session with ``threads`` intra-op threads (None: onnxruntime's own choice) and
    otherwise its default options, as a deployment would create it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_onnx(
    sessions: dict[str, Any],
    x: np.ndarray,
    *,
    seconds: float = 1.0,
    min_calls: int = 5,
    max_calls: int = 200,
    block: int = 3,
) -> dict[str, tuple[float, int]]:
    """Median latency in milliseconds and number of timed calls of each onnxruntime session on input ``x``.

    After one warm-up call each, the sessions run in turn in blocks of ``block`` calls until each had at
    least ``min_calls`` and ``seconds`` have passed, or ``max_calls``. Blocks, not single calls in
    alternation: onnxruntime's worker threads spin for a while after a call, and a session called
    right after another one competes with them (2 cores, resnet18 int8 at batch 8: 65.9 ms in
    alternation, 38.8 ms in blocks, 38.4 ms alone); the first call of a block pays for it, the median
    does not see it.
    """
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"input": x})  # warm-up: onnxruntime finishes preparing on the first call
    started = time.perf_counter()
    while min(len(t) for t in times.values()) < max_calls and (
        min(len(t) for t in times.values()) < min_calls or time.perf_counter() - started < seconds
    ):
        for name, s in sessions.items():
            for _ in range(block):
                t0 = time.perf_counter()
                s.run(None, {"input": x})
                times[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(t) * 1e3, len(t)) for k, t in times.items()}


def compare_speed(
    model: nn.Module,
    exported: str | os.PathLike,
    *,
    threads: int | None = None,
    batch: int = 1,
    seconds: float = 1.0,
    min_calls: int = 5,
    max_calls: int = 200,
    baselines: dict[str, str | os.PathLike] | None = None,
) -> SpeedResult:
    """Time ``exported`` against a float ONNX export of ``model`` (written to a temporary folder).

    Args:
        model: The binarized model ``exported`` was made from.
        exported: An ONNX file ``export`` wrote.
        threads: onnxruntime's intra-op threads; None lets onnxruntime choose, as a deployment would.
        batch: Images per call.
        seconds: About how long to time, both files together, after one warm-up call each.
        min_calls: At least this many timed calls of each.
        max_calls: At most this many.
        baselines: Further ONNX files to time in the same calls, by name (``baseline_ms``).

    Raises:
        ValueError: ``threads`` or ``batch`` out of range.
    """
    from ..data.config import resolve_data_config
    from .onnx import export_onnx

    check_threads(threads)
    if not isinstance(batch, int) or not 1 <= batch <= 1024:
        raise SettingError(f"`bench_batch` must be between 1 and 1024, got {batch}")
    size = resolve_data_config(model).input_size
    x = np.random.default_rng(0).standard_normal((batch, *size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        export_onnx(model, float_path, weights="float")
        paths = {"export": exported, "float": float_path, **(baselines or {})}
        sessions = {name: onnx_session(path, threads) for name, path in paths.items()}
        timed = time_onnx(sessions, x, seconds=seconds, min_calls=min_calls, max_calls=max_calls)
    (mine, calls), (base, _) = timed["export"], timed["float"]
    others = {name: timed[name][0] for name in baselines or {}}
    return SpeedResult(mine, base, base / mine, batch, threads, calls, int8_dot_product(), others)
