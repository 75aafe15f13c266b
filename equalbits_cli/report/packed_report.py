"""``inspect`` of a packed file with numpy alone: no torch, no timm, no model built.

It reads the safetensors header and the bit planes (``safetensors.numpy``), and reports exactly what
:func:`equalbits_cli.report.inspect.inspect_file` reports for the same file (a test compares the two), in a
fraction of the time: most of a command's start-up is importing torch and timm. Files written before
the ``layers`` and ``param_count`` metadata existed go the torch way.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import BinarizeConfig
from ..formats import PACKED_FORMAT
from ..formats.planes import decode_layer
from ..model.policy import INPUT_REASONS, KEEP_REASONS
from ..paths import read_metadata, require_file
from .stats import FileReport, packed_model_stats

__all__ = ["packed_report"]


def _json(path: Path, meta: dict[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path}: metadata {key!r} is missing or not JSON") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: metadata {key!r} must be a JSON {kind.__name__}")
    return value


def packed_report(path: str | os.PathLike) -> FileReport | None:
    """The inspect report of a packed file, or None when the file lacks the metadata this needs.

    Raises:
        ValueError / FileNotFoundError: not a readable packed file.
    """
    from safetensors.numpy import load_file

    path = require_file(path)
    meta = read_metadata(path)
    if meta.get("format") != PACKED_FORMAT or "layers" not in meta or "param_count" not in meta:
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
    real = _json(path, meta, "real_inputs", dict) if "real_inputs" in meta else {}
    if not all(k in binarized and v in INPUT_REASONS for k, v in real.items()):
        raise ValueError(f"{path}: metadata 'real_inputs' must map binarized module names to a reason")
    try:
        params = int(meta["param_count"])
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: cannot read tensors ({type(exc).__name__}: {exc})") from None
    decoded = {}
    for name in binarized:
        if any(name + s not in tensors for s in (".weight.sign", ".weight.scale", ".weight.shape")):
            raise ValueError(f"{path}: binarized layer {name!r} has no packed planes")
        decoded[name] = decode_layer(tensors, name, path)
    shapes = {}
    for name in layers:
        if name not in binarized and name + ".weight" not in tensors:
            raise ValueError(f"{path}: layer {name!r} has no weight tensor")
        shapes[name] = None if name in binarized else tensors[name + ".weight"].shape
    stats = packed_model_stats(shapes, decoded, tensors, params, config, kept, real)
    return FileReport(str(path), PACKED_FORMAT, meta.get("model", ""), asdict(config), stats, os.path.getsize(path))
