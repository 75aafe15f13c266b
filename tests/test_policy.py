"""The layer policy: which layers are binarized, why the others are kept, and that files remember it."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from helpers import invoke_cli

from equalbits_cli import BinarizeConfig, LayerPolicy, binarize_, collect_stats, load_model, save_checkpoint
from equalbits_cli.model.policy import plan_layers
from equalbits_cli.nn.layers import BinaryLayer


def _reasons(model):
    return {p.name: p.reason for p in plan_layers(model)}


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "efficientnet_b0"])
def test_default_policy_keeps_stem_classifier_and_depthwise(name):
    model = timm.create_model(name, pretrained=False, num_classes=5)
    reasons = _reasons(model)
    keep_gates = {p.name: p.reason for p in plan_layers(model, LayerPolicy(gates=False))}
    modules = dict(model.named_modules())
    assert reasons["conv_stem"] == "stem" and reasons["classifier"] == "classifier"
    for n, reason in reasons.items():
        m = modules[n]
        depthwise = isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1
        assert (reason == "depthwise") == (depthwise and reason not in ("stem",)), n
        assert reason != "gate", "gates are binarized by default"
        assert (keep_gates[n] == "gate") == (".se." in n), n
    # the rules bind only what they name: every other conv is binarized
    assert any(r is None for r in reasons.values())


def test_include_exclude_and_their_errors():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    plans = {p.name: p for p in plan_layers(model, LayerPolicy(include=("conv1",), exclude=("layer4.*",)))}
    assert plans["conv1"].binarize, "--include overrides the stem rule"
    assert not plans["layer4.0.conv1"].binarize and plans["layer4.0.conv1"].reason == "excluded"
    assert plans["layer3.0.conv1"].binarize
    both = {p.name: p for p in plan_layers(model, LayerPolicy(include=("layer4.*",), exclude=("layer4.0.*",)))}
    assert both["layer4.0.conv1"].reason == "excluded", "exclude wins over include"
    with pytest.raises(ValueError, match="matches no Conv2d/Linear module; closest module names: layer4"):
        plan_layers(model, LayerPolicy(exclude=("layer44.*",)))
    with pytest.raises(ValueError, match="nothing to binarize"):
        binarize_(model, BinarizeConfig(), policy=LayerPolicy(exclude=("*",)))
    with pytest.raises(ValueError, match="non-empty"):
        LayerPolicy(include=("",))


def test_binarize_then_save_records_policy_and_reasons(tmp_path):
    """binarize_ on a plain model attaches what save_checkpoint needs; load_model honours the policy."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4)
    policy = LayerPolicy(exclude=("blocks.5.*",))
    binarize_(model, BinarizeConfig(ratio=0.4), policy=policy)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    want = [n for n, m in model.named_modules() if isinstance(m, BinaryLayer)]
    assert [n for n, m in loaded.named_modules() if isinstance(m, BinaryLayer)] == want
    assert loaded.equalbits_meta["kept"] == model.equalbits_meta["kept"]
    assert loaded.equalbits_meta["policy"] == policy
    stats = {s.name: s for s in collect_stats(loaded).layers}
    assert stats["blocks.5.0.conv"].kept_because == "excluded"
    assert stats["conv_stem"].kept_because == "stem"
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_cli_policy_options(tmp_path, resnet18_state):
    out = tmp_path / "r.safetensors"
    res = invoke_cli(
        "binarize",
        "resnet18",
        "--checkpoint",
        resnet18_state,
        "--exclude",
        "layer4.*",
        "--include",
        "conv1",
        "-o",
        out,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    layers = {layer["name"]: layer for layer in result["layers"]}
    assert layers["conv1"]["binarized"] and not layers["layer4.1.conv2"]["binarized"]
    assert layers["layer4.1.conv2"]["kept_because"] == "excluded"
    assert result["policy"]["exclude"] == ["layer4.*"]
    bad = tmp_path / "bad.safetensors"
    res = invoke_cli("binarize", "resnet18", "--checkpoint", resnet18_state, "--exclude", "layerx.*", "-o", bad)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "layerx.*" in res.stderr and "closest module names" in res.stderr and not bad.exists()
