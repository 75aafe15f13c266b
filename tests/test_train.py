"""Fine-tune and evaluation: accuracy improves, multi-process training agrees, kills are survivable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli, start_cli, wait_for_file

from equalbits_cli import load_model
from equalbits_cli.train import codes_checksum, state_path_for

FAST = ["--img-size", "32", "--batch-size", "32", "--workers", "0", "--warmup-steps", "5", "--no-augment"]


def test_finetune_improves_the_student(tmp_path, digits_small, digits_student):
    out = tmp_path / "ft.safetensors"
    res = run_cli(
        "finetune",
        digits_student,
        "--data",
        digits_small,
        "--epochs",
        "3",
        "--lr",
        "2e-3",
        "--calibrate-batches",
        "0",
        *FAST,
        "-o",
        out,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    for key in ("teacher_top1", "student_top1_before", "student_top1", "student_top5", "epochs", "output"):
        assert key in result
    assert result["epochs"] == 3 and result["output"] == str(out)
    assert result["student_top1"] > result["student_top1_before"] + 10
    assert not state_path_for(out).exists(), "the training state is removed once the run completes"
    res = run_cli("eval", out, "--data", digits_small, "--img-size", "32", "--workers", "0", "--json")
    assert res.returncode == 0, res.stderr
    evaluation = json.loads(res.stdout)
    assert evaluation["n"] == 120 and evaluation["top1"] == pytest.approx(result["student_top1"])
    res = run_cli("inspect", out, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["totals"]["entropy_bits"] == 1.0


def test_eval_full_precision_model(digits_small, digits_teacher):
    res = run_cli(
        "eval",
        "resnet10t",
        "--checkpoint",
        digits_teacher,
        "--data",
        digits_small,
        "--img-size",
        "32",
        "--workers",
        "0",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)) == {"top1", "top5", "n"}


def test_finetune_finds_the_single_checkpoint_in_cwd(tmp_path, digits_small, digits_student):
    shutil.copy(digits_student, tmp_path / "only.safetensors")
    res = run_cli(
        "finetune", "--data", digits_small, "--epochs", "1", *FAST, "--calibrate-batches", "2", "--json", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["output"] == "only.ft.safetensors"
    shutil.copy(digits_student, tmp_path / "second.safetensors")
    res = run_cli("finetune", "--data", digits_small, cwd=tmp_path)
    assert res.returncode == 2 and "several binarized checkpoints" in res.stderr


def test_torchrun_two_processes(tmp_path, digits_small, digits_student):
    out = tmp_path / "ddp.safetensors"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "--master-port",
        "29531",
        "-m",
        "equalbits_cli",
        "finetune",
        str(digits_student),
        "--data",
        str(digits_small),
        "--epochs",
        "1",
        *FAST,
        "--calibrate-batches",
        "2",
        "-o",
        str(out),
        "--json",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)
    assert result["world_size"] == 2 and result["codes_identical_across_ranks"] is True
    assert result["steps"] == 400 // (32 * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.safetensors"], "rank 0 alone writes, once"
    assert codes_checksum(load_model(out)) == result["codes_checksum"]


def _codes(path):
    model = load_model(path)
    return [m.quantize()[0] for m in model.modules() if hasattr(m, "pin_codes")]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, digits_small, digits_student):
    args = [
        "finetune",
        digits_student,
        "--data",
        digits_small,
        "--epochs",
        "2",
        *FAST,
        "--calibrate-batches",
        "2",
        "--save-every",
        "3",
        "--lr",
        "1e-3",
    ]
    full = tmp_path / "full.safetensors"
    res = run_cli(*args, "-o", full)
    assert res.returncode == 0, res.stderr

    out = tmp_path / "killed.safetensors"
    state = state_path_for(out)
    proc = start_cli(*args, "-o", out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_file(state, proc)
    assert state.exists(), "a training state is written every --save-every steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "no final checkpoint from a killed run"

    res = run_cli(*args, "-o", out, "--resume", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["resumed_from_step"] >= 3
    for a, b in zip(_codes(full), _codes(out), strict=True):
        assert torch.equal(a, b)
    full_state = load_model(full).state_dict()
    for k, v in load_model(out).state_dict().items():
        torch.testing.assert_close(v, full_state[k], rtol=0, atol=0)


def test_bad_training_states(tmp_path, digits_small, digits_student):
    out = tmp_path / "x.safetensors"
    res = run_cli("finetune", digits_student, "--data", digits_small, *FAST, "-o", out, "--resume")
    assert res.returncode == 2 and "no training state to resume" in res.stderr
    state_path_for(out).write_bytes(b"garbage, not a zip file")
    res = run_cli("finetune", digits_student, "--data", digits_small, *FAST, "-o", out, "--resume")
    assert res.returncode == 2 and "corrupt training state" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_finetune_with_amp_on_cpu(tmp_path, digits_small, digits_student):
    """bf16 autocast on CPU trains and still writes a valid binarized checkpoint."""
    out = tmp_path / "amp.safetensors"
    res = run_cli(
        "finetune",
        digits_student,
        "--data",
        digits_small,
        "--epochs",
        "1",
        *FAST,
        "--calibrate-batches",
        "0",
        "--amp",
        "--device",
        "cpu",
        "-o",
        out,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert 0 <= result["student_top1"] <= 100
    assert load_model(out) is not None
