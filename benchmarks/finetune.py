"""The whole fine-tune against what a user would run instead, in one run (issue 27), on the CPU or CUDA.

Three runs on the same data (the built-in 32x32 digits, or with ``--data jpeg`` synthetic JPEGs at
``--img-size`` written to local disk; read as an image folder), the same batches in the same order,
the same epochs and optimizer settings:

- ``equalbits finetune`` (the library call the command makes): binarized student, full-precision
  teacher, everything it does (teacher and student evaluated first, BatchNorm re-estimated, a
  validation and a saved state per epoch, the final evaluation and the checkpoint), with the teacher's
  outputs cached after the first epoch (the default with ``--augment none``) and without;
- a plain full-precision distillation loop written with timm and torch (no binary layers): the same
  model as student and teacher, AdamW with timm's warm-up + cosine schedule, a validation and a
  ``torch.save`` per epoch (under ``--amp``: autocast and a gradient scaler, as ``finetune`` does);
- that loop without a teacher (labels only).

It prints the wall time of each, images per second, the ratio to the plain distillation loop, and where
the plain loops' milliseconds go (waiting for data, teacher forward, student forward and loss,
backward, optimizer step): host time on the CPU, GPU time between CUDA events on a GPU (no
synchronization inside a step; "data" is then the GPU's wait for the next batch, the loader's share).
The teacher is randomly initialized: speed does not depend on its accuracy.

    python benchmarks/finetune.py [--model resnet18] [--epochs 3] [--batch 64] [--workers 0] [--repeats 2]
    python benchmarks/finetune.py --device cuda --amp --data jpeg --img-size 224 --workers 8   # issue 27's GPU setting
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from equalbits_cli import BinarizeConfig, FinetuneConfig, binarize_model, save_checkpoint
from equalbits_cli.data.builtin import make_digits_imagefolder
from equalbits_cli.data.config import DataOverrides, resolve_data_config
from equalbits_cli.data.folders import (
    EpochSampler,
    build_datasets,
    find_splits,
    iterate,
    make_loader,
)
from equalbits_cli.model.convert import save_full_precision
from equalbits_cli.train.finetune import finetune


class PhaseClock:
    """A progress receiver that times each phase ``finetune`` announces (evaluations, calibration, epochs)."""

    def __init__(self) -> None:
        self.current, self.since = "loading (student, teacher, data)", time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    def phase(self, text: str, total: int | None = None) -> None:
        now = time.perf_counter()
        self.seconds[self.current] += now - self.since
        if text.startswith("epoch "):
            name = "epoch 1 (teacher live)" if text.startswith("epoch 1/") else "epochs 2+ (teacher cached)"
        else:  # "validating after epoch 2" -> "validating"; "re-estimating ... on 20 batches" -> "re-estimating ..."
            name = text.split(" after epoch")[0].split(" on ")[0]
        self.current, self.since = name, now

    def stop(self) -> dict[str, float]:
        self.phase("done")
        return dict(self.seconds)

    def advance(self, n: int = 1, **fields) -> None:
        pass

    def done(self) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class Marks:
    """Phase times of a loop: host clock on the CPU, CUDA events on a GPU (read once, at the end)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = defaultdict(list)

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, name: str, start, end) -> None:
        self.spans[name].append((start, end))

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1000 for k, v in self.spans.items()}
        return {k: sum(b - a for a, b in v) for k, v in self.spans.items()}


def write_jpegs(root: Path, size: int, per_class: int, classes: int = 10) -> Path:
    """An ImageFolder of synthetic JPEGs (smooth random colour fields, quality 90) at ``size`` x ``size``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", max(1, per_class // 4))):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def plain_loop(model_name: str, teacher_path: Path, data: Path, args, use_teacher: bool, tmp: Path):
    """A full-precision distillation (or label) loop as a user writes it: ``(seconds, images, phases)``.
    Its wall time starts where ``finetune``'s does: before the models and the data are loaded."""
    from safetensors.torch import load_file
    from timm.scheduler import CosineLRScheduler

    start = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = timm.create_model(model_name, pretrained=False, num_classes=10)
    student.load_state_dict(load_file(str(teacher_path)))
    student.to(device)
    teacher = None
    if use_teacher:
        teacher = timm.create_model(model_name, pretrained=False, num_classes=10)
        teacher.load_state_dict(load_file(str(teacher_path)))
        teacher.to(device).eval()
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    cfg = resolve_data_config(student, DataOverrides(img_size=args.img_size))
    train_ds, val_ds = build_datasets(find_splits(data), cfg, augment="none", seed=0)
    loader = make_loader(train_ds, EpochSampler(len(train_ds), shuffle=True, seed=0), args.batch, args.workers, True)
    val_loader = make_loader(val_ds, EpochSampler(len(val_ds), shuffle=False), args.batch, args.workers, False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-3, weight_decay=1e-4)
    steps = args.epochs * len(loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=steps, warmup_t=min(100, steps // 10), t_in_epochs=False)
    marks = Marks(device)
    loading = time.perf_counter() - start
    images, step = 0, 0
    for epoch in range(args.epochs):
        loader.sampler.epoch = epoch
        student.train()
        tick = marks.now()
        for x, y in iterate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            now = marks.now()
            marks.add("data", tick, now)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    t0 = marks.now()
                    marks.add("teacher forward", now, t0)
                else:
                    t0 = now
                s_logits = student(x)
                if teacher is not None:
                    loss = F.kl_div(
                        F.log_softmax(s_logits.float(), 1), F.softmax(t_logits.float(), 1), reduction="batchmean"
                    )
                else:
                    loss = F.cross_entropy(s_logits.float(), y)
            t1 = marks.now()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            t2 = marks.now()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_update(step)
            tick = marks.now()
            marks.add("student forward + loss", t0, t1)
            marks.add("backward", t1, t2)
            marks.add("optimizer", t2, tick)
            images += len(x)
        student.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            for x, _ in iterate(val_loader):
                student(x.to(device, non_blocking=True))
        torch.save(student.state_dict(), tmp / "plain.pt")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    phases = {"loading": loading, **marks.seconds()}
    return seconds, images, phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of all runs, each round in a rotated order")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--amp", action="store_true", help="mixed precision (fp16 and a gradient scaler on CUDA)")
    ap.add_argument("--data", default="digits", choices=["digits", "jpeg"], help="digits, or synthetic JPEGs")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--images-per-class", type=int, default=128, help="--data jpeg: train images per class")
    args = ap.parse_args()
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.data == "digits":
            data = make_digits_imagefolder(tmp / "digits", size=args.img_size)
        else:
            data = write_jpegs(tmp / "jpegs", args.img_size, args.images_per_class)
        torch.manual_seed(0)
        teacher = timm.create_model(args.model, pretrained=False, num_classes=10)
        cfg = resolve_data_config(teacher, DataOverrides(img_size=args.img_size))
        teacher_path = save_full_precision(teacher, tmp / "teacher.safetensors", data_config=cfg)
        student = binarize_model(args.model, BinarizeConfig(), checkpoint=teacher_path)
        student_path = save_checkpoint(student, tmp / "student.safetensors")

        def ours(epochs: int, cache: bool):
            config = FinetuneConfig(
                epochs=epochs, batch_size=args.batch, img_size=args.img_size, workers=args.workers, amp=args.amp
            )
            config = dataclasses.replace(config, device=args.device, cache_teacher=cache)
            clock = PhaseClock()
            start = time.perf_counter()
            result = finetune(
                student_path,
                data,
                config,
                output=tmp / f"ft{epochs}{cache}.safetensors",
                teacher=str(teacher_path),
                progress=clock,
            )
            return time.perf_counter() - start, result.steps * args.batch, clock.stop()

        runs = {
            "cached": lambda: ours(args.epochs, True),
            "cached+1": lambda: ours(args.epochs + 1, True),  # what an epoch adds, and the fixed cost
            "live": lambda: ours(args.epochs, False),
            "plain": lambda: plain_loop(args.model, teacher_path, data, args, True, tmp),
            "labels": lambda: plain_loop(args.model, teacher_path, data, args, False, tmp),
        }
        ours(1, True)  # warm-up: the first run in a process pays for lazy imports and first calls
        times: dict[str, list] = defaultdict(list)
        order = list(runs)
        for r in range(args.repeats):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                times[name].append(runs[name]())
                print(f"# round {r + 1}: {name} {times[name][-1][0]:.1f} s", flush=True)
    best = {k: min(v, key=lambda t: t[0]) for k, v in times.items()}  # fastest of the rounds: least disturbed
    plain, plain_images, plain_phases = best["plain"]
    what = "digits" if args.data == "digits" else "synthetic JPEGs"
    print(
        f"# {args.model}, {args.img_size}x{args.img_size} {what}, batch {args.batch}, {args.epochs} epochs, "
        f"{args.workers} workers, {args.device}{' amp' if args.amp else ''}"
    )
    print(f"# best of {args.repeats} rounds, each in a rotated order, after a warm-up run")
    print("| run | wall s | train img/s | vs plain distillation |")
    print("|---|---|---|---|")
    for key, name in (
        ("cached", "equalbits finetune (binary student, teacher outputs cached)"),
        ("live", "equalbits finetune --no-cache-teacher"),
        ("plain", "plain distillation loop (fp32 student, teacher)"),
        ("labels", "plain loop, labels only (fp32, no teacher)"),
    ):
        seconds, n, _ = best[key]
        print(f"| {name} | {seconds:.1f} | {n / seconds:.0f} | {seconds / plain:.2f}x |")
    ours_s, per_epoch, plain_epoch = best["cached"][0], best["cached+1"][0] - best["cached"][0], plain / args.epochs
    print(
        f"\nequalbits finetune: one more epoch adds {per_epoch:.1f} s ({per_epoch / plain_epoch:.2f}x a plain "
        f"distillation epoch of {plain_epoch:.1f} s, validation and save included); fixed cost "
        f"{ours_s - args.epochs * per_epoch:.1f} s (start-up evaluations, BatchNorm re-estimation, final evaluation)"
    )
    print()
    print("| equalbits finetune (cached), phase | seconds |")
    print("|---|---|")
    for name, seconds in best["cached"][2].items():
        print(f"| {name} | {seconds:.1f} |")
    print()
    loading = plain_phases.pop("loading")
    print("| plain loop: ms a step | " + " | ".join(plain_phases) + " |")
    print("|---|" + "---|" * len(plain_phases))
    steps = plain_images // args.batch
    for name, phases in (("distillation", plain_phases), ("labels only", best["labels"][2])):
        print(f"| {name} | " + " | ".join(f"{1000 * phases.get(k, 0.0) / steps:.1f}" for k in plain_phases) + " |")
    print(f"\n(the plain loop's loading of its models and data, before its first step: {loading:.2f} s)")


if __name__ == "__main__":
    main()
