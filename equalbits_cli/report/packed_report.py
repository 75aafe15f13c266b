"""``inspect`` of a packed file with numpy alone: no torch, no timm, no model built.

It reads the safetensors header and the bit planes (``safetensors.numpy``), and reports exactly what
:func:`equalbits_cli.report.inspect.inspect_file` reports for the same file (a test compares the two), in a
fraction of the time: most of a command's start-up is importing torch and timm. Files written before
the ``layers`` and ``param_count`` metadata existed go the torch way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BinarizeConfig
from ..model.policy import KEEP_REASONS
from ..paths import read_metadata, require_file
from ..quant.counts import entropy_of_counts, ot_counts
from .stats import FileReport, LayerStats, ModelStats, packed_layer_bytes

__all__ = ["packed_report"]

_SUFFIXES = (".weight.sign", ".weight.nonzero", ".weight.scale", ".weight.shape")


def _json(path: Path, meta: dict[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path}: metadata {key!r} is missing or not JSON") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: metadata {key!r} must be a JSON {kind.__name__}")
    return value


def _codes(t: dict[str, np.ndarray], name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    shape = tuple(int(d) for d in t[name + ".weight.shape"])
    n = int(np.prod(shape)) if shape else 0
    sign, scale = t[name + ".weight.sign"], t[name + ".weight.scale"]
    nonzero = t.get(name + ".weight.nonzero")
    ok = (
        len(shape) >= 2
        and all(d > 0 for d in shape)
        and sign.dtype == np.uint8
        and sign.shape == ((n + 7) // 8,)
        and scale.shape == (shape[0],)
        and np.isfinite(scale).all()
        and (nonzero is None or (nonzero.dtype == np.uint8 and nonzero.shape == sign.shape))
    )
    if not ok:
        raise ValueError(f"{path}: layer {name!r}: planes, scale or shape do not fit each other")
    neg = np.unpackbits(sign, count=n, bitorder="little").astype(bool)
    codes = np.where(neg, -1, 1).astype(np.int8)
    if nonzero is not None:
        nz = np.unpackbits(nonzero, count=n, bitorder="little").astype(bool)
        if (neg & ~nz).any():
            raise ValueError(f"{path}: layer {name!r}: sign bit set on a zero code")
        codes = codes * nz.astype(np.int8)
    return codes.reshape(shape), scale


def packed_report(path: str | os.PathLike) -> FileReport | None:
    """The inspect report of a packed file, or None when the file lacks the metadata this needs.

    Raises:
        ValueError / FileNotFoundError: not a readable packed file.
    """
    from safetensors.numpy import load_file

    path = require_file(path)
    meta = read_metadata(path)
    if meta.get("format") != "equalbits.packed" or "layers" not in meta or "param_count" not in meta:
        return None
    try:
        config = BinarizeConfig.from_dict({"center": False, **_json(path, meta, "binarize_config", dict)})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad binarize_config: {exc}") from None
    layers = _json(path, meta, "layers", list)
    binarized = set(_json(path, meta, "binarized", list))
    kept = _json(path, meta, "kept", dict) if "kept" in meta else {}
    if not all(isinstance(n, str) for n in layers) or not binarized <= set(layers):
        raise ValueError(f"{path}: metadata 'layers' must list every binarized layer")
    if not all(v in KEEP_REASONS + ("filter",) for v in kept.values()):
        raise ValueError(f"{path}: metadata 'kept' must map module names to a reason")
    try:
        params = int(meta["param_count"])
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: cannot read tensors ({type(exc).__name__}: {exc})") from None
    stats, sizes, fp32_extra = [], {}, {}
    for name in layers:
        if name in binarized:
            if any(name + s not in tensors for s in (".weight.sign", ".weight.scale", ".weight.shape")):
                raise ValueError(f"{path}: binarized layer {name!r} has no packed planes")
            codes, scale = _codes(tensors, name, path)
            flat = codes.reshape(codes.shape[0], -1)
            n_minus, n_plus = int((flat == -1).sum()), int((flat == 1).sum())
            n_zero = flat.size - n_minus - n_plus
            exact = None
            if config.method == "ot":
                want = ot_counts(flat.shape[1], config.ratio, config.prune)
                exact = bool(
                    ((flat == -1).sum(1) == want[0]).all()
                    and ((flat == 0).sum(1) == want[1]).all()
                    and ((flat == 1).sum(1) == want[2]).all()
                )
            s64 = scale.astype(np.float64)
            stats.append(
                LayerStats(
                    name,
                    "Conv2d" if codes.ndim == 4 else "Linear",
                    True,
                    tuple(codes.shape),
                    codes.size,
                    n_plus,
                    n_minus,
                    n_zero,
                    n_plus / (n_plus + n_minus) if n_plus + n_minus else None,
                    entropy_of_counts((n_minus, n_zero, n_plus)),
                    float(s64.min()),
                    float(s64.mean()),
                    float(s64.max()),
                    None,
                    exact,
                )  # fmt: skip
            )
            sizes[name + ".weight"] = packed_layer_bytes(codes.size, codes.shape[0], bool(n_zero))
            fp32_extra[name + ".weight"] = 4 * codes.size
        else:
            w = tensors.get(name + ".weight")
            if w is None:
                raise ValueError(f"{path}: layer {name!r} has no weight tensor")
            kind = "Conv2d" if w.ndim == 4 else "Linear"
            stats.append(LayerStats(name, kind, False, tuple(w.shape), int(w.size), kept_because=kept.get(name)))
    packed_names = {n + s for n in binarized for s in _SUFFIXES}
    plain = sum(v.nbytes for k, v in tensors.items() if k not in packed_names)
    model_stats = ModelStats(
        stats,
        params,
        sum(s.params for s in stats if s.binarized),
        plain + sum(fp32_extra.values()),
        plain + sum(sizes.values()),
    )
    from dataclasses import asdict

    return FileReport(str(path), "equalbits.packed", meta.get("model", ""), asdict(config), model_stats,
                      os.path.getsize(path))  # fmt: skip
