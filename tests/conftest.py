"""Shared fixtures: small timm models saved locally and loaded back through the real loading code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach the network: hub downloads fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def resnet18_state(tmp_path_factory) -> Path:
    """A full-precision resnet18 (10 classes, random init) saved as a plain safetensors state dict."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp("fp") / "resnet18_fp.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def binary_ckpt(tmp_path_factory, resnet18_state) -> Path:
    """A binarized resnet18 latent checkpoint (ratio 0.5) written by save_checkpoint."""
    from equalbits_cli import BinarizeConfig, binarize_model, save_checkpoint

    model = binarize_model("resnet18", BinarizeConfig(), checkpoint=resnet18_state)
    return save_checkpoint(model, tmp_path_factory.mktemp("bin") / "r18.safetensors")
