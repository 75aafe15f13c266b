"""``binarize``, ``inspect`` and ``export``: the commands that make, read and ship model files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, default_output
from .options import (
    ActivationsOpt,
    AllBinaryInputsOpt,
    BenchOpt,
    CheckpointOpt,
    CropPctOpt,
    DepthwiseOpt,
    ExactBinaryOpt,
    ExcludeOpt,
    GatesOpt,
    ImgSizeOpt,
    IncludeOpt,
    Int8CalibrateOpt,
    Int8ExcludeOpt,
    Int8RangesOpt,
    InterpolationOpt,
    JsonOpt,
    MeanOpt,
    MethodOpt,
    NumClassesOpt,
    OutOpt,
    OverwriteOpt,
    PretrainedOpt,
    PruneOpt,
    RatioOpt,
    RealInputsOpt,
    StdOpt,
    ThreadsOpt,
    data_overrides,
    user_errors,
    with_flags,
)


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
    binarize_gates: GatesOpt = True,
    all_binary_inputs: AllBinaryInputsOpt = False,
    real_inputs: RealInputsOpt = None,
    output: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Binarize the Conv2d/Linear layers of a timm model and save a latent checkpoint.

    Kept full precision by default, each with its reason in the table: the stem, the classifier and
    depthwise convolutions (they cost accuracy for little size; see the README's recipe table);
    --keep-gates keeps squeeze-excite gates too. --include / --exclude (shell globs on module names)
    override that. A setting known to fail on the family is a warning before any work.

    With --activations sign (1W/1A), every binarized layer binarizes its input but those on the
    network's real-valued path, which keep real-valued inputs: layers fed by a pooled vector
    (squeeze-excite gates, MobileNetV3's head conv), the layers of a block without a shortcut and the
    first layer of one with a shortcut (MobileNet, EfficientNet), and the layers of a shortcut (ResNet's
    downsample projections). A sign there would cut the whole signal, not a branch beside it. The
    table's inputs column says which, and why; --all-binary-inputs and --real-inputs GLOB change it.

    [b]Examples[/b]

      equalbits binarize resnet18 --ratio 0.5 -o r18.safetensors

      equalbits binarize resnet18 --checkpoint my_r18.pth --prune 0.3

      equalbits binarize mobilenetv3_small_100 --checkpoint m.pth --exclude 'blocks.5.*'

      equalbits binarize resnet18 --no-pretrained --ratio 0.3 --prune 0.2 --json
    """
    from .. import binarize_model, collect_stats, save_checkpoint
    from ..config import BinarizeConfig
    from ..model.policy import LayerPolicy, check_input_rules
    from ..paths import check_output_path
    from .render import print_json, show_stats, stderr

    config = BinarizeConfig(ratio=ratio, prune=prune, method=method, activations=activations)
    policy = LayerPolicy(
        depthwise=binarize_depthwise,
        gates=binarize_gates,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        all_binary_inputs=all_binary_inputs,
        real_inputs=tuple(real_inputs or ()),
    )
    check_input_rules(policy, activations)  # before any work; binarize_ checks it too
    out = check_output_path(output or default_output(model, ".binary.safetensors"), overwrite)
    from ..model.limits import known_shortfalls

    warnings = [with_flags(w) for w in known_shortfalls(model.removeprefix("hf-hub:"), config, policy)]
    for warning in warnings:  # before any work: the user may stop here
        stderr().print(f"warning: {warning}")
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
                "warnings": warnings,
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
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --plot file if it exists.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Per-layer bit ratios, entropy, SQNR and sizes of a file.

    For a plain timm state dict (with --model), shows what binarize would do with --ratio/--prune/--method.
    """
    from ..config import BinarizeConfig
    from ..paths import check_distinct_paths, check_output_path
    from .render import print_json, show_stats

    over = data_overrides(img_size, crop_pct, interpolation, mean, std)
    if plot is not None:
        check_distinct_paths({"--plot": plot}, {"FILE": file})
        check_output_path(plot, overwrite)
    if data is not None:
        from ..paths import read_metadata

        if file.suffix == ".onnx":
            raise ValueError(
                "--data measures the activation bits of a PyTorch model; inspect the .safetensors file "
                f"{file.name} was exported from"
            )
        if not str(read_metadata(file).get("format", "")).startswith("equalbits."):
            raise ValueError(f"--data applies to files equalbits wrote; {file} is a plain state dict")
    report = None
    if model is None and file.suffix == ".safetensors":
        from ..report.packed_report import packed_report

        report = packed_report(file)  # numpy only: no torch, no timm; None for other files
    if report is None:
        from ..report.inspect import inspect_file

        report = inspect_file(file, model, BinarizeConfig(ratio=ratio, prune=prune, method=method))
    if data is not None:
        from ..formats.latent import load_model
        from ..report.inspect import activation_shares, with_activation_shares
        from ..train.evaluate import activation_batch

        net = load_model(file)
        report = with_activation_shares(report, activation_shares(net, activation_batch(net, data, over)))
    if plot is not None:
        from ..report.plots import plot_layers

        plot_layers(report.stats, plot, title=f"{report.model} ({Path(report.path).name})", exclusive=not overwrite)
    if json_out:
        print_json(report.to_dict())
    else:
        show_stats(report.stats, f"{report.path}  [{report.format}]  model={report.model}", report.file_bytes)


@app.command()
@user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A binarized checkpoint (from binarize or finetune).")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            metavar="[packed|onnx|onnx-int8]",
            help="packed: 1-bit safetensors; onnx: float ONNX; onnx-int8: int8 ONNX for onnxruntime (needs --data).",
        ),
    ] = "packed",
    onnx_weights: Annotated[
        str,
        typer.Option(
            metavar="[packed|float]",
            help="--format onnx only. packed: uint8 bit planes + unpack ops; float: plain float weights.",
        ),
    ] = "packed",
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="ONNX: image folder with val/ (train/ too, if there is one). onnx-int8 calibrates the activation "
            "ranges on train/ (else val/); both ONNX formats report top-1 agreement with PyTorch on val/.",
            show_default=False,
        ),
    ] = None,
    calibrate_batches: Int8CalibrateOpt = None,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpolationOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    bench: BenchOpt = True,
    threads: ThreadsOpt = None,
    bench_batch: Annotated[int, typer.Option(help="Images per call in the timing.")] = 1,
    int8_exclude: Int8ExcludeOpt = None,
    exact_binary: ExactBinaryOpt = None,
    int8_ranges: Int8RangesOpt = None,
    output: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a packed 1-bit safetensors file or an ONNX model, then verify it against PyTorch.

    onnx-int8 runs in stock onnxruntime on its int8 kernels (ResNets about 3x faster than float on
    x86 with VNNI, ViTs about 2x); binary weights stay 1 bit in the file (exact in int8 at ratio 0.5),
    activations are quantized to 8 bits, with ranges calibrated on --data (CNNs) or taken per call (ViTs).

    [b]Examples[/b]

      equalbits export r18.safetensors --format packed -o r18.packed.safetensors

      equalbits export r18.safetensors --format onnx -o r18.onnx

      equalbits export r18.safetensors --format onnx-int8 --data ./imagenet -o r18.int8.onnx
    """
    from ..export.write import FORMATS, export_file
    from .progress import RichProgress
    from .render import print_json

    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    over = data_overrides(img_size, crop_pct, interpolation, mean, std)
    suffix = {"packed": ".packed.safetensors", "onnx": ".onnx", "onnx-int8": ".int8.onnx"}[format]
    out = output or checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + suffix)
    with RichProgress(enabled=not json_out) as progress:
        result = export_file(
            checkpoint,
            out,
            format=format,
            onnx_weights=onnx_weights,
            data_overrides=over,
            overwrite=overwrite,
            data=data,
            calibrate_batches=calibrate_batches,
            bench=bench,
            threads=threads,
            bench_batch=bench_batch,
            int8_exclude=tuple(int8_exclude or ()),
            progress=progress,
            exact_binary=exact_binary,
            int8_ranges=int8_ranges,
        )
    if json_out:
        print_json(result)
        return
    _report_export(result, format)


def _report_export(result: dict, format: str) -> None:
    """The export's summary on stderr: file, checks, kernels, speed, agreement, notes and warnings."""
    from ..export.int8 import INT8_OPS
    from .render import human_bytes, stderr

    err = stderr()
    err.print(
        f"wrote {result['output']} ({human_bytes(result['bytes'])}, {result['compression']:.2f}x smaller than "
        f"fp32); max |difference| vs PyTorch {result['max_abs_diff']:.3g}"
    )
    if format == "onnx-int8":
        ops = ", ".join(f"{k} x{v}" for k, v in result["int8_ops"].items())
        err.print(f"integer kernels in onnxruntime's optimized graph: {ops}")
        if result["float_ops"]:
            left = ", ".join(f"{k} x{v}" for k, v in result["float_ops"].items())
            err.print(f"float matrix ops left: {left}")
            floats = [f"{m} ({k})" for m, k in result.get("layer_kernels", {}).items() if k not in INT8_OPS]
            if floats:
                more = f" and {len(floats) - 6} more (--json: layer_kernels)" if len(floats) > 6 else ""
                err.print(f"layers run in float: {', '.join(floats[:6])}{more}")
        if result.get("int8_exclude"):
            err.print(f"kept float by --int8-exclude {' '.join(result['int8_exclude'])}: {result['float_nodes']} nodes")
    if result.get("speed") is not None:
        s = result["speed"]
        where = {None: "onnxruntime's threads", 1: "1 thread"}.get(s["threads"], f"{s['threads']} threads")
        err.print(
            f"speed here: {s['latency_ms']:.2f} ms against {s['float_latency_ms']:.2f} ms for the float ONNX "
            f"({s['speedup']:.2f}x; batch {s['batch']}, {where}, median of {s['calls']})"
        )
        for name, ms in s.get("baseline_ms", {}).items():
            err.print(f"           {ms:.2f} ms for the {name} model of the same network ({ms / s['latency_ms']:.2f}x)")
    if result.get("agreement") is not None:
        err.print(
            f"top-1 agreement with PyTorch: {result['agreement']:.2f}% of {result['agreement_images']} val images"
        )
    for note in result.get("notes", []):
        err.print(f"note: {note}")
    for warning in result.get("warnings", []):
        err.print(f"warning: {with_flags(warning)}")
