"""Reading ONNX files equalbits wrote: the graph and its metadata, checked against each other.

``inspect`` and ``eval`` of an ONNX file both start here, so that one set of checks guards both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.config import DataConfig
from . import ONNX_FORMAT, PACKED_FORMAT
from .files import FileInfo, file_info

__all__ = ["OnnxInfo", "read_equalbits_onnx", "read_onnx_info"]


def read_equalbits_onnx(path: str | os.PathLike):
    """``(ModelProto, metadata dict)`` of an ONNX file ``export`` wrote, weights inline.

    Raises:
        ValueError: unreadable, not written by equalbits, or referring to external data.
    """
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    meta = {p.key: p.value for p in m.metadata_props}
    if meta.get("format") != ONNX_FORMAT:
        raise ValueError(f"{path}: not an ONNX file written by equalbits export (no equalbits metadata)")
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"{path}: initializer {init.name[:100]!r} refers to external data; equalbits writes none")
    return m, meta


@dataclass(frozen=True)
class OnnxInfo:
    """An equalbits ONNX file's graph and checked metadata (what ``inspect`` and ``eval`` read).

    Attributes:
        graph: The ``onnx.ModelProto``, weights inline.
        meta: The raw metadata strings.
        info: The model description, checked as for any equalbits file.
        data_config: The preprocessing recorded, matching the graph's input.
        num_classes: The classifier's size.
    """

    graph: Any
    meta: dict[str, str]
    info: FileInfo
    data_config: DataConfig
    num_classes: int | None


def _dims(value_info) -> list[int]:
    """A graph input's or output's dimensions (0 where dynamic)."""
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def read_onnx_info(path: str | os.PathLike) -> OnnxInfo:
    """Read an equalbits ONNX file and check its metadata against itself and its graph.

    The one check every reader of our ONNX files goes through: the metadata as for any equalbits file
    (format version, model, constructor arguments, classes, data config with its bounded input size),
    then the graph's input (``N x C x H x W``, the recorded size) and output (``N x classes``).

    Raises:
        ValueError: unreadable, not written by equalbits, or metadata that contradicts itself or the graph.
    """
    path = Path(path)
    m, meta = read_equalbits_onnx(path)
    if len(m.graph.input) < 1 or len(m.graph.output) < 1:
        raise ValueError(f"{path}: the graph has no input or no output")
    in_dims, out_dims = _dims(m.graph.input[0]), _dims(m.graph.output[0])
    fixed = tuple(in_dims[1:]) if len(in_dims) == 4 and all(d > 0 for d in in_dims[1:]) else None
    info = file_info(path, {**meta, "format": PACKED_FORMAT}, input_size=fixed)
    if len(in_dims) != 4:
        raise ValueError(f"{path}: the graph's input has {len(in_dims)} dimensions; an image model takes 4 (NCHW)")
    if len(out_dims) != 2:
        raise ValueError(f"{path}: the graph's output has {len(out_dims)} dimensions; a classifier gives 2")
    cfg = info.data_config  # a version-1 file's is its architecture's, at the graph's size (migrate.py)
    if cfg is None:
        raise ValueError(f"{path}: records no data config, and none can be made for model {info.model!r}")
    for have, want, what in zip(in_dims[1:], cfg.input_size, ("channels", "height", "width")):
        if have > 0 and have != want:
            raise ValueError(f"{path}: metadata says input {what} {want}, but the graph takes {have}")
    num_classes = info.model_kwargs.get("num_classes") or (out_dims[1] if out_dims[1] > 0 else None)
    if out_dims[1] > 0 and num_classes != out_dims[1]:
        raise ValueError(f"{path}: metadata says {num_classes} classes, but the graph gives {out_dims[1]} outputs")
    if info.classes is not None and num_classes is not None and len(info.classes) > num_classes:
        raise ValueError(f"{path}: metadata 'classes' lists more classes than the graph gives")
    return OnnxInfo(m, meta, info, cfg, num_classes)
