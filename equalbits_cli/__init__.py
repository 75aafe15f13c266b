"""equalbits: binary networks from timm models with exactly equally distributed weights.

Public API::

    from equalbits_cli import BinarizeConfig, LayerPolicy, binarize_, binarize_model, load_model, collect_stats

Names are imported on first use (PEP 562), so ``import equalbits_cli`` and ``equalbits --help`` do not
pay for importing torch and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "BinarizeConfig": "config",
    "FinetuneConfig": "config",
    "LayerPolicy": "model.policy",
    "binarize_": "model.convert",
    "binarize_model": "model.convert",
    "create_model": "model.convert",
    "default_filter": "model.convert",
    "load_model": "formats.latent",
    "save_checkpoint": "formats.latent",
    "BinaryConv2d": "nn.layers",
    "BinaryLinear": "nn.layers",
    "PackedBinary": "nn.packed",
    "pack_model": "nn.packed",
    "save_packed": "formats.packed",
    "export_onnx": "export.onnx",
    "export_onnx_int8": "export.int8",
    "binary_weight": "quant.quantize",
    "entropy_bits": "quant.quantize",
    "ot_codes": "quant.quantize",
    "ot_counts": "quant.quantize",
    "LayerStats": "report.stats",
    "ModelStats": "report.stats",
    "collect_stats": "report.inspect",
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
    "PackedBinary",
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
    "pack_model",
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
    from .export.int8 import export_onnx_int8
    from .export.onnx import export_onnx
    from .formats.latent import load_model, save_checkpoint
    from .formats.packed import save_packed
    from .model.convert import binarize_, binarize_model, create_model, default_filter
    from .model.policy import LayerPolicy
    from .nn.layers import BinaryConv2d, BinaryLinear
    from .nn.packed import PackedBinary, pack_model
    from .quant.quantize import binary_weight, entropy_bits, ot_codes, ot_counts
    from .report.inspect import collect_stats
    from .report.stats import LayerStats, ModelStats
