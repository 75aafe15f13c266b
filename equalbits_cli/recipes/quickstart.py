"""The whole path, offline, on real data: built-in dataset -> teacher -> binarize -> fine-tune -> export.

It calls the same library functions as the individual commands (no separate code path) and writes
every artifact into one folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from ..config import BinarizeConfig, FinetuneConfig
from ..errors import Interrupted, SettingError
from ..progress import NullProgress, Progress
from ..train.state import state_path_for

__all__ = ["ARTIFACTS", "run_quickstart"]

ARTIFACTS = {
    "teacher": "teacher.safetensors",
    "student": "student.safetensors",
    "finetuned": "student.ft.safetensors",
    "packed": "student.packed.safetensors",
    "onnx": "student.onnx",
}


def run_quickstart(
    out: str | os.PathLike,
    *,
    model: str = "resnet18",
    dataset: str = "digits",
    img_size: int = 32,
    ratio: float = 0.5,
    teacher_epochs: int = 4,
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = FinetuneConfig.lr,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the quickstart and return its summary (the fields of ``equalbits quickstart --json``).

    Args:
        dataset: A built-in dataset (:data:`equalbits_cli.data.builtin.DATASETS`), written to
            ``out/<dataset>`` at ``img_size`` pixels.

    Raises:
        ValueError: an artifact exists and ``overwrite`` is False, or a bad setting.
    """

    from ..data.builtin import DATASETS, make_dataset
    from ..export.write import export_file
    from ..formats.latent import load_model, save_checkpoint
    from ..model.convert import binarize_model
    from ..report.inspect import collect_stats
    from ..train.finetune import finetune

    progress = progress or NullProgress()
    started = time.perf_counter()
    # Every setting is checked before any work: a bad one must not cost minutes, leave files behind or
    # delete earlier artifacts.
    config = BinarizeConfig(ratio=ratio)
    ft_config = FinetuneConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, workers=0, warmup_steps=20, augment="none"
    )
    _check_settings(model, dataset, img_size, teacher_epochs)
    out = Path(out)
    paths = {k: out / v for k, v in ARTIFACTS.items()}
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise SettingError(f"{out} already holds {', '.join(existing)}; pass `overwrite` or another `out`")
    out.mkdir(parents=True, exist_ok=True)
    for p in paths.values():
        p.unlink(missing_ok=True)
    progress.phase(f"writing the {dataset} ImageFolder ({DATASETS[dataset]}; {img_size}x{img_size})", 1)
    data = make_dataset(dataset, out / dataset, size=img_size)
    progress.advance(1)

    teacher_eval = _train_teacher(model, data, img_size, teacher_epochs, batch_size, seed, paths["teacher"], progress)
    student = binarize_model(model, config, checkpoint=paths["teacher"])
    save_checkpoint(student, paths["student"])
    try:
        # No augmentation: random flips and crops change what a character is.
        ft = finetune(paths["student"], data, ft_config, output=paths["finetuned"], progress=progress)
    except Interrupted as exc:
        state_path_for(paths["finetuned"]).unlink(missing_ok=True)  # quickstart has no --resume
        raise Interrupted(
            f"quickstart interrupted while fine-tuning; {out} holds the data, teacher and student so far; "
            "rerun with `overwrite` to start again",
            exc.signum,
        ) from None
    assert ft is not None
    progress.phase("exporting packed safetensors and ONNX", 2)
    packed = export_file(paths["finetuned"], paths["packed"], format="packed")
    progress.advance(1)
    onnx = export_file(paths["finetuned"], paths["onnx"], format="onnx")
    progress.advance(1)
    stats = collect_stats(load_model(paths["finetuned"]))
    progress.done()
    return {
        "model": model,
        "dataset": dataset,
        "img_size": img_size,
        "ratio": ratio,
        "out": str(out),
        "teacher_top1": teacher_eval["top1"],
        "student_top1_before": ft.student_top1_before,
        "student_top1_calibrated": ft.student_top1_calibrated,
        "student_top1": ft.student_top1,
        "student_top5": ft.student_top5,
        "entropy_bits": stats.entropy_bits,
        "fp32_bytes": stats.fp32_bytes,
        "packed_bytes": packed["bytes"],
        "onnx_bytes": onnx["bytes"],
        "compression": stats.fp32_bytes / packed["bytes"],
        "onnx_max_abs_diff": onnx["max_abs_diff"],
        "artifacts": {k: str(p) for k, p in paths.items()},
        "seconds": time.perf_counter() - started,
    }


def _check_settings(model: str, dataset: str, img_size: int, teacher_epochs: int) -> None:
    """Raise a one-line error for a bad setting, before any work or file."""
    from ..data.builtin import DATASETS
    from ..model.convert import check_model_name

    if dataset not in DATASETS:
        raise SettingError(f"unknown dataset {dataset!r}; the built-in ones are {', '.join(DATASETS)}")
    if not isinstance(img_size, int) or not 8 <= img_size <= 512:
        raise SettingError(f"`img_size` must be an integer from 8 to 512, got {img_size!r}")
    if not isinstance(teacher_epochs, int) or teacher_epochs < 1:
        raise SettingError(
            f"`teacher_epochs` must be at least 1 (an untrained teacher teaches noise), got {teacher_epochs}"
        )
    check_model_name(model)


def _train_teacher(model: str, data, img_size: int, epochs: int, batch_size: int, seed: int, path, progress):
    """Train the full-precision teacher on ``data`` and save it to ``path`` with its data config."""

    from ..data.config import DataOverrides, resolve_data_config
    from ..data.folders import find_splits
    from ..model.convert import create_model, save_full_precision
    from ..train.finetune import train_classifier

    torch.manual_seed(seed)
    classes = len(find_splits(data).classes)
    teacher = create_model(model, num_classes=classes, img_size=img_size)
    # The built-in images fill their frame: the whole image, no centre crop. The teacher file records
    # this (and its accuracy), and every later step reads it from there.
    whole = DataOverrides(img_size=img_size, crop_pct=1.0)
    teacher_eval = train_classifier(
        teacher, data, epochs=epochs, lr=2e-3, batch_size=batch_size, data=whole, seed=seed, progress=progress
    )
    save_full_precision(teacher, path, data_config=resolve_data_config(teacher, whole), top1=teacher_eval["top1"])
    return teacher_eval
