"""The command line, through subprocesses and CliRunner, reading --json output."""

from __future__ import annotations

import json
import os

import pytest
from helpers import invoke_cli, run_cli
from typer.testing import CliRunner

from equalbits_cli.cli import app
from equalbits_cli.quant.quantize import ot_counts

runner = CliRunner()


def test_binarize_then_inspect_exact_counts(tmp_path):
    """The core issue's acceptance path."""
    out = tmp_path / "r.safetensors"
    res = invoke_cli("binarize", "resnet18", "--no-pretrained", "--ratio", "0.3", "--prune", "0.2", "-o", out)
    assert res.returncode == 0, res.stderr
    res = invoke_cli("inspect", out, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert set(report) >= {"model", "config", "layers", "totals"}
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert not layers["conv1"]["binarized"] and not layers["fc"]["binarized"]
    others = [v for k, v in layers.items() if k not in ("conv1", "fc")]
    assert len(others) == 19 and all(v["binarized"] for v in others)
    for layer in others:
        rows = layer["shape"][0]
        n = layer["params"] // rows
        n_minus, n_zero, n_plus = ot_counts(n, 0.3, 0.2)
        assert (layer["n_minus"], layer["n_zero"], layer["n_plus"]) == (rows * n_minus, rows * n_zero, rows * n_plus)
        assert layer["exact_filters"] is True
    assert report["config"]["ratio"] == 0.3 and report["config"]["prune"] == 0.2


def test_export_and_inspect_each_format(tmp_path, binary_ckpt):
    packed = tmp_path / "p.safetensors"
    res = runner.invoke(app, ["export", str(binary_ckpt), "--format", "packed", "-o", str(packed), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["max_abs_diff"] == 0 and summary["compression"] >= 12
    onnx_path = tmp_path / "m.onnx"
    res = runner.invoke(
        app, ["export", str(binary_ckpt), "-f", "onnx", "--img-size", "32", "--no-bench", "-o", str(onnx_path)]
    )
    assert res.exit_code == 0, res.output
    reports = []
    for f in (binary_ckpt, packed, onnx_path):
        res = runner.invoke(app, ["inspect", str(f), "--json"])
        assert res.exit_code == 0, res.output
        reports.append(json.loads(res.stdout))
    for key in ("n_plus", "n_minus", "n_zero", "entropy_bits"):
        assert [r["layers"][1][key] for r in reports] == [reports[0]["layers"][1][key]] * 3
    assert reports[0]["layers"][1]["sqnr_db"] is not None and reports[1]["layers"][1]["sqnr_db"] is None


def test_onnx_export_says_how_fast_it_runs_against_float(tmp_path, binary_ckpt, monkeypatch):
    """Every ONNX export is timed against the float ONNX of the same model, in the same run; a file slower
    than float is a warning (issue 26: an int8 MobileNetV3 ran 0.89x float and nothing said so)."""
    from equalbits_cli import BinarizeConfig, binarize_model, save_checkpoint

    small = save_checkpoint(binarize_model("test_resnet", BinarizeConfig(), num_classes=10), tmp_path / "t.safetensors")
    out = tmp_path / "m.onnx"
    args = ["export", str(small), "-f", "onnx", "--img-size", "32", "-o", str(out), "--json"]
    res = runner.invoke(app, [*args, "--threads", "1", "--bench-batch", "2"])
    assert res.exit_code == 0, res.output
    speed = json.loads(res.stdout)["speed"]
    assert speed["latency_ms"] > 0 and speed["float_latency_ms"] > 0 and speed["calls"] >= 5
    assert speed["speedup"] == pytest.approx(speed["float_latency_ms"] / speed["latency_ms"])
    assert (speed["threads"], speed["batch"]) == (1, 2)
    res = runner.invoke(app, [*args, "--overwrite", "--no-bench"])
    assert res.exit_code == 0 and "speed" not in json.loads(res.stdout)

    import equalbits_cli.export.speed as speed_module
    from equalbits_cli.export.speed import SpeedResult

    monkeypatch.setattr(speed_module, "compare_speed", lambda *a, **k: SpeedResult(2.0, 1.0, 0.5, 1, None, 5))
    res = runner.invoke(app, args[:-1] + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert "warning: this file runs at 0.50x the speed of the float ONNX here" in res.stderr
    for bad, message in (
        (["--threads", "-1"], "--threads must be between 1 and 1024"),
        (["--threads", "0"], "leave it out for onnxruntime's own choice"),
        (["--bench-batch", "100000"], "--bench-batch must be between 1 and 1024"),
        (["--bench-batch", "0"], "--bench-batch"),
    ):
        res = runner.invoke(app, [*args, "--overwrite", *bad])
        assert res.exit_code == 2 and message in res.stderr
    res = runner.invoke(app, ["export", str(binary_ckpt), "-o", str(tmp_path / "p.safetensors"), "--threads", "2"])
    assert res.exit_code == 2 and "apply to the ONNX formats" in res.stderr


def test_inspect_plain_state_dict(resnet18_state):
    res = runner.invoke(app, ["inspect", str(resnet18_state), "--model", "resnet18", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["totals"]["binarized_layers"] == 19


BAD = [
    (["binarize", "resnet18", "--no-pretrained", "--ratio", "1.5"], "ratio must be strictly between 0 and 1"),
    (["binarize", "resnet18", "--no-pretrained", "--ratio", "0"], "ratio must be strictly between 0 and 1"),
    (["binarize", "resnet18", "--no-pretrained", "--prune", "1"], "prune must be in [0, 1)"),
    (["binarize", "resnet18", "--no-pretrained", "--method", "xnor"], "method must be one of"),
    (["binarize", "resnet18", "--no-pretrained", "--method", "sign", "--prune", "0.2"], "prune applies to"),
    (["binarize", "resnet_18", "--no-pretrained"], "unknown timm model 'resnet_18'"),
    (["binarize", "resnet18"], "pass --checkpoint PATH with a local state dict, or --no-pretrained"),
    (["binarize", "resnet18", "--checkpoint", "missing.pth"], "checkpoint not found"),
    (["binarize", "resnet18", "--checkpoint", "CORRUPT"], "not a readable"),
    (["binarize", "resnet18", "--checkpoint", "FP", "--num-classes", "7"], "its classifier has 10 classes"),
    (["binarize", "resnet18", "--no-pretrained", "-o", "no/such/dir/x.safetensors"], "does not exist"),
    (["inspect", "missing.safetensors"], "file not found"),
    (["inspect", "CORRUPT"], "not a safetensors file"),
    (["inspect", "FP"], "pass --model (the timm architecture)"),
    (["export", "CORRUPT"], "not a safetensors file"),
    (["export", "FP", "-f", "packed"], "not a binarized checkpoint; make one first"),
    (["export", "CKPT", "-f", "tflite"], "--format must be one of packed, onnx, onnx-int8"),
    (["export", "CKPT", "--img-size", "0"], "--img-size must be between 8 and 4096"),
    (["export", "CKPT", "--img-size", "100000"], "--img-size must be between 8 and 4096"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_no_file(tmp_path, args, message, resnet18_state, binary_ckpt):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    subst = {"CORRUPT": str(corrupt), "FP": str(resnet18_state), "CKPT": str(binary_ckpt)}
    args = [subst.get(a, a) for a in args]
    if args[0] == "binarize" and "-o" not in args:
        args += ["-o", "out.safetensors"]
    before = set(os.listdir(tmp_path))
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("loading ")]
    assert len(lines) == 1, res.stderr
    assert message in lines[0] and "Traceback" not in res.stderr
    assert set(os.listdir(tmp_path)) == before, "no output file is left behind"


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "r.safetensors"
    out.write_text("keep me")
    res = runner.invoke(app, ["binarize", "resnet18", "--no-pretrained", "-o", str(out)])
    assert res.exit_code == 2 and out.read_text() == "keep me"
    res = runner.invoke(app, ["binarize", "resnet18", "--no-pretrained", "-o", str(out), "--overwrite", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["output"] == str(out)


def test_help_teaches():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "binarize" in res.output and "export" in res.output
    res = runner.invoke(app, ["binarize", "--help"])
    assert "equal bits" in res.output and "Examples" in res.output


def test_help_and_version_import_neither_torch_nor_timm():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from equalbits_cli.cli import app\n"
        "for args in (['--help'], ['--version'], ['inspect', '--help'], ['finetune', '--help'], ['binarize']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('LOADED', 'torch' in sys.modules, 'timm' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "LOADED False False" in res.stdout, res.stdout + res.stderr
    assert "equalbits 0." in res.stdout


def test_user_text_with_brackets_is_not_markup(tmp_path, binary_ckpt):
    odd = tmp_path / "m[" / "x]"
    odd.mkdir(parents=True)
    res = runner.invoke(app, ["export", str(binary_ckpt), "-o", str(odd / "out[b].safetensors")])
    assert res.exit_code == 0, res.stderr
    assert "out[b].safetensors" in res.stderr
    res = runner.invoke(app, ["inspect", str(odd / "out[b].safetensors")])
    assert res.exit_code == 0 and "m[/x]" in res.stdout, res.stderr


def test_debug_shows_the_traceback(tmp_path):
    res = run_cli("inspect", tmp_path / "missing.safetensors")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = run_cli("--debug", "inspect", tmp_path / "missing.safetensors")
    assert res.returncode != 0 and "Traceback" in res.stderr and "FileNotFoundError" in res.stderr


def test_nothing_to_binarize_is_an_error(tmp_path):
    out = tmp_path / "n.safetensors"
    res = run_cli("binarize", "nf_resnet26", "--no-pretrained", "-o", out)
    assert res.returncode == 2 and "custom forward" in res.stderr and "ScaledStdConv2d" in res.stderr
    assert not out.exists()


def test_binarize_warns_before_work_where_1w1a_is_known_to_fail(tmp_path):
    """Issue 25: 1W/1A on a MobileNetV3 trained to chance, and nothing said so. Since 0.9 the input
    policy holds it (87.2%); every input binary (--all-binary-inputs) is still at chance, and is said."""
    args = ["binarize", "--no-pretrained", "--num-classes", "10", "--activations", "sign", "--json"]
    out = ["-o", str(tmp_path / "m.safetensors")]
    res = runner.invoke(app, [*args[:1], "mobilenetv3_small_100", *args[1:], *out, "--all-binary-inputs"])
    assert res.exit_code == 0, res.output
    assert "8.6%" in json.loads(res.stdout)["warnings"][0] and "warning: 1-bit inputs on every" in res.stderr
    res = runner.invoke(app, [*args[:1], "mobilenetv3_small_100", *args[1:], *out, "--overwrite"])
    assert res.exit_code == 0 and json.loads(res.stdout)["warnings"] == [] and "warning" not in res.stderr
    res = runner.invoke(app, [*args[:1], "resnet18", *args[1:], "-o", str(tmp_path / "r.safetensors")])
    assert res.exit_code == 0 and json.loads(res.stdout)["warnings"] == [] and "warning" not in res.stderr
