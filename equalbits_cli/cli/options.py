"""Reusable option aliases and the error wrapper every command shares."""

from __future__ import annotations

import enum
import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..errors import ExportMismatch, Interrupted

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout instead of tables.")]
OutOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Output file path.", show_default=False)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output file if it exists.")]
RatioOpt = Annotated[
    float, typer.Option(help="Share of +1 codes among each filter's unpruned weights; 0.5 = equal bits. (0, 1)")
]
DatasetOpt = Annotated[
    str, typer.Option(help="Built-in dataset: digits (10 classes, easy) or chars (36 classes, harder).")
]
PruneOpt = Annotated[float, typer.Option(help="Share of each filter's weights set to 0 (ternary codes). [0, 1)")]
MethodOpt = Annotated[
    str,
    typer.Option(
        metavar="[ot|sign|irnet]",
        help="ot: exact-ratio optimal transport (Equal Bits); sign: BWN/XNOR; irnet: IR-Net's "
        "Libra-PB forward with a straight-through gradient (no EDE).",
    ),
]
ActivationsOpt = Annotated[
    str,
    typer.Option(
        metavar="[none|sign]", help="none: full-precision activations; sign: also binarize layer inputs (1W/1A)."
    ),
]
NumClassesOpt = Annotated[
    int | None, typer.Option(help="Classifier size (default: from the checkpoint, or the model's).", show_default=False)
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(help="Local .safetensors or .pth state dict of the full-precision model.", show_default=False),
]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        help="Glob of module names to binarize whatever the policy says (repeatable), e.g. 'conv1'.",
        show_default=False,
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        help="Glob of module names to keep full precision (repeatable), e.g. 'layer4.*'. Wins over --include.",
        show_default=False,
    ),
]
DepthwiseOpt = Annotated[
    bool,
    typer.Option(
        "--binarize-depthwise/--keep-depthwise", help="Binarize depthwise convolutions (kept fp32 by default)."
    ),
]
GatesOpt = Annotated[
    bool,
    typer.Option(
        "--binarize-gates/--keep-gates", help="Binarize squeeze-excite and other gating layers, or keep them fp32."
    ),
]
AllBinaryInputsOpt = Annotated[
    bool,
    typer.Option(
        "--all-binary-inputs",
        help="With --activations sign: every binarized layer binarizes its input. By default the layers on "
        "the real-valued path (pooled inputs, shortcuts, blocks without one) keep real-valued inputs.",
    ),
]
RealInputsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--real-inputs",
        help="With --activations sign: glob of binarized layers that keep real-valued inputs (repeatable).",
        show_default=False,
    ),
]
PretrainedOpt = Annotated[
    bool, typer.Option("--pretrained/--no-pretrained", help="Download pretrained weights from the hub.")
]


class AugmentChoice(str, enum.Enum):
    none = "none"
    light = "light"
    full = "full"


AugmentOpt = Annotated[
    AugmentChoice,
    typer.Option(
        help="none (images decoded once, in memory, at most 1 GiB); light: random crops of 64-100% of the area, "
        "no flips; full: timm's ImageNet training transform."
    ),
]

DataOpt = Annotated[Path, typer.Option("--data", help="ImageFolder root with train/ and val/ (or validation/).")]
ImgSizeOpt = Annotated[
    int | None,
    typer.Option(
        help="Input height and width, 8 to 4096 (default: what the file records, else the model's data config).",
        show_default=False,
    ),
]
CropPctOpt = Annotated[
    float | None,
    typer.Option(
        help="Share of the resized image kept by the centre crop, as the model was trained: 1.0 = the whole "
        "image (default: recorded, else the model's).",
        show_default=False,
    ),
]
InterpolationOpt = Annotated[
    str | None,
    typer.Option(
        metavar="[bilinear|bicubic|nearest|box|hamming|lanczos]",
        help="Resize filter (default: recorded, else the model's).",
        show_default=False,
    ),
]
MeanOpt = Annotated[
    str | None,
    typer.Option(
        metavar="R,G,B",
        help="Normalization mean of pixels in [0, 1] (default: recorded, else the model's).",
        show_default=False,
    ),
]
StdOpt = Annotated[
    str | None,
    typer.Option(
        metavar="R,G,B",
        help="Normalization standard deviation (default: recorded, else the model's).",
        show_default=False,
    ),
]
BatchOpt = Annotated[int, typer.Option(help="Batch size per process.")]
WorkersOpt = Annotated[int, typer.Option(help="Data loader worker processes.")]
DeviceOpt = Annotated[
    str, typer.Option(metavar="[auto|cpu|cuda|cuda:N]", help="auto: CUDA when available (one GPU per local rank).")
]
AmpOpt = Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision (bf16 on CPU, fp16 on CUDA).")]

# finetune's options
TeacherOpt = Annotated[
    str | None,
    typer.Option(help="Teacher: timm name (pretrained) or state dict file. Default: the student's source."),
]
AlphaOpt = Annotated[float, typer.Option(help="Share of label cross-entropy in the loss (0 = pure distillation).")]
WeightDecayOpt = Annotated[float, typer.Option(help="AdamW decay of full-precision weights (never latent binary).")]
CalibrateOpt = Annotated[int, typer.Option(help="Batches to re-estimate BatchNorm statistics first (0: off).")]
SaveEveryOpt = Annotated[
    int, typer.Option(help="Save the training state every N steps (and after each epoch but the last).")
]
ResumeOpt = Annotated[
    str | None,
    typer.Option(
        "--resume",
        metavar="[auto]",
        help="Continue from the saved training state of -o. --resume auto: continue if there is one, else "
        "start afresh (for torchrun --max-restarts).",
        show_default=False,
    ),
]
CompileOpt = Annotated[
    bool, typer.Option("--compile", help="torch.compile the student and teacher (first steps are slower).")
]
ChannelsLastOpt = Annotated[
    bool,
    typer.Option(
        "--channels-last",
        help="Keep convolution weights and images in channels-last memory: on an H100 with --amp, ResNet "
        "training steps ran 1.6-2.2x faster; no gain for ViTs.",
    ),
]
HistoryPlotOpt = Annotated[
    Path | None, typer.Option(help="Draw loss, learning rate and validation top-1 per epoch to this PNG.")
]
CacheTeacherOpt = Annotated[
    bool,
    typer.Option(
        "--cache-teacher/--no-cache-teacher",
        help="With --augment none, keep the teacher's outputs after the first epoch (exact, in memory, at most "
        "1 GiB) so later epochs skip its forward.",
    ),
]
Int8CalibrateOpt = Annotated[
    int | None,
    typer.Option(help="onnx-int8 only: calibration batches of 8 images, 1 to 10000 [default: 8].", show_default=False),
]
BenchOpt = Annotated[
    bool,
    typer.Option(
        "--bench/--no-bench",
        help="ONNX formats: time the file against the float ONNX of the same model in onnxruntime, here.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        help="Threads onnxruntime times the file with, 1 to 1024 [default: onnxruntime's own choice].",
        show_default=False,
    ),
]
Int8ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--int8-exclude",
        metavar="GLOB",
        help="onnx-int8 only: keep the modules matching GLOB float (module names as in `inspect`, shell "
        "globs: 'blocks.*.se'; repeat for more). Binarized layers among them stay 1 bit in the file.",
        show_default=False,
    ),
]
ExactBinaryOpt = Annotated[
    bool | None,
    typer.Option(
        "--exact-binary/--quantized-binary",
        help="onnx-int8 of a 1W/1A model: run its binary-input layers as ConvInteger/MatMulInteger on the "
        "packed codes, matching PyTorch up to float rounding (resnet18: 7-9x slower in onnxruntime), or "
        "quantize the graph like a 1W/32A model with exact +-1 inputs (QLinearConv; resnet18: 0.2 points "
        "of top-1 on the digits). Default: quantized for CNNs, exact where linear layers take binary inputs "
        "(ViT: vit_tiny quantized 61.8% against 93.6% exact).",
        show_default=False,
    ),
]
Int8RangesOpt = Annotated[
    str | None,
    typer.Option(
        metavar="[static|dynamic]",
        help="onnx-int8 only: static: activation ranges calibrated on --data, the whole graph int8; dynamic: "
        "only MatMul/Gemm int8, their inputs quantized per call, no calibration. Default: dynamic where every "
        "binarized layer is linear (ViT, DeiT: vit_small 2.25x float against 1.96x static on AVX-512 VNNI), "
        "static elsewhere and for 1W/1A models.",
        show_default=False,
    ),
]
LogOpt = Annotated[Path | None, typer.Option(help="Append JSON lines (every 10 steps and each epoch) to this file.")]
AutoWorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="Data loader worker processes (default: the CPUs per process less one, at most 8).", show_default=False
    ),
]


def _channels(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers such as 0.485,0.456,0.406, got {text!r}") from None
    return values * 3 if len(values) == 1 else values


def data_overrides(
    img_size: int | None, crop_pct: float | None, interpolation: str | None, mean: str | None, std: str | None
):
    """The data-config options as a :class:`equalbits_cli.data.config.DataOverrides`, checked.

    Raises:
        ValueError: an option out of range, named by its flag.
    """
    from ..data.config import INTERPOLATIONS, MAX_SIZE, MIN_SIZE, DataConfig, DataOverrides

    if img_size is not None and not MIN_SIZE <= img_size <= MAX_SIZE:
        raise ValueError(f"--img-size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {img_size}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    means, stds = _channels(mean, "--mean"), _channels(std, "--std")
    try:  # the ranges of crop, mean and std, on a stand-in config of 3 channels
        DataConfig(
            (3, 32, 32), "bilinear", means or (0.5,) * 3, stds or (0.5,) * 3, 1.0 if crop_pct is None else crop_pct
        )
    except ValueError as exc:
        flag = next((f for f in ("crop_pct", "mean", "std") if str(exc).startswith(f)), None)
        text = str(exc)
        raise ValueError(f"--{flag.replace('_', '-')}{text[len(flag) :]}" if flag else text) from None
    return DataOverrides(img_size, crop_pct, interpolation, means, stds)


# Library messages name settings as Python parameters in backquotes (see errors.SettingError); on the
# command line they are these flags and arguments, else ``--`` and the name with dashes.
_FLAGS = {
    "data_dir": "--data",
    "output": "-o",
    "model_name": "--model",
    "name": "MODEL",
    "model_or_file": "MODEL",
    "model_or_ckpt": "MODEL",
    "pretrained=False": "--no-pretrained",
}
_SETTING = re.compile(r"`([a-z][a-z0-9_]*(?:=False)?)`")


def with_flags(message: str) -> str:
    """A library message as the command line says it: `` `img_size` `` becomes ``--img-size``.

    Example:
        >>> with_flags("`img_size` must be at least 8; or pass `data_dir`")
        '--img-size must be at least 8; or pass --data'
    """
    return _SETTING.sub(lambda m: _FLAGS.get(m.group(1), "--" + m.group(1).replace("_", "-")), message)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit with ``code`` (no traceback). Long messages are cut."""
    # A file name that is not UTF-8 arrives with surrogate escapes: show its bytes (\xff), not \udcff.
    message = with_flags(message).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    line = " ".join(message.split())
    if len(line) > 2000:
        line = line[:2000] + " ... (cut)"
    print(f"error: {line}", file=sys.stderr)
    raise typer.Exit(code)


def debug_enabled() -> bool:
    """Whether ``--debug`` or ``EQUALBITS_DEBUG=1`` asks for full tracebacks."""
    return os.environ.get("EQUALBITS_DEBUG", "") not in ("", "0")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def user_errors(fn: F) -> F:
    """Map errors to one line on stderr: bad input (ValueError, missing files, OS errors such as a
    full disk) exits 2, Ctrl-C 130, anything unexpected 1. ``--debug`` re-raises with the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except Interrupted as exc:
            fail(str(exc), code=128 + int(exc.signum))
        except ExportMismatch as exc:
            if debug_enabled():
                raise
            fail(str(exc), code=1)
        except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            if debug_enabled():
                raise
            fail(_first_line(exc))
        except OSError as exc:
            if debug_enabled():
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or _first_line(exc)}")
        except MemoryError:
            if debug_enabled():
                raise
            fail("out of memory; lower --batch-size or --img-size")
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as exc:
            if debug_enabled():
                raise
            fail(
                f"internal error: {type(exc).__name__}: {_first_line(exc)}; rerun with --debug for the traceback "
                "and report it",
                code=1,
            )

    return wrapper  # type: ignore[return-value]


# sweep's options
CenterOpt = Annotated[
    bool | None,
    typer.Option(
        "--center/--no-center",
        help="Centred levels scale*(codes-mu) for every method, or plain scale*codes (the paper's form). "
        "Default: centred for ot, plain for sign and irnet.",
        show_default=False,
    ),
]
SeedsOpt = Annotated[
    str,
    typer.Option(
        "--seeds",
        "--seed",
        help="Comma-separated fine-tune seeds; each setting runs once per seed, and the table and plot show the "
        "mean and spread.",
    ),
]
SweepRowsOpt = Annotated[
    Path | None,
    typer.Option(
        help="JSON-lines file keeping each finished run's row; a rerun reuses them, so an interrupted sweep goes on "
        "where it stopped. Default: MODEL.sweep.jsonl here.",
        show_default=False,
    ),
]
