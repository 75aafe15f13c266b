"""``export --format onnx-int8``: an int8 ONNX model for stock onnxruntime, binary weights still 1 bit on disk.

A binary weight ``factor * codes`` is exactly an int8 tensor with a per-output-channel scale (codes in
{-1, 0, +1} times 127, zero point 0), so the weight side of an int8 convolution loses nothing; only the
activations are quantized (uint8, static ranges from calibration images). The work is done by
onnxruntime's own tooling:

1. the float graph (:func:`equalbits_cli.export.onnx.trace_graph` with ``weights="float"``: each binarized
   weight is the initializer ``<layer>.weight``) goes through ``quant_pre_process``
   (shape inference, Conv+BatchNorm fusion: without it the QDQ pairs are not fused and int8 runs slower
   than float);
2. ``quantize_static`` writes a QDQ model: per-channel int8 weights, uint8 activations calibrated on the
   images of ``--data`` by onnxruntime's calibrator (ranges ``static``, the default for CNNs); or
   ``quantize_dynamic`` quantizes the MatMul/Gemm nodes only, their inputs per call (ranges ``dynamic``,
   the default where every binarized layer is linear: ViT, DeiT);
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
from ..progress import Progress
from .int8_graph import binary_input_tensors, integer_binary_layers, pack_float_weights, pack_int8_weights
from .onnx import export_data_config

__all__ = [
    "INT8_OPS",
    "RANGES",
    "Exclusion",
    "Int8ExportResult",
    "check_ranges_name",
    "default_ranges",
    "export_onnx_int8",
    "find_exclusion",
    "image_sets",
    "int8_ops",
    "layer_kernels",
    "op_counts",
    "optimized_graph",
    "paired_logits",
    "quantize_matmuls",
    "quantize_qdq",
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
    int8_exclude: list[str] = field(default_factory=list)
    float_nodes: int = 0  # graph nodes the ``int8_exclude`` patterns kept float
    layer_kernels: dict[str, str] = field(default_factory=dict)  # module -> kernel onnxruntime runs


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


def int8_ops(model_bytes: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """``(integer ops, float matrix ops)`` by type in onnxruntime's optimized CPU graph of the model."""
    return op_counts(optimized_graph(model_bytes))


def optimized_graph(model_bytes: bytes):
    """The graph onnxruntime runs on this CPU (an ``onnx.ModelProto``): QDQ pairs fused into integer
    kernels, constants folded."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        # Extended level: the QDQ fusions, without the layout changes that cannot be saved.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def op_counts(optimized) -> tuple[dict[str, int], dict[str, int]]:
    """``(integer ops, float matrix ops)`` by type in an :func:`optimized_graph`."""
    ops = Counter(n.op_type for n in optimized.graph.node)
    return (
        {k: v for k, v in sorted(ops.items()) if k in INT8_OPS},
        {k: v for k, v in sorted(ops.items()) if k in FLOAT_OPS},
    )


def layer_kernels(optimized, scopes: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Module name -> the matrix kernel onnxruntime runs for it (``QLinearConv``, ``Conv`` ...), from an
    :func:`optimized_graph`: fused nodes keep the name of the node they were traced as, and the integer
    layers of 1W/1A models write tensors named ``eb::<layer>::...``."""
    out = {}
    for node in optimized.graph.node:
        if node.op_type not in INT8_OPS | FLOAT_OPS:
            continue
        scope = scopes.get(node.name) or scopes.get(node.name.removesuffix("_quant"))  # quantize_dynamic's names
        if scope:
            out[scope[-1]] = node.op_type
        elif node.output and node.output[0].startswith("eb::"):
            out.setdefault(node.output[0].split("::")[1], node.op_type)
    return dict(sorted(out.items()))


def with_real_inputs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every binary layer computes on its real-valued input: the 1W/32A
    network of a 1W/1A model, for timing one against the other."""
    import copy

    from ..nn.layers import BinaryLayer
    from ..nn.packed import PackedBinary

    real = copy.deepcopy(model)
    for m in real.modules():
        if isinstance(m, BinaryLayer):
            m.keep_real_inputs()
        elif isinstance(m, PackedBinary):
            m.act_threshold = None
    return real


def quantize_qdq(
    pre_path: Path, out_path: Path, reader, exclude: list[str] | None = None, signs: list[str] | None = None
) -> None:
    """onnxruntime's static QDQ quantization: per-channel int8 weights, uint8 activations (the fast
    u8s8 kernels on x86), ranges from the calibration reader; the nodes named in ``exclude`` stay float.
    The tensors named in ``signs`` (1W/1A layers' +-1 inputs) get scale 1/127 and zero point 128: -1 and
    +1 are 1 and 255, exactly."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    exact = {"scale": np.array(1 / 127, dtype=np.float32), "zero_point": np.array(128, dtype=np.uint8)}

    quantize_static(
        str(pre_path),
        str(out_path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude or [],
        extra_options={"TensorQuantOverrides": {t: [dict(exact)] for t in signs or []}},
    )


def quantize_matmuls(pre_path: Path, out_path: Path, exclude: list[str] | None = None) -> None:
    """onnxruntime's dynamic quantization of the MatMul/Gemm nodes with constant weights: per-channel int8
    weights, uint8 inputs quantized per call (DynamicQuantizeMatMul); the nodes named in ``exclude`` and
    every other op stay float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(pre_path),
        str(out_path),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=exclude or [],
    )


@dataclass(frozen=True)
class Exclusion:
    """What ``int8_exclude`` keeps float, found in the traced float graph.

    Attributes:
        nodes: Names of the float graph's nodes traced inside a matching module.
        outputs: Their output tensors (onnxruntime's pre-processing renames or replaces some nodes, a
            fused BatchNorm or a decomposed hard-swish, but keeps the tensors they write).
        layers: The binarized layers among the matching modules (kept float, still packed in the file).
    """

    nodes: frozenset[str] = frozenset()
    outputs: frozenset[str] = frozenset()
    layers: tuple[str, ...] = ()

    def in_graph(self, graph) -> list[str]:
        """Names of ``graph``'s nodes (after pre-processing) to keep float."""
        return [n.name for n in graph.node if n.name in self.nodes or self.outputs.intersection(n.output)]


def find_exclusion(traced, patterns) -> Exclusion:
    """The nodes and binarized layers inside the modules whose names match one of ``patterns`` (shell
    globs, ``fnmatch``: ``blocks.*.se`` matches ``blocks.0.0.se`` and keeps its whole branch float).

    Raises:
        SettingError: a pattern that matches no module of the model.
    """
    from fnmatch import fnmatchcase

    patterns = list(patterns)
    if not patterns:
        return Exclusion()
    if not traced.scopes:  # the exporter's node metadata is where modules are found
        raise ValueError(
            f"torch {torch.__version__}'s ONNX exporter recorded no module names, so `int8_exclude` cannot find "
            "the nodes of a module; export without it"
        )
    modules = {m for scope in traced.scopes.values() for m in scope} | set(traced.layers)
    for pattern in patterns:
        if not any(fnmatchcase(m, pattern) for m in modules):
            example = (sorted(traced.layers) or sorted(modules))[0]
            raise SettingError(
                f"`int8_exclude` pattern {pattern!r} matches no module of the model; patterns match module names "
                f"such as {example!r} (shell globs: `blocks.*.se`)"
            )

    def hit(names) -> bool:
        return any(fnmatchcase(m, p) for m in names for p in patterns)

    nodes = {n for n, scope in traced.scopes.items() if hit(scope)}
    outputs = {o for node in traced.graph.graph.node if node.name in nodes for o in node.output}
    parts = {name: name.split(".") for name in traced.layers}
    layers = tuple(n for n, p in parts.items() if hit(".".join(p[:i]) for i in range(1, len(p) + 1)))
    return Exclusion(frozenset(nodes), frozenset(outputs), layers)


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
    int8_exclude: tuple[str, ...] | list[str] = (),
    progress: Progress | None = None,
    exact_binary: bool | None = None,
    ranges: str | None = None,
) -> Int8ExportResult:
    """Export a binarized model as an int8 ONNX model whose binary weights stay packed bits.

    Args:
        model: A binarized model (``load_model``).
        path: Output ``.onnx`` path (written atomically, only after the checks pass).
        data_dir: An image folder (``train/`` and/or ``val/`` of class folders): ``train/`` (else
            ``val/``) calibrates the activation ranges, ``val/`` checks top-1 agreement with PyTorch.
        calibrate_batches: Number of calibration batches of ``batch_size`` images (1-10000, 1-4096).
        batch_size: Images per calibration batch.
        check_images: Up to this many ``val/`` images for the agreement check (0: skip it).
        img_size: Input height and width (default: the model's data config); recorded in the file.
        exclusive: Refuse if ``path`` exists when the file is renamed into place.
        int8_exclude: Module name globs (``blocks.*.se``) whose nodes stay float (see
            :func:`find_exclusion`); binarized layers among them keep 1-bit planes with float levels.
        progress: Receives the phases (calibrating, checking).
        exact_binary: 1W/1A models only. True: the binary-input layers run as ``ConvInteger`` /
            ``MatMulInteger`` on their packed codes, the rest float: PyTorch's outputs up to float rounding,
            slowly (resnet18: 7-9x slower than quantized). False: the whole graph quantized like a 1W/32A
            model, the +-1 inputs exactly (``QLinearConv``; resnet18: 0.2 points of top-1). None: False
            where every binary-input layer is a convolution, True where linear layers take binary inputs
            (ViTs: 8-bit LayerNorm outputs cross the sign thresholds; vit_tiny 61.8% against 93.6%).
        ranges: ``"static"``: activation ranges calibrated on ``data_dir``'s images, the whole graph in
            int8 (QDQ). ``"dynamic"``: only MatMul/Gemm with constant weights in int8, their inputs
            quantized per call (``quantize_dynamic``), no calibration. None: :func:`default_ranges`
            (dynamic for ViTs: vit_small 2.25x float against 1.96x static), static for 1W/1A models.

    Returns:
        An :class:`Int8ExportResult`: sizes, the integer ops onnxruntime runs, the differences.

    Raises:
        ValueError: bad arguments or data, a pattern that matches no module, or onnxruntime runs no
            integer kernel for the model.
    """
    import onnx
    import onnxruntime as ort

    from ..formats import ONNX_FORMAT
    from ..formats.files import base_metadata
    from ..paths import atomic_write
    from .onnx import export_data_config, has_binary_activations, trace_graph

    _check_batches(calibrate_batches, batch_size)
    calib_set, val_set = image_sets(model, data_dir, img_size)
    meta = {**base_metadata(model, ONNX_FORMAT), "onnx_weights": "int8", "bit_order": "little"}
    meta["data_config"] = json.dumps(export_data_config(model, img_size).to_dict())
    traced = trace_graph(model, img_size, weights="float")
    onnx_model, plain, layers, x = traced.graph, traced.module, traced.layers, traced.x
    exclusion = find_exclusion(traced, int8_exclude)
    route = _Route.choose(layers, has_binary_activations(model), exact_binary, ranges)
    integer, dynamic = route.integer, route.dynamic
    calib = [] if integer or dynamic else _calibration(calib_set, data_dir, calibrate_batches, batch_size)
    q_model, packed, exact, float_nodes = _int8_graph(onnx_model, layers, route, calib, progress, exclusion)
    meta["int8_activations"] = route.recorded
    onnx.helper.set_model_props(q_model, meta)
    onnx.checker.check_model(q_model, full_check=True)
    data = q_model.SerializeToString()

    ints, floats, kernels = _integer_kernels(data, traced.scopes)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    diff, rng, agreement, seen = _compare(session, plain, val_set, check_images, x, integer, progress)
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
        route.described,
        _notes(packed, exact, floats if dynamic else {}, len(exclusion.layers)),
        list(int8_exclude),
        float_nodes,
        kernels,
    )


def _integer_kernels(data: bytes, scopes: dict) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """``(integer ops, float matrix ops, kernel by module)`` in onnxruntime's optimized graph of ``data``.

    Raises:
        ValueError: no integer kernel runs (the file is then not written).
    """
    optimized = optimized_graph(data)
    ints, floats = op_counts(optimized)
    if not ints:
        raise ValueError("onnxruntime fused no integer kernel in the int8 model; the file was not written")
    return ints, floats, layer_kernels(optimized, scopes)


def _calibration(dataset, data_dir, batches: int, batch_size: int) -> list[np.ndarray]:
    """Up to ``batches`` batches of ``dataset``'s images to calibrate static ranges on.

    Raises:
        SettingError: there are none.
    """
    calib = [b for b, _ in _batches(dataset, batches, batch_size)]
    if not calib:
        raise SettingError(
            f"no images to calibrate on: {data_dir}/train (else val/) holds no images of the model's classes; "
            "add some, or pass another `data_dir`"
        )
    return calib


def _check_batches(calibrate_batches: int, batch_size: int) -> None:
    if not 1 <= calibrate_batches <= 10_000:
        raise SettingError(f"`calibrate_batches` must be between 1 and 10000, got {calibrate_batches}")
    if not 1 <= batch_size <= 4096:
        raise SettingError(f"`batch_size` must be between 1 and 4096, got {batch_size}")


def _notes(packed: int, exact: int, float_left: dict[str, int], excluded: int) -> list[str]:
    """What an int8 export's reader should know: inexact weight levels, matrix ops per-call ranges left
    float (``float_left``), binarized layers ``int8_exclude`` kept float."""
    notes = []
    if exact < packed:
        notes.append(
            f"{packed - exact} of {packed} binarized layers have two weight levels of different size (centred "
            "levels where a filter's +1 and -1 counts differ: a ratio other than 0.5, or an odd filter size): "
            "their smaller level is rounded to the int8 grid"
        )
    if float_left:
        notes.append(
            f"{sum(float_left.values())} matrix ops stay float ({', '.join(sorted(float_left))}): per-call ranges "
            "quantize only MatMul/Gemm with constant weights, so attention products and convolutions run in float; "
            "`int8_ranges` static quantizes them too, and was slower on vit_small (1.96x float against 2.25x)"
        )
    if excluded:
        notes.append(
            f"{excluded} binarized layers kept float by `int8_exclude`: their weights stay 1-bit planes in the file, "
            "with float levels"
        )
    return notes


RANGES = ("static", "dynamic")


@dataclass(frozen=True)
class _Route:
    """How an int8 export quantizes: ``integer`` (1W/1A, exact integer ops on the codes, nothing
    calibrated), ``dynamic`` (per-call ranges of MatMul/Gemm), else calibrated QDQ; ``described`` is the
    result's ``activations``."""

    integer: bool
    dynamic: bool
    described: str

    @property
    def recorded(self) -> str:
        """The file's ``int8_activations`` metadata (docs/format.md)."""
        return "binary" if self.integer else ("uint8 dynamic" if self.dynamic else "uint8")

    @classmethod
    def choose(cls, layers: dict, sign_acts: bool, exact_binary: bool | None, ranges: str | None) -> _Route:
        """The route for ``layers`` (the traced binarized layers) and the user's choices (None: defaults).

        Raises:
            SettingError: see :func:`_check_ranges`.
        """
        if exact_binary is None:
            exact_binary = any(m.conv is None and m.act_threshold is not None for m in layers.values())
        integer = sign_acts and exact_binary
        ranges = _check_ranges(ranges, layers, sign_acts)
        if integer:
            return cls(True, False, "binary layers int8 (exact), rest float")
        if sign_acts:
            return cls(False, False, "uint8 static, +-1 inputs exact")
        return cls(False, ranges == "dynamic", f"uint8 {ranges}")


def default_ranges(layers: dict) -> str:
    """``"dynamic"`` where every binarized layer is a linear layer (a ViT's: the per-call ranges of
    ``quantize_dynamic`` beat calibrated ones on speed, 2.25x against 1.96x float for vit_small), else
    ``"static"`` (convolutions: QLinearConv needs calibrated ranges to fuse)."""
    linear = [isinstance(m, nn.Linear) or getattr(m, "conv", True) is None for m in layers.values()]  # packed or not
    return "dynamic" if linear and all(linear) else "static"


def check_ranges_name(ranges: str | None, setting: str = "ranges") -> None:
    """Refuse a ``ranges`` other than None or one of :data:`RANGES` (``setting``: its name in the message).

    Raises:
        SettingError: an unknown name.
    """
    if ranges is not None and ranges not in RANGES:
        raise SettingError(f"`{setting}` must be one of {', '.join(RANGES)}, got {ranges!r}")


def _check_ranges(ranges: str | None, layers: dict, sign_acts: bool) -> str:
    """The ``ranges`` to use: the default for ``layers`` when None, static for 1W/1A models.

    Raises:
        SettingError: an unknown name, or dynamic ranges asked for a 1W/1A model.
    """
    check_ranges_name(ranges)
    if sign_acts:
        if ranges == "dynamic":
            raise SettingError(
                "dynamic `ranges` cannot hold a 1W/1A model's +-1 inputs exactly; leave `ranges` out (static) or "
                "pass `exact_binary`"
            )
        return "static"
    return ranges or default_ranges(layers)


def _int8_graph(onnx_model, layers: dict, route: _Route, calib: list, progress: Progress | None, exclusion: Exclusion):
    """``(int8 model, layers packed in int8, layers exact, nodes kept float)`` from the float graph:
    onnxruntime's pre-processing, then, by ``route``: its static quantization calibrated on ``calib``
    with the binary weights packed again (the +-1 inputs of 1W/1A layers quantized exactly), its dynamic
    quantization of the MatMul/Gemm nodes, or (``route.integer``) the binarized layers rewritten as
    integer ops. What ``exclusion`` names stays float (its binarized layers packed with float levels)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx import captured_stdout

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self):
            batch = next(self.items, None)
            if progress is not None and batch is not None:
                progress.advance(1)
            return None if batch is None else {"input": batch}

    kept = {n: m for n, m in layers.items() if n not in exclusion.layers}
    left = {n: layers[n] for n in exclusion.layers}
    with tempfile.TemporaryDirectory() as tmp:
        float_path, pre_path, q_path = (Path(tmp) / n for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(onnx_model, str(float_path))
        with captured_stdout():
            quant_pre_process(str(float_path), str(pre_path))
            pre = onnx.load(str(pre_path))
            _name_nodes(pre.graph)  # the nodes pre-processing made are unnamed: the quantizer excludes by name
            skip = exclusion.in_graph(pre.graph)
            binary = {n: m for n, m in kept.items() if m.act_threshold is not None}  # +-1 inputs (1W/1A)
            if route.integer:  # integer ops where the inputs are +-1; float where the input policy kept them real
                packed = exact = integer_binary_layers(pre, binary)
                pack_float_weights(pre, {**left, **{n: m for n, m in kept.items() if n not in binary}})
                return pre, packed, exact, len(skip)
            onnx.save(pre, str(pre_path))
            if route.dynamic:
                quantize_matmuls(pre_path, q_path, skip)
            else:
                if progress is not None:
                    progress.phase("calibrating", len(calib))
                quantize_qdq(pre_path, q_path, Reader(), skip, binary_input_tensors(pre, binary))
            q_model = onnx.load(str(q_path))
            packed, exact = pack_int8_weights(q_model, kept)
            pack_float_weights(q_model, left)
            return q_model, packed, exact, len(skip)


def _name_nodes(graph) -> None:
    """Give each unnamed node a unique name from its op type and first output."""
    taken = {n.name for n in graph.node}
    for node in graph.node:
        if not node.name:
            name = base = f"{node.op_type}_{node.output[0]}"
            i = 1
            while name in taken:
                name, i = f"{base}_{i}", i + 1
            node.name = name
            taken.add(name)


def _compare(session, plain: nn.Module, val_set, check_images: int, x: torch.Tensor, sign_acts: bool, progress):
    """``(max |difference|, output range, top-1 agreement or None, images compared)`` of the int8 model
    against PyTorch on up to ``check_images`` val images (else the random tracing batch). 1W/1A models are
    judged like the float export (their integer layers are exact); 8-bit activations are reported only.

    Raises:
        ExportMismatch: a 1W/1A model's outputs differ beyond the float tolerance.
    """
    from .onnx import check_outputs

    pair = paired_logits(session, plain, val_set, check_images, progress) if check_images > 0 else None
    agreement, seen = None, 0
    if pair is None:  # no image check asked for: the random tracing batch
        with torch.no_grad():
            pair = session.run(None, {"input": x.numpy()})[0], plain(x).numpy()
    else:
        agreement, seen = 100.0 * float((pair[0].argmax(1) == pair[1].argmax(1)).mean()), len(pair[0])
    got, want = pair
    if progress is not None:
        progress.done()
    if sign_acts:  # integer layers are exact: the float tolerance applies (see check_outputs)
        diff, rng, _ = check_outputs(got, want, 1e-4, True, "int8")
    else:  # 8-bit activations: reported, not judged
        diff, rng = float(np.abs(got - want).max()), float(want.max() - want.min()) or 1.0
    return diff, rng, agreement, seen
