"""The data config: recorded in every file, read back by eval and export, never overridden behind the user.

Before 0.5, ``--img-size`` silently forced the whole image (crop 1.0) on a model trained with a centre crop,
and ``eval``/``export`` ignored the size a file was fine-tuned at: the same fine-tuned model scored 98% as
the quickstart's ONNX and 11% as its own checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import invoke_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from equalbits_cli.data.config import DataConfig, DataOverrides, resolve_data_config
from equalbits_cli.train.finetune import teacher_warnings


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_data_config_checks_itself():
    cfg = DataConfig((3, 32, 32), "bicubic", (0.5,) * 3, (0.25,) * 3, 0.875)
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, message in (
        ({**cfg.to_dict(), "input_size": [3, 6000, 6000]}, "between 8 and 4096"),
        ({**cfg.to_dict(), "interpolation": "cubic"}, "interpolation must be one of"),
        ({**cfg.to_dict(), "mean": [0.5, 0.5]}, "mean must hold 3 numbers"),
        ({**cfg.to_dict(), "std": [0.5, 0.0, 0.5]}, "std must be positive"),
        ({**cfg.to_dict(), "crop_pct": 0}, "crop_pct must be in"),
        ({**cfg.to_dict(), "extra": 1}, "unknown keys: extra"),
        ({}, "lacks crop_pct, input_size, interpolation, mean, std"),
        ([], "must be a JSON object"),
    ):
        with pytest.raises(ValueError, match=message):
            DataConfig.from_dict(bad)


def test_explicit_size_keeps_the_models_crop():
    """--img-size changes the size and nothing else: resnet10t keeps its own crop (0.95), not 1.0."""
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    own = resolve_data_config(model)
    cfg = resolve_data_config(model, DataOverrides(img_size=32))
    assert cfg.input_size == (3, 32, 32)
    assert (cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std) == (own.crop_pct, own.interpolation, own.mean, own.std)
    assert own.crop_pct != 1.0
    assert resolve_data_config(model, DataOverrides(crop_pct=1.0, mean=(0.5,) * 3)).crop_pct == 1.0


def test_teacher_warnings_name_the_likely_cause():
    cfg = DataConfig((3, 32, 32), "bicubic", (0.5,) * 3, (0.5,) * 3, 1.0)
    assert teacher_warnings({"teacher_top1": 92.0, "student_top1_before": 20.0}, 92.4, cfg) == []
    below_record = teacher_warnings({"teacher_top1": 68.3, "student_top1_before": 20.0}, 92.4, cfg)
    assert len(below_record) == 1 and "24.10 points under the 92.40% its file records" in below_record[0]
    assert "`crop_pct`" in below_record[0] and "32x32, crop 1" in below_record[0]
    below_student = teacher_warnings({"teacher_top1": 30.0, "student_top1_calibrated": 50.0}, None, cfg)
    assert len(below_student) == 1 and "under the binarized student's 50.00%" in below_student[0]


def test_a_fine_tuned_file_scores_the_same_in_every_format(tmp_path, digits_small, digits_student):
    """The quickstart's 98% -> 11% case: finetune without --img-size (the student records 32x32, whole image,
    from its teacher's file), then eval the checkpoint, the packed file and a fresh ONNX export of it, all
    without --img-size: each reads the recorded config and scores what finetune measured."""
    ft = tmp_path / "s.ft.safetensors"
    res = invoke_cli(
        "finetune", digits_student, "--data", digits_small, "--epochs", "1", "--batch-size", "32", "--workers",
        "0", "--warmup-steps", "5", "--calibrate-batches", "2", "-o", ft, "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    tuned = json.loads(res.stdout)
    assert tuned["data_config"]["input_size"] == [3, 32, 32] and tuned["data_config"]["crop_pct"] == 1.0
    assert "data: 32x32, crop 1 (center)" in res.stderr
    assert json.loads(_meta(ft)["data_config"]) == tuned["data_config"]
    for fmt, name in (("packed", "s.packed.safetensors"), ("onnx", "s.onnx")):
        res = invoke_cli(
            "export", ft, "--format", fmt, "-o", tmp_path / name, "--json", *(["--no-bench"] * (fmt == "onnx"))
        )
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["data_config"] == tuned["data_config"]
    for target in (ft, tmp_path / "s.packed.safetensors", tmp_path / "s.onnx"):
        res = invoke_cli("eval", target, "--data", digits_small, "--workers", "0", "--json")
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["data_config"] == tuned["data_config"], target
        assert got["top1"] == pytest.approx(tuned["student_top1"], abs=1e-6), target
    # An override is still the user's: at 64x64 the same file is fed other images.
    res = invoke_cli("eval", ft, "--data", digits_small, "--workers", "0", "--img-size", "64", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["data_config"]["input_size"] == [3, 64, 64]


def test_files_from_before_0_5_use_the_size_they_were_fine_tuned_at(tmp_path, digits_student):
    """A 0.4 file recorded only ``finetune.img_size``; it was trained on the whole image at that size."""
    from equalbits_cli import load_model

    meta = {k: v for k, v in _meta(digits_student).items() if k != "data_config"}
    meta["format_version"] = "1"  # equalbits 0.1-0.4
    meta["finetune"] = json.dumps({"img_size": 32, "epochs": 1})
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(digits_student)), str(old), metadata=meta)
    cfg = resolve_data_config(load_model(old))
    assert cfg.input_size == (3, 32, 32) and cfg.crop_pct == 1.0
    del meta["finetune"]  # never fine-tuned: the architecture's own config
    save_file(load_file(str(digits_student)), str(old), metadata=meta)
    assert resolve_data_config(load_model(old)).input_size == (3, 176, 176)


def test_teacher_fed_the_wrong_crop_is_warned_about(tmp_path, digits_small, digits_student):
    res = invoke_cli(
        "finetune", digits_student, "--data", digits_small, "--epochs", "1", "--batch-size", "32", "--workers",
        "0", "--warmup-steps", "5", "--calibrate-batches", "1", "--crop-pct", "0.3", "-o", tmp_path / "o.safetensors",
        "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["data_config"]["crop_pct"] == 0.3
    assert any("its file records" in w for w in out["warnings"]), out
    assert "warning: the teacher scores" in res.stderr


def test_data_options_are_checked_before_any_work(tmp_path, digits_small, digits_student):
    for args, message in (
        (["--img-size", "5000"], "--img-size must be between 8 and 4096"),
        (["--img-size", "4"], "--img-size must be between 8 and 4096"),
        (["--crop-pct", "1.5"], "--crop-pct must be in"),
        (["--interpolation", "cubic"], "--interpolation must be one of"),
        (["--mean", "0.5,x"], "--mean takes comma-separated numbers"),
        (["--std", "0.5,0,0.5"], "--std must be positive"),
    ):
        for command in (["finetune", digits_student], ["eval", digits_student], ["inspect", digits_student]):
            res = invoke_cli(*command, "--data", digits_small, *args, "-o" if command[0] == "finetune" else "--json",
                          *([tmp_path / "o.safetensors"] if command[0] == "finetune" else []))  # fmt: skip
            assert res.returncode == 2, (command, args, res.stderr)
            assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_val_only_data_works_where_no_training_happens(tmp_path, digits_small, digits_student):
    import shutil

    data = tmp_path / "valonly"
    shutil.copytree(digits_small / "val", data / "val")
    res = invoke_cli("eval", digits_student, "--data", data, "--workers", "0", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["n"] == 120
    res = invoke_cli("export", digits_student, "-f", "onnx", "--data", data, "-o", tmp_path / "m.onnx", "--no-bench")
    assert res.returncode == 0, res.stderr
    res = invoke_cli("eval", tmp_path / "m.onnx", "--data", data, "--workers", "0", "--json")
    assert res.returncode == 0, res.stderr
    res = invoke_cli("inspect", digits_student, "--data", data, "--json")
    assert res.returncode == 0, res.stderr


def _cfg_json(size: int) -> str:
    cfg = {"input_size": [3, size, size], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    return json.dumps({**cfg, "crop_pct": 1.0})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data_config", _cfg_json(6000), "between 8 and 4096"),
        ("data_config", "{}", "bad data_config: data config lacks"),
        ("data_config", _cfg_json(64), "the graph takes 32"),
        ("model_kwargs", '{"num_classes": "ten"}', "out of range"),
        ("classes", "5", "'classes' must be a JSON list"),
        ("classes", "not json", "'classes' is not valid JSON"),
        ("format_version", "3", "version '3' is not supported"),
    ],
)
def test_tampered_onnx_metadata_is_refused_by_eval_and_inspect(
    tmp_path, digits_small, digits_student, key, value, message
):
    import onnx

    from equalbits_cli import load_model
    from equalbits_cli.export.onnx import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(load_model(digits_student), path)
    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    props[key] = value
    onnx.helper.set_model_props(m, props)
    onnx.save(m, str(path))
    for command in (["eval", path, "--data", digits_small, "--workers", "0"], ["inspect", path]):
        res = invoke_cli(*command)
        assert res.returncode == 2, (command, res.stderr)
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_memory_errors_name_the_size_and_batch():
    from equalbits_cli.train.evaluate import memory_errors

    cfg = DataConfig((3, 4096, 4096), "bicubic", (0.5,) * 3, (0.5,) * 3, 1.0)
    with pytest.raises(ValueError, match="out of memory at 4096x4096 images in batches of 64; lower `batch_size`"):
        with memory_errors(cfg, 64):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 26 GB")
    with pytest.raises(ValueError, match="out of memory"), memory_errors(cfg, 64):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="shape mismatch"), memory_errors(cfg, 64):
        raise RuntimeError("shape mismatch")
