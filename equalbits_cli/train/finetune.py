"""Training and evaluation loops: distillation fine-tune, BatchNorm re-estimation, top-k evaluation.

No printing here: progress goes to a :class:`Progress` object (the CLI renders it with rich).
Multi-process training runs under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on GPU,
one GPU per local rank); only rank 0 evaluates, writes and reports. The pieces come from the field's
libraries where they fit: timm's optimizer factory and cosine scheduler, timm.data's transforms,
``torch.optim.swa_utils.update_bn`` for BatchNorm statistics. The distillation loss stays our own
small function (:mod:`equalbits_cli.train.distill`): timm's distillation task owns the forward pass and
the teacher, which would hide the per-step loss we log and the resumable state we save.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import FinetuneConfig
from ..data.config import DataConfig, DataOverrides, resolve_data_config
from ..data.folders import iterate
from ..errors import Interrupted, SettingError
from ..paths import check_log_path
from ..progress import NullProgress, Progress
from .distill import distillation_loss, match_normalization, teacher_for
from .distributed import all_equal, barrier, dist_setup, resolve_device
from .evaluate import autocast_for, evaluate, recalibrate_bn
from .state import (
    STATE_FORMAT,
    STATE_VERSION,
    check_resume_config,
    check_resume_identity,
    load_state,
    remove_stale_temporaries,
    run_identity,
    save_state,
    state_path_for,
)
from .teacher_cache import DEFAULT_BOUND, TeacherCache

__all__ = ["LOG_EVERY", "FinetuneResult", "codes_checksum", "finetune", "teacher_warnings", "train_classifier"]


class _Terminated(BaseException):
    """Raised inside the loop by the SIGTERM handler (what schedulers and ``kill`` send)."""


@dataclass(frozen=True)
class FinetuneResult:
    teacher_top1: float | None
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
    history: list[dict[str, Any]] = field(default_factory=list)
    data_config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def codes_checksum(model: nn.Module) -> int:
    """A 63-bit checksum (BLAKE2b) of every binarized layer's codes and shape, in order: equal codes give
    equal checksums."""
    import hashlib

    from ..nn.layers import BinaryLayer

    digest = hashlib.blake2b(digest_size=8)
    for m in model.modules():
        if isinstance(m, BinaryLayer):
            codes = m.quantize()[0].contiguous().cpu()
            digest.update(repr(tuple(codes.shape)).encode())
            digest.update(codes.numpy())
    return int.from_bytes(digest.digest(), "little") >> 1  # fits an int64 (compared across ranks as one)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on latent binary weights (it would pull them to 0 and flip codes at random),
    nor on norms and biases; the usual decay on the other full-precision weights. timm's
    ``filter_bias_and_bn`` knows the second rule, not the first, so the groups are built here."""
    from ..nn.layers import BinaryLayer

    latent = {id(m.weight) for m in model.modules() if isinstance(m, BinaryLayer)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in latent or p.dim() <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer_and_schedule(
    model: nn.Module, lr: float, weight_decay: float, total_steps: int, warmup: int, fused: bool = False
):
    """AdamW from timm's factory, and timm's cosine schedule with linear warm-up, stepped per update.

    ``fused``: torch's fused AdamW. On CUDA it also takes the AMP scaler's inf check on the device, so
    that ``GradScaler.step`` does not wait for the device to decide whether to skip the step; on the CPU
    it is 5x faster than the per-parameter loop (resnet18's 11M parameters, 2 threads: 5.7 ms a step
    against 30.4 ms, the share of the step the exact quantizer costs)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    extra = {"fused": True} if fused else {}
    optimizer = create_optimizer_v2(
        _param_groups(model, weight_decay), opt="adamw", lr=lr, weight_decay=weight_decay, **extra
    )
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps),
        lr_min=0.0,
        warmup_t=warmup,
        warmup_lr_init=lr * 0.01,
        t_in_epochs=False,
    )
    return optimizer, scheduler


@dataclass
class _Run:
    """Everything a fine-tune holds while it runs."""

    config: FinetuneConfig
    device: torch.device
    rank: int
    world: int
    student: nn.Module
    model: nn.Module  # the student, wrapped in DDP when world > 1
    teacher: nn.Module | None
    data_config: DataConfig
    teacher_top1_recorded: float | None
    train_ds: Any
    train_sampler: Any
    train_loader: Any
    val_loader: Any
    calib_loader: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    steps_per_epoch: int
    total_steps: int
    state_path: Path
    progress: Progress
    log: Any = None  # open JSON-lines file, rank 0
    step: int = 0
    epoch: int = 0
    batch: int = 0
    evals: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    identity: dict[str, str] = field(default_factory=dict)  # what the training state is for
    teacher_cache: TeacherCache | None = None
    last_eval: tuple[int, dict[str, float]] | None = None  # (step, evaluate()) of the latest validation

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.config.channels_last else torch.preserve_format

    def write_log(self, row: dict[str, Any]) -> None:
        if self.log is not None:
            try:
                self.log.write(json.dumps(row) + "\n")
                self.log.flush()
            except OSError as exc:
                raise ValueError(f"cannot write the log file {self.log.name}: {exc.strerror}") from None

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _decoded(train_ds, val_ds, batch_size: int, workers: int, progress: Progress) -> tuple:
    """The train and val splits decoded into memory (:func:`~equalbits_cli.data.folders.decode_once`),
    each where it fits the memory bound; a split that does not is read from disk, and the run says so."""
    from ..data.folders import decode_once

    batches = sum(-(-len(ds) // batch_size) for ds in (train_ds, val_ds))
    progress.phase("decoding the images once (no augmentation: they never change)", batches)
    kept = [decode_once(ds, batch_size, workers, DEFAULT_BOUND, progress) for ds in (train_ds, val_ds)]
    if isinstance(kept[0], str):
        progress.note(kept[0])
    return tuple(ds if isinstance(k, str) else k for ds, k in zip((train_ds, val_ds), kept))


def _setup(student_path, data_dir, config: FinetuneConfig, teacher: str | None, progress: Progress, output: Path):
    from ..data.folders import (
        EpochSampler,
        build_datasets,
        calibration_dataset,
        default_workers,
        find_splits,
        make_loader,
    )
    from ..formats import LATENT_FORMAT
    from ..formats.latent import load_model
    from ..paths import read_metadata

    device = resolve_device(config.device)
    rank, world = dist_setup(device)
    workers = config.workers
    if workers is None:
        workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    fmt = read_metadata(student_path).get("format")
    if fmt != LATENT_FORMAT:
        raise ValueError(f"{student_path}: fine-tuning needs a latent checkpoint (from binarize), not {fmt}")
    student = load_model(student_path)
    splits = find_splits(data_dir, classes=student.equalbits_meta.get("classes"))
    num_classes = int(student.equalbits_meta["model_kwargs"].get("num_classes", 0)) or None
    if num_classes is not None and len(splits.classes) > num_classes:
        raise SettingError(
            f"the data has {len(splits.classes)} classes but the model's classifier has {num_classes}; "
            f"binarize with `num_classes` {len(splits.classes)}"
        )
    student.equalbits_meta["classes"] = list(splits.classes)
    data_config = resolve_data_config(student, config.data_overrides())
    student.equalbits_meta["data_config"] = data_config  # the fine-tuned file records what it was trained on
    teacher_model, teacher_top1 = None, None
    if config.alpha < 1:
        found = teacher_for(student.equalbits_meta, teacher, num_classes or len(splits.classes))
        teacher_model = match_normalization(found, data_config)
        teacher_top1 = found.recorded_top1
    train_ds, val_ds = build_datasets(splits, data_config, config.augment, config.seed)
    if config.batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
        raise SettingError(
            "`batch_size` 1 cannot train BatchNorm layers (they need 2 or more images a batch); use 2 or more"
        )
    if len(train_ds) < config.batch_size * world:
        raise SettingError(
            f"train/ has {len(train_ds)} images, fewer than one batch ({config.batch_size} x {world} processes); "
            "lower `batch_size`"
        )
    if config.augment == "none" and world == 1:  # the images never change: decoded once, not every epoch
        train_ds, val_ds = _decoded(train_ds, val_ds, config.batch_size, workers, progress)
    # Without augmentation the training split already has the evaluation transform the calibration wants.
    calib_ds = train_ds if config.augment == "none" else calibration_dataset(splits, data_config)
    train_sampler = EpochSampler(len(train_ds), shuffle=True, seed=config.seed, rank=rank, world=world)
    train_loader = make_loader(train_ds, train_sampler, config.batch_size, workers, drop_last=True)
    val_loader = make_loader(
        val_ds, EpochSampler(len(val_ds), shuffle=False), config.batch_size, workers, drop_last=False
    )
    calib_sampler = EpochSampler(len(calib_ds), shuffle=True, seed=config.seed + 1)
    calib_loader = make_loader(calib_ds, calib_sampler, config.batch_size, workers, drop_last=True)
    student.to(device)
    if teacher_model is not None:
        teacher_model.to(device).eval()
        for p in teacher_model.parameters():
            p.requires_grad_(False)
    if config.channels_last:  # the binary layers' grouped GPU launches read and write this layout too
        student.to(memory_format=torch.channels_last)
        if teacher_model is not None:
            teacher_model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(train_sampler) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    warmup = min(config.warmup_steps, total_steps // 10)
    optimizer, scheduler = _optimizer_and_schedule(
        student, config.lr, config.weight_decay, total_steps, warmup, fused=device.type in ("cuda", "cpu")
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    return _Run(
        config,
        device,
        rank,
        world,
        student,
        student,
        teacher_model,
        data_config,
        teacher_top1,
        train_ds,
        train_sampler,
        train_loader,
        val_loader,
        calib_loader,
        optimizer,
        scheduler,
        scaler,
        steps_per_epoch,
        total_steps,
        state_path_for(output),
        progress,
    )


def _evaluate_start(run: _Run) -> None:
    """Teacher, binarized student, and student after BatchNorm re-estimation (rank 0 evaluates)."""
    cfg, progress = run.config, run.progress
    if run.rank == 0:
        if run.teacher is not None:
            progress.phase("evaluating teacher", len(run.val_loader))
            run.evals["teacher_top1"] = evaluate(run.teacher, run.val_loader, run.device, cfg.amp, progress)["top1"]
        progress.phase("evaluating binarized student", len(run.val_loader))
        run.evals["student_top1_before"] = evaluate(run.student, run.val_loader, run.device, cfg.amp, progress)["top1"]
    run.evals["student_top1_calibrated"] = None
    n_calib = min(cfg.calibrate_batches, len(run.calib_loader))
    thresholds = any(getattr(m, "act_threshold", None) is not None for m in run.student.modules())
    norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run.student.modules())
    if n_calib and thresholds:
        from ..nn.layers import calibrate_thresholds

        progress.phase(f"calibrating activation thresholds on {n_calib} batches", n_calib)
        images = (b for b, _ in itertools.islice(iterate(run.calib_loader), n_calib))
        calibrate_thresholds(run.student, images, run.device)
    if n_calib and norms:
        progress.phase(f"re-estimating BatchNorm statistics on {n_calib} un-augmented batches", n_calib)
        recalibrate_bn(run.student, run.calib_loader, n_calib, run.device, progress)
    if n_calib and (thresholds or norms):  # else the student is the one evaluated above: no second pass
        if run.rank == 0:
            progress.phase("evaluating calibrated student", len(run.val_loader))
            top1 = evaluate(run.student, run.val_loader, run.device, cfg.amp, progress)["top1"]
            run.evals["student_top1_calibrated"] = top1
    if run.rank == 0:
        run.evals["warnings"] = teacher_warnings(run.evals, run.teacher_top1_recorded, run.data_config)
        for warning in run.evals["warnings"]:
            progress.note(f"warning: {warning}")


# How far under its recorded accuracy a teacher may score before the data config is suspected.
TEACHER_SHORTFALL = 5.0


def teacher_warnings(evals: dict[str, Any], recorded_top1: float | None, data_config: DataConfig) -> list[str]:
    """Warnings for a teacher that scores implausibly low: under its own file's record, or under the
    binarized student. Both point at images prepared unlike those it was trained on.

    Example:
        >>> cfg = DataConfig((3, 32, 32), "bicubic", (0.5,) * 3, (0.5,) * 3, 1.0)
        >>> teacher_warnings({"teacher_top1": 68.3, "student_top1_before": 20.0}, 92.4, cfg)[0][:40]
        'the teacher scores 68.30% on val/, 24.10'
    """
    teacher = evals.get("teacher_top1")
    if teacher is None:
        return []
    cause = (
        f"the images are likely prepared unlike those it was trained on ({data_config.describe()}); "
        "set `img_size`, `crop_pct`, `interpolation`, `mean` and `std` to how it was trained"
    )
    out = []
    if recorded_top1 is not None and recorded_top1 - teacher > TEACHER_SHORTFALL:
        out.append(
            f"the teacher scores {teacher:.2f}% on val/, {recorded_top1 - teacher:.2f} points under the "
            f"{recorded_top1:.2f}% its file records: {cause}"
        )
    student = _start_top1(evals)
    if student is not None and teacher < student:
        out.append(f"the teacher scores {teacher:.2f}% on val/, under the binarized student's {student:.2f}%: {cause}")
    return out


def _start_top1(evals: dict[str, Any]) -> float | None:
    """The student's top-1 before training: after BatchNorm re-estimation where there was one, else just
    binarized (None where it was not evaluated)."""
    calibrated = evals.get("student_top1_calibrated")
    return evals.get("student_top1_before") if calibrated is None else calibrated


# How far under its own start a fine-tuned student may end before the run is called too short.
SHORTFALL_FROM_START = 1.0


def shortfall_warnings(evals: dict[str, Any], final_top1: float, steps: int) -> list[str]:
    """A warning when the fine-tuned student ends under the student it started from (after BatchNorm
    re-estimation, else just binarized): the first steps flip many codes, and a run too short to recover
    leaves a worse model than no fine-tune.

    Example:
        >>> shortfall_warnings({"student_top1_before": 9.7, "student_top1_calibrated": 88.9}, 50.7, 22)[0][:52]
        'the fine-tuned student scores 50.70% on val/, under '
        >>> shortfall_warnings({"student_top1_before": 9.7, "student_top1_calibrated": 88.9}, 95.0, 110)
        []
    """
    start = _start_top1(evals)
    if start is None or final_top1 >= start - SHORTFALL_FROM_START:
        return []
    return [
        f"the fine-tuned student scores {final_top1:.2f}% on val/, under the {start:.2f}% it started from: "
        f"{steps} steps were too few to recover from the first steps' code flips; train more `epochs` or "
        "lower `lr`"
    ]


def _restore(run: _Run, state: dict[str, Any]) -> None:
    try:
        run.student.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or ["mismatch"])[0][:200]
        raise ValueError(f"{run.state_path}: does not fit this student or settings ({first})") from None
    run.evals = dict(state.get("evals", {}))
    run.history = list(state.get("history", []))
    run.step, run.epoch, run.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])


def _save(run: _Run) -> None:
    if run.rank != 0:
        return
    save_state(
        run.state_path,
        {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "model": run.student.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "step": run.step,
            "epoch": run.epoch,
            "batch": run.batch,
            "rng": torch.get_rng_state(),
            "evals": run.evals,
            "history": run.history,
            "config": run.config.to_json(),
            "identity": run.identity,
        },
    )


def _step(run: _Run, images: torch.Tensor, targets: torch.Tensor, indices: np.ndarray | None, bad_step: torch.Tensor):
    """One optimizer step of the student, with the teacher's forward (or its cached outputs for the
    images ``indices``); nothing in it waits for the device.

    Returns:
        ``(loss, bad_step)``: the loss (on the device) and ``bad_step`` updated to this step if the loss
        is not finite and no earlier step's was.
    """
    cfg = run.config
    images = images.to(run.device, non_blocking=True, memory_format=run.memory_format)
    targets = targets.to(run.device, non_blocking=True)
    t_logits = None
    if run.teacher is not None:
        cache = run.teacher_cache
        t_logits = cache.lookup(indices) if cache is not None else None
        if t_logits is None:
            with torch.no_grad(), autocast_for(run.device, cfg.amp):
                t_logits = run.teacher(images)
            if cache is not None:
                cache.store(indices, t_logits)
    with autocast_for(run.device, cfg.amp):
        s_logits = run.model(images)
    if t_logits is None:  # --alpha 1: labels alone
        loss = nn.functional.cross_entropy(s_logits.float(), targets)
    else:
        loss = distillation_loss(s_logits, t_logits, targets, cfg.temperature, cfg.alpha)
    bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), run.step, bad_step)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss, bad_step


LOG_EVERY = 10  # steps between log points: the loss is read from the device there, and only there


def _train_epoch(run: _Run) -> float:
    """Train from ``run.batch`` to the end of epoch ``run.epoch``; returns the mean loss of the steps run."""
    cfg = run.config
    run.train_sampler.epoch = run.train_ds.epoch = run.epoch
    run.train_sampler.start = run.batch * cfg.batch_size
    run.model.train()
    run.progress.phase(f"epoch {run.epoch + 1}/{cfg.epochs}", run.steps_per_epoch)
    run.progress.advance(run.batch)
    tick = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    # No step waits for the device: a non-finite loss is noted on the device (the first step it happened)
    # and reported at the next log point, where the loss is read anyway.
    bad_step = torch.full((), -1, dtype=torch.int64, device=run.device)
    shown: dict[str, float] = {}
    n = 0
    # The images of each batch, in the loader's order (the sampler's, from its start on): the cache's keys.
    order = np.fromiter(iter(run.train_sampler), dtype=np.int64) if run.teacher_cache is not None else None
    for images, targets in iterate(run.train_loader):
        indices = order[n * cfg.batch_size : (n + 1) * cfg.batch_size] if order is not None else None
        loss, bad_step = _step(run, images, targets, indices, bad_step)
        run.step += 1
        run.batch += 1
        run.scheduler.step_update(num_updates=run.step)
        total += loss.detach().double()
        n += 1
        now = time.perf_counter()
        img_s = len(images) * run.world / max(now - tick, 1e-9)
        tick = now
        if run.step % LOG_EVERY == 0 or run.batch == run.steps_per_epoch:
            first_bad = int(bad_step)  # the one read of the device per log point
            if first_bad >= 0:
                raise SettingError(
                    f"the loss became NaN or infinite at step {first_bad + 1}; lower `lr` or turn off `amp`"
                )
            shown["loss"] = float(loss.detach())
            run.write_log(
                {"event": "step", "step": run.step, "epoch": run.epoch + 1, "loss": shown["loss"], "lr": run.lr()}
            )
        run.progress.advance(1, img_s=img_s, **shown)
        if run.step % cfg.save_every == 0:
            _save(run)
    if run.teacher_cache is not None and run.teacher_cache.too_large is not None:
        run.progress.note(run.teacher_cache.too_large)
        run.teacher_cache = None
    return float(total) / max(n, 1)


def _compile(run: _Run) -> None:
    """``torch.compile`` the training forward of the student (and the teacher's). Binary layers trace
    their quantizer as one custom op (:mod:`equalbits_cli.quant.ops`), without a graph break.
    Evaluation, saving and exports use the uncompiled modules."""
    run.model = torch.compile(run.model)
    if run.teacher is not None:
        run.teacher = torch.compile(run.teacher)


def _compile_error(exc: BaseException) -> ValueError | None:
    """A one-line error for a failure of torch.compile (not of the training itself), else None."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    if not isinstance(exc, TorchDynamoException):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return ValueError(
        f"`compile`: torch.compile failed on this model ({type(exc).__name__}: {first}); run without `compile`"
    )


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def finetune(
    student_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    config: FinetuneConfig,
    *,
    output: str | os.PathLike,
    teacher: str | None = None,
    resume: bool | str = False,
    log: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> FinetuneResult | None:
    """Distil a binarized student from its full-precision teacher on an ImageFolder dataset.

    Args:
        student_path: A binarized latent checkpoint (``binarize`` output).
        data_dir: ImageFolder root with ``train/`` and ``val/``.
        config: Hyper-parameters.
        output: The fine-tuned checkpoint to write (its training state goes next to it).
        teacher: A timm name (pretrained) or a full-precision state dict file; default: the model the
            student was binarized from, as its metadata records. Not used when ``config.alpha == 1``.
        resume: True: continue from the training state of ``output`` (saved with the same settings);
            ``"auto"``: continue if there is one, else start afresh (what ``torchrun --max-restarts``
            needs: the restarted command is the same); False: start afresh.
        log: Append one JSON line per 10 steps and per epoch to this file (rank 0).
        progress: Receives progress; default none.

    Returns:
        The result on rank 0, with per-epoch ``history`` (loss, learning rate, validation top-1);
        None on other ranks.

    Raises:
        ValueError / FileNotFoundError: bad inputs. Interrupted: Ctrl-C or SIGTERM (state saved).
    """

    progress = progress or NullProgress()
    started = time.perf_counter()
    output = Path(output)
    state_path = state_path_for(output)
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    if log is not None:
        check_log_path(log)
    state = load_state(state_path) if resume is True or (resume == "auto" and state_path.exists()) else None
    identity = run_identity(student_path, teacher, data_dir)
    if state is not None:
        check_resume_config(state_path, state, config.to_json())
        check_resume_identity(state_path, state, identity)
    run = _setup(student_path, data_dir, config, teacher, progress, output)
    if run.teacher is not None and config.cache_teacher:
        if config.augment == "none":
            run.teacher_cache = TeacherCache(len(run.train_ds))  # an image's teacher outputs never change
        elif run.rank == 0:
            note = f"`augment` {config.augment}: the teacher runs every step (its outputs change with the crops)"
            progress.note(note)
    run.identity = identity
    if run.rank == 0:
        progress.note(f"data: {run.data_config.describe()}")
    if run.rank == 0:
        remove_stale_temporaries(state_path)
        remove_stale_temporaries(output)
    if state is None:
        _evaluate_start(run)
        resumed = None
    else:
        _restore(run, state)
        resumed = run.step
    if run.world > 1:
        run.model = nn.parallel.DistributedDataParallel(
            run.student, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    if config.compile:
        _compile(run)
    _run_epochs(run, log, state_path)
    checksum = codes_checksum(run.student)
    identical = all_equal(checksum, run.world, run.device)
    if run.rank != 0:
        barrier(run.world)
        return None
    try:
        result = _finish(run, output, started, resumed, checksum, identical)
    except BaseException:
        with contextlib.suppress(Exception):  # what failed is what the user needs to see
            _save(run)  # trained to the end: a resume only evaluates and writes the checkpoint
        raise
    state_path.unlink(missing_ok=True)
    progress.done()
    barrier(run.world)
    return result


def _run_epochs(run: _Run, log: str | os.PathLike | None, state_path: Path) -> None:
    """Train the remaining epochs, validating and saving the state after each; SIGTERM and Ctrl-C save
    the state and raise :class:`Interrupted`."""
    import threading

    config = run.config
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    log_file = open(log, "a") if (log is not None and run.rank == 0) else None  # noqa: SIM115
    run.log = log_file
    try:
        while run.epoch < config.epochs:
            try:
                loss = _train_epoch(run)
            except Exception as exc:
                err = _compile_error(exc) if config.compile else None
                if err is None:
                    raise
                raise err from exc
            row: dict[str, Any] = {"epoch": run.epoch + 1, "step": run.step, "loss": loss, "lr": run.lr()}
            if run.rank == 0:
                run.progress.phase(f"validating after epoch {run.epoch + 1}", len(run.val_loader))
                ev = evaluate(run.student, run.val_loader, run.device, config.amp, run.progress)
                row["val_top1"], run.last_eval = ev["top1"], (run.step, ev)
            run.history.append(row)
            run.write_log({"event": "epoch", **row})
            run.epoch += 1
            run.batch = 0
            if run.epoch < config.epochs:  # after the last one the checkpoint is written (the state if that fails)
                _save(run)
    except (KeyboardInterrupt, _Terminated) as exc:
        _save(run)
        signum = signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT
        raise Interrupted(
            f"interrupted at step {run.step}; training state saved to {state_path}; continue with the same "
            "command and `resume`",
            signum,
        ) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if log_file is not None:
            with contextlib.suppress(OSError):  # a full disk fails the close's flush too: reported above
                log_file.close()


def _finish(run: _Run, output: Path, started: float, resumed: int | None, checksum: int, identical: bool):
    """Evaluate the fine-tuned student, write it with what the fine-tune measured, and return the result."""
    from ..formats.latent import save_checkpoint

    config, progress = run.config, run.progress
    if run.last_eval is not None and run.last_eval[0] == run.step:  # the last epoch's validation: same weights
        final = run.last_eval[1]
    else:
        progress.phase("evaluating fine-tuned student", len(run.val_loader))
        final = evaluate(run.student, run.val_loader, run.device, config.amp, progress)
    shortfall = shortfall_warnings(run.evals, final["top1"], run.step)
    for warning in shortfall:
        progress.note(f"warning: {warning}")
    result = FinetuneResult(
        teacher_top1=run.evals.get("teacher_top1"),
        student_top1_before=run.evals["student_top1_before"],
        student_top1_calibrated=run.evals.get("student_top1_calibrated"),
        student_top1=final["top1"],
        student_top5=final["top5"],
        epochs=config.epochs,
        steps=run.step,
        output=str(output),
        seconds=time.perf_counter() - started,
        world_size=run.world,
        codes_checksum=checksum,
        codes_identical_across_ranks=identical,
        resumed_from_step=resumed,
        history=run.history,
        data_config=run.data_config.to_dict(),
        warnings=[*run.evals.get("warnings", []), *shortfall],
    )
    run.student.cpu()
    summary = {k: v for k, v in result.to_dict().items() if k.startswith(("teacher", "student"))}
    save_checkpoint(
        run.student,
        output,
        extra={"finetune": json.dumps({**json.loads(config.to_json()), **summary, "history": run.history})},
    )
    return result


def train_classifier(
    model: nn.Module,
    data_dir: str | os.PathLike,
    *,
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 64,
    data: DataOverrides | None = None,
    workers: int = 0,
    seed: int = 0,
    device: str = "auto",
    progress: Progress | None = None,
) -> dict[str, float]:
    """Train a full-precision model with label cross-entropy (AdamW, warm-up + cosine). Returns the
    final val accuracy. Used by ``quickstart`` to make a teacher when no pretrained one is at hand.

    The images are prepared by the model's data config with ``data``'s overrides
    (:func:`equalbits_cli.data.config.resolve_data_config`)."""
    from ..data.folders import EpochSampler, build_datasets, find_splits, make_loader

    progress = progress or NullProgress()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    splits = find_splits(data_dir)
    train_ds, val_ds = build_datasets(splits, resolve_data_config(model, data), augment="none", seed=seed)
    train_ds, val_ds = _decoded(train_ds, val_ds, batch_size, workers, progress)
    sampler = EpochSampler(len(train_ds), shuffle=True, seed=seed)
    loader = make_loader(train_ds, sampler, batch_size, workers, drop_last=True)
    val_loader = make_loader(val_ds, EpochSampler(len(val_ds), shuffle=False), batch_size, workers, drop_last=False)
    model.to(dev)
    total = epochs * len(loader)
    optimizer, scheduler = _optimizer_and_schedule(model, lr, 1e-4, total, min(50, total // 10))
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for epoch in range(epochs):
        sampler.epoch = epoch
        model.train()
        progress.phase(f"teacher epoch {epoch + 1}/{epochs}", len(loader))
        tick = time.perf_counter()
        for images, targets in iterate(loader):
            images, targets = images.to(dev), targets.to(dev)
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            now = time.perf_counter()
            progress.advance(1, loss=float(loss.detach()), img_s=len(images) / max(now - tick, 1e-9))
            tick = now
    progress.phase("evaluating teacher", len(val_loader))
    return evaluate(model, val_loader, dev, progress=progress)
