"""Training-step time of the binarized student: method=ot against method=sign and full precision.

Same model, batch, input size and optimizer (AdamW) in one run; steps are interleaved round-robin
so that machine noise hits every variant alike. Reports the median step time and the ratios.

    python benchmarks/train_step.py [--model resnet18] [--batch 64] [--img-size 32] [--steps 12]
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


def make(model_name: str, method: str | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=10)
    if method is not None:
        binarize_(model, BinarizeConfig(method=method))
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    variants = {"fp32": make(args.model, None), "sign": make(args.model, "sign"), "ot": make(args.model, "ot")}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in range(args.steps + 2):
        for name, (model, opt) in variants.items():
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            if step >= 2:  # the first two steps warm up allocators and the OT threshold caches
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"machine: {machine()}")
    print(f"{args.model}, batch {args.batch}, {args.img_size}x{args.img_size}, AdamW lr 1e-3, {args.steps} steps")
    print("| variant | median step ms | vs fp32 | vs sign |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / med['fp32']:.2f}x | {v / med['sign']:.2f}x |")


if __name__ == "__main__":
    main()
