"""Conversion of timm models of every family, and model loading with its errors."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from equalbits_cli import BinarizeConfig, BinaryConv2d, BinaryLinear, LayerPolicy, binarize_, create_model
from equalbits_cli.model.convert import excluded_names, load_state_dict_file
from equalbits_cli.nn.layers import BinaryLayer

ARCHS = [
    ("resnet18", 32),
    ("mobilenetv3_small_050", 32),
    ("efficientnet_b0", 32),
    ("convnext_atto", 32),
    ("vit_tiny_patch16_224", 32),
    ("deit_tiny_distilled_patch16_224", 32),
    ("regnetx_002", 32),
    ("ghostnet_100", 32),
    ("mixer_s16_224", 32),
]


@pytest.mark.parametrize(("name", "size"), ARCHS)
def test_binarize_every_family(name, size):
    kwargs = {"img_size": size} if name.startswith(("vit", "deit", "mixer")) else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    excluded = excluded_names(model)
    assert excluded, "stem and classifier come from pretrained_cfg"
    plain_before = {
        n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear) or type(m).__name__ == "Linear"
    }
    binarize_(model, BinarizeConfig(ratio=0.5), policy=LayerPolicy(depthwise=True, gates=True))
    modules = dict(model.named_modules())
    for n in plain_before:
        is_excluded = any(n == e or n.startswith(e + ".") for e in excluded)
        assert isinstance(modules[n], BinaryLayer) != is_excluded, n
        if is_excluded:
            assert model.equalbits_meta["kept"][n] in ("stem", "classifier")
    depthwise = [m for m in modules.values() if isinstance(m, BinaryConv2d) and m.groups > 1]
    if name in ("mobilenetv3_small_050", "efficientnet_b0", "convnext_atto"):
        assert depthwise, "depthwise convs are binarized too"
    if name.startswith(("vit", "deit")):
        assert isinstance(modules["blocks.0.attn.qkv"], BinaryLinear)
    model.train()
    x = torch.randn(2, 3, size, size)
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()
    for m in modules.values():
        if isinstance(m, BinaryLayer):
            assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()
            codes, _ = m.quantize()
            flat = codes.reshape(codes.shape[0], -1)
            assert ((flat == 1).sum(1) - (flat == -1).sum(1)).abs().max() <= 1


def test_custom_filter_and_idempotence():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    binarize_(model, BinarizeConfig(), filter_fn=lambda m, fqn: fqn.startswith("layer4"))
    names = [n for n, m in model.named_modules() if isinstance(m, BinaryLayer)]
    assert names and all(n.startswith("layer4") for n in names)
    binarize_(model, BinarizeConfig(), filter_fn=lambda m, fqn: fqn.startswith("layer4"))  # no double wrap
    assert [n for n, m in model.named_modules() if isinstance(m, BinaryLayer)] == names


def test_non_timm_model_falls_back_to_first_conv_last_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 8), nn.Linear(8, 2))
    binarize_(model, BinarizeConfig())
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "BinaryConv2d", "Flatten", "BinaryLinear", "Linear"]


def test_create_model_from_checkpoint_infers_classes(resnet18_state):
    model = create_model("resnet18", checkpoint=resnet18_state)
    assert model.fc.out_features == 10
    with pytest.raises(ValueError, match="pass `num_classes` 10"):
        create_model("resnet18", checkpoint=resnet18_state, num_classes=7)


def test_create_model_from_pth(tmp_path, resnet18_state):
    state = load_state_dict_file(resnet18_state)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, path)
    model = create_model("resnet18", checkpoint=path)
    torch.testing.assert_close(model.fc.weight, state["fc.weight"], rtol=0, atol=0)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        load_state_dict_file(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet_18"}, "unknown timm model 'resnet_18'; did you mean"),
        ({"name": "resnet18", "pretrained": True}, "pass `checkpoint` PATH"),
        ({"name": "resnet18", "checkpoint": "missing.safetensors"}, "checkpoint not found"),
        ({"name": "resnet50", "checkpoint": "R18"}, "does not fit timm model 'resnet50'"),
        ({"name": "resnet18", "num_classes": 0}, "between 1 and 1,000,000"),
    ],
)
def test_create_model_errors(kwargs, message, resnet18_state):
    if kwargs.get("checkpoint") == "R18":
        kwargs["checkpoint"] = resnet18_state
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        create_model(**kwargs)
