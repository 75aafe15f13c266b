"""ONNX export of the inference graph, with binarized weights stored as packed bit planes.

The exported graph computes each binarized layer as a plain Conv/Gemm (MatMul for transformer Linear
layers) whose weight is ``factor * levels`` (``levels`` = codes, or centred codes; BatchNorm is kept
as its own node, so ``factor`` is the layer's scale). Each such float initializer is then replaced by
its packed uint8 bit planes, a per-filter float factor and a small unpack subgraph (Unsqueeze,
BitShift, BitwiseAnd, Reshape, Slice, Cast, Mul; opset 18), which onnxruntime folds into a constant
once, when the session is created.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
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
from ..nn.layers import BinaryLayer, conv_kwargs

__all__ = [
    "ExportResult",
    "OPSET",
    "SignActivation",
    "check_outputs",
    "export_data_config",
    "export_onnx",
    "has_binary_activations",
    "inference_model",
    "trace_graph",
]

OPSET = 18


class SignActivation(nn.Module):
    """Inference-time activation binarization: sign(x - t) with sign(0) = +1, ``t`` per channel."""

    def __init__(self, threshold: torch.Tensor | None = None, channel_dim: int = 1) -> None:
        super().__init__()
        self.register_buffer("threshold", None if threshold is None else threshold.detach().clone())
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:
            shape = [1] * x.dim()
            shape[self.channel_dim if self.channel_dim >= 0 else x.dim() + self.channel_dim] = -1
            x = x - self.threshold.view(shape)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


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


def inference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each binarized layer replaced by a plain Conv2d/Linear of weight
    ``scale * codes`` (and a sign activation before it for 1W/1A layers): no straight-through
    functions, so the graph exports as standard operators."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if not isinstance(module, BinaryLayer):
            continue
        if isinstance(module, nn.Conv2d):
            plain: nn.Module = nn.Conv2d(**conv_kwargs(module))
        else:
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(module.quantized_weight())
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        if module.config.activations == "sign":
            channel_dim = 1 if isinstance(module, nn.Conv2d) else -1
            plain = nn.Sequential(SignActivation(module.act_threshold, channel_dim), plain)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain)
    return model


def _factor_if_same_codes(w: np.ndarray, codes: np.ndarray, mu: np.ndarray | None = None) -> np.ndarray | None:
    """Per-row factor ``f`` with ``w == f * (codes - mu * |codes|)`` (within float rounding; ``mu`` 0 when
    None), or None if ``w`` has other codes."""
    rows = codes.shape[0]
    c = codes.reshape(rows, -1).astype(np.float32)
    if mu is not None:
        c = c - mu.reshape(rows, 1).astype(np.float32) * np.abs(c)
    w2 = w.reshape(rows, -1).astype(np.float32)
    nz = codes.reshape(rows, -1) != 0
    if np.any((w2 != 0) & ~nz):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(nz & (c != 0), w2 / np.where(c != 0, c, 1), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        f = np.nanmean(ratio, axis=1)
    f = np.where(np.isnan(f), 0.0, f).astype(np.float32)
    expect = f[:, None] * c
    tol = 1e-5 * np.maximum(np.abs(f), 1e-30)[:, None]
    if not np.all(np.abs(expect - w2) <= tol):
        return None
    return f


def unpack_constants(prefix: str, shape: tuple[int, ...]) -> list:
    """The constant initializers :func:`plane_nodes` reads (one set per layer, under ``prefix``)."""
    from onnx import numpy_helper

    count = int(np.prod(shape))
    return [
        numpy_helper.from_array(np.arange(8, dtype=np.uint8).reshape(1, 8), prefix + "bit_shifts"),
        numpy_helper.from_array(np.ones((1, 1), dtype=np.uint8), prefix + "bit_one"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), prefix + "flat"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), prefix + "start"),
        numpy_helper.from_array(np.array([count], dtype=np.int64), prefix + "count"),
        numpy_helper.from_array(np.array(shape, dtype=np.int64), prefix + "shape"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), prefix + "axis1"),
    ]


def plane_nodes(prefix: str, name: str) -> list:
    """Nodes unpacking the bit plane initializer ``prefix + name`` (uint8, LSB first) into a flat float
    tensor ``prefix + name + "_f"`` of 0/1 values, one per code."""
    from onnx import helper

    p = prefix + name
    return [
        helper.make_node("Unsqueeze", [p, prefix + "axis1"], [p + "_col"]),
        helper.make_node("BitShift", [p + "_col", prefix + "bit_shifts"], [p + "_shift"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [p + "_shift", prefix + "bit_one"], [p + "_bits"]),
        helper.make_node("Reshape", [p + "_bits", prefix + "flat"], [p + "_flat"]),
        helper.make_node("Slice", [p + "_flat", prefix + "start", prefix + "count"], [p + "_cut"]),
        helper.make_node("Cast", [p + "_cut"], [p + "_f"], to=1),
    ]


def _unpack_nodes(
    prefix: str, shape: tuple[int, ...], ternary: bool, out_name: str, centered: bool = False
) -> tuple[list, list]:
    """Nodes and constant initializers computing ``factor * codes`` (or, ``centered``,
    ``factor * (codes - mu * |codes|)`` with the per-filter initializer ``mu``) from the packed planes."""
    from onnx import helper, numpy_helper

    inits = unpack_constants(prefix, shape) + [
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), prefix + "one_f"),
        numpy_helper.from_array(np.array(2.0, dtype=np.float32), prefix + "two_f"),
    ]

    plane = functools.partial(plane_nodes, prefix)
    nodes = plane("sign")
    # code = 1 - 2 * sign  (binary);  code = (1 - 2 * sign) * nonzero  (ternary)
    nodes += [
        helper.make_node("Mul", [prefix + "sign_f", prefix + "two_f"], [prefix + "sign2"]),
        helper.make_node("Sub", [prefix + "one_f", prefix + "sign2"], [prefix + "pm"]),
    ]
    codes = prefix + "pm"
    if ternary:
        nodes += plane("nonzero")
        nodes.append(helper.make_node("Mul", [prefix + "pm", prefix + "nonzero_f"], [prefix + "codes"]))
        codes = prefix + "codes"
    nodes.append(helper.make_node("Reshape", [codes, prefix + "shape"], [prefix + "codes_shaped"]))
    levels = prefix + "codes_shaped"
    if centered:
        nodes += [
            helper.make_node("Abs", [levels], [prefix + "abs"]),
            helper.make_node("Mul", [prefix + "abs", prefix + "mu"], [prefix + "shift"]),
            helper.make_node("Sub", [levels, prefix + "shift"], [prefix + "levels"]),
        ]
        levels = prefix + "levels"
    nodes.append(helper.make_node("Mul", [levels, prefix + "factor"], [out_name]))
    return nodes, inits


def shape_candidates(by_shape: dict[tuple[int, ...], list[str]], shape: tuple[int, ...], layer: str) -> list:
    """``(initializer name, transposed)`` pairs that could hold ``layer``'s weight: those of its shape (or,
    2-D, the transposed shape), names that contain the layer's own first. Graph optimizers rename weights
    (``ConvBnFusion_W_<layer>.weight``) but keep the name in them; trying those first matters where a
    weight matches several codes (an all-zero weight, as after a zero-initialized BatchNorm, matches any)."""
    out = [(n, False) for n in by_shape.get(shape, [])]
    if len(shape) == 2:
        out += [(n, True) for n in by_shape.get(shape[::-1], [])]
    return sorted(out, key=lambda c: (layer + ".weight") not in c[0])


def find_weights(onnx_model, layers: dict[str, tuple[torch.Tensor, bool]]) -> dict[str, tuple]:
    """For each binarized layer, ``(initializer name, factor, transposed, mu)`` of its float weight.

    The weight is found by name when the exporter kept it, else by its code pattern among the
    initializers of the same shape, or of the transposed shape (a Linear applied to 3-D input is
    exported as MatMul with a transposed constant, under a generated name).
    """
    from onnx import numpy_helper

    from ..quant.quantize import code_offsets

    inits = {i.name: i for i in onnx_model.graph.initializer}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, init in inits.items():
        by_shape.setdefault(tuple(init.dims), []).append(name)
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    used: set[str] = set()
    out = {}
    for name, (codes_t, centered) in layers.items():
        codes = codes_t.numpy()
        shape = codes.shape
        mu = code_offsets(codes_t).numpy() if centered else None
        if mu is not None and not mu.any():  # ratio 0.5, even filter sizes: nothing to centre
            mu = None
        candidates = shape_candidates(by_shape, shape, name)
        found = None
        for cand, transposed in candidates:
            if cand in used or tuple(inits[cand].dims) != (shape[::-1] if transposed else shape):
                continue
            a = array(cand)
            f = _factor_if_same_codes(a.T if transposed else a, codes, mu)
            if f is not None:
                found = (cand, f, transposed, mu)
                break
        if found is None:
            raise ValueError(f"ONNX export: cannot find the weight of binarized layer {name!r} in the exported graph")
        used.add(found[0])
        out[name] = found
    return out


def _pack_initializers(onnx_model, layers: dict[str, tuple[torch.Tensor, bool]]) -> int:
    """Replace each binarized layer's float weight initializer by packed planes + unpack subgraph."""
    from onnx import helper, numpy_helper

    from ..formats.packed import pack_codes

    graph = onnx_model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes = []
    for name, (init_name, factor, transposed, mu) in find_weights(onnx_model, layers).items():
        codes_t = layers[name][0]
        codes = codes_t.numpy()
        shape = codes.shape
        prefix = f"eb::{name}::"
        sign, nonzero = pack_codes(codes_t)
        fshape = (-1,) + (1,) * (codes.ndim - 1)
        graph.initializer.remove(inits[init_name])
        graph.initializer.append(numpy_helper.from_array(sign.numpy(), prefix + "sign"))
        if nonzero is not None:
            graph.initializer.append(numpy_helper.from_array(nonzero.numpy(), prefix + "nonzero"))
        graph.initializer.append(numpy_helper.from_array(factor.reshape(fshape), prefix + "factor"))
        if mu is not None:
            graph.initializer.append(numpy_helper.from_array(mu.astype(np.float32).reshape(fshape), prefix + "mu"))
        target = prefix + "weight" if transposed else init_name
        nodes, consts = _unpack_nodes(prefix, shape, nonzero is not None, target, centered=mu is not None)
        if transposed:
            nodes.append(helper.make_node("Transpose", [target], [init_name], perm=[1, 0]))
        graph.initializer.extend(consts)
        new_nodes.extend(nodes)
    # The unpack subgraphs only read initializers, so they can all go first (topological order holds).
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + old)
    return len(layers)


@contextlib.contextmanager
def captured_stdout():
    """Keep the exporter's own printing (it can dump hundreds of lines of IR on failure, some from C++)
    off our stdout, which ``--json`` reserves for one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()):
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def export_data_config(model: nn.Module, img_size: int | None = None) -> DataConfig:
    """The data config an export of ``model`` records: the model's (see
    :func:`equalbits_cli.data.config.resolve_data_config`), at ``img_size`` when given."""
    return resolve_data_config(model, DataOverrides(img_size=img_size))


def trace_graph(model: nn.Module, img_size: int | None = None, seed: int = 0):
    """The float inference graph of a binarized model, as torch's exporter writes it.

    Returns:
        ``(onnx_model, plain, layers, x)``: the ONNX ModelProto (each binarized weight a float
        initializer equal to ``factor * levels``), the plain PyTorch model it was traced from, each
        binarized layer's ``(codes, centred)``, and the random input batch used for tracing.

    Raises:
        ValueError: the exporter cannot trace the model (with a hint).
    """
    import onnx

    plain = inference_model(model)
    layers = {
        n: (m.quantize()[0], bool(m.config.center)) for n, m in model.named_modules() if isinstance(m, BinaryLayer)
    }
    c, h, w = export_data_config(model, img_size).input_size
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed))
    buf = io.BytesIO()
    with warnings.catch_warnings(), captured_stdout():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                plain,
                (x,),
                buf,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
                # PRESERVE on an eval-mode model keeps BatchNorm as its own (inference) node instead of folding
                # it into the conv weight, so each binarized weight stays exactly scale * codes under its own
                # name. onnxruntime fuses Conv+BatchNorm again when it loads the model.
                training=torch.onnx.TrainingMode.PRESERVE,
            )
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            native = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", ("?", "?", "?"))[-1]
            sizey = any(
                w in first.lower() for w in ("size", "shape", "dimension", "kernel", "patch", "grid", "height", "width")
            )
            hint = (
                f"try --img-size {native} (the model's own input size)"
                if sizey
                else "torch's exporter cannot trace this model; export --format packed instead"
            )
            raise ValueError(f"ONNX export failed: {type(exc).__name__}: {first}; {hint}") from exc
    return onnx.load_from_string(buf.getvalue()), plain, layers, x


def has_binary_activations(model: nn.Module) -> bool:
    return any(isinstance(m, BinaryLayer) and m.config.activations == "sign" for m in model.modules())


MIN_MATCHED = 0.75
MIN_SCALE = 1e-2


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
    # at least MIN_SCALE: logits that small decide nothing, and their float rounding is not an error.
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
            "model, not a fault of the input: export --format packed, and please report it"
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
        raise ValueError(f"--onnx-weights must be packed or float, got {weights!r}")
    meta = base_metadata(model, "equalbits.onnx")
    onnx_model, plain, layers, x = trace_graph(model, img_size, seed)
    meta["data_config"] = json.dumps(export_data_config(model, img_size).to_dict())
    packed_layers = _pack_initializers(onnx_model, layers) if weights == "packed" else 0
    if weights == "float":  # where each binarized weight went, for readers such as inspect
        found = find_weights(onnx_model, layers)
        meta["float_weights"] = json.dumps({n: [f[0], bool(f[2])] for n, f in found.items()})
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
        want = plain(x).numpy()
    diff, rng, matched = check_outputs(got, want, tolerance, binary_acts, "ONNX")
    path = Path(path)
    with atomic_write(path, exclusive=exclusive) as tmp:
        tmp.write_bytes(data)
    return ExportResult(str(path), len(data), weights, packed_layers, diff, rng, diff / rng, matched)
