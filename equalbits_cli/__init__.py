"""equalbits: binary networks from timm models with exactly equally distributed weights.

Public API::

    from equalbits_cli import BinarizeConfig, LayerPolicy, binarize_, binarize_model, load_model, collect_stats

Names are imported on first use (PEP 562), so ``import equalbits_cli`` and ``equalbits --help`` do not
pay for importing torch and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.5.0"

_EXPORTS = {
    "BinarizeConfig": "config",
    "FinetuneConfig": "config",
    "LayerPolicy": "policy",
    "binarize_": "convert",
    "binarize_model": "convert",
    "create_model": "convert",
    "default_filter": "convert",
    "load_model": "io",
    "save_checkpoint": "io",
    "BinaryConv2d": "layers",
    "BinaryLinear": "layers",
    "save_packed": "packing",
    "export_onnx": "onnx_export",
    "export_onnx_int8": "onnx_int8",
    "binary_weight": "quantize",
    "entropy_bits": "quantize",
    "ot_codes": "quantize",
    "ot_counts": "quantize",
    "LayerStats": "report",
    "ModelStats": "report",
    "collect_stats": "report",
}

__all__ = [
    "__version__",
    "BinarizeConfig",
    "BinaryConv2d",
    "BinaryLinear",
    "FinetuneConfig",
    "LayerPolicy",
    "LayerStats",
    "ModelStats",
    "binarize_",
    "binarize_model",
    "binary_weight",
    "collect_stats",
    "create_model",
    "default_filter",
    "entropy_bits",
    "export_onnx",
    "export_onnx_int8",
    "load_model",
    "ot_codes",
    "ot_counts",
    "save_checkpoint",
    "save_packed",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'equalbits_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs
    from .config import BinarizeConfig, FinetuneConfig
    from .convert import binarize_, binarize_model, create_model, default_filter
    from .io import load_model, save_checkpoint
    from .layers import BinaryConv2d, BinaryLinear
    from .onnx_export import export_onnx
    from .onnx_int8 import export_onnx_int8
    from .packing import save_packed
    from .policy import LayerPolicy
    from .quantize import binary_weight, entropy_bits, ot_codes, ot_counts
    from .report import LayerStats, ModelStats, collect_stats
