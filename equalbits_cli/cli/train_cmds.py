"""``finetune`` and ``eval``: the commands that train and score models on an ImageFolder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import FinetuneConfig
from .app import app
from .options import (
    AlphaOpt,
    AmpOpt,
    AugmentChoice,
    AugmentOpt,
    AutoWorkersOpt,
    BatchOpt,
    CacheTeacherOpt,
    CalibrateOpt,
    ChannelsLastOpt,
    CheckpointOpt,
    CompileOpt,
    CropPctOpt,
    DataOpt,
    DeviceOpt,
    HistoryPlotOpt,
    ImgSizeOpt,
    InterpolationOpt,
    JsonOpt,
    LogOpt,
    MeanOpt,
    OutOpt,
    OverwriteOpt,
    ResumeOpt,
    SaveEveryOpt,
    StdOpt,
    TeacherOpt,
    WeightDecayOpt,
    WorkersOpt,
    data_overrides,
    user_errors,
    with_flags,
)


def _find_student(directory: Path) -> Path:
    """The single binarized latent checkpoint in ``directory`` (for ``finetune`` without CKPT)."""
    from ..formats import LATENT_FORMAT
    from ..paths import read_metadata

    found = []
    for f in sorted(directory.glob("*.safetensors")):
        try:
            if read_metadata(f).get("format") == LATENT_FORMAT:
                found.append(f)
        except (ValueError, OSError):
            continue
    if not found:
        raise ValueError(f"no binarized checkpoint in {directory.resolve()}; run 'equalbits binarize' or pass CKPT")
    if len(found) > 1:
        raise ValueError(f"several binarized checkpoints here ({', '.join(f.name for f in found)}); pass one as CKPT")
    return found[0]


@app.command()
@user_errors
def finetune(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="Binarized checkpoint (default: the single one in the working directory).", show_default=False
        ),
    ] = None,
    data: DataOpt = ...,  # type: ignore[assignment]
    epochs: Annotated[int, typer.Option(help="Passes over train/.")] = FinetuneConfig.epochs,
    lr: Annotated[
        float, typer.Option(help="Peak AdamW learning rate (after warm-up, then cosine to 0).")
    ] = FinetuneConfig.lr,
    batch_size: BatchOpt = FinetuneConfig.batch_size,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    teacher: TeacherOpt = None,
    temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = FinetuneConfig.temperature,
    alpha: AlphaOpt = FinetuneConfig.alpha,
    weight_decay: WeightDecayOpt = FinetuneConfig.weight_decay,
    warmup_steps: Annotated[
        int, typer.Option(help="Linear warm-up steps (at most 10% of training).")
    ] = FinetuneConfig.warmup_steps,
    calibrate_batches: CalibrateOpt = FinetuneConfig.calibrate_batches,
    save_every: SaveEveryOpt = FinetuneConfig.save_every,
    resume: ResumeOpt = None,
    compile: CompileOpt = False,
    channels_last: ChannelsLastOpt = False,
    augment: AugmentOpt = AugmentChoice.none,
    cache_teacher: CacheTeacherOpt = True,
    log: LogOpt = None,
    plot: HistoryPlotOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of data order, augmentation and initialisation.")] = 0,
    workers: AutoWorkersOpt = None,
    device: DeviceOpt = "auto",
    amp: AmpOpt = False,
    output: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Distil the binarized student from its full-precision teacher on an ImageFolder dataset.

    Loss: KL(teacher || student) at temperature T, times T^2, mixed with label cross-entropy by --alpha.
    AdamW, linear warm-up then cosine decay; BatchNorm statistics re-estimated first.

    Images are prepared as the student's file records (from its source checkpoint, else the model's timm config).
    --img-size, --crop-pct, --interpolation, --mean and --std change that; the fine-tuned file records what was used,
    and eval and export read it back.

    [b]Examples[/b]

      equalbits finetune r18.safetensors --data ./imagenet --epochs 5

      equalbits finetune --data ./imagenet            (uses the one checkpoint here)

      torchrun --nproc-per-node 2 -m equalbits_cli finetune r18.safetensors --data ./imagenet

      torchrun --nproc-per-node 8 --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint localhost:29400 \\
        -m equalbits_cli finetune r18.safetensors \\
        --data ./imagenet --resume auto
    """
    import os

    from ..train.finetune import finetune as run_finetune
    from .progress import RichProgress

    over = data_overrides(img_size, crop_pct, interpolation, mean, std)
    config = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        **over.to_dict(),  # the data config's overrides: img_size, crop_pct, interpolation, mean, std
        temperature=temperature,
        alpha=alpha,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        calibrate_batches=calibrate_batches,
        save_every=save_every,
        seed=seed,
        workers=workers,
        amp=amp,
        device=device,
        augment=augment.value,
        compile=compile,
        channels_last=channels_last,
        cache_teacher=cache_teacher,
    )
    if resume not in (None, "yes", "auto"):
        raise ValueError(f"--resume takes no value (continue the saved state) or 'auto', got {resume!r}")
    resume_arg: bool | str = {None: False, "yes": True, "auto": "auto"}[resume]
    student = checkpoint if checkpoint is not None else _find_student(Path("."))
    out = _checked_paths(student, output, teacher, plot, log, resume_arg, overwrite)
    rank = int(os.environ.get("RANK", "0"))
    with RichProgress(enabled=rank == 0) as progress:
        result = run_finetune(
            student, data, config, output=out, teacher=teacher, resume=resume_arg, log=log, progress=progress
        )
    if result is not None:
        _show(result, student, out, plot, overwrite, json_out)


def _show(result, student: Path, out: Path, plot: Path | None, overwrite: bool, json_out: bool) -> None:
    """The fine-tune's plot, and its summary as a table or JSON."""
    from .render import kv_table, print_json, stdout

    if plot is not None:
        from ..report.plots import plot_history

        plot_history(result.history, plot, title=f"fine-tune of {student.name}", exclusive=not overwrite)
    if json_out:
        print_json({**result.to_dict(), "output": str(out)})
        return
    stdout().print(kv_table(f"fine-tuned {student.name} -> {out}", _result_rows(result)))


def _checked_paths(student: Path, output, teacher, plot, log, resume, overwrite: bool) -> Path:
    """The fine-tune's output path, every path it writes checked first (by the first process only)."""
    import os

    from ..paths import check_distinct_paths, check_log_path, check_output_path
    from ..train.state import state_path_for

    if not student.is_file():
        raise FileNotFoundError(f"checkpoint not found: {student}")
    out = output or student.with_name(student.name.removesuffix(".safetensors") + ".ft.safetensors")
    if int(os.environ.get("RANK", "0")) != 0:
        return out
    teacher_file = teacher if teacher is not None and Path(teacher).is_file() else None
    check_distinct_paths(
        {"-o": out, "--plot": plot, "--log": log, "the training state": state_path_for(out)},
        {"CKPT": student, "--teacher": teacher_file},
    )
    resuming = resume is True or (resume == "auto" and state_path_for(out).exists())
    check_output_path(out, overwrite or resuming)
    if plot is not None:
        check_output_path(plot, overwrite)
    if log is not None:
        check_log_path(log)
    return out


def _result_rows(result) -> list[tuple[str, str]]:
    """The fine-tune's summary table."""
    from ..data.config import DataConfig

    rows = [("data", DataConfig.from_dict(result.data_config).describe())]
    rows.append(("teacher top-1", "-" if result.teacher_top1 is None else f"{result.teacher_top1:.2f}%"))
    rows.append(("student top-1, binarized", f"{result.student_top1_before:.2f}%"))
    if result.student_top1_calibrated is not None:
        rows.append(("student top-1, BatchNorm re-estimated", f"{result.student_top1_calibrated:.2f}%"))
    rows += [
        (f"epoch {h['epoch']}: loss / val top-1", f"{h['loss']:.4f} / {h['val_top1']:.2f}%") for h in result.history
    ]
    rows += [
        ("student top-1, fine-tuned", f"{result.student_top1:.2f}%"),
        ("student top-5, fine-tuned", f"{result.student_top5:.2f}%"),
        ("steps / epochs", f"{result.steps} / {result.epochs}"),
        ("processes", str(result.world_size)),
        ("time", f"{result.seconds:.1f} s"),
    ]
    rows += [("warning", with_flags(w)) for w in result.warnings]
    return rows


@app.command("eval")
@user_errors
def eval_(
    model: Annotated[str, typer.Argument(help="Binarized or packed file, or a timm model name (with --checkpoint).")],
    data: DataOpt = ...,  # type: ignore[assignment]
    checkpoint: CheckpointOpt = None,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    amp: AmpOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Top-1 / top-5 accuracy on the val split of an ImageFolder dataset (val/ alone is enough).

    Images are prepared as the file records (the data config it was fine-tuned with), else by the model's timm config.
    --img-size, --crop-pct, --interpolation, --mean and --std override that; the report names what was used.

    [b]Examples[/b]

      equalbits eval r18.ft.safetensors --data ./imagenet

      equalbits eval resnet18 --checkpoint r18_fp.safetensors --data ./imagenet --json
    """
    from ..data.config import DataConfig
    from ..train.evaluate import evaluate_source
    from .progress import RichProgress
    from .render import print_json, stdout

    over = data_overrides(img_size, crop_pct, interpolation, mean, std)
    with RichProgress(enabled=not json_out) as progress:
        result = evaluate_source(
            model,
            data,
            checkpoint=checkpoint,
            data=over,
            batch_size=batch_size,
            workers=workers,
            device=device,
            amp=amp,
            progress=progress,
        )
    if json_out:
        print_json(result)
    else:
        used = DataConfig.from_dict(result["data_config"]).describe()
        stdout().print(
            f"{model}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {result['n']} images ({used})"
        )
