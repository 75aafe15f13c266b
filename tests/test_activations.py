"""1-bit activations: calibrated per-channel thresholds carry information, and survive every file format."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import invoke_cli
from safetensors.torch import load_file, save_file

from equalbits_cli import BinarizeConfig, binarize_model, load_model, save_checkpoint, save_packed
from equalbits_cli.export.onnx import export_onnx
from equalbits_cli.nn.layers import calibrate_thresholds
from equalbits_cli.report.inspect import activation_shares
from equalbits_cli.train.evaluate import activation_batch, recalibrate_bn


@pytest.fixture(scope="module")
def one_w_one_a(digits_teacher, digits_small):
    model = binarize_model("resnet10t", BinarizeConfig(activations="sign"), checkpoint=digits_teacher)
    images = activation_batch(model, digits_small, n=48)
    before = activation_shares(model, images)
    assert calibrate_thresholds(model, [images]) == len(before)
    recalibrate_bn(model, [(images, None)], 1, torch.device("cpu"))
    return model.eval(), images, before


def test_thresholds_balance_the_activation_bits(one_w_one_a):
    model, images, before = one_w_one_a
    assert max(before.values()) > 0.95, "at threshold 0 some post-ReLU layer sees (almost) only +1"
    after = activation_shares(model, images)
    assert set(after) == set(before)
    assert all(0.2 <= share <= 0.8 for share in after.values()), after


def test_thresholds_round_trip_through_files(tmp_path, one_w_one_a):
    model, images, _ = one_w_one_a
    x = images[:4]
    with torch.no_grad():
        want = model(x)
    for path in (save_checkpoint(model, tmp_path / "l.safetensors"), save_packed(model, tmp_path / "p.safetensors")):
        loaded = load_model(path)
        assert torch.equal(loaded.layer1[0].conv1.act_threshold, model.layer1[0].conv1.act_threshold)
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    result = export_onnx(model, tmp_path / "m.onnx", img_size=32)
    got = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    # a value within float error of its threshold may flip its bit: compare most outputs exactly
    close = np.abs(got - want.detach().numpy()) <= 1e-4 * float(want.max() - want.min())
    assert close.mean() >= 0.95


def test_version_1_files_without_thresholds_load_at_zero_and_bad_thresholds_are_refused(tmp_path, one_w_one_a):
    model, _, _ = one_w_one_a
    path = save_checkpoint(model, tmp_path / "l.safetensors")
    state = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    old = {k: v for k, v in state.items() if not k.endswith("act_threshold")}
    save_file(old, str(tmp_path / "old.safetensors"), metadata={**meta, "format_version": "1"})
    # equalbits 0.1 computed sign(x) at 0: read so, bit-exact (tests/test_formats.py has such a file)
    assert float(load_model(tmp_path / "old.safetensors").layer1[0].conv1.act_threshold.detach().abs().sum()) == 0
    save_file(old, str(tmp_path / "new.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="act_threshold"):  # a version-2 file must hold them
        load_model(tmp_path / "new.safetensors")
    bad = dict(state)
    bad["layer1.0.conv1.act_threshold"] = torch.full_like(bad["layer1.0.conv1.act_threshold"], float("nan"))
    save_file(bad, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="NaN or inf"):
        load_model(tmp_path / "nan.safetensors")
    bad["layer1.0.conv1.act_threshold"] = torch.zeros(3)
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="act_threshold"):
        load_model(tmp_path / "shape.safetensors")


@pytest.mark.parametrize("binarize_depthwise", [False, True])
def test_uncalibrated_mobilenetv3_1w1a_exports(tmp_path, binarize_depthwise):
    """A freshly binarized 1W/1A MobileNetV3 (thresholds never calibrated) exports: its many exact-zero
    inputs (hard-swish below its knee, cancelling +-1 sums) do not sit on the threshold, so onnxruntime's
    rounding cannot flip them. Before 0.5 the thresholds started at 0 and 0% of samples matched."""
    from equalbits_cli import LayerPolicy

    policy = LayerPolicy(depthwise=binarize_depthwise)
    model = binarize_model("mobilenetv3_small_100", BinarizeConfig(activations="sign"), num_classes=10, policy=policy)
    weights = "float" if binarize_depthwise else "packed"  # each form once: both ran the same graph in 0.5
    result = export_onnx(model.eval(), tmp_path / f"{weights}.onnx", weights=weights, img_size=64)
    # Exact zeros flipped every sample (0% matched before 0.5). A continuous input within float rounding
    # of its threshold may still flip one (what MIN_MATCHED allows): it did for one sample in 16 with
    # 0.11's scales, summed in another order than 0.10's.
    assert result.matched >= 15 / 16, weights


def _real(model) -> set[str]:
    from equalbits_cli.nn.layers import BinaryLayer

    return {n for n, m in model.named_modules() if isinstance(m, BinaryLayer) and m.act_threshold is None}


def test_input_policy_keeps_pooled_layers_real_and_binarizes_the_rest(digits_teacher):
    from equalbits_cli import LayerPolicy

    cfg = BinarizeConfig(activations="sign")
    model = binarize_model("mobilenetv3_small_100", cfg, num_classes=10)
    real = model.equalbits_meta["real_inputs"]
    pooled = {n for n, _ in model.named_modules() if ".se.conv_" in n} | {"conv_head"}
    first = {f"blocks.{i}.0.conv_{k}" for i in range(1, 5) for k in ("pw", "pwl")}
    first |= {"blocks.0.0.conv_pw", "blocks.5.0.conv"}
    bottleneck = {f"blocks.{i}.{j}.conv_pw" for i, j in ((1, 1), (2, 1), (2, 2), (3, 1), (4, 1), (4, 2))}
    assert set(real) == pooled | first | bottleneck == _real(model)
    assert {real[n] for n in pooled} == {"pooled"} and {real[n] for n in first} == {"no shortcut"}
    assert {real[n] for n in bottleneck} == {"bottleneck"}
    # the layer computes on its real input: the same output as the float conv with its binary weight
    head = model.conv_head
    x = torch.randn(2, head.in_channels, 1, 1)
    with torch.no_grad():
        want = torch.nn.functional.conv2d(x, head.eval().quantized_weight(), head.bias)
        torch.testing.assert_close(head(x), want, rtol=0, atol=0)
    # ResNet: the shortcut projections; its stage-4 convolutions see 1x1 maps at 32x32, but they are
    # not pooled: not at the model's own size
    shortcuts = {f"layer{i}.0.downsample.0": "shortcut" for i in (2, 3, 4)}
    assert binarize_model("resnet18", cfg, num_classes=10).equalbits_meta["real_inputs"] == shortcuts
    small = binarize_model("resnet10t", cfg, checkpoint=digits_teacher)  # recorded input size 32x32
    assert small.pretrained_cfg["input_size"][-1] == 32
    assert set(small.equalbits_meta["real_inputs"].values()) == {"shortcut"}
    every = LayerPolicy(all_binary_inputs=True)
    everything = binarize_model("mobilenetv3_small_100", cfg, num_classes=10, policy=every)
    assert _real(everything) == set() and everything.equalbits_meta["real_inputs"] == {}
    pattern = LayerPolicy(all_binary_inputs=True, real_inputs=("blocks.1.*.conv_pwl",))
    chosen = binarize_model("mobilenetv3_small_100", cfg, num_classes=10, policy=pattern).equalbits_meta
    assert chosen["real_inputs"] == {"blocks.1.0.conv_pwl": "pattern", "blocks.1.1.conv_pwl": "pattern"}
    with pytest.raises(ValueError, match="real_inputs.*matches no binarized layer"):
        binarize_model("resnet18", cfg, num_classes=10, policy=LayerPolicy(real_inputs=("nothing.*",)))
    assert binarize_model("mobilenetv3_small_100", num_classes=10).equalbits_meta["real_inputs"] == {}


def test_real_inputs_round_trip_and_old_files_keep_every_input_binary(tmp_path):
    from safetensors import safe_open

    from equalbits_cli import LayerPolicy
    from equalbits_cli.report.inspect import inspect_file
    from equalbits_cli.report.packed_report import packed_report

    cfg = BinarizeConfig(activations="sign")
    model = binarize_model("mobilenetv3_small_100", cfg, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    packed = save_packed(model, tmp_path / "p.safetensors")
    for path in (save_checkpoint(model, tmp_path / "l.safetensors"), packed):
        loaded = load_model(path).eval()
        assert loaded.equalbits_meta["real_inputs"] == model.equalbits_meta["real_inputs"]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    # inspect says which layers compute on real inputs, the torch and the numpy reader alike
    for report in (inspect_file(packed), packed_report(packed)):
        inputs = {s.name: s.inputs for s in report.stats.layers if s.binarized}
        assert inputs["conv_head"] == "real (pooled)" and inputs["blocks.1.1.conv_pwl"] == "1-bit"
    # a 1W/1A file written before the input policy (no real_inputs) keeps every input binary
    old = binarize_model("mobilenetv3_small_100", cfg, num_classes=10, policy=LayerPolicy(all_binary_inputs=True))
    path = save_checkpoint(old, tmp_path / "old.safetensors")
    with safe_open(str(path), "pt") as f:
        assert "real_inputs" not in f.metadata()
    assert _real(load_model(path)) == set()


@pytest.mark.parametrize(
    "real, match",
    [({"nothing": "pooled"}, "real_inputs"), ({"conv_head": "why"}, "real_inputs"), ("[1]", "real_inputs")],
)
def test_bad_real_inputs_metadata_is_one_line(tmp_path, real, match):
    import json

    from safetensors import safe_open

    model = binarize_model("mobilenetv3_small_100", BinarizeConfig(activations="sign"), num_classes=10)
    path = save_packed(model, tmp_path / "p.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    meta["real_inputs"] = real if isinstance(real, str) else json.dumps(real)
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=match) as err:
        load_model(tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value)


def test_thresholds_of_linear_layers_on_tokens_are_per_feature():
    """A ViT's linear layers see (batch, tokens, features): each feature gets its own threshold (the
    calibration read the token axis as channels and failed before 0.9)."""
    import timm

    from equalbits_cli.model.convert import binarize_

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    binarize_(model, BinarizeConfig(activations="sign"))
    images = torch.randn(8, 3, 32, 32)
    assert calibrate_thresholds(model, [images]) == 4 * 12  # qkv, proj, fc1, fc2 of 12 blocks
    assert model.blocks[0].attn.qkv.act_threshold.shape == (192,)
    shares = activation_shares(model.eval(), images)
    assert all(0.2 <= s <= 0.8 for s in shares.values()), shares


def test_real_inputs_options_need_binary_activations(tmp_path):
    r = invoke_cli("binarize", "resnet18", "--no-pretrained", "--real-inputs", "layer1.*", "-o", tmp_path / "c")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --real-inputs and --all-binary-inputs need --activations sign"
    assert not (tmp_path / "c").exists()
