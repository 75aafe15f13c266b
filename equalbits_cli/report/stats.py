"""Statistics records: per layer, per model, per file. Plain dataclasses, no torch, rendered by the CLI.

Sizes: ``fp32_bytes`` counts every tensor of the state dict at its stored width (4 bytes per float32
value). ``packed_bytes`` counts what a packed file must hold: 1 bit per binary weight (2 for ternary
layers), rounded up to whole bytes per layer, plus 4 bytes per per-filter scale, plus every other
tensor as stored. It excludes the file header.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ..formats.planes import SUFFIXES
from ..quant.counts import entropy_of_counts, ot_counts

__all__ = [
    "FileReport",
    "LayerStats",
    "ModelStats",
    "binary_layer_stats",
    "packed_layer_bytes",
    "packed_model_stats",
    "summarize_sweep",
]


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
    inputs: str | None = None  # binarized layers of 1W/1A models: "1-bit", or "real (<reason>)"

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


def _kind(shape: tuple[int, ...]) -> str:
    return "Conv2d" if len(shape) == 4 else "Linear"


def binary_layer_stats(
    name: str,
    codes: np.ndarray,
    scale: np.ndarray,
    config: Any = None,
    sqnr_db: float | None = None,
) -> LayerStats:
    """Statistics of one binarized layer from its codes and per-filter scales: every reader's one builder.

    Args:
        config: The layer's :class:`equalbits_cli.BinarizeConfig`; with method ``ot`` it sets
            ``exact_filters``: whether every filter has exactly the counts :func:`ot_counts` promises.
        sqnr_db: The quantization's signal-to-noise ratio, where the latent weights are known.

    Example:
        >>> from equalbits_cli import BinarizeConfig
        >>> st = binary_layer_stats("fc", np.array([[1, -1], [-1, 1]]), np.ones(2), BinarizeConfig())
        >>> st.ratio, st.entropy_bits, st.exact_filters
        (0.5, 1.0, True)
    """
    flat = np.asarray(codes).reshape(codes.shape[0], -1)
    per_filter = [(flat == c).sum(axis=1) for c in (-1, 0, 1)]
    n_minus, n_zero, n_plus = (int(c.sum()) for c in per_filter)
    exact = None
    if config is not None and config.method == "ot":
        want = ot_counts(flat.shape[1], config.ratio, config.prune)
        exact = all(bool((got == w).all()) for got, w in zip(per_filter, want))
    s = np.asarray(scale, dtype=np.float64)
    unpruned = n_plus + n_minus
    return LayerStats(
        name=name,
        kind=_kind(tuple(codes.shape)),
        binarized=True,
        shape=tuple(int(d) for d in codes.shape),
        params=int(flat.size),
        n_plus=n_plus,
        n_minus=n_minus,
        n_zero=n_zero,
        ratio=n_plus / unpruned if unpruned else None,
        entropy_bits=entropy_of_counts((n_minus, n_zero, n_plus)),
        scale_min=float(s.min()),
        scale_mean=float(s.mean()),
        scale_max=float(s.max()),
        sqnr_db=sqnr_db,
        exact_filters=exact,
    )


def input_label(name: str, config: Any, real_inputs: Mapping[str, str]) -> str | None:
    """What a binarized layer computes on: ``1-bit`` inputs, ``real (<reason>)`` inputs in a model
    with 1-bit activations, or None in a model with real activations."""
    if getattr(config, "activations", None) != "sign":
        return None
    return f"real ({real_inputs[name]})" if name in real_inputs else "1-bit"


def packed_model_stats(
    layers: Mapping[str, tuple[int, ...] | None],
    binarized: Mapping[str, tuple[np.ndarray, np.ndarray]],
    tensors: Mapping[str, Any],
    params: int,
    config: Any = None,
    kept: Mapping[str, str] | None = None,
    real_inputs: Mapping[str, str] | None = None,
) -> ModelStats:
    """Statistics of a model read from a file: one builder for packed files and ONNX exports.

    Args:
        layers: Every Conv2d/Linear module name, in module order, with its weight's shape (None for the
            binarized ones: their codes have it).
        binarized: ``(codes, scale)`` of each binarized layer, decoded.
        tensors: Every stored tensor by name (arrays, or anything with ``nbytes``); the binarized layers'
            packed fields (:data:`equalbits_cli.formats.planes.SUFFIXES`) are counted by their codes.
        params: The model's parameter count.
        config: The binarization config (for the exact-count check).
        kept: Why each full-precision layer was kept (stem, classifier, ...).
        real_inputs: With 1-bit activations, the binarized layers that compute on real inputs, and why.

    """
    kept = kept or {}
    stats, plain, binary_bytes, fp32_binary = [], 0, 0, 0
    for name, shape in layers.items():
        if name in binarized:
            codes, scale = binarized[name]
            st = binary_layer_stats(name, codes, scale, config)
            st = replace(st, inputs=input_label(name, config, real_inputs or {}))
            binary_bytes += packed_layer_bytes(codes.size, codes.shape[0], bool(st.n_zero))
            fp32_binary += 4 * codes.size
        else:
            shape = tuple(int(d) for d in shape or ())
            st = LayerStats(name, _kind(shape), False, shape, math.prod(shape), kept_because=kept.get(name))
        stats.append(st)
    plain = sum(
        int(v.nbytes) for k, v in tensors.items() if not (k.endswith(SUFFIXES) and k.rsplit(".", 2)[0] in binarized)
    )
    return ModelStats(
        stats, params, sum(s.params for s in stats if s.binarized), plain + fp32_binary, plain + binary_bytes
    )


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


def summarize_sweep(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting over its seeds: ``top1_mean``, ``top1_std`` (sample standard deviation, 0 for
    one seed), ``seeds`` (how many), with the setting's fields, its mean entropy and (for ``sign`` and
    ``irnet``, whose ratio is measured) its mean +1 ratio.

    Example:
        >>> rows = [dict(method="ot", prune=0.0, ratio=0.5, top1=t, entropy_bits=1.0) for t in (80.0, 82.0)]
        >>> s = summarize_sweep(rows)[0]
        >>> s["top1_mean"], round(s["top1_std"], 3), s["seeds"]
        (81.0, 1.414, 2)
        >>> signs = [dict(method="sign", prune=0.0, ratio=r, top1=80.0, entropy_bits=1.0) for r in (0.49, 0.51)]
        >>> [(s["ratio"], s["seeds"]) for s in summarize_sweep(signs)]
        [(0.5, 2)]
    """
    import statistics

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        # ot's ratio is the setting; sign and irnet measure theirs, which differs from seed to seed
        ratio = r["ratio"] if r["method"] == "ot" else None
        key = (r["method"], r["prune"], r.get("center"), r.get("activations", "none"), ratio)
        groups.setdefault(key, []).append(r)
    out = []
    for (method, prune, center, activations, _), items in groups.items():
        top1 = [r["top1"] for r in items]
        out.append(
            {
                "method": method,
                "prune": prune,
                "center": center,
                "activations": activations,
                "ratio": statistics.fmean(r["ratio"] for r in items),
                "seeds": len(items),
                "top1_mean": statistics.fmean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "entropy_bits": statistics.fmean(r["entropy_bits"] for r in items),
            }
        )
    return out
