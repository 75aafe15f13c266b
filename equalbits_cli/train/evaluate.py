"""Evaluation: top-k accuracy, BatchNorm re-estimation, and ``eval`` of any model or file equalbits reads."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.config import DataConfig, DataOverrides, resolve_data_config
from ..data.folders import iterate
from ..errors import SettingError
from ..progress import Progress
from .distributed import resolve_device

__all__ = [
    "OnnxModule",
    "activation_batch",
    "evaluate",
    "evaluate_source",
    "onnx_module",
    "memory_errors",
    "recalibrate_bn",
]


def autocast_for(device: torch.device, enabled: bool):
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, amp: bool = False, progress: Progress | None = None
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and the number of samples. A binarized model, in the training
    or the packed form, is evaluated with the weights its packed form unpacks to, made once
    (:func:`equalbits_cli.nn.packed.float_model`), not once per batch; it is left in eval mode.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> loader = [(torch.eye(4)[:3], torch.tensor([0, 1, 2]))]
        >>> sorted(evaluate(model, loader, torch.device("cpu")))
        ['n', 'top1', 'top5']
    """
    from ..nn.layers import BinaryLayer
    from ..nn.packed import PackedBinary, float_model

    model.eval()
    if any(isinstance(m, (BinaryLayer, PackedBinary)) for m in model.modules()):
        model = float_model(model)
    correct1 = correct5 = n = 0
    for images, targets in iterate(loader):
        images, targets = images.to(device), targets.to(device)
        with autocast_for(device, amp):
            logits = model(images)
        logits = logits[0] if isinstance(logits, tuple) else logits
        k = min(5, logits.shape[1])
        top = logits.float().topk(k, dim=1).indices
        hits = top == targets[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        n += targets.numel()
        if progress is not None:
            progress.advance(1)
    if n == 0:
        raise ValueError("the validation split holds no images")
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, batches: int, device: torch.device, progress: Progress | None = None):
    """Re-estimate BatchNorm running statistics of ``model`` on ``batches`` batches (no training).

    Binarization changes every layer's output distribution; the stored running means and variances
    then no longer fit. A cumulative average over a few batches (``torch.optim.swa_utils.update_bn``)
    fixes much of the accuracy drop. Feed it un-augmented images: statistics taken on random crops do
    not fit the images the model is evaluated on.
    """
    from torch.optim.swa_utils import update_bn

    if batches == 0 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return

    def images():
        for batch, _ in itertools.islice(iterate(loader), batches):
            yield batch
            if progress is not None:
                progress.advance(1)

    update_bn(images(), model, device)
    model.eval()


def evaluate_source(
    model_or_file: str,
    data_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    data: DataOverrides | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    amp: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 on the val split of ``data_dir`` for a binarized checkpoint, a packed file, an ONNX
    export, or a full-precision timm model (a name, with ``checkpoint`` or pretrained weights).

    Images are prepared as the file records (the data config it was fine-tuned with), else as the model's
    ``pretrained_cfg`` says, with ``data``'s overrides on top. Only ``val/`` is needed.

    Returns:
        ``top1``, ``top5`` (percent), ``n`` (images) and ``data_config`` (what was used).

    Raises:
        ValueError / FileNotFoundError: bad inputs.
    """
    from ..data.folders import EpochSampler, check_classes, find_splits, make_loader, val_dataset
    from ..formats.latent import load_model
    from ..model.convert import create_model
    from ..paths import read_metadata

    dev = resolve_device(device)
    data = data or DataOverrides()
    path = Path(model_or_file)
    if path.suffix == ".onnx" and path.is_file():
        if amp:
            raise SettingError("`amp` applies to PyTorch models; an ONNX file runs as it was exported")
        model: nn.Module = onnx_module(path, data.img_size)
    elif path.is_file():
        meta = read_metadata(path) if path.suffix == ".safetensors" else {}
        if not str(meta.get("format", "")).startswith("equalbits."):
            raise SettingError(
                f"{path} is a plain state dict: pass the timm model name as `model_or_file`, the file as `checkpoint`"
            )
        model = load_model(path)
    elif path.exists():
        raise ValueError(f"{path} is not a file; pass a checkpoint file or a timm model name")
    elif path.suffix in (".safetensors", ".pth", ".pt", ".onnx"):
        raise FileNotFoundError(f"file not found: {path}")
    else:
        model = create_model(model_or_file, checkpoint=checkpoint, pretrained=checkpoint is None)
    cfg = resolve_data_config(model, data)
    recorded = (getattr(model, "equalbits_meta", None) or {}).get("classes")
    splits = find_splits(data_dir, need_train=False, classes=recorded)
    check_classes(splits, getattr(model, "num_classes", None), recorded is not None)
    val_ds = val_dataset(splits, cfg)
    loader = make_loader(val_ds, EpochSampler(len(val_ds), shuffle=False), batch_size, workers, drop_last=False)
    if isinstance(model, OnnxModule):
        dev = torch.device("cpu")  # onnxruntime's CPU provider: the tensors stay on the host
    model.to(dev)
    if progress is not None:
        progress.phase(f"evaluating at {cfg.describe()}", len(loader))
    with memory_errors(cfg, batch_size):
        result = evaluate(model, loader, dev, amp, progress)
    if progress is not None:
        progress.done()
    return {**result, "data_config": cfg.to_dict()}


@contextlib.contextmanager
def memory_errors(cfg: DataConfig, batch_size: int) -> Iterator[None]:
    """Turn running out of memory (host or device) into one line naming the image size and the batch.

    Raises:
        ValueError: the work inside ran out of memory.
    """
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError):
        raise ValueError(_out_of_memory(cfg, batch_size)) from None
    except RuntimeError as exc:
        text = str(exc).lower()
        if "can't allocate memory" not in text and "out of memory" not in text:
            raise
        raise ValueError(_out_of_memory(cfg, batch_size)) from None


def _out_of_memory(cfg: DataConfig, batch_size: int) -> str:
    return f"out of memory at {cfg.size}x{cfg.size} images in batches of {batch_size}; lower `batch_size` or `img_size`"


class OnnxModule(nn.Module):
    """An ONNX file equalbits wrote, run by onnxruntime behind a module's call, so that ``eval`` scores
    every export (float, packed, int8) with the same data pipeline and metric as the PyTorch models.

    ``equalbits_meta`` holds the data config and classes recorded in the file."""

    def __init__(self, path: Path, session, data_config: DataConfig, classes, num_classes: int | None) -> None:
        super().__init__()
        self.path = path
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.pretrained_cfg = data_config.transform_kwargs()
        self.num_classes = num_classes
        self.equalbits_meta = {"classes": classes, "data_config": data_config}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)


def onnx_module(path: Path, img_size: int | None = None) -> OnnxModule:
    """Open an equalbits ONNX file in onnxruntime (CPU) as an :class:`OnnxModule`.

    Its metadata is checked as ``inspect`` checks it (:func:`equalbits_cli.formats.onnx_file.read_onnx_info`).

    Raises:
        ValueError: not an ONNX file equalbits wrote, damaged metadata, or an ``img_size`` the graph
            cannot take.
    """
    import onnxruntime as ort

    from ..formats.onnx_file import read_onnx_info

    onnx_info = read_onnx_info(path)
    cfg = onnx_info.data_config
    if img_size is not None and img_size != cfg.size:
        raise SettingError(f"{path} takes {cfg.size}x{cfg.size} images; leave out `img_size` or export at {img_size}")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ValueError(f"{path}: onnxruntime cannot load the model: {first}") from None
    return OnnxModule(path, session, cfg, onnx_info.info.classes, onnx_info.num_classes)


def activation_batch(
    model: nn.Module, data_dir: str | os.PathLike, data: DataOverrides | None = None, n: int = 64
) -> torch.Tensor:
    """Up to ``n`` images of ``data_dir``'s val split, prepared for ``model`` (for inspect --data)."""
    from ..data.folders import EpochSampler, find_splits, make_loader, val_dataset

    recorded = (getattr(model, "equalbits_meta", None) or {}).get("classes")
    splits = find_splits(data_dir, need_train=False, classes=recorded)
    val = val_dataset(splits, resolve_data_config(model, data))
    loader = make_loader(val, EpochSampler(len(val), shuffle=True, seed=0), n, 0, drop_last=False)
    images, _ = next(iter(iterate(loader)))
    return images
