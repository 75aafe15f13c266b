"""``export``: packed safetensors or ONNX from a binarized checkpoint, verified after writing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..data.config import DataOverrides, resolve_data_config
from ..errors import SettingError
from .int8 import check_ranges_name

__all__ = ["FORMATS", "export_file", "verify_packed"]

FORMATS = ("packed", "onnx", "onnx-int8")


def verify_packed(model: torch.nn.Module, packed_path: str | os.PathLike) -> float:
    """Max |difference| between ``model`` and ``load_model(packed_path)`` on a random batch (0 expected:
    the codes are bit-identical and the scales stored exactly).

    Raises:
        ValueError: if the outputs differ.
    """
    from ..formats.latent import load_model
    from .onnx import export_data_config

    c, h, w = export_data_config(model).input_size
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    loaded = load_model(packed_path)
    model.eval()
    with torch.no_grad():
        diff = float((model(x) - loaded(x)).abs().max())
    if diff != 0:
        raise ValueError(f"{packed_path}: reloaded packed model differs from the checkpoint by {diff:.3g}")
    return diff


def export_file(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    format: str = "packed",
    onnx_weights: str = "packed",
    data_overrides: DataOverrides | None = None,
    overwrite: bool = False,
    data: str | os.PathLike | None = None,
    calibrate_batches: int | None = None,
    bench: bool = False,
    threads: int | None = None,
    bench_batch: int = 1,
    int8_exclude: tuple[str, ...] | list[str] = (),
    progress: Any = None,
    exact_binary: bool | None = None,
    int8_ranges: str | None = None,
) -> dict[str, Any]:
    """Export ``checkpoint`` to ``output`` and verify it; returns a JSON-ready summary.

    ``format`` is ``packed`` (1-bit safetensors), ``onnx`` (float graph, weights packed or float) or
    ``onnx-int8`` (static int8 for stock onnxruntime, calibrated on the images of ``data``). The
    output records the checkpoint's data config with ``data_overrides`` on top (the ONNX input size).
    With ``bench``, an ONNX export is timed against the float ONNX of the same model in onnxruntime
    (:func:`equalbits_cli.export.speed.compare_speed`, ``threads`` and ``bench_batch``); a file slower
    than float gets a warning saying so (``warnings`` in the summary). ``int8_exclude`` (``onnx-int8``):
    module name globs kept float (:func:`equalbits_cli.export.int8.find_exclusion`). ``exact_binary``
    (``onnx-int8`` of a 1W/1A model): integer ops on the packed codes, bit-faithful and slow.
    ``int8_ranges`` (``onnx-int8``): ``static`` or ``dynamic`` activation ranges (default: by family, see
    :func:`equalbits_cli.export.int8.default_ranges`).

    Raises:
        ValueError: bad arguments, a damaged checkpoint, or a failed verification (then nothing is kept).
    """
    from ..formats.latent import load_model
    from ..formats.packed import save_packed
    from ..paths import atomic_write, check_distinct_paths, check_output_path, read_metadata
    from ..report.inspect import collect_stats

    _check_settings(format, data, calibrate_batches, threads, bench_batch)
    _check_int8_settings(format, int8_exclude, exact_binary, int8_ranges)
    calibrate_batches = 8 if calibrate_batches is None else calibrate_batches
    out = check_output_path(output, overwrite)
    check_distinct_paths({"-o": out}, {"CHECKPOINT": checkpoint})
    meta = read_metadata(checkpoint) if Path(checkpoint).suffix == ".safetensors" else {}
    if not str(meta.get("format", "")).startswith("equalbits."):
        raise ValueError(
            f"{checkpoint} is not a binarized checkpoint; make one first (binarize_model and save_checkpoint; on the "
            f"command line: equalbits binarize MODEL --checkpoint {checkpoint})"
        )
    model = load_model(checkpoint)
    model.equalbits_meta["data_config"] = resolve_data_config(model, data_overrides)
    stats = collect_stats(model)
    if format == "packed":
        # Written and verified under a temporary name; only a verified file takes the final name.
        with atomic_write(out, exclusive=not overwrite) as tmp:
            save_packed(model, tmp)
            diff = verify_packed(model, tmp)
        extra: dict[str, Any] = {}
    elif format == "onnx":
        diff, extra = _export_onnx(model, out, onnx_weights, data, overwrite)
    else:
        from dataclasses import asdict

        from .int8 import export_onnx_int8

        assert data is not None
        r = export_onnx_int8(
            model,
            out,
            data,
            calibrate_batches=calibrate_batches,
            exclusive=not overwrite,
            int8_exclude=tuple(int8_exclude),
            progress=progress,
            exact_binary=exact_binary,
            ranges=int8_ranges,
        )
        diff = r.max_abs_diff
        extra = {k: v for k, v in asdict(r).items() if k not in ("path", "bytes", "max_abs_diff")}
    if bench and format != "packed":
        extra.update(_bench(model, out, threads, bench_batch, progress, format, data, calibrate_batches))
    size = Path(out).stat().st_size
    return {
        "output": str(out),
        "format": format,
        "bytes": size,
        "fp32_bytes": stats.fp32_bytes,
        "theoretical_bytes": stats.packed_bytes,
        "compression": stats.fp32_bytes / size,
        "max_abs_diff": diff,
        "data_config": model.equalbits_meta["data_config"].to_dict(),
        **extra,
    }


def _real_activation_int8(model, path: Path, data: Any, calibrate_batches: int | None) -> Path:
    """The int8 ONNX of ``model`` with every binary layer computing on real-valued inputs (1W/32A)."""
    from .int8 import export_onnx_int8, with_real_inputs

    kwargs = {} if calibrate_batches is None else {"calibrate_batches": calibrate_batches}
    export_onnx_int8(with_real_inputs(model), path, data, check_images=0, **kwargs)
    return path


def _check_settings(
    format: str, data: Any, calibrate_batches: int | None, threads: int | None, bench_batch: int
) -> None:
    """Refuse settings that do not fit ``format`` or each other, before any work."""
    if format not in FORMATS:
        raise SettingError(f"`format` must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "onnx-int8" and data is None:
        raise SettingError("`format` onnx-int8 calibrates activations on images: pass `data` DIR (an image folder)")
    if format == "packed" and data is not None:
        raise SettingError("`data` is used by the ONNX formats only (a packed file reproduces PyTorch exactly)")
    if format != "onnx-int8" and calibrate_batches is not None:
        raise SettingError("`calibrate_batches` applies to `format` onnx-int8 only")
    if format == "packed" and (threads is not None or bench_batch != 1):
        raise SettingError("`threads` and `bench_batch` apply to the ONNX formats (a packed file is not timed)")
    from .speed import check_threads

    check_threads(threads)
    if not isinstance(bench_batch, int) or not 1 <= bench_batch <= 1024:
        raise SettingError(f"`bench_batch` must be between 1 and 1024, got {bench_batch}")


def _check_int8_settings(format: str, int8_exclude, exact_binary: bool | None, int8_ranges: str | None) -> None:
    """Refuse the onnx-int8 settings given with another ``format``, and unknown ``int8_ranges``."""
    given = {"int8_exclude": bool(int8_exclude), "exact_binary": exact_binary is not None}
    given["int8_ranges"] = int8_ranges is not None
    for name, is_given in given.items():
        if is_given and format != "onnx-int8":
            raise SettingError(f"`{name}` applies to `format` onnx-int8 only")
    check_ranges_name(int8_ranges, "int8_ranges")


def _export_onnx(model, out: Path, onnx_weights: str, data: Any, overwrite: bool) -> tuple[float, dict[str, Any]]:
    """The float/packed ONNX export: ``(max |difference|, summary fields)``, with the top-1 agreement on
    ``data``'s val images when given (bad data is refused before the export, not after)."""
    from .int8 import image_sets, top1_agreement
    from .onnx import export_onnx

    val_set = image_sets(model, data)[1] if data is not None else None
    result = export_onnx(model, out, weights=onnx_weights, exclusive=not overwrite)
    extra: dict[str, Any] = {"onnx_weights": onnx_weights, "rel_diff": result.rel_diff}
    if val_set is not None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        extra["agreement"], extra["agreement_images"] = top1_agreement(session, model, val_set)
    return result.max_abs_diff, extra


def _bench(
    model,
    out: Path,
    threads: int | None,
    bench_batch: int,
    progress: Any,
    format: str,
    data: Any = None,
    calibrate_batches: int | None = None,
) -> dict[str, Any]:
    """The exported file timed against the float ONNX (``speed``), and a warning when it is slower; an
    int8 file that gains little on a CPU without int8 dot-product instructions says why. An int8 file of
    a 1W/1A model is also timed against the int8 file of the same network with real-valued activations
    (``speed.baseline_ms["1W/32A int8"]``), exported to a temporary folder."""
    import tempfile

    from .onnx import has_binary_activations
    from .speed import compare_speed

    if progress is not None:
        progress.phase("timing against the float ONNX", None)
    with tempfile.TemporaryDirectory() as tmp:
        baselines = {}
        if format == "onnx-int8" and has_binary_activations(model) and data is not None:
            baselines["1W/32A int8"] = _real_activation_int8(model, Path(tmp) / "w1a32.onnx", data, calibrate_batches)
        speed = compare_speed(model, out, threads=threads, batch=bench_batch, baselines=baselines)
    extra: dict[str, Any] = {"speed": speed.to_dict()}
    if speed.speedup < 1.0:
        extra["warnings"] = [
            f"this file runs at {speed.speedup:.2f}x the speed of the float ONNX here ({speed.latency_ms:.2f} "
            f"against {speed.float_latency_ms:.2f} ms a batch of {speed.batch}): slower than float on this "
            "machine; keep the float ONNX for speed, or try other `threads`"
        ]
    if format == "onnx-int8" and speed.speedup < 1.5 and speed.int8_dot == "":
        extra.setdefault("notes", []).append(
            "this CPU has no int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX-INT8; Arm: dot product), "
            "and onnxruntime's int8 kernels gain little over float without them (resnet18 int8: 1.05x its float "
            "ONNX on an AVX2-only AMD EPYC); time the file on the CPU you deploy to"
        )
    return extra
