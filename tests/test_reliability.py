"""Bad arguments and data through the CLI, and Ctrl-C during a fine-tune.

Every bad input must give exit code 2, exactly one line on stderr naming the problem, no traceback,
and no output file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from helpers import start_cli
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from equalbits_cli.cli import app
from equalbits_cli.train import state_path_for

runner = CliRunner()


def _bad_data(root, kind):
    """Variants of a digits tree, each broken in one way."""
    src = root["digits"]
    dst = root["tmp"] / kind
    if kind == "missing":
        return dst
    shutil.copytree(src, dst)
    if kind == "no_train":
        shutil.rmtree(dst / "train")
    elif kind == "no_val":
        shutil.rmtree(dst / "val")
    elif kind == "empty_class":
        (dst / "train" / "3").mkdir(exist_ok=True)
        for f in (dst / "train" / "3").iterdir():
            f.unlink()
    elif kind == "truncated":
        victim = sorted((dst / "val" / "0").iterdir())[0]
        victim.write_bytes(victim.read_bytes()[:40])
    elif kind == "not_image":
        victim = sorted((dst / "val" / "1").iterdir())[0]
        victim.write_text("this is not a png")
    elif kind == "extra_val_class":
        (dst / "val" / "zz").mkdir()
        shutil.copy(sorted((dst / "val" / "0").iterdir())[0], dst / "val" / "zz" / "a.png")
    return dst


CASES = [
    ("eval", "missing", [], "data directory not found"),
    ("finetune", "no_train", [], "has no train/ folder"),
    ("eval", "no_val", [], "has no val/ (or validation/) folder"),
    ("finetune", "empty_class", [], "holds no images"),
    ("eval", "truncated", ["--workers", "0"], "unreadable image"),
    ("eval", "truncated", ["--workers", "1"], "unreadable image"),
    ("eval", "not_image", ["--workers", "0"], "unreadable image"),
    ("finetune", "extra_val_class", [], "has classes the model was not trained on"),
    ("finetune", "ok", ["--epochs", "0"], "epochs must be an integer >= 1"),
    ("finetune", "ok", ["--alpha", "2"], "alpha must be in [0, 1]"),
    ("finetune", "ok", ["--lr", "-1"], "lr must be in (0, 1)"),
    ("finetune", "ok", ["--batch-size", "100000"], "fewer than one batch"),
    ("finetune", "ok", ["--device", "tpu"], "device must be auto, cpu or cuda"),
]


@pytest.mark.parametrize(
    ("command", "kind", "extra", "message"), CASES, ids=[f"{c}-{k}-{'_'.join(e)}" for c, k, e, _ in CASES]
)
def test_bad_data_and_settings(tmp_path, digits_small, digits_student, command, kind, extra, message):
    data = digits_small if kind == "ok" else _bad_data({"digits": digits_small, "tmp": tmp_path}, kind)
    out = tmp_path / "out.safetensors"
    args = [command, str(digits_student), "--data", str(data), "--img-size", "32", *extra]
    if command == "finetune":
        args += ["-o", str(out), "--workers", "0"] if "--workers" not in extra else ["-o", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
    if kind in ("truncated", "not_image"):
        assert ".png" in lines[0], "the error names the file"


def test_nan_weights_are_refused(tmp_path, resnet18_state):
    state = load_file(str(resnet18_state))
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    res = runner.invoke(app, ["binarize", "resnet18", "--checkpoint", str(bad), "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "NaN or inf" in res.stderr and not (tmp_path / "o.safetensors").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permission checks cannot be exercised")
def test_unwritable_output_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    res = runner.invoke(app, ["binarize", "resnet18", "--no-pretrained", "-o", str(locked / "x.safetensors")])
    assert res.exit_code == 2 and "not writable" in res.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_state_and_says_how_to_resume(tmp_path, digits_small, digits_student, signum, code):
    """Ctrl-C and SIGTERM (what schedulers send) save the state; --save-every is too large to have saved it."""
    out = tmp_path / "ft.safetensors"
    state = state_path_for(out)
    log = tmp_path / "log.jsonl"
    proc = start_cli(
        # 200 epochs of 50 steps: the run is interrupted long before it could end, however slow the polling
        "finetune", digits_student, "--data", digits_small, "--epochs", "200", "--img-size", "32", "--batch-size", "8",
        "--workers", "0", "--save-every", "100000", "--augment", "none", "--log", log, "-o", out,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and '"step"' not in (log.read_text() if log.exists() else ""):
        time.sleep(0.05)
    state.unlink(missing_ok=True)  # an epoch-end save may have run meanwhile: only the handler may save now
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a 200-epoch run behind
    assert proc.returncode == code, err
    assert "--resume" in err and "Traceback" not in err
    assert state.exists() and not out.exists()
    assert not list(tmp_path.glob(".*.tmp")), "no temporary is left"
    saved = torch.load(state, weights_only=True)
    assert saved["format"] == "equalbits.train_state" and saved["step"] >= 10


def test_tiny_file_naming_a_huge_model_is_refused_before_allocating(tmp_path, binary_ckpt):
    import json as _json
    import resource

    from equalbits_cli.io import read_metadata

    meta = dict(read_metadata(binary_ckpt))
    for model, kwargs in (("vit_huge_patch14_224", {}), ("resnet50", {"num_classes": 1_000_000})):
        meta.update(model=model, model_kwargs=_json.dumps(kwargs), binarized="[]")
        bad = tmp_path / f"{model}.safetensors"
        save_file({"x": torch.zeros(1)}, str(bad), metadata=meta)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = runner.invoke(app, ["inspect", str(bad)])
        assert res.exit_code == 2 and "too small for model" in res.stderr, res.stderr
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mib < 500, f"inspect grew by {grown_mib:.0f} MiB"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-pretrained", "--num-classes", "1000001"], "between 1 and 1,000,000"),
        (["--no-pretrained", "--prune", "0.999999"], "sets all"),
        (["--no-pretrained", "--ratio", "1e-300"], "only -1 codes"),
    ],
)
def test_binarize_refuses_what_readers_would_refuse(tmp_path, args, message):
    out = tmp_path / "o.safetensors"
    res = runner.invoke(app, ["binarize", "resnet18", *args, "-o", str(out)])
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert not out.exists()


def test_file_given_as_model_and_directory_given_as_file(tmp_path, resnet18_state):
    res = runner.invoke(app, ["binarize", str(resnet18_state), "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "--checkpoint" in res.stderr
    res = runner.invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 2 and "is a directory" in res.stderr


def test_inspect_plot_needs_overwrite(tmp_path, binary_ckpt):
    plot = tmp_path / "p.png"
    plot.write_bytes(b"keep")
    res = runner.invoke(app, ["inspect", str(binary_ckpt), "--plot", str(plot)])
    assert res.exit_code == 2 and "--overwrite" in res.stderr and plot.read_bytes() == b"keep"
    res = runner.invoke(app, ["inspect", str(binary_ckpt), "--plot", str(plot), "--overwrite", "--json"])
    assert res.exit_code == 0 and plot.read_bytes()[:4] == b"\x89PNG"


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "o.safetensors"
    res = runner.invoke(app, ["binarize", "resnet18", "--no-pretrained", "-o", str(out)])
    assert res.exit_code == 2 and "No space left on device" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_forged_onnx_initializers_are_refused(tmp_path, binary_ckpt):
    import onnx

    res = runner.invoke(
        app, ["export", str(binary_ckpt), "-f", "onnx", "--img-size", "32", "-o", str(tmp_path / "m.onnx")]
    )
    assert res.exit_code == 0, res.stderr
    m = onnx.load(str(tmp_path / "m.onnx"))
    init = next(i for i in m.graph.initializer if i.name.endswith("::factor"))
    init.name = "eb::no.such.layer::factor"
    onnx.save(m, str(tmp_path / "forged.onnx"))
    res = runner.invoke(app, ["inspect", str(tmp_path / "forged.onnx")])
    assert res.exit_code == 2 and "names no binarized layer" in res.stderr
    m = onnx.load(str(tmp_path / "m.onnx"))
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)  # fmt: skip
    res = runner.invoke(app, ["inspect", str(tmp_path / "ext.onnx")])
    assert res.exit_code == 2 and "external data" in res.stderr
