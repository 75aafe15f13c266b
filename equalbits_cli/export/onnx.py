"""ONNX export of the packed inference form, through torch's exporter (``torch.onnx.export(dynamo=True)``).

The graph is traced from :func:`equalbits_cli.nn.packed.pack_model`: each binarized layer's forward
unpacks its uint8 bit planes (BitwiseAnd with the eight bit masks, Reshape, Slice, Cast), forms
``scale * levels`` and runs a plain Conv/Gemm/MatMul, so the packed planes are the graph's initializers
and onnxruntime folds the unpack subgraph into a constant once, when the session is created. torch's
graph optimizer is off (``optimize=False``): it would fold small layers' unpacking back into float
weights. ``weights="float"`` traces :func:`equalbits_cli.nn.packed.float_model` instead, where each
binarized weight is the float initializer ``<layer>.weight``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.config import DataConfig, DataOverrides, resolve_data_config
from ..errors import ExportMismatch
from ..formats import ONNX_FORMAT
from ..nn.layers import BinaryLayer
from ..nn.packed import PackedBinary, float_model, pack_model

__all__ = [
    "ExportResult",
    "OPSET",
    "Traced",
    "check_outputs",
    "export_data_config",
    "export_onnx",
    "has_binary_activations",
    "trace_graph",
]

OPSET = 18


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote and how closely onnxruntime matches PyTorch."""

    path: str
    bytes: int
    weights: str
    packed_layers: int
    max_abs_diff: float
    output_range: float
    rel_diff: float
    matched: float = 1.0  # share of check samples within tolerance (below 1 only with binary activations)


@dataclass(frozen=True)
class Traced:
    """An exported graph and what it was traced from."""

    graph: object  # onnx.ModelProto
    module: nn.Module  # the traced PyTorch model: packed, or float weights
    layers: dict[str, PackedBinary]  # the binarized layers, packed, by module name
    x: torch.Tensor  # the random batch traced with
    scopes: dict[str, tuple[str, ...]]  # node name -> the modules it was traced in, outermost first


def _scopes(onnx_model) -> dict[str, tuple[str, ...]]:
    """Each node's enclosing modules, from the exporter's ``pkg.torch.onnx.name_scopes`` metadata (a list
    ``['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d_3']``: the root, the modules, the FX node)."""
    out = {}
    for node in onnx_model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                try:
                    names = json.loads(prop.value.replace("'", '"'))
                except ValueError:
                    break
                out[node.name] = tuple(n for n in names[:-1] if n)
    return out


@contextlib.contextmanager
def captured_stdout():
    """Keep the exporter's own printing (it can dump hundreds of lines of IR on failure, some from C++)
    off our stdout, which ``--json`` reserves for one JSON object, and the root-logger warnings of
    onnxruntime's quantization tools (``Axis 1 is out-of-range for weight ...`` for each LayerNorm of a
    ViT) off stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()):
        os.dup2(sink.fileno(), 1)
        root.setLevel(logging.ERROR)
        try:
            yield
        finally:
            root.setLevel(level)
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def export_data_config(model: nn.Module, img_size: int | None = None) -> DataConfig:
    """The data config an export of ``model`` records: the model's (see
    :func:`equalbits_cli.data.config.resolve_data_config`), at ``img_size`` when given."""
    return resolve_data_config(model, DataOverrides(img_size=img_size))


def _optimize(program, protected: set[str], rewrite: bool) -> None:
    """Fold constants (onnxscript's optimizer, which torch's exporter runs by default) without touching
    a node that reads a ``protected`` initializer: by default it folds the unpacking of small layers into
    float weights, and transposes a transformer's weight into a new one under a generated name. With
    ``rewrite``, also its rewrite rules (Conv+BatchNorm fusion of full-precision layers and the like).
    """
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants_ir, optimize_ir

    def should_fold(node) -> bool | None:
        return False if any(v is not None and v.name in protected for v in node.inputs) else None

    if rewrite:
        optimize_ir(program.model, should_fold=should_fold)
        return
    fold_constants_ir(program.model, should_fold=should_fold)
    common.RemoveUnusedNodesPass()(program.model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(program.model)


def _strip(onnx_model) -> None:
    """Drop what the exporter adds for debugging: per-node metadata (source paths, stack traces, FX
    names; most of an unstripped file's size, and the exporting machine's paths) and the inferred shapes
    of intermediate values, which onnxruntime infers again."""
    for node in onnx_model.graph.node:
        del node.metadata_props[:]
    del onnx_model.graph.value_info[:]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain: torch's exporter wraps the tracer's error in its own."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def trace_graph(model: nn.Module, img_size: int | None = None, seed: int = 0, weights: str = "packed") -> Traced:
    """The inference graph of a binarized model, as torch's exporter writes it from the packed form.

    Args:
        model: A binarized model.
        img_size: Input height and width (default: the model's data config).
        seed: Seed of the random batch traced with.
        weights: ``packed`` (the graph unpacks the bit planes) or ``float`` (``<layer>.weight`` float
            initializers, as onnxruntime's quantization tools need).

    Raises:
        ValueError: the exporter cannot trace the model (with a hint).
    """
    packed = pack_model(model)
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedBinary)}
    net = packed if weights == "packed" else float_model(packed)
    c, h, w = export_data_config(model, img_size).input_size
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings(), captured_stdout():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                net,
                (x,),
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                opset_version=OPSET,
                dynamo=True,
                optimize=False,
                verbose=False,
            )
            fields = ("sign", "nonzero", "scale", "mu") if weights == "packed" else ("weight",)
            # Float weights stay under their names, BatchNorm unfused, for onnxruntime's tools.
            _optimize(program, {f"{n}.{f}" for n in layers for f in fields}, rewrite=weights == "packed")
            onnx_model = program.model_proto
        except Exception as exc:
            cause = _root_cause(exc)
            first = (_ANSI.sub("", str(cause)).strip().splitlines() or [""])[0][:300]
            first = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
            native = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", ("?", "?", "?"))[-1]
            sizey = any(
                w in first.lower() for w in ("size", "shape", "dimension", "kernel", "patch", "grid", "height", "width")
            )
            hint = (
                f"try `img_size` {native} (the model's own input size)"
                if sizey
                else "torch's exporter cannot trace this model; export `format` packed instead"
            )
            raise ValueError(f"ONNX export failed: {first}; {hint}") from exc
    scopes = _scopes(onnx_model)
    _strip(onnx_model)
    return Traced(onnx_model, net, layers, x, scopes)


def has_binary_activations(model: nn.Module) -> bool:
    return any(isinstance(m, (BinaryLayer, PackedBinary)) and m.act_threshold is not None for m in model.modules())


MIN_MATCHED = 0.75
MIN_SCALE = 0.1


def check_outputs(
    got: np.ndarray, want: np.ndarray, tolerance: float, binary_activations: bool, what: str
) -> tuple[float, float, float]:
    """Compare onnxruntime's logits with PyTorch's: ``(max |difference| over the matching samples,
    output range, share of samples whose every logit is within tolerance * range)``.

    With binary activations the outputs are not continuous in the inputs: an input within float
    rounding of its threshold (another runtime sums in another order, folds BatchNorm) can take the
    other bit and change that sample's logits. Such models pass when at least ``MIN_MATCHED`` of the
    samples match; a wrong graph changes nearly all of them. Every other model must match everywhere.

    Raises:
        ExportMismatch: the outputs differ beyond that (nothing is written then).
    """
    # The scale of the outputs: their range, or their magnitude where they hardly vary (a network whose
    # binary activations saturate gives nearly constant logits, whose range is float noise itself), and
    # at least MIN_SCALE: logits that all lie within 0.1 of each other give a near-uniform softmax and
    # decide nothing; their float rounding is not an error (a random-init 1W/1A MobileNetV3 gives
    # constant logits of 3e-7, which onnxruntime computes 7e-7 to 1e-6 off).
    rng = max(float(want.max() - want.min()), float(np.abs(want).max()), MIN_SCALE)
    per_sample = np.abs(got - want).reshape(len(want), -1).max(axis=1)
    ok = per_sample <= tolerance * rng
    matched = float(ok.mean())
    if matched < (MIN_MATCHED if binary_activations else 1.0):
        worst = float(per_sample.max())
        extra = (
            f"; {matched:.0%} of samples match (binary activations need {MIN_MATCHED:.0%})"
            if binary_activations
            else ""
        )
        raise ExportMismatch(
            f"{what} output differs from PyTorch by {worst:.3g} ({worst / rng:.3g} of the output range, tolerance "
            f"{tolerance}){extra}; the file was not written. This is a limitation of the ONNX export for this "
            "model, not a fault of the input: export `format` packed, and please report it"
        )
    return float(per_sample[ok].max()) if ok.any() else 0.0, rng, matched


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    weights: str = "packed",
    img_size: int | None = None,
    tolerance: float = 1e-4,
    seed: int = 0,
    exclusive: bool = False,
) -> ExportResult:
    """Export a binarized model to ONNX and check it in onnxruntime against PyTorch.

    Args:
        model: A binarized model (``load_model`` or ``binarize_model``).
        path: Output ``.onnx`` path (written atomically).
        weights: ``packed`` (uint8 bit planes + unpack subgraph) or ``float`` (plain float weights).
        img_size: Input height and width (default: the model's data config); recorded in the file.
        tolerance: Largest accepted ``max |onnx - torch| / (max(torch) - min(torch))``.
        seed: Seed of the random verification batch.
        exclusive: Refuse if ``path`` exists when the file is renamed into place.

    Returns:
        An :class:`ExportResult` with the file size and the measured difference.

    Raises:
        ValueError: bad ``weights``, or onnxruntime's output differs beyond ``tolerance``.
    """
    import onnx
    import onnxruntime as ort

    from ..formats.files import base_metadata
    from ..paths import atomic_write

    if weights not in ("packed", "float"):
        raise ValueError(f"weights must be 'packed' or 'float', got {weights!r}")
    meta = base_metadata(model, ONNX_FORMAT)
    traced = trace_graph(model, img_size, seed, weights)
    onnx_model, x = traced.graph, traced.x
    meta["data_config"] = json.dumps(export_data_config(model, img_size).to_dict())
    packed_layers = len(traced.layers) if weights == "packed" else 0
    if weights == "float":  # where each binarized weight is, for readers such as inspect
        names = {i.name for i in onnx_model.graph.initializer}
        missing = [n for n in traced.layers if n + ".weight" not in names]
        if missing:
            raise ValueError(f"ONNX export: the exporter renamed the weight of binarized layer {missing[0]!r}")
        meta["float_weights"] = json.dumps({n: [n + ".weight", m.conv is None] for n, m in traced.layers.items()})
    meta["onnx_weights"] = weights
    meta["bit_order"] = "little"
    onnx.helper.set_model_props(onnx_model, meta)
    onnx.checker.check_model(onnx_model, full_check=True)
    data = onnx_model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    binary_acts = has_binary_activations(model)
    if binary_acts:  # judged by the share of samples that match: see check_outputs
        x = torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(seed))
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = traced.module(x).numpy()
    diff, rng, matched = check_outputs(got, want, tolerance, binary_acts, "ONNX")
    path = Path(path)
    with atomic_write(path, exclusive=exclusive) as tmp:
        tmp.write_bytes(data)
    return ExportResult(str(path), len(data), weights, packed_layers, diff, rng, diff / rng, matched)
