"""The quickstart end to end (reduced: a smaller model, one epoch each), and the figures."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli
from typer.testing import CliRunner

from equalbits_cli.cli import app
from equalbits_cli.recipes.quickstart import ARTIFACTS


@pytest.mark.slow
def test_reduced_quickstart(tmp_path):
    out = tmp_path / "qs"
    res = run_cli(
        "quickstart", "--out", out, "--model", "resnet10t", "--teacher-epochs", "1", "--epochs", "1", "--json"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    for key in ("teacher_top1", "student_top1_before", "student_top1", "fp32_bytes", "packed_bytes", "seconds"):
        assert key in summary, key
    for name in ARTIFACTS.values():
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "digits").iterdir() if not p.name.startswith(".")) == ["train", "val"]
    assert summary["fp32_bytes"] / summary["packed_bytes"] > 10
    assert summary["entropy_bits"] == 1.0
    assert summary["student_top1"] > summary["student_top1_before"]
    # Every artifact is readable by the other commands.
    runner = CliRunner()
    for name in ("student.ft.safetensors", "student.packed.safetensors", "student.onnx"):
        r = runner.invoke(app, ["inspect", str(out / name), "--json"])
        assert r.exit_code == 0, r.output
    # A second run refuses to overwrite without --overwrite.
    res = run_cli("quickstart", "--out", out)
    assert res.returncode == 2 and "--overwrite" in res.stderr


def test_inspect_plot(tmp_path, binary_ckpt):
    png = tmp_path / "layers.png"
    res = CliRunner().invoke(app, ["inspect", str(binary_ckpt), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sweep_small(tmp_path, digits_small, digits_teacher):
    png = tmp_path / "sweep.png"
    res = CliRunner().invoke(
        app,
        [
            "sweep",
            "resnet10t",
            "--checkpoint",
            str(digits_teacher),
            "--data",
            str(digits_small),
            "--ratios",
            "0.1,0.5",
            "--methods",
            "ot,sign",
            "--epochs",
            "1",
            "--img-size",
            "32",
            "--workers",
            "0",
            "--batch-size",
            "32",
            "--plot",
            str(png),
            "--rows",
            str(tmp_path / "rows.jsonl"),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [(r["method"], r["ratio"]) for r in rows][:2] == [("ot", 0.1), ("ot", 0.5)]
    assert rows[1]["entropy_bits"] == 1.0 and rows[0]["entropy_bits"] < 0.5
    assert rows[2]["method"] == "sign" and 0 < rows[2]["ratio"] < 1
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_in_the_papers_setting_repeats_each_setting_per_seed(tmp_path, digits_small, digits_teacher):
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.recipes.sweep import run_sweep
    from equalbits_cli.report.stats import summarize_sweep

    cfg = FinetuneConfig(epochs=1, batch_size=32, workers=0, warmup_steps=2, calibrate_batches=1, seed=5)
    rows = run_sweep(
        "resnet10t",
        digits_small,
        ratios=[0.3],
        activations="sign",
        center=False,
        seeds=[0, 1],
        checkpoint=str(digits_teacher),
        finetune_config=cfg,
    )
    assert [(r["ratio"], r["center"], r["activations"], r["seed"]) for r in rows] == [
        (0.3, False, "sign", 0),
        (0.3, False, "sign", 1),
    ]
    (summary,) = summarize_sweep(rows)
    assert summary["seeds"] == 2 and summary["top1_mean"] == (rows[0]["top1"] + rows[1]["top1"]) / 2
    with pytest.raises(ValueError, match="at least one seed, each once"):
        run_sweep("resnet10t", digits_small, ratios=[0.3], seeds=[1, 1], checkpoint=str(digits_teacher))
