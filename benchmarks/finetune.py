"""The whole fine-tune against what a user would run instead, in one run (issue 27), on the CPU.

Three runs on the same data (the built-in 32x32 digits, read from disk as an image folder), the same
batches in the same order, the same epochs and optimizer settings:

- ``equalbits finetune`` (the library call the command makes): binarized student, full-precision
  teacher, everything it does (teacher and student evaluated first, BatchNorm re-estimated, a
  validation and a saved state per epoch, the final evaluation and the checkpoint), with the teacher's
  outputs cached after the first epoch (the default with ``--augment none``) and without;
- a plain full-precision distillation loop written with timm and torch (no binary layers): the same
  model as student and teacher, AdamW with timm's warm-up + cosine schedule, a validation and a
  ``torch.save`` per epoch;
- that loop without a teacher (labels only).

It prints the wall time of each, images per second, the ratio to the plain distillation loop, and where
the plain loops' milliseconds go (waiting for data, teacher forward, student forward and loss,
backward, optimizer step). The teacher is randomly initialized: speed does not depend on its accuracy.

    python benchmarks/finetune.py [--model resnet18] [--epochs 3] [--batch 64] [--workers 0] [--repeats 2]
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


def plain_loop(model_name: str, teacher_path: Path, data: Path, args, use_teacher: bool, tmp: Path):
    """A full-precision distillation (or label) loop as a user writes it: ``(seconds, images, phases)``.
    Its wall time starts where ``finetune``'s does: before the models and the data are loaded."""
    from safetensors.torch import load_file
    from timm.scheduler import CosineLRScheduler

    start = time.perf_counter()
    torch.manual_seed(0)
    student = timm.create_model(model_name, pretrained=False, num_classes=10)
    student.load_state_dict(load_file(str(teacher_path)))
    teacher = None
    if use_teacher:
        teacher = timm.create_model(model_name, pretrained=False, num_classes=10)
        teacher.load_state_dict(load_file(str(teacher_path)))
        teacher.eval()
    cfg = resolve_data_config(student, DataOverrides(img_size=32))
    train_ds, val_ds = build_datasets(find_splits(data), cfg, augment="none", seed=0)
    loader = make_loader(train_ds, EpochSampler(len(train_ds), shuffle=True, seed=0), args.batch, args.workers, True)
    val_loader = make_loader(val_ds, EpochSampler(len(val_ds), shuffle=False), args.batch, args.workers, False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-3, weight_decay=1e-4)
    steps = args.epochs * len(loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=steps, warmup_t=min(100, steps // 10), t_in_epochs=False)
    phases: dict[str, float] = defaultdict(float)
    phases["loading"] = time.perf_counter() - start
    images, step = 0, 0
    for epoch in range(args.epochs):
        loader.sampler.epoch = epoch
        student.train()
        tick = time.perf_counter()
        for x, y in iterate(loader):
            now = time.perf_counter()
            phases["data"] += now - tick
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
                phases["teacher forward"] += time.perf_counter() - now
            t0 = time.perf_counter()
            s_logits = student(x)
            if teacher is not None:
                loss = F.kl_div(F.log_softmax(s_logits, 1), F.softmax(t_logits, 1), reduction="batchmean")
            else:
                loss = F.cross_entropy(s_logits, y)
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            tick = time.perf_counter()
            phases["student forward + loss"] += t1 - t0
            phases["backward"] += t2 - t1
            phases["optimizer"] += tick - t2
            images += len(x)
        student.eval()
        with torch.no_grad():
            for x, _ in iterate(val_loader):
                student(x)
        torch.save(student.state_dict(), tmp / "plain.pt")
    return time.perf_counter() - start, images, dict(phases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of all runs, each round in a rotated order")
    args = ap.parse_args()
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = make_digits_imagefolder(tmp / "digits", size=32)
        torch.manual_seed(0)
        teacher = timm.create_model(args.model, pretrained=False, num_classes=10)
        cfg = resolve_data_config(teacher, DataOverrides(img_size=32))
        teacher_path = save_full_precision(teacher, tmp / "teacher.safetensors", data_config=cfg)
        student = binarize_model(args.model, BinarizeConfig(), checkpoint=teacher_path)
        student_path = save_checkpoint(student, tmp / "student.safetensors")

        def ours(epochs: int, cache: bool):
            config = FinetuneConfig(epochs=epochs, batch_size=args.batch, img_size=32, workers=args.workers)
            config = dataclasses.replace(config, device="cpu", cache_teacher=cache)
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
    print(f"# {args.model}, 32x32 digits, batch {args.batch}, {args.epochs} epochs, {args.workers} workers")
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
