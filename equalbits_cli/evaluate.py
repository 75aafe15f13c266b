"""Evaluation: top-k accuracy, BatchNorm re-estimation, and ``eval`` of any model or file equalbits reads."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import resolve_device
from .progress import Progress

__all__ = ["OnnxModule", "activation_batch", "evaluate", "evaluate_source", "onnx_module", "recalibrate_bn"]


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _batches(loader):
    """Iterate a loader, turning a worker's wrapped error back into its one-line message."""
    try:
        yield from loader
    except Exception as exc:
        # DataLoader re-raises a worker's error with a multi-line "Caught ... Original Traceback" message.
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        for line in reversed(text.splitlines()):
            if line.startswith("ValueError: "):
                raise ValueError(line[len("ValueError: ") :]) from None
        raise


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, amp: bool = False, progress: Progress | None = None
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and the number of samples.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> loader = [(torch.eye(4)[:3], torch.tensor([0, 1, 2]))]
        >>> sorted(evaluate(model, loader, torch.device("cpu")))
        ['n', 'top1', 'top5']
    """
    model.eval()
    correct1 = correct5 = n = 0
    for images, targets in _batches(loader):
        images, targets = images.to(device), targets.to(device)
        with _autocast(device, amp):
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
        for batch, _ in itertools.islice(_batches(loader), batches):
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
    img_size: int | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    amp: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 on the val split of ``data_dir`` for a binarized checkpoint, a packed file, or a
    full-precision timm model (a name, with ``checkpoint`` or pretrained weights).

    Raises:
        ValueError / FileNotFoundError: bad inputs.
    """
    from .convert import create_model
    from .data import EpochSampler, build_datasets, check_classes, find_splits, make_loader
    from .io import load_model, read_metadata

    dev = resolve_device(device)
    if img_size is not None and not 8 <= img_size <= 4096:
        raise ValueError(f"--img-size must be between 8 and 4096 pixels, got {img_size}")
    path = Path(model_or_file)
    if path.suffix == ".onnx" and path.is_file():
        if amp:
            raise ValueError("--amp applies to PyTorch models; an ONNX file runs as it was exported")
        model = onnx_module(path, img_size)
        img_size = None  # the file's own data config already holds its input size
    elif path.is_file():
        meta = read_metadata(path) if path.suffix == ".safetensors" else {}
        if not str(meta.get("format", "")).startswith("equalbits."):
            raise ValueError(
                f"{path} is a plain state dict: pass the timm model name as MODEL and the file as --checkpoint"
            )
        model = load_model(path)
    elif path.exists():
        raise ValueError(f"{path} is not a file; pass a checkpoint file or a timm model name")
    elif path.suffix in (".safetensors", ".pth", ".pt", ".onnx"):
        raise FileNotFoundError(f"file not found: {path}")
    else:
        model = create_model(model_or_file, checkpoint=checkpoint, pretrained=checkpoint is None)
    recorded = (getattr(model, "equalbits_meta", None) or {}).get("classes")
    splits = find_splits(data_dir, need_train=False, classes=recorded)
    check_classes(splits, getattr(model, "num_classes", None), recorded is not None)
    _, val_ds = build_datasets(splits, model, img_size, augment="none", seed=0)
    loader = make_loader(val_ds, EpochSampler(len(val_ds), shuffle=False), batch_size, workers, drop_last=False)
    if isinstance(model, OnnxModule):
        dev = torch.device("cpu")  # onnxruntime's CPU provider: the tensors stay on the host
    model.to(dev)
    if progress is not None:
        progress.phase("evaluating", len(loader))
    result = evaluate(model, loader, dev, amp, progress)
    if progress is not None:
        progress.done()
    return result


class OnnxModule(nn.Module):
    """An ONNX file equalbits wrote, run by onnxruntime behind a module's call, so that ``eval`` scores
    every export (float, packed, int8) with the same data pipeline and metric as the PyTorch models.

    ``pretrained_cfg`` is the data config recorded in the file; ``equalbits_meta`` holds its classes."""

    def __init__(self, path: Path, session, meta: dict, data_config: dict, num_classes: int | None) -> None:
        super().__init__()
        self.path = path
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.pretrained_cfg = data_config
        self.num_classes = num_classes
        classes = meta.get("classes")
        self.equalbits_meta = {"classes": json.loads(classes) if classes else None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)


def onnx_module(path: Path, img_size: int | None = None) -> OnnxModule:
    """Open an equalbits ONNX file in onnxruntime (CPU) as an :class:`OnnxModule`.

    Raises:
        ValueError: not an ONNX file equalbits wrote, external data, or an ``img_size`` the graph cannot take.
    """
    import onnxruntime as ort

    from .onnx_export import read_equalbits_onnx

    m, meta = read_equalbits_onnx(path)
    dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    if "data_config" in meta:
        try:
            cfg = json.loads(meta["data_config"])
            cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{path}: metadata 'data_config' is not valid JSON") from None
    else:  # files from before 0.3: the model's own config, at the graph's input size
        from .files import build_model, file_info

        info = file_info(path, {**meta, "format": "equalbits.packed"})
        cfg = dict(getattr(build_model(info), "pretrained_cfg", None) or {})
        if len(dims) == 4 and dims[2] > 0:
            cfg["input_size"] = (dims[1], dims[2], dims[3])
    size = tuple(cfg.get("input_size", ()))[-1:] or (None,)
    if img_size is not None and img_size != size[0]:
        raise ValueError(f"{path} takes {size[0]}x{size[0]} images; leave out --img-size or export at {img_size}")
    try:
        kwargs = json.loads(meta.get("model_kwargs") or "{}")
    except json.JSONDecodeError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: metadata 'model_kwargs' is not a JSON object")
    out_dims = [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
    num_classes = kwargs.get("num_classes") or (out_dims[-1] if out_dims and out_dims[-1] > 0 else None)
    del m
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ValueError(f"{path}: onnxruntime cannot load the model: {first}") from None
    return OnnxModule(path, session, meta, cfg, num_classes)


def activation_batch(model: nn.Module, data_dir: str | os.PathLike, img_size: int | None, n: int = 64) -> torch.Tensor:
    """Up to ``n`` images of ``data_dir``'s val split, transformed for ``model`` (for inspect --data)."""
    from .data import EpochSampler, build_datasets, find_splits, make_loader

    recorded = (getattr(model, "equalbits_meta", None) or {}).get("classes")
    splits = find_splits(data_dir, need_train=False, classes=recorded)
    _, val = build_datasets(splits, model, img_size, "none", 0)
    loader = make_loader(val, EpochSampler(len(val), shuffle=True, seed=0), n, 0, drop_last=False)
    images, _ = next(iter(_batches(loader)))
    return images
