"""Shared fixtures: small timm models saved locally and loaded back through the real loading code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The property tests draw the same examples in every run (`make test`, CI): a red run is then the change's,
# not the draw's. HYPOTHESIS_PROFILE=explore draws new ones each run.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# Tests never reach the network: hub downloads fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Under pytest-xdist (`make test` runs one worker a core) every worker, and every process a test starts,
# computes on one thread: torch's threads spin while they wait, and two workers of two threads each on
# two cores ran 5-10x slower than one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
# Without a GPU the Triton kernels run in Triton's interpreter (tests/test_kernels.py). The variable is
# read when triton.language is first imported, so it is set here, before any test can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory) -> Path:
    """A small real ImageFolder: 40 train and 12 val images per class of the UCI digits, 32x32 RGB."""
    import shutil

    from equalbits_cli.data.builtin import make_digits_imagefolder

    full = make_digits_imagefolder(tmp_path_factory.mktemp("digits_full"))
    small = tmp_path_factory.mktemp("digits_small")
    for split, count in (("train", 40), ("val", 12)):
        for cls in sorted((full / split).iterdir()):
            dst = small / split / cls.name
            dst.mkdir(parents=True)
            for f in sorted(cls.iterdir())[:count]:
                shutil.copy(f, dst / f.name)
    return small


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory, digits_small) -> Path:
    """A full-precision resnet10t trained briefly on ``digits_small`` at 32x32 (the whole image), saved as a
    plain state dict that records its data config and accuracy, as ``quickstart``'s teacher does."""
    import timm

    from equalbits_cli.data.config import DataOverrides, resolve_data_config
    from equalbits_cli.model.convert import save_full_precision
    from equalbits_cli.train.finetune import train_classifier

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    digits = DataOverrides(img_size=32, crop_pct=1.0)
    result = train_classifier(model, digits_small, epochs=6, lr=3e-3, batch_size=32, data=digits, workers=0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    return save_full_precision(model, path, data_config=resolve_data_config(model, digits), top1=result["top1"])


@pytest.fixture(scope="session")
def digits_student(tmp_path_factory, digits_teacher) -> Path:
    """The teacher binarized at ratio 0.5, as a latent checkpoint."""
    from equalbits_cli import BinarizeConfig, binarize_model, save_checkpoint

    model = binarize_model("resnet10t", BinarizeConfig(), checkpoint=digits_teacher)
    return save_checkpoint(model, tmp_path_factory.mktemp("student") / "student.safetensors")
