"""The paper's key experiment on your own model and data: accuracy and entropy across bit ratios.

For each setting the full-precision model is binarized, fine-tuned by distillation with the same
recipe, and evaluated. ``ot`` runs at every ratio (and prune); ``sign`` and ``irnet`` cannot enforce
a ratio, so each runs once and is reported at the +1 ratio it happens to give.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .config import BinarizeConfig, FinetuneConfig
from .train import NullProgress, Progress

__all__ = ["parse_floats", "run_sweep"]


def parse_floats(text: str, name: str) -> list[float]:
    """``"0.1,0.5"`` -> ``[0.1, 0.5]``; a clear error otherwise."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def _source(model_or_ckpt: str, checkpoint: str | None) -> tuple[str, str | None, bool]:
    """(timm name, full-precision checkpoint, pretrained) of what to binarize."""
    from .io import file_info

    path = Path(model_or_ckpt)
    if path.is_file():
        info = file_info(path)
        src = info.source or {}
        if not src.get("checkpoint") and not src.get("pretrained"):
            raise ValueError(f"{path} does not record a full-precision source; pass a timm name and --checkpoint")
        return src.get("model") or info.model, src.get("checkpoint"), bool(src.get("pretrained"))
    return model_or_ckpt, checkpoint, checkpoint is None


def run_sweep(
    model_or_ckpt: str,
    data_dir: str | os.PathLike,
    *,
    ratios: list[float],
    prunes: list[float] | None = None,
    methods: list[str] | None = None,
    checkpoint: str | None = None,
    finetune_config: FinetuneConfig | None = None,
    workdir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Binarize, fine-tune and evaluate at every setting; one row per setting.

    Returns:
        Rows with ``method``, ``ratio`` (target for ot, measured otherwise), ``prune``, ``top1``,
        ``top5``, ``top1_before``, ``entropy_bits``.
    """
    from .convert import binarize_model
    from .io import load_model, save_checkpoint
    from .report import collect_stats
    from .train import finetune

    progress = progress or NullProgress()
    prunes = prunes or [0.0]
    methods = methods or ["ot"]
    for m in methods:
        BinarizeConfig(method=m)  # validates the name
    settings: list[BinarizeConfig] = []
    for method in methods:
        if method == "ot":
            settings += [BinarizeConfig(ratio=r, prune=p) for p in prunes for r in ratios]
        else:
            settings.append(BinarizeConfig(method=method))
    name, ckpt, pretrained = _source(model_or_ckpt, checkpoint)
    config = finetune_config or FinetuneConfig(epochs=2)
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i, cfg in enumerate(settings):
            progress.phase(f"setting {i + 1}/{len(settings)}: {cfg.method} ratio {cfg.ratio:g} prune {cfg.prune:g}", 1)
            student = binarize_model(name, cfg, checkpoint=ckpt, pretrained=pretrained)
            path = save_checkpoint(student, Path(tmp) / f"s{i}.safetensors")
            out = Path(tmp) / f"s{i}.ft.safetensors"
            result = finetune(path, data_dir, config, output=out, progress=progress)
            assert result is not None
            stats = collect_stats(load_model(out))
            binar = [s for s in stats.layers if s.binarized]
            measured = sum(s.n_plus or 0 for s in binar) / max(
                1, sum((s.n_plus or 0) + (s.n_minus or 0) for s in binar)
            )
            rows.append(
                {
                    "method": cfg.method,
                    "ratio": cfg.ratio if cfg.method == "ot" else round(measured, 4),
                    "measured_ratio": measured,
                    "prune": cfg.prune,
                    "top1": result.student_top1,
                    "top5": result.student_top5,
                    "top1_before": result.student_top1_before,
                    "teacher_top1": result.teacher_top1,
                    "entropy_bits": stats.entropy_bits,
                }
            )
    return rows
