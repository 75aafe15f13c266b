"""``export --format onnx-int8``: a static int8 ONNX model for stock onnxruntime, binary weights still 1 bit on disk.

A binary weight ``factor * codes`` is exactly an int8 tensor with a per-output-channel scale (codes in
{-1, 0, +1} times 127, zero point 0), so the weight side of an int8 convolution loses nothing; only the
activations are quantized (uint8, static ranges from calibration images). The work is done by
onnxruntime's own tooling:

1. the float graph (:func:`equalbits_cli.export.onnx.trace_graph` with ``weights="float"``: each binarized
   weight is the initializer ``<layer>.weight``) goes through ``quant_pre_process``
   (shape inference, Conv+BatchNorm fusion: without it the QDQ pairs are not fused and int8 runs slower
   than float);
2. ``quantize_static`` writes a QDQ model: per-channel int8 weights, uint8 activations calibrated on the
   images of ``--data`` by onnxruntime's calibrator;
3. each binarized layer's int8 weight initializer (found by name: ``<layer>.weight`` as onnxruntime's tools
   rename it, see :func:`weight_name`, and checked against the layer's codes) is replaced by its packed
   bit planes, two int8 levels
   per output channel and a small unpack subgraph ending in a Cast to int8. onnxruntime folds the
   subgraph into an int8 constant when the session is created, before it fuses the QDQ pairs into
   QLinearConv / QLinearMatMul / QGemm; :func:`int8_ops` reads the optimized graph to prove it.

Centred layers (``ratio`` other than 0.5) have the two weight levels ``factor * (±1 - mu)``: the larger
becomes ±127 and the other is rounded to the int8 grid like any quantized weight (at most 1/254 of the
larger level). At ratio 0.5 (``mu = 0``) both are ±127: exact.

Models with binary activations (``--activations sign``): a binary layer's input is ±1, exactly
representable as uint8 with scale 1/127 and zero point 128, and its weight is exact, so its integer
convolution is exact. Only those layers are quantized (their outputs stay float, the rest of the graph
too), and the int8 model matches PyTorch up to accumulation order.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SettingError
from ..nn.packed import PackedBinary
from ..progress import Progress
from .onnx import export_data_config

__all__ = [
    "INT8_OPS",
    "Int8ExportResult",
    "export_onnx_int8",
    "image_sets",
    "int8_ops",
    "paired_logits",
    "top1_agreement",
]

# Operators that compute on integers in onnxruntime's optimized CPU graph (QDQ fusions and the
# operator-oriented forms).
INT8_OPS = frozenset(
    {
        "QLinearConv",
        "NhwcQLinearConv",
        "QLinearMatMul",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QAttention",
    }
)
FLOAT_OPS = frozenset({"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})


@dataclass(frozen=True)
class Int8ExportResult:
    """What :func:`export_onnx_int8` wrote and how it compares with PyTorch."""

    path: str
    bytes: int
    packed_layers: int
    exact_layers: int
    int8_ops: dict[str, int]
    float_ops: dict[str, int]
    max_abs_diff: float
    rel_diff: float
    calibration_images: int
    agreement: float | None = None
    agreement_images: int = 0
    activations: str = "float"
    notes: list[str] = field(default_factory=list)


def image_sets(model: nn.Module, data_dir: str | os.PathLike, img_size: int | None = None):
    """``(calibration, val)`` datasets of ``data_dir`` prepared by the model's data config, as it is
    scored: calibration is ``train/`` when it exists, else ``val/``.

    Raises:
        ValueError / FileNotFoundError: a missing, empty or malformed image folder.
    """
    from ..data.folders import calibration_dataset, find_splits, val_dataset

    recorded = (getattr(model, "equalbits_meta", None) or {}).get("classes")
    splits = find_splits(data_dir, need_train=False, classes=recorded)
    cfg = export_data_config(model, img_size)
    val = val_dataset(splits, cfg)
    if splits.train.is_dir():
        return calibration_dataset(splits, cfg), val
    return val, val


def _batches(dataset, batches: int, batch_size: int, seed: int = 0):
    """Up to ``batches`` batches of ``batch_size`` images, in a seeded order, as float32 arrays."""
    from ..data.folders import EpochSampler, make_loader
    from ..data.folders import iterate as unwrap

    loader = make_loader(dataset, EpochSampler(len(dataset), shuffle=True, seed=seed), batch_size, 0, drop_last=False)
    for i, (images, labels) in enumerate(unwrap(loader)):
        if i >= batches:
            break
        yield images.numpy().astype(np.float32), labels.numpy()


def paired_logits(session, plain: nn.Module, dataset, images: int, progress: Progress | None = None):
    """onnxruntime's and PyTorch's logits on up to ``images`` images of ``dataset`` (a seeded choice, in
    batches of 64): ``(got, want)``, or None when there are no images to compare."""
    batches = -(-images // 64)
    if progress is not None:
        progress.phase("checking against PyTorch", min(batches, -(-len(dataset) // 64)))
    got, want, seen = [], [], 0
    for batch, _ in _batches(dataset, batches, 64, seed=1):
        batch = batch[: images - seen]
        got.append(session.run(None, {"input": batch})[0])
        with torch.no_grad():
            want.append(plain(torch.from_numpy(batch)).numpy())
        seen += len(batch)
        if progress is not None:
            progress.advance(1)
    return (np.concatenate(got), np.concatenate(want)) if got else None


def top1_agreement(session, model: nn.Module, dataset, images: int = 256) -> tuple[float | None, int]:
    """``(percent of images where onnxruntime's top-1 equals PyTorch's, images compared)``."""
    from ..nn.packed import pack_model

    pair = paired_logits(session, pack_model(model), dataset, images)
    if pair is None:
        return None, 0
    got, want = pair
    return 100.0 * float((got.argmax(1) == want.argmax(1)).mean()), len(got)


def _int8_levels(q: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-row int8 values ``(pos, neg)`` with ``q == pos`` where ``codes == 1``, ``neg`` where -1 and 0
    where 0, or None when ``q`` is not such a tensor."""
    rows = codes.shape[0]
    c = codes.reshape(rows, -1)
    v = q.reshape(rows, -1).astype(np.int16)
    if np.any(v[c == 0] != 0):
        return None
    levels = []
    for code in (1, -1):
        mask = c == code
        hi = np.where(mask, v, -1000).max(axis=1)
        lo = np.where(mask, v, 1000).min(axis=1)
        has = mask.any(axis=1)
        if np.any(has & (hi != lo)):
            return None
        levels.append(np.where(has, hi, 0).astype(np.float32))
    return levels[0], levels[1]


def _unpack_constants(prefix: str, shape: tuple[int, ...]) -> list:
    """The constant initializers :func:`_plane_nodes` reads (one set per layer, under ``prefix``)."""
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


def _plane_nodes(prefix: str, name: str) -> list:
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


def _int8_unpack(
    prefix: str, codes: np.ndarray, pos: np.ndarray, neg: np.ndarray, out_name: str, transposed: bool
) -> tuple[list, list]:
    """Nodes and initializers computing the int8 tensor ``out_name`` (``pos``/``neg`` per output channel
    where the code is +1/-1, 0 where it is 0; transposed to ``[in, out]`` if asked) from the packed bit
    planes of ``codes``: ``q = (pos + sign * (neg - pos)) [* nonzero]``, all small integers, exact in
    float32, then a Cast to int8. onnxruntime folds it into an int8 constant at session creation."""
    from onnx import TensorProto, helper, numpy_helper

    from ..formats.planes import pack_codes

    shape = tuple(codes.shape)
    rows = shape[0]
    sign, nonzero = pack_codes(codes)
    inits = [numpy_helper.from_array(sign, prefix + "sign")]
    if nonzero is not None:
        inits.append(numpy_helper.from_array(nonzero, prefix + "nonzero"))
    inits += [
        numpy_helper.from_array(pos.astype(np.float32).reshape(rows, 1), prefix + "qpos"),
        numpy_helper.from_array((neg - pos).astype(np.float32).reshape(rows, 1), prefix + "qdelta"),
        numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), prefix + "rows"),
    ] + _unpack_constants(prefix, shape)
    nodes = _plane_nodes(prefix, "sign") + [
        helper.make_node("Reshape", [prefix + "sign_f", prefix + "rows"], [prefix + "sign_rows"]),
        helper.make_node("Mul", [prefix + "sign_rows", prefix + "qdelta"], [prefix + "delta"]),
        helper.make_node("Add", [prefix + "delta", prefix + "qpos"], [prefix + "qf"]),
    ]
    qf = prefix + "qf"
    if nonzero is not None:
        nodes += _plane_nodes(prefix, "nonzero") + [
            helper.make_node("Reshape", [prefix + "nonzero_f", prefix + "rows"], [prefix + "nz_rows"]),
            helper.make_node("Mul", [qf, prefix + "nz_rows"], [prefix + "qf_nz"]),
        ]
        qf = prefix + "qf_nz"
    nodes += [
        helper.make_node("Cast", [qf], [prefix + "q_flat"], to=TensorProto.INT8),
        helper.make_node("Reshape", [prefix + "q_flat", prefix + "shape"], [prefix + "q" if transposed else out_name]),
    ]
    if transposed:
        nodes.append(helper.make_node("Transpose", [prefix + "q"], [out_name], perm=[1, 0]))
    return nodes, inits


def _prepend(graph, nodes: list) -> None:
    # Unpack subgraphs read initializers only, so they can all go first (topological order holds).
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)


def weight_name(names, layer: str, suffix: str = "") -> str:
    """The initializer that holds binarized ``layer``'s weight after onnxruntime's tools: the float graph
    names it ``<layer>.weight``; ``quant_pre_process`` renames a weight it folds BatchNorm into
    ``ConvBnFusion_W_<layer>.weight``; ``quantize_static`` adds ``_quantized`` (``suffix``).

    Raises:
        ValueError: neither name is in ``names`` (a tool renamed it in a way this does not know).
    """
    for name in (f"{layer}.weight{suffix}", f"ConvBnFusion_W_{layer}.weight{suffix}"):
        if name in names:
            return name
    raise ValueError(f"int8 export: onnxruntime's tools renamed the weight of binarized layer {layer!r}")


def _pack_int8_weights(q_model, layers: dict[str, PackedBinary]) -> tuple[int, int]:
    """Replace each binarized layer's int8 weight initializer (from the quantizer) by its bit planes, two
    int8 levels per output channel and an unpack subgraph. Returns ``(layers packed, layers whose
    levels are exactly +-127, so exact)``."""
    from onnx import TensorProto, numpy_helper

    graph = q_model.graph
    int8 = {i.name: i for i in graph.initializer if i.data_type == TensorProto.INT8}
    new_nodes, exact = [], 0
    for name, layer in layers.items():
        codes = layer.codes().numpy()
        transposed = layer.conv is None  # a Linear's float weight is [in, out]: see float_model
        init = int8[weight_name(int8, name, "_quantized")]
        q = numpy_helper.to_array(init)
        levels = _int8_levels(q.T if transposed else q, codes)
        if levels is None:
            raise ValueError(f"int8 export: the int8 weight of binarized layer {name!r} does not hold its codes")
        pos, neg = levels
        exact += bool(np.all(np.abs(pos[pos != 0]) == 127) and np.all(np.abs(neg[neg != 0]) == 127))
        graph.initializer.remove(init)
        nodes, inits = _int8_unpack(f"eb::{name}::", codes, pos, neg, init.name, transposed)
        graph.initializer.extend(inits)
        new_nodes.extend(nodes)
    _prepend(graph, new_nodes)
    return len(layers), exact


def _factor(w: np.ndarray, codes: np.ndarray, mu: np.ndarray | None, layer: str) -> np.ndarray:
    """Per-row ``f`` with ``w == f * (codes - mu * |codes|)`` (float rounding allowed): the layer's scale,
    times the BatchNorm factor where onnxruntime folded one in.

    Raises:
        ValueError: ``w`` does not hold ``codes``.
    """
    rows = codes.shape[0]
    c = codes.reshape(rows, -1).astype(np.float32)
    if mu is not None:
        c = c - mu.reshape(rows, 1) * np.abs(c)
    w2 = w.reshape(rows, -1).astype(np.float32)
    first = np.argmax(c != 0, axis=1)  # a non-zero level per row (a filter has at least one non-zero code)
    f = w2[np.arange(rows), first] / np.where(c[np.arange(rows), first] != 0, c[np.arange(rows), first], 1)
    f = np.where(c[np.arange(rows), first] != 0, f, 0).astype(np.float32)
    if not np.all(np.abs(f[:, None] * c - w2) <= 1e-5 * np.maximum(np.abs(f), 1e-30)[:, None]):
        raise ValueError(f"int8 export: the float weight of binarized layer {layer!r} does not hold its codes")
    return f


def _integer_binary_layers(pre_model, layers: dict[str, PackedBinary]) -> int:
    """1W/1A: rewrite each binarized layer (Conv, Gemm or MatMul fed by +-1 activations) as an integer
    convolution or product on its packed codes, with float output:

        y = factor * IntOp(q(x), codes) - factor * mu * IntOp(q(x), |codes|) + bias

    ``q(x)`` is QuantizeLinear with scale 1 and zero point 128, exact for x in {-1, +1} (and for the
    zero padding, which ConvInteger pads with the zero point). ``mu`` (centred levels) is 0 at ratio
    0.5; otherwise the second product is a one-channel box sum (all codes non-zero, one group) or a
    full product on ``|codes|`` (pruned or grouped layers). Both are exact integer sums, so the layer
    matches PyTorch up to the float rounding of the final scale.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = pre_model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    new_nodes, replaced = [], {}
    for name, layer in layers.items():
        codes = layer.codes().numpy()
        mu = None if layer.mu is None else layer.mu.numpy()
        init_name = weight_name(inits, name)
        w = numpy_helper.to_array(inits[init_name])
        factor = _factor(w if layer.conv is not None else w.T, codes, mu, name)
        prefix = f"eb::{name}::"
        users = consumers.get(init_name, [])
        node = users[0] if len(users) == 1 else None
        if node is not None and node.op_type == "Transpose":
            nxt = consumers.get(node.output[0], [])
            replaced[node.output[0]] = []
            node = nxt[0] if len(nxt) == 1 else None
        if node is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
            raise ValueError(f"int8 export: binarized layer {name!r} is not a single Conv/Gemm/MatMul in the graph")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0):
            raise ValueError(f"int8 export: binarized layer {name!r} is a Gemm with transA or alpha; not supported")
        rows = codes.shape[0]
        ones = np.ones(rows, dtype=np.float32)
        # The integer weight in the layout the op wants: Conv [out, in, k, k]; MatMulInteger [in, out].
        as_in_out = node.op_type != "Conv"
        w_nodes, w_inits = _int8_unpack(prefix + "w_", codes, ones, -ones, prefix + "wq", as_in_out)
        new_nodes += w_nodes
        graph.initializer.extend(w_inits)
        consts = [
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), prefix + "x_scale"),
            numpy_helper.from_array(np.array(128, dtype=np.uint8), prefix + "x_zero"),
        ]
        bshape = (1, rows, 1, 1) if node.op_type == "Conv" else (rows,)
        consts.append(numpy_helper.from_array(factor.astype(np.float32).reshape(bshape), prefix + "factor"))
        op = "ConvInteger" if node.op_type == "Conv" else "MatMulInteger"
        kw = {
            k: v for k, v in attrs.items() if k in ("pads", "strides", "dilations", "group", "kernel_shape", "auto_pad")
        }
        x = node.input[0]
        out = [
            helper.make_node("QuantizeLinear", [x, prefix + "x_scale", prefix + "x_zero"], [prefix + "xq"]),
            helper.make_node(op, [prefix + "xq", prefix + "wq", prefix + "x_zero"], [prefix + "acc"], **kw),
            helper.make_node("Cast", [prefix + "acc"], [prefix + "acc_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [prefix + "acc_f", prefix + "factor"], [prefix + "y0"]),
        ]
        y = prefix + "y0"
        if mu is not None:
            box = not (codes == 0).any() and attrs.get("group", 1) == 1
            if box:  # every output channel sums the same window of +-1 inputs
                absw = np.ones((1,) + codes.shape[1:], dtype=np.int8)
                if as_in_out:
                    absw = absw.reshape(1, -1).T.copy()
                consts.append(numpy_helper.from_array(absw, prefix + "absq"))
            else:
                # |codes| from the weight's own unpacked codes (float, before their int8 Cast): no more bits.
                qf = prefix + ("w_qf_nz" if (codes == 0).any() else "w_qf")
                absq = prefix + "abs_q" if as_in_out else prefix + "absq"
                new_nodes += [
                    helper.make_node("Abs", [qf], [prefix + "abs_f"]),
                    helper.make_node("Cast", [prefix + "abs_f"], [prefix + "abs_flat"], to=TensorProto.INT8),
                    helper.make_node("Reshape", [prefix + "abs_flat", prefix + "w_shape"], [absq]),
                ]
                if as_in_out:
                    new_nodes.append(helper.make_node("Transpose", [absq], [prefix + "absq"], perm=[1, 0]))
            consts.append(
                numpy_helper.from_array((-factor * mu).astype(np.float32).reshape(bshape), prefix + "mu_factor")
            )
            out += [
                helper.make_node(op, [prefix + "xq", prefix + "absq", prefix + "x_zero"], [prefix + "acc2"], **kw),
                helper.make_node("Cast", [prefix + "acc2"], [prefix + "acc2_f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [prefix + "acc2_f", prefix + "mu_factor"], [prefix + "y_mu"]),
                helper.make_node("Add", [y, prefix + "y_mu"], [prefix + "y1"]),
            ]
            y = prefix + "y1"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            if bias not in inits:
                raise ValueError(f"int8 export: the bias of binarized layer {name!r} is not a constant")
            b = numpy_helper.to_array(inits[bias]).astype(np.float32)
            if node.op_type == "Gemm":
                b = b * float(attrs.get("beta", 1.0))
            consts.append(numpy_helper.from_array(b.reshape(bshape) if b.size == rows else b, prefix + "bias"))
            out.append(helper.make_node("Add", [y, prefix + "bias"], [prefix + "y2"]))
            y = prefix + "y2"
        out.append(helper.make_node("Identity", [y], [node.output[0]]))
        graph.initializer.extend(consts)
        replaced[node.output[0]] = out
    rebuilt = []
    for node in graph.node:
        rebuilt.extend(replaced.get(node.output[0], [node]))
    del graph.node[:]
    graph.node.extend(new_nodes + rebuilt)
    _drop_unused_initializers(graph)
    return len(layers)


def _drop_unused_initializers(graph) -> None:
    needed = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(init)


def int8_ops(model_bytes: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """``(integer ops, float matrix ops)`` by type in onnxruntime's optimized CPU graph of the model."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        # Extended level: the QDQ fusions, without the layout changes that cannot be saved.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return (
        {k: v for k, v in sorted(ops.items()) if k in INT8_OPS},
        {k: v for k, v in sorted(ops.items()) if k in FLOAT_OPS},
    )


def _quantize(pre_path: Path, out_path: Path, reader) -> None:
    """onnxruntime's static QDQ quantization: per-channel int8 weights, uint8 activations (the fast
    u8s8 kernels on x86), ranges from the calibration reader."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(pre_path),
        str(out_path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def export_onnx_int8(
    model: nn.Module,
    path: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    calibrate_batches: int = 8,
    batch_size: int = 8,
    check_images: int = 256,
    img_size: int | None = None,
    exclusive: bool = False,
    progress: Progress | None = None,
) -> Int8ExportResult:
    """Export a binarized model as a static int8 QDQ ONNX model whose binary weights stay packed bits.

    Args:
        model: A binarized model (``load_model``).
        path: Output ``.onnx`` path (written atomically, only after the checks pass).
        data_dir: An image folder (``train/`` and/or ``val/`` of class folders): ``train/`` (else
            ``val/``) calibrates the activation ranges, ``val/`` checks top-1 agreement with PyTorch.
        calibrate_batches: Number of calibration batches of ``batch_size`` images.
        batch_size: Images per calibration batch.
        check_images: Up to this many ``val/`` images for the agreement check (0: skip it).
        img_size: Input height and width (default: the model's data config); recorded in the file.
        exclusive: Refuse if ``path`` exists when the file is renamed into place.
        progress: Receives the phases (calibrating, checking).

    Returns:
        An :class:`Int8ExportResult`: sizes, the integer ops onnxruntime runs, the differences.

    Raises:
        ValueError: bad arguments or data, or onnxruntime runs no integer kernel for the model.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..formats import ONNX_FORMAT
    from ..formats.files import base_metadata
    from ..paths import atomic_write
    from .onnx import captured_stdout, check_outputs, export_data_config, has_binary_activations, trace_graph

    if not 1 <= calibrate_batches <= 10_000:
        raise SettingError(f"`calibrate_batches` must be between 1 and 10000, got {calibrate_batches}")
    if not 1 <= batch_size <= 4096:
        raise SettingError(f"`batch_size` must be between 1 and 4096, got {batch_size}")
    calib_set, val_set = image_sets(model, data_dir, img_size)
    meta = base_metadata(model, ONNX_FORMAT)
    meta["data_config"] = json.dumps(export_data_config(model, img_size).to_dict())
    traced = trace_graph(model, img_size, weights="float")
    onnx_model, plain, layers, x = traced.graph, traced.module, traced.layers, traced.x
    sign_acts = has_binary_activations(model)
    calib = [] if sign_acts else [b for b, _ in _batches(calib_set, calibrate_batches, batch_size)]
    if not sign_acts and not calib:
        raise SettingError(
            f"no images to calibrate on: {data_dir}/train (else val/) holds no images of the model's classes; "
            "add some, or pass another `data_dir`"
        )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self):
            batch = next(self.items, None)
            if progress is not None and batch is not None:
                progress.advance(1)
            return None if batch is None else {"input": batch}

    with tempfile.TemporaryDirectory() as tmp:
        float_path, pre_path, q_path = (Path(tmp) / n for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(onnx_model, str(float_path))
        with captured_stdout():
            quant_pre_process(str(float_path), str(pre_path))
            if sign_acts:
                q_model = onnx.load(str(pre_path))
                packed = exact = _integer_binary_layers(q_model, layers)
            else:
                if progress is not None:
                    progress.phase("calibrating", len(calib))
                _quantize(pre_path, q_path, Reader())
                q_model = onnx.load(str(q_path))
                packed, exact = _pack_int8_weights(q_model, layers)
    meta["onnx_weights"] = "int8"
    meta["bit_order"] = "little"
    meta["int8_activations"] = "binary" if sign_acts else "uint8"
    onnx.helper.set_model_props(q_model, meta)
    onnx.checker.check_model(q_model, full_check=True)
    data = q_model.SerializeToString()

    ints, floats = int8_ops(data)
    if not ints:
        raise ValueError("onnxruntime fused no integer kernel in the int8 model; the file was not written")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    pair = paired_logits(session, plain, val_set, check_images, progress) if check_images > 0 else None
    agreement, seen = None, 0
    if pair is None:  # no image check asked for: the random tracing batch
        with torch.no_grad():
            pair = session.run(None, {"input": x.numpy()})[0], plain(x).numpy()
    else:
        agreement, seen = 100.0 * float((pair[0].argmax(1) == pair[1].argmax(1)).mean()), len(pair[0])
    got, want = pair
    if sign_acts:  # integer layers are exact: the float tolerance applies (see check_outputs)
        diff, rng, _ = check_outputs(got, want, 1e-4, True, "int8")
    else:  # 8-bit activations: reported, not judged
        diff, rng = float(np.abs(got - want).max()), float(want.max() - want.min()) or 1.0
    if progress is not None:
        progress.done()
    notes = []
    if exact < packed:
        notes.append(
            f"{packed - exact} of {packed} binarized layers have two weight levels of different size (centred "
            "levels where a filter's +1 and -1 counts differ: a ratio other than 0.5, or an odd filter size): "
            "their smaller level is rounded to the int8 grid"
        )
    path = Path(path)
    with atomic_write(path, exclusive=exclusive) as tmp_file:
        tmp_file.write_bytes(data)
    return Int8ExportResult(
        str(path),
        len(data),
        packed,
        exact,
        ints,
        floats,
        diff,
        diff / rng,
        sum(len(b) for b in calib),
        agreement,
        seen,
        "binary layers int8 (exact), rest float" if sign_acts else "uint8 static",
        notes,
    )
