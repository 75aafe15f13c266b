"""The ``equalbits`` command line: one thin command per library call (parse, build config, call, render)."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated

import typer

from .options import (
    ActivationsOpt,
    CheckpointOpt,
    DepthwiseOpt,
    ExcludeOpt,
    GatesOpt,
    IncludeOpt,
    JsonOpt,
    MethodOpt,
    NumClassesOpt,
    OutOpt,
    OverwriteOpt,
    PretrainedOpt,
    PruneOpt,
    RatioOpt,
    user_errors,
)

app = typer.Typer(
    name="equalbits",
    help=(
        "Binary networks from timm models with exactly equally distributed weights (Equal Bits, AAAI 2022).\n\n"
        "Typical path: binarize -> finetune -> eval -> export. Every command takes --json for scripts."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


class AugmentChoice(str, enum.Enum):
    none = "none"
    light = "light"
    full = "full"


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"equalbits {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of errors (also EQUALBITS_DEBUG=1).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Binary networks from timm models with exactly equally distributed weights (Equal Bits, AAAI 2022).

    Typical path: binarize -> finetune -> eval -> export. Every command takes --json for scripts.
    """
    import os
    import warnings

    if debug:
        os.environ["EQUALBITS_DEBUG"] = "1"
    else:  # library warnings (torch, timm) would break the one-line error promise; --debug shows them
        warnings.filterwarnings("ignore")


def _default_output(source: str, suffix: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.split("/")[-1].removeprefix("hf-hub:"))
    return Path(f"{stem}{suffix}")


@app.command()
@user_errors
def binarize(
    model: Annotated[str, typer.Argument(help="timm model name (resnet18) or hf-hub:org/name.")],
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = True,
    num_classes: NumClassesOpt = None,
    ratio: RatioOpt = 0.5,
    prune: PruneOpt = 0.0,
    method: MethodOpt = "ot",
    activations: ActivationsOpt = "none",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    binarize_depthwise: DepthwiseOpt = False,
    binarize_gates: GatesOpt = False,
    output: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Binarize the Conv2d/Linear layers of a timm model and save a latent checkpoint.

    Kept full precision by default, each with its reason in the table: the stem, the classifier,
    depthwise convolutions and squeeze-excite gates (they cost accuracy for little size; see the
    README's recipe table). --include / --exclude (shell globs on module names) override that.

    [b]Examples[/b]

      equalbits binarize resnet18 --ratio 0.5 -o r18.safetensors

      equalbits binarize resnet18 --checkpoint my_r18.pth --prune 0.3

      equalbits binarize mobilenetv3_small_100 --checkpoint m.pth --exclude 'blocks.5.*'

      equalbits binarize resnet18 --no-pretrained --ratio 0.3 --prune 0.2 --json
    """
    from .. import binarize_model, collect_stats, save_checkpoint
    from ..config import BinarizeConfig
    from ..io import check_output_path
    from ..policy import LayerPolicy
    from .render import print_json, show_stats, stderr

    config = BinarizeConfig(ratio=ratio, prune=prune, method=method, activations=activations)
    policy = LayerPolicy(
        depthwise=binarize_depthwise, gates=binarize_gates, include=tuple(include or ()), exclude=tuple(exclude or ())
    )
    out = check_output_path(output or _default_output(model, ".binary.safetensors"), overwrite)
    net = binarize_model(
        model, config, pretrained=pretrained, checkpoint=checkpoint, num_classes=num_classes, policy=policy
    )
    stats = collect_stats(net)
    save_checkpoint(net, out, exclusive=not overwrite)
    if json_out:
        print_json(
            {
                "model": net.equalbits_meta["model"],
                "config": config.__dict__,
                "policy": policy.to_dict(),
                "output": str(out),
                "layers": [s.to_dict() for s in stats.layers],
                "totals": stats.totals(),
            }
        )
    else:
        show_stats(stats, f"{model}  method={method} ratio={ratio} prune={prune} activations={activations}")
        stderr().print(f"wrote {out}")


@app.command()
@user_errors
def inspect(
    file: Annotated[Path, typer.Argument(help="A file equalbits wrote (.safetensors, .onnx) or a plain state dict.")],
    model: Annotated[
        str | None, typer.Option(help="timm architecture of a plain state dict (not needed for our files).")
    ] = None,
    ratio: RatioOpt = 0.5,
    prune: PruneOpt = 0.0,
    method: MethodOpt = "ot",
    plot: Annotated[Path | None, typer.Option(help="Also draw per-layer ratio, entropy and SQNR to this PNG.")] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="ImageFolder root: also report each 1W/1A layer's share of +1 activation bits on a batch."),
    ] = None,
    img_size: Annotated[int | None, typer.Option(help="Input size for --data (default: the model's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --plot file if it exists.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Per-layer bit ratios, entropy, SQNR and sizes of a file.

    For a plain timm state dict (with --model), shows what binarize would do with --ratio/--prune/--method.
    """
    from ..config import BinarizeConfig
    from ..io import check_output_path
    from ..report import inspect_file
    from .render import print_json, show_stats

    if plot is not None:
        check_output_path(plot, overwrite)
    report = inspect_file(file, model, BinarizeConfig(ratio=ratio, prune=prune, method=method))
    if data is not None:
        from ..evaluate import activation_batch
        from ..io import load_model
        from ..report import activation_shares, with_activation_shares

        net = load_model(file)
        report = with_activation_shares(report, activation_shares(net, activation_batch(net, data, img_size)))
    if plot is not None:
        from ..plots import plot_layers

        plot_layers(report.stats, plot, title=f"{report.model} ({Path(report.path).name})")
    if json_out:
        print_json(report.to_dict())
    else:
        show_stats(report.stats, f"{report.path}  [{report.format}]  model={report.model}", report.file_bytes)


@app.command()
@user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A binarized checkpoint (from binarize or finetune).")],
    format: Annotated[
        str, typer.Option("--format", "-f", metavar="[packed|onnx]", help="packed: 1-bit safetensors; onnx: ONNX.")
    ] = "packed",
    onnx_weights: Annotated[
        str,
        typer.Option(
            metavar="[packed|float]",
            help="ONNX only. packed: uint8 bit planes + unpack ops; float: plain float weights.",
        ),
    ] = "packed",
    img_size: Annotated[int | None, typer.Option(help="ONNX input size (default: the model's).")] = None,
    output: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a packed 1-bit safetensors file or an ONNX model, then verify it against PyTorch.

    [b]Examples[/b]

      equalbits export r18.safetensors --format packed -o r18.packed.safetensors

      equalbits export r18.safetensors --format onnx -o r18.onnx
    """
    from ..export import export_file
    from .render import human_bytes, print_json, stderr

    if format not in ("packed", "onnx"):
        raise ValueError(f"--format must be packed or onnx, got {format!r}")
    suffix = ".packed.safetensors" if format == "packed" else ".onnx"
    out = output or checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + suffix)
    result = export_file(
        checkpoint, out, format=format, onnx_weights=onnx_weights, img_size=img_size, overwrite=overwrite
    )
    if json_out:
        print_json(result)
    else:
        stderr().print(
            f"wrote {result['output']} ({human_bytes(result['bytes'])}, {result['compression']:.2f}x smaller than "
            f"fp32); max |difference| vs PyTorch {result['max_abs_diff']:.3g}"
        )


def _find_student(directory: Path) -> Path:
    """The single binarized latent checkpoint in ``directory`` (for ``finetune`` without CKPT)."""
    from ..io import LATENT_FORMAT, read_metadata

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


DataOpt = Annotated[Path, typer.Option("--data", help="ImageFolder root with train/ and val/ (or validation/).")]
ImgSizeOpt = Annotated[int | None, typer.Option(help="Input size (default: the model's data config).")]
BatchOpt = Annotated[int, typer.Option(help="Batch size per process.")]
WorkersOpt = Annotated[int, typer.Option(help="Data loader worker processes.")]
DeviceOpt = Annotated[
    str, typer.Option(metavar="[auto|cpu|cuda|cuda:N]", help="auto: CUDA when available (one GPU per local rank).")
]
AmpOpt = Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision (bf16 on CPU, fp16 on CUDA).")]


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
    epochs: Annotated[int, typer.Option(help="Passes over train/.")] = 5,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (after warm-up, then cosine to 0).")] = 5e-3,
    batch_size: BatchOpt = 64,
    img_size: ImgSizeOpt = None,
    teacher: Annotated[
        str | None,
        typer.Option(help="Teacher: timm name (pretrained) or state dict file. Default: the student's source."),
    ] = None,
    temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = 1.0,
    alpha: Annotated[
        float, typer.Option(help="Share of label cross-entropy in the loss (0 = pure distillation).")
    ] = 0.0,
    weight_decay: Annotated[
        float, typer.Option(help="AdamW decay of full-precision weights (never latent binary).")
    ] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps (at most 10% of training).")] = 100,
    calibrate_batches: Annotated[
        int, typer.Option(help="Batches to re-estimate BatchNorm statistics first (0: off).")
    ] = 20,
    save_every: Annotated[
        int, typer.Option(help="Save the training state every N steps (and at each epoch end).")
    ] = 200,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the saved training state of -o.")] = False,
    augment: Annotated[
        AugmentChoice,
        typer.Option(
            help="none; light: random crops of 64-100% of the area, no flips; full: timm's ImageNet training transform."
        ),
    ] = AugmentChoice.none,
    log: Annotated[
        Path | None, typer.Option(help="Append JSON lines (every 10 steps and each epoch) to this file.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw loss, learning rate and validation top-1 per epoch to this PNG.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of data order, augmentation and initialisation.")] = 0,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    amp: AmpOpt = False,
    output: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Distil the binarized student from its full-precision teacher on an ImageFolder dataset.

    Loss: KL(teacher || student) at temperature T, times T^2, mixed with label cross-entropy by --alpha.
    AdamW, linear warm-up then cosine decay; BatchNorm statistics re-estimated first.

    [b]Examples[/b]

      equalbits finetune r18.safetensors --data ./imagenet --epochs 5

      equalbits finetune --data ./imagenet            (uses the one checkpoint here)

      torchrun --nproc-per-node 2 -m equalbits_cli finetune r18.safetensors --data ./imagenet
    """
    import os

    from ..config import FinetuneConfig
    from ..io import check_output_path
    from ..train import Interrupted
    from ..train import finetune as run_finetune
    from .progress import RichProgress
    from .render import kv_table, print_json, stdout

    config = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        img_size=img_size,
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
    )
    student = checkpoint if checkpoint is not None else _find_student(Path("."))
    if not student.is_file():
        raise FileNotFoundError(f"checkpoint not found: {student}")
    out = output or student.with_name(student.name.removesuffix(".safetensors") + ".ft.safetensors")
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        check_output_path(out, overwrite or resume)
        if plot is not None:
            check_output_path(plot, overwrite)
    try:
        with RichProgress(enabled=rank == 0) as progress:
            result = run_finetune(
                student, data, config, output=out, teacher=teacher, resume=resume, log=log, progress=progress
            )
    except Interrupted as exc:
        from .options import fail

        fail(str(exc), code=128 + int(exc.signum))
        return
    if result is None:
        return
    if plot is not None:
        from ..plots import plot_history

        plot_history(result.history, plot, title=f"fine-tune of {student.name}")
    if json_out:
        print_json({**result.to_dict(), "output": str(out)})
        return
    rows = [("teacher top-1", "-" if result.teacher_top1 is None else f"{result.teacher_top1:.2f}%")]
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
    stdout().print(kv_table(f"fine-tuned {student.name} -> {out}", rows))


@app.command("eval")
@user_errors
def eval_(
    model: Annotated[str, typer.Argument(help="Binarized or packed file, or a timm model name (with --checkpoint).")],
    data: DataOpt = ...,  # type: ignore[assignment]
    checkpoint: CheckpointOpt = None,
    img_size: ImgSizeOpt = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    amp: AmpOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Top-1 / top-5 accuracy on the val split of an ImageFolder dataset.

    [b]Examples[/b]

      equalbits eval r18.ft.safetensors --data ./imagenet

      equalbits eval resnet18 --checkpoint r18_fp.safetensors --data ./imagenet --json
    """
    from ..train import evaluate_source
    from .progress import RichProgress
    from .render import print_json, stdout

    with RichProgress(enabled=not json_out) as progress:
        result = evaluate_source(
            model,
            data,
            checkpoint=checkpoint,
            img_size=img_size,
            batch_size=batch_size,
            workers=workers,
            device=device,
            amp=amp,
            progress=progress,
        )
    if json_out:
        print_json(result)
    else:
        stdout().print(f"{model}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {result['n']} images")


@app.command()
@user_errors
def quickstart(
    out: Annotated[Path, typer.Option(help="Folder for the data and every artifact.")] = Path("quickstart_out"),
    model: Annotated[str, typer.Option(help="timm architecture to train, binarize and fine-tune.")] = "resnet18",
    ratio: RatioOpt = 0.5,
    teacher_epochs: Annotated[int, typer.Option(help="Epochs to train the full-precision teacher.")] = 4,
    epochs: Annotated[int, typer.Option(help="Fine-tune epochs of the binarized student.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of everything.")] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """The whole path offline in a few minutes: digits data, teacher, binarize, fine-tune, export.

    Uses the UCI handwritten digits that scikit-learn ships (32x32, 10 classes; nothing is downloaded).
    """
    from ..quickstart import run_quickstart
    from .progress import RichProgress
    from .render import human_bytes, kv_table, print_json, stdout

    with RichProgress(enabled=True) as progress:
        summary = run_quickstart(
            out,
            model=model,
            ratio=ratio,
            teacher_epochs=teacher_epochs,
            epochs=epochs,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
        )
    if json_out:
        print_json(summary)
        return
    rows = [
        ("teacher top-1 (full precision)", f"{summary['teacher_top1']:.2f}%"),
        ("student top-1, just binarized", f"{summary['student_top1_before']:.2f}%"),
    ]
    if summary["student_top1_calibrated"] is not None:
        rows.append(("student top-1, BatchNorm re-estimated", f"{summary['student_top1_calibrated']:.2f}%"))
    rows += [
        ("student top-1, fine-tuned", f"{summary['student_top1']:.2f}%"),
        ("entropy (bits / binary weight)", f"{summary['entropy_bits']:.4f}"),
        ("fp32 size", human_bytes(summary["fp32_bytes"])),
        ("packed safetensors", human_bytes(summary["packed_bytes"])),
        ("ONNX (packed weights)", human_bytes(summary["onnx_bytes"])),
        ("compression", f"{summary['compression']:.1f}x"),
        ("time", f"{summary['seconds']:.0f} s"),
        ("artifacts", str(out)),
    ]
    stdout().print(kv_table(f"equalbits quickstart: {model} on digits, ratio {ratio}", rows))


@app.command()
@user_errors
def sweep(
    model: Annotated[str, typer.Argument(help="timm name (with --checkpoint) or a binarized checkpoint (its source).")],
    data: DataOpt = ...,  # type: ignore[assignment]
    ratios: Annotated[
        str, typer.Option(help="Comma-separated +1 ratios for --method ot.")
    ] = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
    prune: Annotated[str, typer.Option(help="Comma-separated prune shares for ot.")] = "0",
    methods: Annotated[str, typer.Option(help="Comma-separated: ot, sign, irnet.")] = "ot,sign,irnet",
    checkpoint: CheckpointOpt = None,
    epochs: Annotated[int, typer.Option(help="Fine-tune epochs per setting.")] = 2,
    lr: Annotated[float, typer.Option(help="Peak learning rate per setting.")] = 5e-3,
    batch_size: BatchOpt = 64,
    img_size: ImgSizeOpt = None,
    workers: WorkersOpt = 2,
    seed: Annotated[int, typer.Option(help="Seed (the same for every setting).")] = 0,
    plot: Annotated[Path | None, typer.Option(help="Write accuracy and entropy against the ratio to this PNG.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Accuracy and entropy across bit ratios and methods: do equal bits win on your model and data?

    [b]Example[/b]

      equalbits sweep resnet18 --checkpoint r18.pth --data ./digits --ratios 0.1,0.3,0.5 --plot sweep.png
    """
    from ..config import FinetuneConfig
    from ..sweep import parse_floats, run_sweep
    from .progress import RichProgress
    from .render import print_json, stdout

    ratio_list = parse_floats(ratios, "ratios")
    prune_list = parse_floats(prune, "prune")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    config = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, img_size=img_size, workers=workers, seed=seed)
    if plot is not None:
        from ..io import check_output_path

        check_output_path(plot, overwrite=True)
    with RichProgress(enabled=True) as progress:
        rows = run_sweep(
            model,
            data,
            ratios=ratio_list,
            prunes=prune_list,
            methods=method_list,
            checkpoint=checkpoint,
            finetune_config=config,
            progress=progress,
        )
    if plot is not None:
        from ..plots import plot_sweep

        plot_sweep(rows, plot, title=f"{model}: accuracy and entropy vs +1 ratio")
    if json_out:
        print_json({"model": model, "rows": rows, "plot": str(plot) if plot else None})
        return
    from rich.table import Table

    t = Table(title=f"sweep of {model}", title_justify="left")
    for col in ("method", "prune", "+1 ratio", "entropy", "top-1 before", "top-1 after", "top-5 after"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r["method"],
            f"{r['prune']:g}",
            f"{r['ratio']:.3f}",
            f"{r['entropy_bits']:.4f}",
            f"{r['top1_before']:.2f}%",
            f"{r['top1']:.2f}%",
            f"{r['top5']:.2f}%",
        )
    stdout().print(t)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
