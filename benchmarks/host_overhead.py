"""Host (Python) cost of the binary layers in a training step, as a GPU step pays it, measured on the CPU.

A ViT step on an H100 is bound by the host issuing work, not by the GPU doing it, so every binary
layer's Python shows in the step time. This script measures that Python alone, on any machine: the
model is vit_small_patch16_224 (12 blocks, 49 binary layers) narrowed to a width of 32 on 32x32
inputs, so that its arithmetic is negligible; the binary layers take the CUDA path (a model's
StepWeights, grouped launch plans, the straight-through node), with the Triton kernel replaced by a
no-op. fp32 weights and ot run interleaved, forward and backward timed apart, under bf16 autocast.

    python benchmarks/host_overhead.py [--steps 150] [--model vit_small_patch16_224]

The code under test is whichever ``equalbits_cli`` is imported: put an older checkout first on
``PYTHONPATH`` to compare.
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

import equalbits_cli  # noqa: E402
from equalbits_cli import BinarizeConfig, binarize_  # noqa: E402
from equalbits_cli.quant import quantize  # noqa: E402


class _NoKernel:
    """Stands in for the Triton kernel: launching it does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _gpu_path_without_kernels() -> None:
    from equalbits_cli.quant.kernels import ot_triton

    quantize.use_triton = lambda device, n, dtype=None: True  # every layer takes the grouped CUDA path
    ot_triton._binary_rows_kernel = _NoKernel()


def make(name: str, method: str | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, embed_dim=32, num_heads=2, img_size=32, num_classes=10)
    if method is not None:
        binarize_(model, BinarizeConfig(method=method))
    model.train()
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224", help="a timm ViT (embed_dim and img_size are set)")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the host's own thread: what issuing the work costs, not the arithmetic
    _gpu_path_without_kernels()
    variants = {"fp32": make(args.model, None), "ot": make(args.model, "ot")}
    layers = len(variants["ot"][0].blocks[0].mlp.fc1._step_weights.layers)
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([1])
    fwd: dict[str, list[float]] = {k: [] for k in variants}
    bwd: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.steps + 20):
        for name, (model, opt) in variants.items():
            opt.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            mid = time.perf_counter()
            loss.backward()
            end = time.perf_counter()
            opt.step()  # the latents change: every step rebuilds the weights, as in training
            if i >= 20:
                fwd[name].append(mid - start)
                bwd[name].append(end - mid)
    med = {k: (statistics.median(fwd[k]) * 1e3, statistics.median(bwd[k]) * 1e3) for k in variants}
    (ff, fb), (of, ob) = med["fp32"], med["ot"]
    print(f"machine: {machine()}; equalbits {equalbits_cli.__version__} from {Path(equalbits_cli.__file__).parent}")
    print(
        "| model | binary layers | fp32 fwd + bwd | ot fwd + bwd | extra: forward | backward | per layer | ot / fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    extra = (of + ob) - (ff + fb)
    print(
        f"| {args.model} (width 32) | {layers} | {ff:.3f} + {fb:.3f} ms | {of:.3f} + {ob:.3f} ms "
        f"| {of - ff:.3f} ms | {ob - fb:.3f} ms | {extra / layers * 1e3:.1f} µs | {(of + ob) / (ff + fb):.2f}x |"
    )


if __name__ == "__main__":
    main()
