"""Training and evaluation loops: distillation fine-tune, BatchNorm re-estimation, top-k evaluation.

No printing here: progress goes to a :class:`Progress` object (the CLI renders it with rich).
Multi-process training runs under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on GPU);
only rank 0 evaluates, writes and reports.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .config import FinetuneConfig
from .distill import distillation_loss

__all__ = [
    "FinetuneResult",
    "Interrupted",
    "Progress",
    "NullProgress",
    "evaluate",
    "recalibrate_bn",
    "finetune",
    "state_path_for",
    "codes_checksum",
]

STATE_FORMAT = "equalbits.train_state"
STATE_VERSION = 1


class Progress(Protocol):
    """Receives progress from the loops. Every method may be a no-op."""

    def phase(self, text: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1, **fields: Any) -> None: ...
    def done(self) -> None: ...


class NullProgress:
    def phase(self, text: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def done(self) -> None:
        pass


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving its state; the message says how to resume."""


@dataclass(frozen=True)
class FinetuneResult:
    teacher_top1: float
    student_top1_before: float
    student_top1_calibrated: float | None
    student_top1: float
    student_top5: float
    epochs: int
    steps: int
    output: str
    seconds: float
    world_size: int
    codes_checksum: int
    codes_identical_across_ranks: bool
    resumed_from_step: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


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
    then no longer fit. A cumulative average over a few batches fixes much of the accuracy drop.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or batches == 0:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for i, (images, _) in enumerate(_batches(loader)):
            if i >= batches:
                break
            model(images.to(device))
            if progress is not None:
                progress.advance(1)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()


def state_path_for(output: str | os.PathLike) -> Path:
    """Where the training state of a fine-tune writing ``output`` lives."""
    return Path(str(output) + ".train-state.pt")


def codes_checksum(model: nn.Module) -> int:
    """A checksum of every binarized layer's codes (equal codes give equal checksums)."""
    from .layers import BinaryLayer

    total = 0
    for i, m in enumerate(m for m in model.modules() if isinstance(m, BinaryLayer)):
        codes = m.quantize()[0].reshape(-1).to(torch.int64).cpu()
        weights = torch.arange(codes.numel(), dtype=torch.int64) % 65_521 + 1
        total = (total * 1_000_003 + int((codes + 2).mul(weights).sum()) + i) % (2**61 - 1)
    return total


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on latent binary weights (it would pull them to 0 and flip codes at random),
    nor on norms and biases; the usual decay on the other full-precision weights."""
    from .layers import BinaryLayer

    latent = {id(m.weight) for m in model.modules() if isinstance(m, BinaryLayer)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in latent or p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _dist_setup(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume at {path}; run without --resume to start afresh")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path}: corrupt training state ({first}); delete it and run without --resume") from None
    required = {"format", "version", "model", "optimizer", "scheduler", "step", "epoch", "batch", "rng"}
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not required <= set(state):
        raise ValueError(f"{path}: not an equalbits training state; delete it and run without --resume")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state['version']} is not supported")
    return state


def _save_state(path: Path, payload: dict[str, Any]) -> None:
    from .io import atomic_write

    with atomic_write(path) as tmp:
        torch.save(payload, str(tmp))


def _teacher_for(student_meta: dict[str, Any], teacher: str | None, num_classes: int) -> nn.Module:
    from .convert import create_model

    if teacher is None:
        source = student_meta.get("source") or {}
        name = source.get("model") or student_meta["model"]
        ckpt = source.get("checkpoint")
        if ckpt is not None:
            if not Path(ckpt).is_file():
                raise ValueError(
                    f"the student's full-precision source {ckpt} is gone; pass --teacher NAME_OR_CHECKPOINT"
                )
            return create_model(name, checkpoint=ckpt)
        if source.get("pretrained"):
            return create_model(name, pretrained=True, num_classes=num_classes)
        raise ValueError(
            "the student was binarized from a randomly initialized model, which is no teacher; "
            "pass --teacher NAME_OR_CHECKPOINT"
        )
    if Path(teacher).is_file():
        return create_model(student_meta["model"], checkpoint=teacher)
    return create_model(teacher, pretrained=True, num_classes=num_classes)


def finetune(
    student_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    config: FinetuneConfig,
    *,
    output: str | os.PathLike,
    teacher: str | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> FinetuneResult | None:
    """Distil a binarized student from its full-precision teacher on an ImageFolder dataset.

    Args:
        student_path: A binarized latent checkpoint (``binarize`` output).
        data_dir: ImageFolder root with ``train/`` and ``val/``.
        config: Hyper-parameters.
        output: The fine-tuned checkpoint to write (its training state goes next to it).
        teacher: A timm name (pretrained) or a full-precision state dict file; default: the model the
            student was binarized from, as its metadata records.
        resume: Continue from the training state of ``output``.
        progress: Receives progress; default none.

    Returns:
        The result on rank 0; None on other ranks.

    Raises:
        ValueError / FileNotFoundError: bad inputs. Interrupted: Ctrl-C (state saved).
    """
    from .data import EpochSampler, build_datasets, find_splits, make_loader
    from .io import LATENT_FORMAT, load_model, read_metadata, save_checkpoint

    progress = progress or NullProgress()
    started = time.perf_counter()
    device = resolve_device(config.device)
    rank, world = _dist_setup(device)
    output = Path(output)
    state_path = state_path_for(output)
    state = _load_state(state_path) if resume else None

    splits = find_splits(data_dir)
    fmt = read_metadata(student_path).get("format")
    if fmt != LATENT_FORMAT:
        raise ValueError(f"{student_path}: fine-tuning needs a latent checkpoint (from binarize), not {fmt}")
    student = load_model(student_path)
    num_classes = int(student.equalbits_meta["model_kwargs"].get("num_classes", 0)) or None
    if num_classes is not None and len(splits.classes) > num_classes:
        raise ValueError(
            f"the data has {len(splits.classes)} classes but the model's classifier has {num_classes}; "
            f"binarize with --num-classes {len(splits.classes)}"
        )
    teacher_model = _teacher_for(student.equalbits_meta, teacher, num_classes or len(splits.classes))
    train_ds, val_ds = build_datasets(splits, student, config.img_size, config.augment, config.seed)
    if len(train_ds) < config.batch_size * world:
        raise ValueError(
            f"train/ has {len(train_ds)} images, fewer than one batch ({config.batch_size} x {world} processes); "
            "lower --batch-size"
        )
    train_sampler = EpochSampler(len(train_ds), shuffle=True, seed=config.seed, rank=rank, world=world)
    train_loader = make_loader(train_ds, train_sampler, config.batch_size, config.workers, drop_last=True)
    val_loader = make_loader(
        val_ds, EpochSampler(len(val_ds), shuffle=False), config.batch_size, config.workers, drop_last=False
    )
    calib_sampler = EpochSampler(len(train_ds), shuffle=True, seed=config.seed + 1)
    calib_loader = make_loader(train_ds, calib_sampler, config.batch_size, config.workers, drop_last=True)
    student.to(device)
    teacher_model.to(device).eval()
    for p in teacher_model.parameters():
        p.requires_grad_(False)

    steps_per_epoch = len(train_sampler) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    warmup = min(config.warmup_steps, total_steps // 10)
    optimizer = torch.optim.AdamW(_param_groups(student, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup))

    evals: dict[str, Any] = {}
    if state is None:
        if rank == 0:
            progress.phase("evaluating teacher", len(val_loader))
            evals["teacher_top1"] = evaluate(teacher_model, val_loader, device, config.amp, progress)["top1"]
            progress.phase("evaluating binarized student", len(val_loader))
            evals["student_top1_before"] = evaluate(student, val_loader, device, config.amp, progress)["top1"]
        evals["student_top1_calibrated"] = None
        if config.calibrate_batches:
            n_calib = min(config.calibrate_batches, len(calib_loader))
            progress.phase(f"re-estimating BatchNorm statistics on {n_calib} batches", n_calib)
            recalibrate_bn(student, calib_loader, n_calib, device, progress)
            if rank == 0:
                progress.phase("evaluating calibrated student", len(val_loader))
                evals["student_top1_calibrated"] = evaluate(student, val_loader, device, config.amp, progress)["top1"]
        step, epoch, batch_in_epoch, resumed = 0, 0, 0, None
    else:
        try:
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or ["mismatch"])[0]
            raise ValueError(f"{state_path}: does not fit this student or settings ({first})") from None
        torch.set_rng_state(state["rng"])
        evals = dict(state.get("evals", {}))
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch"])
        resumed = step

    model: nn.Module = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )

    def save_state(epoch_: int, batch_: int) -> None:
        if rank == 0:
            _save_state(
                state_path,
                {
                    "format": STATE_FORMAT,
                    "version": STATE_VERSION,
                    "model": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "epoch": epoch_,
                    "batch": batch_,
                    "rng": torch.get_rng_state(),
                    "evals": evals,
                    "config": config.to_json(),
                },
            )

    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    try:
        while epoch < config.epochs:
            train_sampler.epoch = train_ds.epoch = epoch
            train_sampler.start = batch_in_epoch * config.batch_size
            model.train()
            progress.phase(f"epoch {epoch + 1}/{config.epochs}", steps_per_epoch)
            progress.advance(batch_in_epoch)
            tick = time.perf_counter()
            for images, targets in _batches(train_loader):
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                with torch.no_grad(), _autocast(device, config.amp):
                    t_logits = teacher_model(images)
                with _autocast(device, config.amp):
                    s_logits = model(images)
                loss = distillation_loss(s_logits, t_logits, targets, config.temperature, config.alpha)
                if not torch.isfinite(loss):
                    raise ValueError(f"loss became {float(loss)} at step {step}; lower --lr or turn off --amp")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                batch_in_epoch += 1
                now = time.perf_counter()
                progress.advance(1, loss=float(loss.detach()), img_s=len(images) * world / max(now - tick, 1e-9))
                tick = now
                if step % config.save_every == 0:
                    save_state(epoch, batch_in_epoch)
            epoch += 1
            batch_in_epoch = 0
            save_state(epoch, 0)
    except KeyboardInterrupt:
        save_state(epoch, batch_in_epoch)
        raise Interrupted(
            f"interrupted at step {step}; training state saved to {state_path}; continue with the same "
            "command and --resume"
        ) from None

    checksum = codes_checksum(student)
    identical = True
    if world > 1:
        import torch.distributed as dist

        sums = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sums, torch.tensor([checksum], dtype=torch.int64))
        identical = len({int(s) for s in sums}) == 1
    if rank != 0:
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        return None
    progress.phase("evaluating fine-tuned student", len(val_loader))
    final = evaluate(student, val_loader, device, config.amp, progress)
    result = FinetuneResult(
        teacher_top1=evals["teacher_top1"],
        student_top1_before=evals["student_top1_before"],
        student_top1_calibrated=evals.get("student_top1_calibrated"),
        student_top1=final["top1"],
        student_top5=final["top5"],
        epochs=config.epochs,
        steps=step,
        output=str(output),
        seconds=time.perf_counter() - started,
        world_size=world,
        codes_checksum=checksum,
        codes_identical_across_ranks=identical,
        resumed_from_step=resumed,
    )
    student.cpu()
    save_checkpoint(
        student,
        output,
        extra={
            "finetune": json.dumps(
                {
                    **json.loads(config.to_json()),
                    **{k: v for k, v in result.to_dict().items() if k.startswith(("teacher", "student"))},
                }
            )
        },
    )
    state_path.unlink(missing_ok=True)
    progress.done()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


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
    from .data import EpochSampler, build_datasets, find_splits, make_loader
    from .io import load_model, read_metadata

    dev = resolve_device(device)
    splits = find_splits(data_dir, need_train=False)
    path = Path(model_or_file)
    if path.is_file():
        meta = read_metadata(path) if path.suffix == ".safetensors" else {}
        if not str(meta.get("format", "")).startswith("equalbits."):
            raise ValueError(
                f"{path} is a plain state dict: pass the timm model name as MODEL and the file as --checkpoint"
            )
        model = load_model(path)
    elif path.suffix in (".safetensors", ".pth", ".pt", ".onnx"):
        raise FileNotFoundError(f"file not found: {path}")
    else:
        model = create_model(model_or_file, checkpoint=checkpoint, pretrained=checkpoint is None)
    _, val_ds = build_datasets(splits, model, img_size, augment=False, seed=0)
    loader = make_loader(val_ds, EpochSampler(len(val_ds), shuffle=False), batch_size, workers, drop_last=False)
    model.to(dev)
    if progress is not None:
        progress.phase("evaluating", len(loader))
    result = evaluate(model, loader, dev, amp, progress)
    if progress is not None:
        progress.done()
    return result


__all__ += ["evaluate_source"]


def train_classifier(
    model: nn.Module,
    data_dir: str | os.PathLike,
    *,
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 64,
    img_size: int | None = None,
    workers: int = 0,
    seed: int = 0,
    device: str = "auto",
    progress: Progress | None = None,
) -> dict[str, float]:
    """Train a full-precision model with label cross-entropy (AdamW, warm-up + cosine). Returns the
    final val accuracy. Used by ``quickstart`` to make a teacher when no pretrained one is at hand."""
    from .data import EpochSampler, build_datasets, find_splits, make_loader

    progress = progress or NullProgress()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    splits = find_splits(data_dir)
    train_ds, val_ds = build_datasets(splits, model, img_size, augment=False, seed=seed)
    sampler = EpochSampler(len(train_ds), shuffle=True, seed=seed)
    loader = make_loader(train_ds, sampler, batch_size, workers, drop_last=True)
    val_loader = make_loader(val_ds, EpochSampler(len(val_ds), shuffle=False), batch_size, workers, drop_last=False)
    model.to(dev)
    total = epochs * len(loader)
    optimizer = torch.optim.AdamW(_param_groups(model, 1e-4), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, min(50, total // 10)))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        sampler.epoch = epoch
        model.train()
        progress.phase(f"teacher epoch {epoch + 1}/{epochs}", len(loader))
        tick = time.perf_counter()
        for images, targets in _batches(loader):
            images, targets = images.to(dev), targets.to(dev)
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            now = time.perf_counter()
            progress.advance(1, loss=float(loss.detach()), img_s=len(images) / max(now - tick, 1e-9))
            tick = now
    progress.phase("evaluating teacher", len(val_loader))
    return evaluate(model, val_loader, dev, progress=progress)


__all__ += ["train_classifier"]
