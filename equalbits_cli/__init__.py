"""equalbits: binary networks from timm models with exactly equally distributed weights.

Public API::

    from equalbits_cli import BinarizeConfig, binarize_, binarize_model, load_model, collect_stats
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import BinarizeConfig
from .convert import binarize_, binarize_model, create_model, default_filter
from .io import load_model, save_checkpoint
from .layers import BinaryConv2d, BinaryLinear
from .packing import save_packed
from .quantize import entropy_bits, ot_codes, ot_counts
from .report import LayerStats, ModelStats, collect_stats

__all__ = [
    "__version__",
    "BinarizeConfig",
    "BinaryConv2d",
    "BinaryLinear",
    "LayerStats",
    "ModelStats",
    "binarize_",
    "binarize_model",
    "collect_stats",
    "create_model",
    "default_filter",
    "entropy_bits",
    "load_model",
    "ot_codes",
    "ot_counts",
    "save_checkpoint",
    "save_packed",
]
