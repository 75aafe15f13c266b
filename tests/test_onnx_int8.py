"""export --format onnx-int8: integer kernels in onnxruntime, 1-bit planes on disk, exact binary weights,
exact 1W/1A layers, and ``eval FILE.onnx`` for every ONNX file equalbits writes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import invoke_cli, run_cli
from onnx import numpy_helper

from equalbits_cli import BinarizeConfig, LayerPolicy, binarize_model, load_model, save_checkpoint, save_packed
from equalbits_cli.export.int8 import INT8_OPS, export_onnx_int8, int8_ops, quantize_qdq
from equalbits_cli.export.int8_graph import int8_levels, pack_int8_weights
from equalbits_cli.formats.planes import unpack_codes
from equalbits_cli.nn.layers import BinaryLayer


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory, digits_student, digits_small) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("int8") / "student.int8.onnx"
    r = run_cli(
        "export", digits_student, "-f", "onnx-int8", "--data", digits_small, "--img-size", "32", "-o", out, "--json",
        "--no-bench",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def _binary(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BinaryLayer)}


def test_int8_runs_integer_kernels_from_packed_planes(int8_file, digits_student, tmp_path):
    path, result = int8_file
    model = load_model(digits_student)
    binary = _binary(model)
    # Every convolution and the classifier run as integer kernels in onnxruntime's optimized graph.
    ops, floats = int8_ops(path.read_bytes())
    assert ops == result["int8_ops"]
    assert ops.get("QLinearConv", 0) >= sum(isinstance(m, torch.nn.Conv2d) for m in binary.values())
    assert not floats, floats
    assert result["exact_layers"] == result["packed_layers"] == len(binary)  # ratio 0.5: levels are +-127
    # On disk, binary weights are bit planes only: decoding them gives the model's codes, bit for bit,
    # and no int8 tensor as large as a binary weight remains.
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    for name, layer in binary.items():
        codes = layer.quantize()[0]
        sign = numpy_helper.to_array(inits[f"eb::{name}::sign"])
        assert np.array_equal(unpack_codes(sign, None, tuple(codes.shape)), codes.numpy())
        assert not any(
            i.data_type == onnx.TensorProto.INT8 and tuple(i.dims) == tuple(codes.shape) for i in inits.values()
        )
    packed = save_packed(model, tmp_path / "p.safetensors")
    assert path.stat().st_size <= 1.10 * packed.stat().st_size
    assert result["agreement_images"] == 120 and result["agreement"] >= 95.0
    # inspect reads the codes back from the int8 file's planes
    r = run_cli("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["totals"]["binarized_layers"] == len(binary)
    assert all(row["exact_filters"] and row["ratio"] == 0.5 for row in report["layers"] if row["binarized"])


def test_packed_int8_computes_what_onnxruntimes_own_int8_model_computes(digits_student, digits_small, tmp_path):
    """The unpack subgraph folds into exactly the int8 weights the quantizer wrote: same logits, bit for bit."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from equalbits_cli.export.onnx import trace_graph

    model = load_model(digits_student)
    traced = trace_graph(model, 32, weights="float")
    layers = traced.layers
    onnx.save(traced.graph, str(tmp_path / "f.onnx"))
    quant_pre_process(str(tmp_path / "f.onnx"), str(tmp_path / "pre.onnx"))
    gen = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": gen.standard_normal((4, 3, 32, 32)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    quantize_qdq(tmp_path / "pre.onnx", tmp_path / "q.onnx", Reader())
    reference = onnx.load(str(tmp_path / "q.onnx"))
    packed = onnx.load(str(tmp_path / "q.onnx"))
    assert pack_int8_weights(packed, layers) == (len(layers), len(layers))
    x = gen.standard_normal((3, 3, 32, 32)).astype(np.float32)
    outs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        for m in (reference, packed)
    ]
    assert np.array_equal(outs[0], outs[1])
    assert packed.ByteSize() < reference.ByteSize() / 3


def testint8_levels_reads_two_values_per_row():
    codes = np.array([[1, -1, 0, 1], [-1, -1, 1, 0]], dtype=np.int8)
    q = np.array([[127, -40, 0, 127], [-127, -127, 90, 0]], dtype=np.int8)
    pos, neg = int8_levels(q, codes)
    assert pos.tolist() == [127, 90] and neg.tolist() == [-40, -127]
    assert int8_levels(np.where(codes == 0, 3, q).astype(np.int8), codes) is None  # zero code, non-zero value
    bad = q.copy()
    bad[0, 3] = 126  # two values for +1 codes in one row
    assert int8_levels(bad, codes) is None


@pytest.mark.parametrize(
    "config",
    [BinarizeConfig(activations="sign"), BinarizeConfig(activations="sign", ratio=0.3, prune=0.1)],
    ids=["ratio0.5", "ratio0.3-prune0.1-centred"],
)
def test_1w1a_int8_is_exact(tmp_path, resnet18_state, digits_small, config):
    """+-1 inputs and +-1 weights are exact in int8: integer layers match PyTorch up to float rounding.
    The centred case keeps layer4 float (``int8_exclude``): its 5 layers' float levels unpacked from bit
    planes must be exact too."""
    every = LayerPolicy(all_binary_inputs=True)  # every input binary: test_1w1a_int8_keeps_real_input_layers_float
    model = binarize_model("resnet18", config, checkpoint=resnet18_state, policy=every).eval()
    centred = config.ratio != 0.5
    exclude = ("layer4",) if centred else ()
    result = export_onnx_int8(
        model, tmp_path / "m.onnx", digits_small, img_size=32, check_images=32, int8_exclude=exclude, exact_binary=True
    )
    ops, floats = int8_ops((tmp_path / "m.onnx").read_bytes())
    assert ops == {"ConvInteger": (19 - 5) * 2 if centred else 19}  # centred: + the mu * |codes| sum
    assert sum(floats.values()) == 2 + (5 if centred else 0)  # the full-precision stem and classifier
    kernels = {m: "float" if k in ("Conv", "FusedConv") else k for m, k in result.layer_kernels.items()}
    want = {m: "float" if m.startswith("layer4") and centred else "ConvInteger" for m in _binary(model)}
    assert {m: kernels.get(m) for m in want} == want
    assert result.rel_diff <= 1e-5 and result.agreement == 100.0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5 * (want.max() - want.min())
    packed = save_packed(model, tmp_path / "p.safetensors")
    assert (tmp_path / "m.onnx").stat().st_size <= 1.10 * packed.stat().st_size


def test_eval_scores_every_onnx_export_like_its_checkpoint(int8_file, digits_student, digits_small, tmp_path):
    def top1(target, *extra):
        r = invoke_cli("eval", target, "--data", digits_small, "--workers", "0", "--json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["top1"]

    want = top1(digits_student, "--img-size", "32")
    for weights in ("packed", "float"):
        out = tmp_path / f"{weights}.onnx"
        r = invoke_cli(
            "export", digits_student, "-f", "onnx", "--onnx-weights", weights, "--img-size", "32", "-o", out,
            "--data", digits_small, "--json", "--no-bench",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["agreement"] == 100.0  # float ONNX: the same top-1 on every val image
        assert top1(out) == want
    assert abs(top1(int8_file[0]) - want) <= 2.5  # 120 val images: 3 images


def test_int8_bad_input_one_line_no_file(tmp_path, digits_student, digits_small):
    out = tmp_path / "x.onnx"
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty" / "val").mkdir(parents=True)
    cases = [
        ([], "--data"),
        (["--data", tmp_path / "missing"], "not found"),
        (["--data", tmp_path / "file.txt"], "is a file"),
        (["--data", tmp_path / "empty"], "no class folders"),
        (["--calibrate-batches", "0", "--data", digits_small], "calibrate-batches"),
        (["--data", digits_small, "--int8-exclude", "layer9.*"], "'layer9.*' matches no module"),
    ]
    for extra, needle in cases:
        r = invoke_cli("export", digits_student, "-f", "onnx-int8", "-o", out, *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert not out.exists()
    r = invoke_cli("export", digits_student, "-f", "packed", "--data", digits_small, "-o", out)
    assert r.returncode == 2 and "ONNX formats only" in r.stderr and not out.exists()
    r = invoke_cli("export", digits_student, "-f", "onnx", "--data", tmp_path / "missing", "-o", out)
    assert r.returncode == 2 and "not found" in r.stderr and not out.exists()
    r = invoke_cli("export", digits_student, "-f", "onnx", "--int8-exclude", "layer1", "-o", out)
    assert r.returncode == 2 and "--int8-exclude applies to --format onnx-int8 only" in r.stderr and not out.exists()
    r = invoke_cli("export", digits_student, "-f", "onnx", "--int8-ranges", "dynamic", "-o", out)
    assert r.returncode == 2 and "--int8-ranges applies to --format onnx-int8 only" in r.stderr and not out.exists()
    r = invoke_cli("export", digits_student, "-f", "onnx-int8", "--data", digits_small, "--int8-ranges", "x", "-o", out)
    assert r.returncode == 2 and "--int8-ranges must be one of static, dynamic" in r.stderr and not out.exists()


def test_int8_exclude_keeps_modules_float_and_their_weights_one_bit(tmp_path, digits_small, monkeypatch):
    """--int8-exclude GLOB: every node traced inside a matching module stays float (the squeeze-excite
    branches here, whose binarized convolutions keep 1-bit planes with float levels); the rest is int8.
    An int8 file that gains little on a CPU without int8 dot-product instructions says why."""
    import equalbits_cli.export.speed as speed_module
    from equalbits_cli.export.speed import SpeedResult

    monkeypatch.setattr(speed_module, "compare_speed", lambda *a, **k: SpeedResult(1.0, 1.1, 1.1, 1, None, 5, ""))
    model = binarize_model("test_efficientnet", BinarizeConfig(), num_classes=10)
    ckpt = save_checkpoint(model, tmp_path / "te.safetensors")
    se = [n for n in _binary(model) if ".se." in n]
    assert len(se) == 4
    outs = {}
    for name, extra in (("all", []), ("se", ["--int8-exclude", "blocks.*.se"])):
        outs[name] = tmp_path / f"{name}.onnx"
        r = invoke_cli(
            "export", ckpt, "-f", "onnx-int8", "--data", digits_small, "--img-size", "32", "--json",
            "-o", outs[name], *extra,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs[name + "_json"] = json.loads(r.stdout)
    full, kept = outs["all_json"], outs["se_json"]
    assert any("no int8 dot-product instructions" in n for n in full["notes"])
    assert sum(full["float_ops"].values()) == 0 and full["float_nodes"] == 0
    assert sum(kept["float_ops"].values()) == len(se)  # the SE convolutions run float
    assert sum(kept["int8_ops"].values()) == sum(full["int8_ops"].values()) - len(se)
    assert kept["float_nodes"] >= 3 * len(se) // 2 and kept["int8_exclude"] == ["blocks.*.se"]
    # which kernel each layer runs, read back from onnxruntime's optimized graph
    assert set(_binary(model)) <= set(full["layer_kernels"]) and set(full["layer_kernels"].values()) <= INT8_OPS
    assert {m for m, k in kept["layer_kernels"].items() if k not in INT8_OPS} == set(se)
    inits = {i.name: i for i in onnx.load(str(outs["se"])).graph.initializer}
    for layer in _binary(model):
        assert f"eb::{layer}::sign" in inits, layer  # every binarized weight is a bit plane
        assert not any(n.endswith(f"{layer}.weight") for n in inits), layer
    assert outs["se"].stat().st_size <= 1.05 * outs["all"].stat().st_size


def test_eval_onnx_refuses_foreign_files_and_sizes(tmp_path, int8_file, digits_small):
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.load(str(int8_file[0])), str(foreign))
    m = onnx.load(str(foreign))
    del m.metadata_props[:]
    onnx.save(m, str(foreign))
    r = invoke_cli("eval", foreign, "--data", digits_small)
    assert r.returncode == 2 and "not an ONNX file written by equalbits" in r.stderr
    r = invoke_cli("eval", int8_file[0], "--data", digits_small, "--img-size", "64")
    assert r.returncode == 2 and "takes 32x32 images" in r.stderr
    with tempfile.NamedTemporaryFile(suffix=".onnx", dir=tmp_path) as junk:
        junk.write(b"not onnx")
        junk.flush()
        r = invoke_cli("eval", junk.name, "--data", digits_small)
        assert r.returncode == 2 and "not a readable ONNX file" in r.stderr


def test_int8_transformer_matmuls(tmp_path, digits_small):
    """Binary Linear layers of a ViT are exported as MatMul with transposed weights: int8 too, by default
    with per-call ranges (DynamicQuantizeMatMul, no calibration), with calibrated ones on request
    (QLinearMatMul); the weights are the packed planes either way."""
    from equalbits_cli.export.int8 import default_ranges

    model = binarize_model("test_vit", BinarizeConfig(), num_classes=10).eval()
    ckpt = save_checkpoint(model, tmp_path / "v.safetensors")
    layers = _binary(model)
    assert default_ranges(layers) == "dynamic"
    dynamic = export_onnx_int8(load_model(ckpt), tmp_path / "d.onnx", digits_small, check_images=16)
    assert dynamic.activations == "uint8 dynamic" and dynamic.calibration_images == 0
    assert dynamic.packed_layers == len(layers) and sum(dynamic.int8_ops.values()) >= len(layers)
    assert "QLinearMatMul" not in dynamic.int8_ops
    assert {dynamic.layer_kernels[n] for n in layers} == {"DynamicQuantizeMatMul"}
    assert any("attention products and convolutions run in float" in n for n in dynamic.notes)
    static = export_onnx_int8(load_model(ckpt), tmp_path / "s.onnx", digits_small, check_images=16, ranges="static")
    assert static.activations == "uint8 static" and static.calibration_images > 0
    assert static.packed_layers == len(layers) and static.int8_ops.get("QLinearMatMul", 0) >= len(layers)
    for result in (dynamic, static):
        assert result.agreement is not None and result.rel_diff < 0.5, result.rel_diff  # 8 bits: near, not exact
        inits = {i.name for i in onnx.load(result.path).graph.initializer}
        assert all(f"eb::{n}::sign" in inits for n in layers)
    assert dynamic.rel_diff < static.rel_diff  # test_vit, random weights: 0.013 against 0.25
    with pytest.raises(ValueError, match="`ranges` must be one of static, dynamic"):
        export_onnx_int8(model, tmp_path / "x.onnx", digits_small, ranges="per-call")
    signs = binarize_model("resnet18", BinarizeConfig(activations="sign"), num_classes=10).eval()
    with pytest.raises(ValueError, match="cannot hold a 1W/1A model's"):
        export_onnx_int8(signs, tmp_path / "x.onnx", digits_small, ranges="dynamic")
    assert not (tmp_path / "x.onnx").exists()
    assert default_ranges(_binary(signs)) == "static"


@pytest.mark.parametrize("config", [BinarizeConfig(), BinarizeConfig(ratio=0.3, prune=0.1)], ids=["0.5", "centred"])
def test_float_levels_unpack_to_the_float_weights(config):
    """A binarized layer kept float (``int8_exclude``) is stored as bit planes and two float levels a
    row; the unpack subgraph gives back its float weight within float rounding."""
    from equalbits_cli.export.int8_graph import pack_float_weights
    from equalbits_cli.export.onnx import trace_graph

    model = binarize_model("test_resnet", config, num_classes=10).eval()
    traced = trace_graph(model, 32, weights="float")
    graph = traced.graph.graph
    want = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith(".weight")}
    names = [n + ".weight" for n in traced.layers]
    assert len(names) >= 5 and all(n in want for n in names)
    assert pack_float_weights(traced.graph, traced.layers) == len(names)
    assert not any(i.name in names for i in graph.initializer)  # the float weights are gone from the file
    for name in names:
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(traced.graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(names, {"input": np.zeros((1, 3, 32, 32), np.float32)})
    for name, g in zip(names, got):
        w = want[name]
        assert g.shape == w.shape, name
        assert np.abs(g - w).max() <= 1e-6 * np.abs(w).max(), name


def test_int8_exclude_needs_the_exporters_module_names():
    """Without the exporter's name scopes no node can be found by module: refused, not ignored."""
    from types import SimpleNamespace

    from equalbits_cli.export.int8 import Exclusion, find_exclusion

    traced = SimpleNamespace(scopes={}, layers={"layer1.0.conv1": None}, graph=None)
    assert find_exclusion(traced, []) == Exclusion()
    with pytest.raises(ValueError, match="recorded no module names"):
        find_exclusion(traced, ["layer1"])


def test_1w1a_int8_keeps_real_input_layers_float(tmp_path, digits_small):
    """With the 1W/1A input policy and ``exact_binary``, the layers that keep real inputs stay float
    convolutions (a uint8 quantizer at scale 1 would round their inputs to integers); the others run
    ConvInteger."""
    model = binarize_model("mobilenetv3_small_100", BinarizeConfig(activations="sign"), num_classes=10).eval()
    real = model.equalbits_meta["real_inputs"]
    result = export_onnx_int8(model, tmp_path / "m.onnx", digits_small, img_size=32, check_images=16, exact_binary=True)
    kernels = {m: "float" if k in ("Conv", "FusedConv") else k for m, k in result.layer_kernels.items()}
    want = {m: "float" if m in real else "ConvInteger" for m in _binary(model)}
    assert {m: kernels.get(m) for m in want} == want
    assert result.rel_diff <= 1e-4  # an untrained model: its near-constant logits make top-1 agreement noise


def test_1w1a_int8_export_is_timed_against_the_1w32a_int8_model(tmp_path, digits_small, capsys):
    """Issue 25: the export of a 1W/1A int8 file says how fast it runs against the 1W/32A int8 file of
    the same network, measured in the same run."""
    model = binarize_model("test_resnet", BinarizeConfig(activations="sign"), num_classes=10)
    path = save_checkpoint(model, tmp_path / "t.safetensors")
    out = tmp_path / "m.onnx"
    args = ["export", path, "-f", "onnx-int8", "--data", digits_small, "--img-size", "32", "-o", out, "--json"]
    r = invoke_cli(*args, "--threads", "1")
    assert r.returncode == 0, r.stderr
    speed = json.loads(r.stdout)["speed"]
    assert set(speed["baseline_ms"]) == {"1W/32A int8"} and speed["baseline_ms"]["1W/32A int8"] > 0
    from equalbits_cli.cli.model_cmds import _report_export

    capsys.readouterr()
    _report_export(json.loads(r.stdout), "onnx-int8")  # what the command prints without --json
    assert "for the 1W/32A int8 model of the same network" in capsys.readouterr().err


def test_1w1a_int8_default_quantizes_the_signs_exactly(tmp_path, resnet18_state, digits_small):
    """The default 1W/1A int8 route quantizes the whole graph like a 1W/32A model (QLinearConv, 7-9x
    faster than ConvInteger in onnxruntime), with the +-1 inputs at scale 1/127 and zero point 128:
    -1 and +1 are 1 and 255, exactly."""
    model = binarize_model("resnet18", BinarizeConfig(activations="sign"), checkpoint=resnet18_state).eval()
    result = export_onnx_int8(model, tmp_path / "m.onnx", digits_small, img_size=32, check_images=32)
    real = model.equalbits_meta["real_inputs"]
    assert result.activations == "uint8 static, +-1 inputs exact"
    assert {m: result.layer_kernels.get(m) for m in _binary(model) if m not in real} == {
        m: "QLinearConv" for m in _binary(model) if m not in real
    }
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    signs = {o for n in graph.node if n.op_type == "Where" for o in n.output}
    quant = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in signs]
    assert len(quant) == 19 - len(real)
    for q in quant:
        assert float(inits[q.input[1]]) == np.float32(1 / 127) and int(inits[q.input[2]]) == 128


def test_1w1a_vit_exports_and_its_int8_default_is_exact(tmp_path, digits_small):
    """A calibrated 1W/1A ViT (timm's test_vit) passes the ONNX check, and its int8 file takes the exact
    route by default (binary-input linear layers: quantizing their LayerNorm outputs moved values across
    the sign thresholds, outputs 76% of their range off)."""
    from equalbits_cli.export.onnx import export_onnx
    from equalbits_cli.nn.layers import calibrate_thresholds

    torch.manual_seed(0)
    model = binarize_model("test_vit", BinarizeConfig(activations="sign"), num_classes=10)
    calibrate_thresholds(model, [torch.randn(8, *model.pretrained_cfg["input_size"])])
    model.eval()
    assert export_onnx(model, tmp_path / "m.onnx").matched >= 0.75
    result = export_onnx_int8(model, tmp_path / "m8.onnx", digits_small, check_images=16)
    assert result.activations == "binary layers int8 (exact), rest float"
    assert set(result.int8_ops) == {"MatMulInteger"} and result.rel_diff <= 1e-4
