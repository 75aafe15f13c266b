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
    ("finetune", "extra_val_class", [], "has classes not in train/"),
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
        "finetune", digits_student, "--data", digits_small, "--epochs", "3", "--img-size", "32", "--batch-size", "32",
        "--workers", "0", "--save-every", "100000", "--augment", "none", "--log", log, "-o", out,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and '"step"' not in (log.read_text() if log.exists() else ""):
        time.sleep(0.05)
    assert not state.exists(), "no periodic save can have happened"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "--resume" in err and "Traceback" not in err
    assert state.exists() and not out.exists()
    assert not list(tmp_path.glob(".*.tmp")), "no temporary is left"
    saved = torch.load(state, weights_only=True)
    assert saved["format"] == "equalbits.train_state" and saved["step"] >= 10
