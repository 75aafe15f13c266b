"""Graph surgery of the int8 export: each binarized layer's int8 weight, as onnxruntime's quantizer
wrote it, replaced by its packed bit planes and an unpack subgraph; and, for 1W/1A models, each binarized
layer rewritten as an exact integer convolution or product on its codes. The format is specified in
docs/format.md; :mod:`equalbits_cli.export.int8` drives the export.
"""

from __future__ import annotations

import numpy as np

from ..nn.packed import PackedBinary

__all__ = ["int8_levels", "integer_binary_layers", "pack_float_weights", "pack_int8_weights", "weight_name"]


def int8_levels(q: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
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
    prefix: str,
    codes: np.ndarray,
    pos: np.ndarray,
    neg: np.ndarray,
    out_name: str,
    transposed: bool,
    to_int8: bool = True,
) -> tuple[list, list]:
    """Nodes and initializers computing the int8 tensor ``out_name`` (``pos``/``neg`` per output channel
    where the code is +1/-1, 0 where it is 0; transposed to ``[in, out]`` if asked) from the packed bit
    planes of ``codes``: ``q = (pos + sign * (neg - pos)) [* nonzero]``, all small integers, exact in
    float32, then a Cast to int8 (without ``to_int8``: the float tensor itself, for float levels).
    onnxruntime folds it into a constant at session creation."""
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
    if to_int8:
        nodes.append(helper.make_node("Cast", [qf], [prefix + "q_flat"], to=TensorProto.INT8))
        qf = prefix + "q_flat"
    nodes.append(helper.make_node("Reshape", [qf, prefix + "shape"], [prefix + "q" if transposed else out_name]))
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


def pack_int8_weights(q_model, layers: dict[str, PackedBinary]) -> tuple[int, int]:
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
        levels = int8_levels(q.T if transposed else q, codes)
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


def pack_float_weights(model, layers: dict[str, PackedBinary]) -> int:
    """Replace each of ``layers``' float weight initializers (layers left float, ``int8_exclude``) by its
    bit planes, two float levels per output channel and an unpack subgraph, so that a binarized layer
    kept float still takes 1 bit a weight in the file. Returns the number of layers packed.

    Raises:
        ValueError: a weight is missing or does not hold its layer's codes.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes = []
    for name, layer in layers.items():
        codes = layer.codes().numpy()
        rows = codes.shape[0]
        mu = np.zeros(rows, np.float32) if layer.mu is None else layer.mu.numpy().reshape(rows)
        transposed = layer.conv is None  # a Linear's float weight is [in, out]: see float_model
        init = inits[weight_name(inits, name)]
        w = numpy_helper.to_array(init)
        factor = _factor(w.T if transposed else w, codes, None if layer.mu is None else mu, name)
        pos, neg = factor * (1 - mu), factor * (-1 - mu)
        graph.initializer.remove(init)
        nodes, new_inits = _int8_unpack(f"eb::{name}::", codes, pos, neg, init.name, transposed, to_int8=False)
        graph.initializer.extend(new_inits)
        new_nodes.extend(nodes)
    _prepend(graph, new_nodes)
    return len(layers)


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


def integer_binary_layers(pre_model, layers: dict[str, PackedBinary]) -> int:
    """1W/1A: rewrite each binarized layer (Conv, Gemm or MatMul fed by +-1 activations) as an integer
    convolution or product on its packed codes, with float output:

        y = factor * IntOp(q(x), codes) - factor * mu * IntOp(q(x), |codes|) + bias

    ``q(x)`` is QuantizeLinear with scale 1 and zero point 128, exact for x in {-1, +1} (and for the
    zero padding, which ConvInteger pads with the zero point). ``mu`` (centred levels) is 0 at ratio
    0.5; otherwise the second product is a one-channel box sum (all codes non-zero, one group) or a
    full product on ``|codes|`` (pruned or grouped layers). Both are exact integer sums, so the layer
    matches PyTorch up to the float rounding of the final scale.
    """
    graph = pre_model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    new_nodes: list = []
    replaced: dict[str, list] = {}
    for name, layer in layers.items():
        new_nodes += _integer_layer(graph, inits, consumers, name, layer, replaced)
    rebuilt = []
    for node in graph.node:
        rebuilt.extend(replaced.get(node.output[0], [node]))
    del graph.node[:]
    graph.node.extend(new_nodes + rebuilt)
    _drop_unused_initializers(graph)
    return len(layers)


def _consumers(graph) -> dict[str, list]:
    """The nodes that read each tensor of ``graph``, by tensor name."""
    out: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            out.setdefault(i, []).append(node)
    return out


def binary_input_tensors(pre_model, layers: dict[str, PackedBinary]) -> list[str]:
    """The input tensor of each binarized layer's Conv/Gemm/MatMul node in ``pre_model`` (the +-1
    activations of a 1W/1A layer), for quantization parameters that hold -1 and +1 exactly."""
    graph = pre_model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    return [_layer_node(consumers, weight_name(inits, name), name, {}).input[0] for name in layers]


def _layer_node(consumers: dict[str, list], init_name: str, name: str, replaced: dict[str, list]):
    """The one Conv/Gemm/MatMul that reads the weight ``init_name`` (through a Transpose, which is then
    dropped)."""
    users = consumers.get(init_name, [])
    node = users[0] if len(users) == 1 else None
    if node is not None and node.op_type == "Transpose":
        nxt = consumers.get(node.output[0], [])
        replaced[node.output[0]] = []
        node = nxt[0] if len(nxt) == 1 else None
    if node is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
        raise ValueError(f"int8 export: binarized layer {name!r} is not a single Conv/Gemm/MatMul in the graph")
    return node


def _integer_layer(graph, inits: dict, consumers: dict, name: str, layer: PackedBinary, replaced: dict) -> list:
    """Rewrite one binarized layer (see :func:`integer_binary_layers`): its Conv/Gemm/MatMul node is
    replaced in ``replaced``; returns the nodes that unpack its integer weights (they go first)."""
    from onnx import TensorProto, helper, numpy_helper

    codes = layer.codes().numpy()
    mu = None if layer.mu is None else layer.mu.numpy()
    init_name = weight_name(inits, name)
    w = numpy_helper.to_array(inits[init_name])
    factor = _factor(w if layer.conv is not None else w.T, codes, mu, name)
    prefix = f"eb::{name}::"
    node = _layer_node(consumers, init_name, name, replaced)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0):
        raise ValueError(f"int8 export: binarized layer {name!r} is a Gemm with transA or alpha; not supported")
    rows = codes.shape[0]
    ones = np.ones(rows, dtype=np.float32)
    # The integer weight in the layout the op wants: Conv [out, in, k, k]; MatMulInteger [in, out].
    as_in_out = node.op_type != "Conv"
    new_nodes, w_inits = _int8_unpack(prefix + "w_", codes, ones, -ones, prefix + "wq", as_in_out)
    graph.initializer.extend(w_inits)
    consts = [
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), prefix + "x_scale"),
        numpy_helper.from_array(np.array(128, dtype=np.uint8), prefix + "x_zero"),
    ]
    bshape = (1, rows, 1, 1) if node.op_type == "Conv" else (rows,)
    consts.append(numpy_helper.from_array(factor.astype(np.float32).reshape(bshape), prefix + "factor"))
    op = "ConvInteger" if node.op_type == "Conv" else "MatMulInteger"
    kw = {k: v for k, v in attrs.items() if k in ("pads", "strides", "dilations", "group", "kernel_shape", "auto_pad")}
    out = [
        helper.make_node("QuantizeLinear", [node.input[0], prefix + "x_scale", prefix + "x_zero"], [prefix + "xq"]),
        helper.make_node(op, [prefix + "xq", prefix + "wq", prefix + "x_zero"], [prefix + "acc"], **kw),
        helper.make_node("Cast", [prefix + "acc"], [prefix + "acc_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [prefix + "acc_f", prefix + "factor"], [prefix + "y0"]),
    ]
    y = prefix + "y0"
    if mu is not None:
        box = not (codes == 0).any() and attrs.get("group", 1) == 1
        new_nodes += _abs_codes(prefix, codes, as_in_out, box, consts)
        consts.append(numpy_helper.from_array((-factor * mu).astype(np.float32).reshape(bshape), prefix + "mu_factor"))
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
    return new_nodes


def _abs_codes(prefix: str, codes: np.ndarray, as_in_out: bool, box: bool, consts: list) -> list:
    """The int8 ``|codes|`` operand ``prefix + "absq"`` of a centred layer's second product: a one-channel
    box of ones (``box``: every code non-zero, one group; added to ``consts``), else the weight's own
    unpacked codes (float, before their int8 Cast), so no more bits. Returns the nodes to add."""
    from onnx import TensorProto, helper, numpy_helper

    if box:  # every output channel sums the same window of +-1 inputs
        absw = np.ones((1,) + codes.shape[1:], dtype=np.int8)
        if as_in_out:
            absw = absw.reshape(1, -1).T.copy()
        consts.append(numpy_helper.from_array(absw, prefix + "absq"))
        return []
    qf = prefix + ("w_qf_nz" if (codes == 0).any() else "w_qf")
    absq = prefix + "abs_q" if as_in_out else prefix + "absq"
    nodes = [
        helper.make_node("Abs", [qf], [prefix + "abs_f"]),
        helper.make_node("Cast", [prefix + "abs_f"], [prefix + "abs_flat"], to=TensorProto.INT8),
        helper.make_node("Reshape", [prefix + "abs_flat", prefix + "w_shape"], [absq]),
    ]
    if as_in_out:
        nodes.append(helper.make_node("Transpose", [absq], [prefix + "absq"], perm=[1, 0]))
    return nodes


def _drop_unused_initializers(graph) -> None:
    needed = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(init)
