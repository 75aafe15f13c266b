"""Training-step time of the binarized student: method=ot against method=sign and full precision.

Same model, batch, input size and optimizer (AdamW) in one run; steps are interleaved round-robin
so that machine noise hits every variant alike. Reports the median step time and the ratios.
On CUDA two more variants: ``ot 1-by-1`` builds each layer's weight in its own launch (as layers
without the model's StepWeights do), and ``--channels-last`` adds fp32 and ot in channels-last memory.

    python benchmarks/train_step.py [--model resnet18] [--batch 64] [--img-size 32] [--steps 12]
    python benchmarks/train_step.py --device cuda --amp --steps 12 \
        --model resnet18:256:224,resnet50:128:224,vit_small_patch16_224:128:224
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _timing import machine  # noqa: E402

from equalbits_cli import BinarizeConfig, binarize_  # noqa: E402


def make(
    model_name: str, method: str | None, device: str, grouped: bool = True, channels_last: bool = False
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=10 if device == "cpu" else 1000)
    if method is not None:
        binarize_(model, BinarizeConfig(method=method))
        if not grouped:
            for m in model.modules():
                if hasattr(m, "_step_weights"):
                    m._step_weights = None
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


VARIANTS = {  # name: (method, grouped, channels_last)
    "fp32": (None, True, False),
    "sign": ("sign", True, False),
    "ot": ("ot", True, False),
    "ot 1-by-1": ("ot", False, False),
    "fp32 CL": (None, True, True),
    "ot CL": ("ot", True, True),
}


def run(args, model_name: str, batch: int, img_size: int) -> dict[str, float]:
    dev = torch.device(args.device)
    names = ["fp32", "sign", "ot"]
    if dev.type == "cuda":
        names.append("ot 1-by-1")
    if args.channels_last:
        names += ["fp32 CL", "ot CL"]
    if args.only_main:
        names = names[:3]
    variants = {k: make(model_name, *VARIANTS[k][:1], args.device, *VARIANTS[k][1:]) for k in names}
    g = torch.Generator().manual_seed(0)
    classes = 10 if args.device == "cpu" else 1000
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(dev)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), generator=g).to(dev)
    loss_fn = nn.CrossEntropyLoss()
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    scalers = {k: torch.amp.GradScaler(dev.type, enabled=args.amp and dev.type == "cuda") for k in variants}
    times: dict[str, list[float]] = {k: [] for k in variants}

    def step(name: str) -> None:
        model, opt = variants[name]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=args.amp):
            loss = loss_fn(model(x_cl if name.endswith("CL") else x), y)
        scalers[name].scale(loss).backward()
        scalers[name].step(opt)
        scalers[name].update()

    for i in range(args.steps + 2):
        for name in variants:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(name)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # the first two steps warm up allocators, kernels and the OT threshold caches
                times[name].append(time.perf_counter() - start)
    if args.profile:
        profile(model_name, step, ["fp32", "ot"], dev)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def profile(model_name: str, step, names: list[str], dev: torch.device) -> None:
    """Where a step's time goes: torch.profiler over two steps of each variant, the top operators by
    self device time and by self CPU time, and the totals (a step whose CPU total exceeds its device
    total is bound by launching work, not by doing it)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for name in names:
        with torch_profile(activities=acts) as prof:
            for _ in range(2):
                step(name)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        cpu = sum(e.self_cpu_time_total for e in events) / 2e3
        gpu = sum(getattr(e, "self_device_time_total", 0) for e in events) / 2e3
        print(f"\nprofile {model_name} {name}: self CPU {cpu:.2f} ms/step, self device {gpu:.2f} ms/step")
        if dev.type == "cuda":
            print(events.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))
        print(events.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50))


def others(med: dict[str, float]) -> str:
    """The extra variants, each in ms and against fp32."""
    extra = [k for k in med if k not in ("fp32", "sign", "ot")]
    return "; ".join(f"{k} {med[k]:.2f} ms ({med[k] / med['fp32']:.2f}x)" for k in extra) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18", help="comma-separated; model:batch:size overrides per model")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="autocast (fp16 + GradScaler on CUDA, bf16 on CPU)")
    ap.add_argument("--channels-last", action="store_true", help="also fp32 and ot in channels-last memory")
    ap.add_argument("--profile", action="store_true", help="also print where fp32's and ot's step time goes")
    ap.add_argument("--only-main", action="store_true", help="fp32, sign and ot alone (no extra variants)")
    args = ap.parse_args()
    device = torch.cuda.get_device_name() if args.device == "cuda" else machine()
    print(f"machine: {device}; torch {torch.__version__}, timm {timm.__version__}")
    print("| model | batch | input | fp32 ms | sign ms | ot ms | ot / sign | ot / fp32 | sign / fp32 | others |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.model.split(","):
        name, *rest = spec.split(":")
        batch = int(rest[0]) if rest else args.batch
        size = int(rest[1]) if len(rest) > 1 else args.img_size
        med = run(args, name, batch, size)
        amp = ", AMP" if args.amp else ""
        print(
            f"| {name} | {batch} | {size}{amp} | {med['fp32']:.2f} | {med['sign']:.2f} | {med['ot']:.2f} "
            f"| {med['ot'] / med['sign']:.2f}x | {med['ot'] / med['fp32']:.2f}x | {med['sign'] / med['fp32']:.2f}x "
            f"| {others(med)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
