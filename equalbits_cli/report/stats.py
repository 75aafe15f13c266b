"""Statistics records: per layer, per model, per file. Plain dataclasses, no torch, rendered by the CLI.

Sizes: ``fp32_bytes`` counts every tensor of the state dict at its stored width (4 bytes per float32
value). ``packed_bytes`` counts what a packed file must hold: 1 bit per binary weight (2 for ternary
layers), rounded up to whole bytes per layer, plus 4 bytes per per-filter scale, plus every other
tensor as stored. It excludes the file header.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["FileReport", "LayerStats", "ModelStats", "packed_layer_bytes"]


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one Conv2d/Linear layer. Code fields are None for full-precision layers."""

    name: str
    kind: str
    binarized: bool
    shape: tuple[int, ...]
    params: int
    n_plus: int | None = None
    n_minus: int | None = None
    n_zero: int | None = None
    ratio: float | None = None
    entropy_bits: float | None = None
    scale_min: float | None = None
    scale_mean: float | None = None
    scale_max: float | None = None
    sqnr_db: float | None = None
    exact_filters: bool | None = None
    kept_because: str | None = None  # for full-precision layers: stem, classifier, depthwise, gate, ...
    act_plus_share: float | None = None  # 1W/1A layers, with inspect --data: share of +1 activation bits

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if d["sqnr_db"] is not None and not math.isfinite(d["sqnr_db"]):
            d["sqnr_db"] = None
        return d


@dataclass(frozen=True)
class ModelStats:
    """Per-layer statistics and totals of a model."""

    layers: list[LayerStats]
    params: int
    binarized_params: int
    fp32_bytes: int
    packed_bytes: int

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.packed_bytes if self.packed_bytes else math.inf

    @property
    def entropy_bits(self) -> float | None:
        """Mean entropy per binarized weight, weighted by layer size."""
        binar = [s for s in self.layers if s.binarized and s.entropy_bits is not None]
        total = sum(s.params for s in binar)
        return sum(s.entropy_bits * s.params for s in binar) / total if total else None  # type: ignore[operator]

    def totals(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "binarized_params": self.binarized_params,
            "binarized_layers": sum(s.binarized for s in self.layers),
            "fp32_bytes": self.fp32_bytes,
            "packed_bytes": self.packed_bytes,
            "compression": round(self.compression, 3),
            "entropy_bits": self.entropy_bits,
        }


def packed_layer_bytes(numel: int, out_channels: int, ternary: bool) -> int:
    """Bytes a packed binarized layer needs: its bit planes plus fp32 per-filter scales."""
    return (2 if ternary else 1) * ((numel + 7) // 8) + 4 * out_channels


@dataclass(frozen=True)
class FileReport:
    """What ``inspect`` says about a file: its kind, model, config and statistics."""

    path: str
    format: str
    model: str
    config: dict[str, Any]
    stats: ModelStats
    file_bytes: int

    def to_dict(self) -> dict[str, Any]:
        totals = self.stats.totals()
        totals["file_bytes"] = self.file_bytes
        return {
            "file": self.path,
            "format": self.format,
            "model": self.model,
            "config": self.config,
            "layers": [s.to_dict() for s in self.stats.layers],
            "totals": totals,
        }
