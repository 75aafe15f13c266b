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
from equalbits_cli.train.state import state_path_for

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

    from equalbits_cli.paths import read_metadata

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
        app,
        ["export", str(binary_ckpt), "-f", "onnx", "--img-size", "32", "--no-bench", "-o", str(tmp_path / "m.onnx")],
    )
    assert res.exit_code == 0, res.stderr
    for new_name, message in (
        ("eb::no.such.layer::factor", "names no binarized layer"),  # the naming of 0.5 exports
        ("no.such.layer.scale", "layer 'layer1.0.conv1': missing tensor"),
    ):
        m = onnx.load(str(tmp_path / "m.onnx"))
        init = next(i for i in m.graph.initializer if i.name == "layer1.0.conv1.scale")
        init.name = new_name
        onnx.save(m, str(tmp_path / "forged.onnx"))
        res = runner.invoke(app, ["inspect", str(tmp_path / "forged.onnx")])
        assert res.exit_code == 2 and message in res.stderr, res.stderr
    m = onnx.load(str(tmp_path / "m.onnx"))
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)  # fmt: skip
    res = runner.invoke(app, ["inspect", str(tmp_path / "ext.onnx")])
    assert res.exit_code == 2 and "external data" in res.stderr


# Round three (issue 23): data loss, early validation, messages.


def _one_error(res, message):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, (res.stdout, res.stderr, res.exception)
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr, res.stderr


def test_an_output_cannot_be_an_input_or_another_output(tmp_path, digits_small, digits_student, binary_ckpt):
    student = tmp_path / "s.safetensors"
    shutil.copy(digits_student, student)
    before = student.read_bytes()
    out = tmp_path / "o.safetensors"
    base = ["finetune", str(student), "--data", str(digits_small), "--workers", "0"]
    _one_error(runner.invoke(app, [*base, "-o", str(out), "--plot", str(out)]), "--plot")
    _one_error(runner.invoke(app, [*base, "-o", str(out), "--plot", str(student), "--overwrite"]), "CKPT")
    _one_error(runner.invoke(app, [*base, "-o", str(out), "--log", str(student)]), "CKPT")
    _one_error(runner.invoke(app, [*base, "-o", str(out), "--log", str(tmp_path)]), "is a directory")
    _one_error(runner.invoke(app, ["inspect", str(student), "--plot", str(student), "--overwrite"]), "FILE")
    _one_error(runner.invoke(app, ["export", str(student), "-o", str(student), "--overwrite"]), "CHECKPOINT")
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep")
    _one_error(
        runner.invoke(app, ["sweep", "resnet10t", "--data", str(digits_small), "--plot", str(existing),
                            "--rows", str(tmp_path / "r.jsonl")]),
        "--overwrite",
    )  # fmt: skip
    assert student.read_bytes() == before and existing.read_bytes() == b"keep" and not out.exists()


def test_bad_settings_are_refused_before_any_work(tmp_path, digits_small):
    out = tmp_path / "qs"
    for args, message in (
        (["--epochs", "0"], "epochs must be an integer >= 1"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--teacher-epochs", "0"], "--teacher-epochs must be at least 1"),
        (["--model", "nope_model"], "unknown timm model 'nope_model'"),
    ):
        _one_error(runner.invoke(app, ["quickstart", "--out", str(out), *args]), message)
        assert not out.exists() or not any(out.iterdir()), "nothing written"
    rows = tmp_path / "r.jsonl"
    for args, message in (
        (["--ratios", "0.5,0.0001"], "only -1 codes"),
        (["--ratios", "0.5,,0.5"], "has an empty entry"),
        (["--ratios", "0.5,0.5"], "lists 0.5 more than once"),
        (["--prune", "0,0.999"], "sets all"),
        (["--methods", "sign", "--prune", "0.2"], "--prune applies to --methods ot only"),
    ):
        res = runner.invoke(app, ["sweep", "resnet10t", "--data", str(digits_small), "--rows", str(rows), *args])
        _one_error(res, message)
        assert not rows.exists()


def test_one_line_messages(tmp_path, binary_ckpt, resnet18_state, digits_small):
    from helpers import run_cli

    res = run_cli("binarize", "resnet18", "--ratio", "abc")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Invalid value for '--ratio'" in res.stderr and "equalbits binarize --help" in res.stderr
    _one_error(
        runner.invoke(app, ["export", str(resnet18_state), "-o", str(tmp_path / "x.packed.safetensors")]),
        "not a binarized checkpoint; make one first (binarize_model and save_checkpoint; on the command line: "
        "equalbits binarize MODEL --checkpoint",
    )
    _one_error(
        runner.invoke(app, ["export", str(binary_ckpt), "--calibrate-batches", "4", "-o", str(tmp_path / "p")]),
        "--calibrate-batches applies to --format onnx-int8 only",
    )
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not read: --data is refused first")
    _one_error(
        runner.invoke(app, ["inspect", str(onnx_file), "--data", str(digits_small)]),
        "--data measures the activation bits of a PyTorch model",
    )
    _one_error(runner.invoke(app, ["inspect", str(resnet18_state), "--model", "resnet18", "--data",
                                   str(digits_small)]), "plain state dict")  # fmt: skip
    state = state_path_for(tmp_path / "o.safetensors")
    state.mkdir()
    _one_error(
        runner.invoke(app, ["finetune", str(binary_ckpt), "--data", str(digits_small), "-o",
                            str(tmp_path / "o.safetensors"), "--resume", "yes"]),
        "is a directory, not a training state",
    )  # fmt: skip
    _one_error(runner.invoke(app, ["finetune", str(binary_ckpt), "--data", str(digits_small), "--temperature",
                                   "1e308"]), "temperature must be in (0, 100]")  # fmt: skip


def test_corrupt_state_never_advises_unpickling(tmp_path):
    from equalbits_cli.train.state import load_state

    path = tmp_path / "s.pt"
    import datetime

    # A date is no tensor, number or string: torch's safe loader refuses it, and advises unpickling.
    torch.save({"format": "equalbits.train_state", "obj": datetime.date(2026, 1, 1)}, str(path))
    with pytest.raises(ValueError, match="corrupt training state") as err:
        load_state(path)
    assert "weights_only" not in str(err.value)


def test_a_truncated_state_is_refused(tmp_path):
    """States are written without torch's per-record CRC (save_state): a cut file is still refused in one
    line, by the zip directory it lacks (the atomic write keeps a cut file from ever being the state)."""
    from equalbits_cli.train.state import load_state, save_state

    path = tmp_path / "s.pt"
    save_state(path, {"format": "equalbits.train_state", "model": {"w": torch.randn(100, 100)}})
    data = path.read_bytes()
    with pytest.raises(ValueError, match="not an equalbits training state"):  # read whole: only keys missing
        load_state(path)
    for cut in (len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="corrupt training state"):
            load_state(path)


def test_non_utf8_names_show_their_bytes(tmp_path):
    name = os.fsdecode(b"bad\xff.safetensors")
    res = runner.invoke(app, ["inspect", str(tmp_path / name)])
    assert res.exit_code == 2 and "bad\\xff" in res.stderr and "udcff" not in res.stderr


def test_resume_of_a_state_saved_for_another_student_is_refused(tmp_path, resnet18_state, digits_small):
    from equalbits_cli import BinarizeConfig, binarize_model, save_checkpoint
    from equalbits_cli.train.state import check_resume_identity, run_identity

    path = tmp_path / "s.safetensors"
    save_checkpoint(binarize_model("resnet18", BinarizeConfig(), checkpoint=resnet18_state), path)
    saved = {"identity": run_identity(path, None, digits_small)}
    check_resume_identity(path, saved, run_identity(path, None, digits_small))  # the same run: accepted
    save_checkpoint(binarize_model("resnet18", BinarizeConfig(0.3, 0.2), checkpoint=resnet18_state), path)
    with pytest.raises(ValueError, match="the student's binarization .* changed .*0.3"):
        check_resume_identity(path, saved, run_identity(path, None, digits_small))
    save_checkpoint(binarize_model("resnet18", BinarizeConfig(), checkpoint=resnet18_state), path)
    with pytest.raises(ValueError, match="the teacher changed"):
        check_resume_identity(path, saved, run_identity(path, "resnet34", digits_small))
    with pytest.raises(ValueError, match="the data folder changed"):
        check_resume_identity(path, saved, run_identity(path, None, tmp_path))
    check_resume_identity(path, {}, run_identity(path, None, tmp_path))  # states from before 0.5: as before


def test_interrupted_sweep_keeps_its_rows_and_goes_on(tmp_path, digits_small, digits_teacher):
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.errors import Interrupted
    from equalbits_cli.progress import NullProgress
    from equalbits_cli.recipes.sweep import read_rows, run_sweep

    class StopAtSecond(NullProgress):
        def __init__(self):
            self.settings = 0

        def phase(self, text, total=None):
            if text.startswith("run"):
                self.settings += 1
                if self.settings == 2:
                    raise KeyboardInterrupt

    rows_file = tmp_path / "rows.jsonl"
    cfg = FinetuneConfig(epochs=1, batch_size=32, workers=0, warmup_steps=2, calibrate_batches=1)
    kwargs = dict(ratios=[0.5, 0.3], checkpoint=str(digits_teacher), finetune_config=cfg, rows_file=rows_file)
    with pytest.raises(Interrupted, match="after 1 of 2 runs; they are kept in") as stopped:
        run_sweep("resnet10t", digits_small, progress=StopAtSecond(), **kwargs)
    assert stopped.value.signum == signal.SIGINT and len(stopped.value.rows) == 1
    assert len(read_rows(rows_file)) == 1
    notes = []

    class Notes(NullProgress):
        def note(self, text):
            notes.append(text)

    rows = run_sweep("resnet10t", digits_small, progress=Notes(), **kwargs)
    assert [r["ratio"] for r in rows] == [0.5, 0.3] and rows[0] == stopped.value.rows[0]
    reused = [n for n in notes if "reusing the finished row" in n]
    assert len(reused) == 1 and reused[0].startswith("run 1/2") and len(read_rows(rows_file)) == 2
