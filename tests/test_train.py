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
from equalbits_cli.nn.layers import BinaryLayer
from equalbits_cli.paths import read_metadata
from equalbits_cli.train.distill import distillation_loss
from equalbits_cli.train.finetune import SHORTFALL_FROM_START, codes_checksum, shortfall_warnings
from equalbits_cli.train.state import state_path_for

FAST = ["--img-size", "32", "--batch-size", "32", "--workers", "0", "--warmup-steps", "5", "--augment", "none"]


def test_finetune_improves_the_student(tmp_path, digits_small, digits_student):
    out = tmp_path / "ft.safetensors"
    log = tmp_path / "log.jsonl"
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
        "--log",
        log,
    )
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    for key in ("teacher_top1", "student_top1_before", "student_top1", "student_top5", "epochs", "output"):
        assert key in result
    assert result["epochs"] == 3 and result["output"] == str(out)
    assert result["student_top1"] > result["student_top1_before"] + 10
    assert result["warnings"] == [], "a run that improves on its start is not called too short"
    assert not state_path_for(out).exists(), "the training state is removed once the run completes"
    res = run_cli("eval", out, "--data", digits_small, "--img-size", "32", "--workers", "0", "--json")
    assert res.returncode == 0, res.stderr
    evaluation = json.loads(res.stdout)
    assert evaluation["n"] == 120 and evaluation["top1"] == pytest.approx(result["student_top1"])
    res = run_cli("inspect", out, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["totals"]["entropy_bits"] == 1.0
    # the class list is recorded for eval, and the curves are reported
    assert json.loads(read_metadata(out)["classes"]) == sorted(p.name for p in (digits_small / "train").iterdir())
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert all({"loss", "lr", "val_top1"} <= set(h) for h in result["history"])
    assert result["history"][-1]["val_top1"] == pytest.approx(result["student_top1"])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["event"] == "epoch"] == [1, 2, 3]
    assert any(r["event"] == "step" for r in rows)


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
    out = json.loads(res.stdout)
    assert set(out) == {"top1", "top5", "n", "data_config"}
    # The teacher's file records how it was trained (32x32, the whole image); eval reads it back.
    assert out["data_config"]["input_size"] == [3, 32, 32] and out["data_config"]["crop_pct"] == 1.0


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


def _torchrun(launcher: list[str], student, data, finetune: list[str]) -> list[str]:
    """``torchrun --nproc-per-node 2 LAUNCHER -m equalbits_cli finetune STUDENT --data DATA FAST
    --calibrate-batches 2 FINETUNE --json`` (later options win)."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    head = [torchrun, "--nproc-per-node", "2", *launcher, "-m", "equalbits_cli", "finetune", str(student)]
    return head + ["--data", str(data), *FAST, "--calibrate-batches", "2", *finetune, "--json"]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, digits_small, digits_student):
    out = tmp_path / "ddp.safetensors"
    cmd = _torchrun(["--master-port", "29531"], digits_student, digits_small, ["--epochs", "1", "-o", str(out)])
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
    return [m.quantize()[0] for m in model.modules() if isinstance(m, BinaryLayer)]


@pytest.mark.slow
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
        "--augment",  # after FAST's "--augment none": the last one wins; seeded crops must resume exactly
        "light",
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


def test_each_local_rank_gets_its_own_gpu():
    from equalbits_cli.train.distributed import device_for_rank

    assert device_for_rank("cuda", 1, True, 2) == torch.device("cuda", 1)
    assert device_for_rank("auto", 3, True, 4) == torch.device("cuda", 3)
    assert device_for_rank("cuda:0", 1, True, 2) == torch.device("cuda", 0), "an explicit index is kept"
    assert device_for_rank("auto", 1, False, 0) == torch.device("cpu")
    with pytest.raises(ValueError, match="no GPU of its own"):
        device_for_rank("cuda", 2, True, 2)
    with pytest.raises(ValueError, match="no CUDA device"):
        device_for_rank("cuda", 0, False, 0)


def test_pretrained_teacher_with_another_head_is_refused():
    from equalbits_cli.train.distill import teacher_for as _teacher_for

    meta = {"model": "resnet18", "source": {"model": "resnet18", "pretrained": True, "checkpoint": None}}
    with pytest.raises(ValueError, match="1000 classes, not this data's 10.*`teacher`.*`alpha` 1"):
        _teacher_for(meta, None, 10)
    with pytest.raises(ValueError, match="head would be random"):
        _teacher_for(meta, "resnet18", 10)
    for source in ({"checkpoint": 5}, {"model": 123}, {"checkpoint": "x" * 100_000}):
        with pytest.raises(ValueError, match="teacher"):
            _teacher_for({"model": "resnet18", "source": source}, None, 10)


def test_label_only_training_needs_no_teacher(tmp_path, digits_small):
    from equalbits_cli import BinarizeConfig, binarize_model, save_checkpoint

    student = save_checkpoint(binarize_model("resnet10t", BinarizeConfig(), num_classes=10), tmp_path / "s.safetensors")
    out = tmp_path / "ft.safetensors"
    res = run_cli("finetune", student, "--data", digits_small, "--epochs", "1", *FAST, "--alpha", "1", "-o", out,
                  "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["teacher_top1"] is None and out.exists()
    assert json.loads(res.stdout)["student_top1_calibrated"] is not None  # BatchNorm re-estimated, scored again
    res = run_cli("finetune", student, "--data", digits_small, "--epochs", "1", *FAST, "-o", tmp_path / "x.safetensors")
    assert res.returncode == 2 and "--alpha 1" in res.stderr


def test_resume_with_other_settings_is_refused(tmp_path):
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.train.state import check_resume_config

    saved = {"config": FinetuneConfig(epochs=1000).to_json()}
    with pytest.raises(ValueError, match="`epochs` 1000 \\(now 2\\)"):
        check_resume_config(tmp_path / "s", saved, FinetuneConfig(epochs=2).to_json())
    check_resume_config(tmp_path / "s", saved, FinetuneConfig(epochs=1000, workers=0, device="cpu").to_json())


def test_damaged_training_state_fields(tmp_path, digits_small, digits_student):
    from equalbits_cli.train.state import STATE_FORMAT

    out = tmp_path / "x.safetensors"
    base = {"format": STATE_FORMAT, "version": 1, "model": {}, "optimizer": {}, "scheduler": {}, "step": 1,
            "epoch": 0, "batch": 1, "rng": torch.get_rng_state()}  # fmt: skip
    for bad in ({"rng": "abc"}, {"model": [1, 2]}, {"step": "3"}):
        torch.save({**base, **bad}, str(state_path_for(out)))
        res = run_cli("finetune", digits_student, "--data", digits_small, *FAST, "-o", out, "--resume")
        assert res.returncode == 2 and "damaged training state" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_amp_autocasts_on_cpu(tmp_path, digits_small, digits_student):
    """--amp runs the student's convolutions in bf16 on the CPU (seen through a global forward hook).
    Two steps on 4 images a class: bf16 convolutions are slow on CPUs without bf16 instructions."""
    import shutil

    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.nn.layers import BinaryConv2d
    from equalbits_cli.train.finetune import finetune

    dtypes = set()

    def hook(module, args, output):
        if isinstance(module, BinaryConv2d) and module.training:
            dtypes.add(output.dtype)

    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in sorted((digits_small / split).iterdir()):
            (data / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:4]:
                shutil.copy(f, data / split / cls.name / f.name)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        cfg = FinetuneConfig(epochs=1, img_size=32, batch_size=20, workers=0, calibrate_batches=0, amp=True,
                             device="cpu", augment="none")  # fmt: skip
        result = finetune(digits_student, data, cfg, output=tmp_path / "amp.safetensors")
    finally:
        handle.remove()
    assert dtypes == {torch.bfloat16}
    assert result is not None and load_model(tmp_path / "amp.safetensors") is not None


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_torchrun_restart_resumes_automatically(tmp_path, digits_small, digits_student):
    """A worker lost mid-run: torchrun --max-restarts starts the same command again, and --resume auto
    continues from the saved state instead of starting over."""
    out = tmp_path / "ddp.safetensors"
    # dynamic rendezvous, as elastic jobs use (each restart is a new rendezvous round)
    launcher = ["--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:29533"]
    launcher += ["--rdzv-id", f"eb-{os.getpid()}"]
    args = ["--epochs", "3", "--calibrate-batches", "1", "--save-every", "2", "--resume", "auto", "-o", str(out)]
    cmd = _torchrun(launcher, digits_student, digits_small, args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert wait_for_file(state_path_for(out), proc, timeout=300), "a training state is saved every 2 steps"
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)  # one worker lost
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout)
    assert result["resumed_from_step"] >= 2 and result["steps"] == 3 * (400 // (32 * 2))
    assert result["world_size"] == 2 and result["codes_identical_across_ranks"] is True
    assert not state_path_for(out).exists() and codes_checksum(load_model(out)) == result["codes_checksum"]


def test_resume_auto_starts_afresh_without_state_and_respects_a_finished_output(tmp_path, digits_small, digits_student):
    out = tmp_path / "auto.safetensors"
    args = ["finetune", digits_student, "--data", digits_small, "--epochs", "1", *FAST, "--calibrate-batches", "1"]
    res = run_cli(*args, "--resume", "auto", "-o", out, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["resumed_from_step"] is None
    res = run_cli(*args, "--resume", "auto", "-o", out)  # finished: no state left, the output exists
    assert res.returncode == 2 and "exists" in res.stderr
    res = run_cli(*args, "--resume", "later", "-o", tmp_path / "y.safetensors")
    assert res.returncode == 2 and "later" in res.stderr


@pytest.fixture(scope="module")
def plain_finetune(tmp_path_factory, digits_small, digits_student):
    """The command line of a one-epoch fine-tune, and its --json result without extra flags."""
    args = ["finetune", digits_student, "--data", digits_small, "--epochs", "1", *FAST, "--calibrate-batches", "1"]
    res = run_cli(*args, "-o", tmp_path_factory.mktemp("plain") / "plain.safetensors", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    return args, json.loads(res.stdout)


# The same steps as without the flag. Compiled kernels round differently, and channels-last
# convolutions sum in another order; over an epoch a few codes flip on such differences, and a flipped
# code moves the rest of the run: the losses agree closely, not exactly (channels-last: 0.2% on one CPU,
# 2.5% on another, with 0.5.0's code as with today's).
@pytest.mark.parametrize("flag,tolerance", [("--compile", 0.05), ("--channels-last", 0.05)])
def test_compile_and_channels_last_train_the_same_steps(tmp_path, plain_finetune, flag, tolerance):
    args, plain = plain_finetune
    out = tmp_path / "flagged.safetensors"
    res = run_cli(*args, flag, "-o", out, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    flagged = json.loads(res.stdout)
    assert flagged["steps"] == plain["steps"]
    loss, want = flagged["history"][0]["loss"], plain["history"][0]["loss"]
    assert abs(loss - want) <= tolerance * want
    model = load_model(out)  # written contiguous, as every file is
    assert all(t.is_contiguous() for t in model.state_dict().values())


def test_compile_failures_are_one_line_errors():
    from torch._dynamo.exc import TorchRuntimeError

    from equalbits_cli.train.finetune import _compile_error

    err = _compile_error(TorchRuntimeError("RuntimeError when making fake tensor call\nmore lines"))
    assert err is not None and "`compile`" in str(err) and "\n" not in str(err)
    assert _compile_error(ValueError("a training error")) is None


def test_default_workers_follow_the_cpus(monkeypatch):
    from equalbits_cli.data import folders as data

    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert data.default_workers() == 8 and data.default_workers(4) == 3 and data.default_workers(16) == 0
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert data.default_workers() == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [False, True])
def test_no_device_sync_in_a_finetune_step_on_cuda(tmp_path, digits_small, digits_student, amp):
    """A whole fine-tune step (teacher forward, student forward and backward, the AMP scaler and the
    optimizer) never waits for the device: the loss is read at log points only, and on CUDA the fused
    AdamW takes the scaler's inf check on the device."""
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.progress import NullProgress
    from equalbits_cli.train.finetune import _setup, _step

    cfg = FinetuneConfig(epochs=1, batch_size=16, workers=0, device="cuda", amp=amp, calibrate_batches=0)
    run = _setup(digits_student, digits_small, cfg, None, NullProgress(), tmp_path / "o.safetensors")
    assert run.teacher is not None
    run.model.train()
    batches = iter(run.train_loader)  # pinned by the loader on CUDA, as in a fine-tune
    bad = torch.full((), -1, dtype=torch.int64, device=run.device)
    _step(run, *next(batches), bad)  # warm-up: kernels compiled, launch tables built, scaler initialised
    images, targets = next(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, bad = _step(run, images, targets, bad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(bad) == -1 and bool(torch.isfinite(loss))


def test_a_non_finite_loss_is_reported_with_its_step(tmp_path, digits_small, digits_student, monkeypatch):
    """The loss is checked on the device each step and read at the next log point: the error names the
    first bad step (3), not the log point (10) where it is found."""
    import equalbits_cli.train.finetune as train
    from equalbits_cli.config import FinetuneConfig

    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = distillation_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "distillation_loss", poisoned)
    cfg = FinetuneConfig(epochs=1, batch_size=32, workers=0, calibrate_batches=0, warmup_steps=2)
    with pytest.raises(ValueError, match="became NaN or infinite at step 3; lower `lr`"):
        train.finetune(digits_student, digits_small, cfg, output=tmp_path / "o.safetensors")
    assert len(calls) == train.LOG_EVERY


def test_cached_teacher_outputs_train_the_same_student(tmp_path, digits_small, digits_student, monkeypatch):
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.train import teacher_cache
    from equalbits_cli.train.finetune import finetune

    caches = []
    init = teacher_cache.TeacherCache.__post_init__

    def spy(self):
        caches.append(self)
        init(self)

    monkeypatch.setattr(teacher_cache.TeacherCache, "__post_init__", spy)
    results = {}
    for cached in (True, False):
        cfg = FinetuneConfig(
            epochs=3, batch_size=32, workers=0, calibrate_batches=1, warmup_steps=2, seed=1, cache_teacher=cached
        )
        results[cached] = finetune(digits_student, digits_small, cfg, output=tmp_path / f"{cached}.safetensors")
    # 400 images, 12 batches of 32 an epoch: after epoch 1 a batch is served from the cache once all of its
    # images were seen (the 16 images dropped from epoch 1 keep a few batches live in epoch 2).
    (cache,) = caches
    steps = results[True].steps
    assert steps == 36 and 12 <= cache.hits < 24 and cache.filled.sum() >= 384
    # The teacher's output for an image does not depend on the batch it came in: the same student, bit for bit.
    assert [h["loss"] for h in results[True].history] == [h["loss"] for h in results[False].history]
    same, live = load_model(tmp_path / "True.safetensors"), load_model(tmp_path / "False.safetensors")
    assert codes_checksum(same) == codes_checksum(live)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), live.state_dict().values()))


def test_images_decoded_once_train_the_same_student(tmp_path, digits_small, digits_student, monkeypatch):
    """With no augmentation the splits are decoded into memory once; read from disk every epoch instead
    (the memory bound at 0 bytes, as for data too large), the run says so and trains the same student."""
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.progress import NullProgress
    from equalbits_cli.train import finetune as ft

    class Notes(NullProgress):
        def __init__(self):
            self.notes, self.phases = [], []

        def note(self, text):
            self.notes.append(text)

        def phase(self, text, total=None):
            self.phases.append(text)

    results, runs, full = {}, {}, ft.DEFAULT_BOUND
    for bound in (full, 0):
        monkeypatch.setattr(ft, "DEFAULT_BOUND", bound)
        runs[bound] = Notes()
        cfg = FinetuneConfig(epochs=2, batch_size=32, workers=0, calibrate_batches=2, warmup_steps=2, seed=1)
        results[bound] = ft.finetune(
            digits_student, digits_small, cfg, output=tmp_path / f"{bound}.safetensors", progress=runs[bound]
        )
    decoded, disk = runs[full], runs[0]
    assert any(p.startswith("decoding the images once") for p in decoded.phases)
    assert not any("decoded every epoch" in n for n in decoded.notes)
    assert any("images are decoded every epoch: 400 decoded images would take 0.0 GiB" in n for n in disk.notes)
    assert [h["loss"] for h in results[full].history] == [h["loss"] for h in results[0].history]
    assert results[full].student_top1 == results[0].student_top1
    a, b = load_model(tmp_path / f"{full}.safetensors"), load_model(tmp_path / "0.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_decode_once_gives_the_split_s_own_tensors(digits_small):
    from equalbits_cli.data.config import DataOverrides, resolve_data_config
    from equalbits_cli.data.folders import decode_once, find_splits, val_dataset

    model = torch.nn.Linear(1, 1)
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    ds = val_dataset(find_splits(digits_small), resolve_data_config(model, DataOverrides(img_size=32)))
    kept = decode_once(ds, batch_size=7, workers=0, bound=1 << 30)
    assert len(kept) == len(ds) == 120
    for i in (0, 6, 7, 119):  # across the loader's batches
        image, target = kept[i]
        assert torch.equal(image, ds[i][0]) and target == ds[i][1]
    assert decode_once(ds, batch_size=7, workers=0, bound=len(ds) * 3 * 32 * 32 * 4 - 1).startswith(
        "images are decoded every epoch"
    )


def test_a_teacher_cache_over_its_bound_is_given_up():
    import numpy as np

    from equalbits_cli.train.teacher_cache import TeacherCache

    cache = TeacherCache(n=1000, bound=1000 * 10 * 4 - 1)
    cache.store(np.arange(4), torch.zeros(4, 10))
    assert cache.logits is None and "would take 0.0 GiB" in cache.too_large
    assert cache.lookup(np.arange(4)) is None


def test_a_student_without_batchnorm_is_evaluated_once_before_training(tmp_path, digits_small):
    """A ViT has no BatchNorm and, at 1W/32A, no thresholds: nothing is re-estimated before training,
    so the student is not evaluated a second time (student_top1_calibrated is None; a ResNet's is set:
    test_label_only_training_needs_no_teacher)."""
    from equalbits_cli import BinarizeConfig, binarize_model, save_checkpoint

    student = save_checkpoint(binarize_model("test_vit", BinarizeConfig(), num_classes=10), tmp_path / "v.safetensors")
    res = run_cli("finetune", student, "--data", digits_small, "--epochs", "1", *FAST, "--alpha", "1",
                  "-o", tmp_path / "ft.safetensors", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["student_top1_calibrated"] is None and out["student_top1_before"] is not None


def test_a_failed_final_write_keeps_the_trained_state(tmp_path, digits_small, digits_student, monkeypatch):
    """No state is written after the last epoch (the checkpoint is, and the state is then removed); if
    writing the checkpoint fails, the state of the finished training is saved, and a resume only
    evaluates and writes the checkpoint."""
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.formats import latent
    from equalbits_cli.train import finetune as ft

    saves = []
    save_state = ft.save_state
    monkeypatch.setattr(
        ft, "save_state", lambda path, payload: (saves.append(payload["epoch"]), save_state(path, payload))
    )
    write = latent.save_checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(latent, "save_checkpoint", full_disk)
    cfg = FinetuneConfig(epochs=2, batch_size=32, workers=0, calibrate_batches=1, warmup_steps=2, save_every=1000)
    out = tmp_path / "o.safetensors"
    with pytest.raises(OSError, match="No space"):
        ft.finetune(digits_student, digits_small, cfg, output=out)
    assert saves == [1, 2] and state_path_for(out).exists() and not out.exists()
    monkeypatch.setattr(latent, "save_checkpoint", write)
    result = ft.finetune(digits_student, digits_small, cfg, output=out, resume=True)
    assert result.resumed_from_step == result.steps == 24 and saves == [1, 2]
    assert len(result.history) == 2 and out.exists() and not state_path_for(out).exists()


def test_codes_checksum_tells_codes_apart():
    """Equal codes, equal checksums; two codes swapped within one filter (same counts), another one."""
    import copy

    import timm

    from equalbits_cli import BinarizeConfig, binarize_

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    binarize_(model, BinarizeConfig())
    twin = copy.deepcopy(model)
    assert codes_checksum(model) == codes_checksum(twin) < 2**63
    with torch.no_grad():
        f = twin.layer1[0].conv1.weight[0].view(-1)
        hi, lo = int(f.argmax()), int(f.argmin())
        f[hi], f[lo] = f[lo].clone(), f[hi].clone()
    assert codes_checksum(model) != codes_checksum(twin)


def test_a_run_that_ends_under_its_start_is_called_too_short():
    """Measured: 22 steps took a resnet18 from 88.9% after BatchNorm re-estimation to 50.7%."""
    evals = {"student_top1_before": 9.7, "student_top1_calibrated": 88.9}
    (warning,) = shortfall_warnings(evals, 50.7, 22)
    assert "50.70%" in warning and "88.90%" in warning and "22 steps" in warning and "`epochs`" in warning
    assert shortfall_warnings(evals, 88.9 - SHORTFALL_FROM_START, 22) == []  # within the margin
    assert shortfall_warnings(evals, 90.0, 22) == []
    # without BatchNorm re-estimation the start is the student just binarized
    assert shortfall_warnings({"student_top1_before": 60.0, "student_top1_calibrated": None}, 50.0, 9)
    assert shortfall_warnings({"student_top1_before": 9.7, "student_top1_calibrated": None}, 50.0, 9) == []
