"""File sizes: fp32 checkpoint, packed safetensors, the theoretical minimum and ONNX, in one run.

For each model (random init, fixed seed; sizes do not depend on the values) and setting, it writes
the latent checkpoint, the packed file and the packed-weight ONNX, and prints their sizes and ratios.
Theoretical = 1 bit per binary weight (2 with pruning) + 4 bytes per per-filter scale + every other
tensor as stored; the header allowance is what the file holds beyond it.

    python benchmarks/export_size.py [--models resnet18,resnet50,mobilenetv3_large_100,vit_small_patch16_224]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from equalbits_cli import BinarizeConfig, binarize_model, collect_stats, save_checkpoint, save_packed
from equalbits_cli.export.onnx import export_onnx


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50,mobilenetv3_large_100,vit_small_patch16_224")
    ap.add_argument("--prunes", default="0,0.3")
    args = ap.parse_args()
    header = [
        "model",
        "prune",
        "fp32 MiB",
        "packed MiB",
        "theoretical MiB",
        "packed/theoretical",
        "ONNX MiB",
        "ONNX/packed",
        "fp32/packed",
        "ONNX max rel diff",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for prune in (float(p) for p in args.prunes.split(",")):
                torch.manual_seed(0)
                model = binarize_model(name, BinarizeConfig(prune=prune), num_classes=1000)
                stats = collect_stats(model)
                latent = save_checkpoint(model, Path(tmp) / "l.safetensors").stat().st_size
                packed = save_packed(model, Path(tmp) / "p.safetensors").stat().st_size
                onnx = export_onnx(model, Path(tmp) / "m.onnx", img_size=224)
                row = [
                    name,
                    f"{prune:g}",
                    mib(latent),
                    mib(packed),
                    mib(stats.packed_bytes),
                    f"{packed / stats.packed_bytes:.4f}",
                    mib(onnx.bytes),
                    f"{onnx.bytes / packed:.3f}",
                    f"{latent / packed:.1f}x",
                    f"{onnx.rel_diff:.1e}",
                ]
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
