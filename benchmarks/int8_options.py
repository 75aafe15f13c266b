"""Which int8 quantization makes each family faster than its float ONNX (issue 26), measured.

For each model (random init, ratio 0.5, default layer policy, 1000 classes, 224x224) it traces the float
inference graph once, quantizes it with onnxruntime's ``quantize_static`` in several ways, and times every
variant against the float ONNX with the function ``export``'s speed report uses
(``equalbits_cli.export.speed.time_onnx``: blocks of calls in turn, median).
Calibration uses random images: timing does not depend on the ranges.

Variants:
  all        onnxruntime's defaults, what ``export --format onnx-int8`` does today (QDQ on every op type
             it quantizes: Conv, Gemm, MatMul, Add, Mul, pooling, activations ...)
  matmul     only Conv, Gemm and MatMul quantized: element-wise ops stay float (fewer Q/DQ pairs)
  matmul-dw  as ``matmul``, with depthwise convolutions left float too
  qop        every op type, QOperator format (QLinearConv ... written out, not fused from Q/DQ pairs)
  tensor     as ``all``, with per-tensor instead of per-channel weight scales
  qop-tensor ``qop`` with per-tensor weight scales
  dynamic    MatMul/Gemm only, weights int8 per channel, activations quantized per call (``quantize_dynamic``)
  dynamic-tensor  as ``dynamic``, per-tensor weight scales
  nbitsB[-aL]  MatMul/Gemm weights only, onnxruntime's ``MatMulNBits`` at B bits (2: a binary code fits),
             blocks of 32, accuracy level L (4: int8 compute); the rest float
  act-float  as ``all``, the gated activations (hard-swish, SiLU) float
  se-float   as ``all``, the squeeze-excite branches float
  no-mul     as ``all``, no Mul quantized (activation and squeeze-excite products float)

    python benchmarks/int8_options.py [--models mobilenetv3_large_100,efficientnet_b0,resnet18] [--threads 2]
        [--batch 8] [--seconds 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from equalbits_cli import BinarizeConfig, binarize_model
from equalbits_cli.export.onnx import trace_graph


def depthwise_nodes(model: onnx.ModelProto) -> list[str]:
    names = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1:
                names.append(node.name)
    return names


def _mul_operands(model: onnx.ModelProto):
    """``(mul node, one input, the other input's producer or None, producers by output)`` for each Mul, both
    input orders."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Mul":
            for a, b in (node.input, node.input[::-1]):
                yield node, a, made_by.get(b), made_by


def gate_muls(model: onnx.ModelProto, gate: str) -> list[str]:
    """Mul nodes that multiply a tensor by ``gate`` of itself (x * HardSigmoid(x): a hard-swish, as
    onnxruntime's pre-processing decomposes it; x * Sigmoid(x): SiLU), and their gate nodes."""
    names = []
    for node, x, g, _ in _mul_operands(model):
        if g is not None and g.op_type == gate and g.input[0] == x and node.name not in names:
            names += [node.name, g.name]
    return names


def se_nodes(model: onnx.ModelProto) -> list[str]:
    """The squeeze-excite branches: everything from a spatial ReduceMean or GlobalAveragePool to the Mul
    that scales the feature map by its result."""
    names = []
    for node, x, n, made_by in _mul_operands(model):
        branch = []
        while n is not None and len(branch) < 12 and node.name not in names:
            branch.append(n.name)
            if n.op_type in ("ReduceMean", "GlobalAveragePool") and n.input[0] == x:
                names += branch + [node.name]
                break
            n = made_by.get(n.input[0]) if n.input else None
    return names


def name_nodes(path: Path) -> None:
    """Name the nodes onnxruntime's pre-processing left unnamed (a decomposed hard-swish): the quantizer
    excludes nodes by name."""
    model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    onnx.save(model, str(path))


def quantize(pre: Path, out: Path, variant: str, size: int) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.items = iter([{"input": rng.standard_normal((4, 3, size, size)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    if variant.startswith("nbits"):  # weight-only MatMulNBits for MatMul/Gemm: nbits2, nbits4, nbits2-a4 ...
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        bits, _, level = variant[5:].partition("-a")
        q = MatMulNBitsQuantizer(str(pre), bits=int(bits), block_size=32, is_symmetric=True,
                                 accuracy_level=int(level) if level else None)  # fmt: skip
        q.process()
        q.model.save_model_to_file(str(out))
        return
    if variant in ("dynamic", "dynamic-tensor"):  # weights int8, activations quantized per call
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=variant == "dynamic",
                         op_types_to_quantize=["MatMul", "Gemm"])  # fmt: skip
        return
    kwargs = {}
    fmt, per_channel = QuantFormat.QDQ, True
    if variant in ("qop", "qop-tensor"):
        fmt = QuantFormat.QOperator
    if variant in ("tensor", "qop-tensor"):
        per_channel = False
    if variant in ("matmul", "matmul-dw"):
        kwargs["op_types_to_quantize"] = ["Conv", "Gemm", "MatMul"]
    if variant == "matmul-dw":
        kwargs["nodes_to_exclude"] = depthwise_nodes(onnx.load(str(pre)))
    if variant == "act-float":  # the gated activations (hard-swish, SiLU) stay float
        graph = onnx.load(str(pre))
        kwargs["nodes_to_exclude"] = gate_muls(graph, "HardSigmoid") + gate_muls(graph, "Sigmoid")
    if variant == "se-float":  # the squeeze-excite branches stay float
        kwargs["nodes_to_exclude"] = se_nodes(onnx.load(str(pre)))
    if variant == "no-mul":  # Mul never quantized: activations' and squeeze-excite's products stay float
        kwargs["op_types_to_quantize"] = ["Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "Sigmoid", "MaxPool"]
        kwargs["op_types_to_quantize"] += ["GlobalAveragePool", "AveragePool", "Concat", "Softmax", "Reshape"]
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=fmt,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        **kwargs,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mobilenetv3_large_100,efficientnet_b0,resnet18")
    ap.add_argument("--variants", default="all,matmul,matmul-dw")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from equalbits_cli.export.speed import int8_dot_product, onnx_session, time_onnx

    dot = int8_dot_product()
    print(f"# onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} threads, batch {args.batch}")
    print(f"# int8 dot-product instructions: {({'': 'none', None: 'unknown'}).get(dot, dot)}")
    print("| model | variant | float ONNX | int8 | int8 vs float |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = binarize_model(name, BinarizeConfig(), num_classes=1000).eval()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            onnx.save(trace_graph(model, 224, weights="float").graph, str(tmp / "float.onnx"))
            quant_pre_process(str(tmp / "float.onnx"), str(tmp / "pre.onnx"))
            name_nodes(tmp / "pre.onnx")
            x = np.random.default_rng(1).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
            for variant in args.variants.split(","):
                quantize(tmp / "pre.onnx", tmp / f"{variant}.onnx", variant, 224)
                sessions = {"float": onnx_session(tmp / "float.onnx", args.threads),
                            "int8": onnx_session(tmp / f"{variant}.onnx", args.threads)}  # fmt: skip
                timed = time_onnx(sessions, x, seconds=args.seconds)
                f, q = timed["float"][0], timed["int8"][0]
                print(f"| {name} | {variant} | {f:.1f} ms | {q:.1f} ms | {f / q:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
