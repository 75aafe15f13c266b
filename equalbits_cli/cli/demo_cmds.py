"""``quickstart``, ``sweep`` and ``data``: the whole path on built-in data, the ratio experiment, the data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import FinetuneConfig
from .app import app
from .options import (
    ActivationsOpt,
    BatchOpt,
    CenterOpt,
    CheckpointOpt,
    CropPctOpt,
    DataOpt,
    DatasetOpt,
    ImgSizeOpt,
    InterpolationOpt,
    JsonOpt,
    MeanOpt,
    OverwriteOpt,
    RatioOpt,
    SeedsOpt,
    StdOpt,
    SweepRowsOpt,
    WorkersOpt,
    data_overrides,
    user_errors,
)


@app.command()
@user_errors
def quickstart(
    out: Annotated[Path, typer.Option(help="Folder for the data and every artifact.")] = Path("quickstart_out"),
    model: Annotated[str, typer.Option(help="timm architecture to train, binarize and fine-tune.")] = "resnet18",
    dataset: DatasetOpt = "digits",
    img_size: Annotated[int, typer.Option(help="Side of the built-in images, in pixels.")] = 32,
    ratio: RatioOpt = 0.5,
    teacher_epochs: Annotated[int, typer.Option(help="Epochs to train the full-precision teacher.")] = 4,
    epochs: Annotated[int, typer.Option(help="Fine-tune epochs of the binarized student.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of everything.")] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """The whole path offline in a few minutes: built-in data, teacher, binarize, fine-tune, export.

    --dataset digits: the UCI handwritten digits that scikit-learn ships (10 classes, easy).
    --dataset chars: 0-9A-Z drawn from matplotlib's fonts with clutter and noise (36 classes, harder:
    binarization costs accuracy there). Nothing is downloaded.

    [b]Example[/b]

      equalbits quickstart --dataset chars --out qs_chars
    """
    from ..recipes.quickstart import run_quickstart
    from .progress import RichProgress
    from .render import human_bytes, kv_table, print_json, stdout

    with RichProgress(enabled=True) as progress:
        summary = run_quickstart(
            out,
            model=model,
            dataset=dataset,
            img_size=img_size,
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
    stdout().print(kv_table(f"equalbits quickstart: {model} on {dataset} ({img_size}px), ratio {ratio}", rows))


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
    activations: ActivationsOpt = "none",
    center: CenterOpt = None,
    checkpoint: CheckpointOpt = None,
    epochs: Annotated[int, typer.Option(help="Fine-tune epochs per setting.")] = 2,
    lr: Annotated[float, typer.Option(help="Peak learning rate per setting.")] = FinetuneConfig.lr,
    batch_size: BatchOpt = 64,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    workers: WorkersOpt = 2,
    seeds: SeedsOpt = "0",
    plot: Annotated[Path | None, typer.Option(help="Write accuracy and entropy against the ratio to this PNG.")] = None,
    rows: SweepRowsOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start afresh: empty the --rows file and replace the --plot file.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Accuracy and entropy across bit ratios and methods: do equal bits win on your model and data?

    Ctrl-C or SIGTERM keeps the finished settings (printed, plotted, and in --rows); the same command continues.

    [b]Example[/b]

      equalbits sweep resnet18 --checkpoint r18.pth --data ./digits --ratios 0.1,0.3,0.5 --plot sweep.png
    """
    from ..errors import Interrupted
    from ..paths import check_distinct_paths, check_log_path, check_output_path
    from ..recipes.sweep import parse_floats, run_sweep
    from .app import default_output
    from .progress import RichProgress

    ratio_list = parse_floats(ratios, "ratios")
    seed_list = parse_floats(seeds, "seeds")
    if any(v != int(v) for v in seed_list):
        raise typer.BadParameter(f"--seeds must be whole numbers, got {seeds!r}")
    prune_list = parse_floats(prune, "prune")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    over = data_overrides(img_size, crop_pct, interpolation, mean, std)
    config = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        **over.to_dict(),  # the data config's overrides: img_size, crop_pct, interpolation, mean, std
        workers=workers,
        seed=int(seed_list[0]),
    )
    rows_file = rows if rows is not None else default_output(model, ".sweep.jsonl")
    check_distinct_paths({"--plot": plot, "--rows": rows_file}, {"MODEL": model if Path(model).is_file() else None})
    check_log_path(rows_file)
    if plot is not None:
        check_output_path(plot, overwrite=overwrite or rows_file.exists())
    if overwrite:
        rows_file.unlink(missing_ok=True)
    try:
        with RichProgress(enabled=True) as progress:
            result = run_sweep(
                model,
                data,
                ratios=ratio_list,
                prunes=prune_list,
                methods=method_list,
                activations=activations,
                center=center,
                seeds=[int(v) for v in seed_list],
                checkpoint=checkpoint,
                finetune_config=config,
                rows_file=rows_file,
                progress=progress,
            )
    except Interrupted as exc:
        if exc.rows:
            _show_sweep(model, exc.rows, plot, json_out, partial=True)
        raise
    _show_sweep(model, result, plot, json_out, partial=False)


def _show_sweep(model: str, rows: list, plot: Path | None, json_out: bool, partial: bool) -> None:
    from ..report.stats import summarize_sweep
    from .render import print_json, stdout

    if plot is not None:
        from ..report.plots import plot_sweep

        done = " (interrupted: finished settings only)" if partial else ""
        plot_sweep(rows, plot, title=f"{model}: accuracy and entropy vs +1 ratio{done}")
    if json_out:
        summary = summarize_sweep(rows)
        print_json(
            {"model": model, "rows": rows, "summary": summary, "plot": str(plot) if plot else None, "partial": partial}
        )
        return
    from rich.table import Table

    t = Table(title=f"sweep of {model}" + (" (interrupted)" if partial else ""), title_justify="left")
    summary = summarize_sweep(rows)
    seeds = max(r["seeds"] for r in summary)
    for col in ("method", "levels", "activations", "prune", "+1 ratio", "entropy", "seeds", "top-1 after"):
        t.add_column(col, justify="right")
    if seeds > 1:
        t.add_column("spread (sd)", justify="right")
    for r in summary:
        cells = [
            r["method"],
            "centred" if r["center"] else "plain",
            "1-bit" if r["activations"] == "sign" else "full",
            f"{r['prune']:g}",
            f"{r['ratio']:.3f}",
            f"{r['entropy_bits']:.4f}",
            str(r["seeds"]),
            f"{r['top1_mean']:.2f}%",
        ]
        t.add_row(*cells, *([f"{r['top1_std']:.2f}"] if seeds > 1 else []))
    stdout().print(t)


@app.command("data")
@user_errors
def data_cmd(
    name: Annotated[str, typer.Argument(help="Built-in dataset: digits or chars.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Folder to write the ImageFolder (train/, val/) into.")],
    img_size: Annotated[int, typer.Option(help="Side of the images, in pixels.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the drawing (chars) or of the split (digits).")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Write a built-in dataset as an ImageFolder, for finetune, eval and sweep --data (no download).

    A folder already holding the same build is reused; one built with other settings is rebuilt.

    [b]Example[/b]

      equalbits data chars ./chars --img-size 32
    """
    from ..data.builtin import make_dataset
    from ..data.folders import find_splits
    from .render import print_json, stdout

    root = make_dataset(name, out, size=img_size, seed=seed)
    counts = {split: sum(1 for _ in (root / split).glob("*/*.png")) for split in ("train", "val")}
    classes = len(find_splits(root).classes)
    if json_out:
        print_json({"dataset": name, "out": str(root), "img_size": img_size, "classes": classes, **counts})
        return
    stdout().print(
        f"{name}: {classes} classes, {counts['train']} train and {counts['val']} val images "
        f"of {img_size}x{img_size} in {root}"
    )
