"""The paper's experiment and ours on the built-in ``chars`` data, side by side, seeds repeated.

- **paper**: 1-bit weights and 1-bit activations, plain levels ``scale * codes`` (``center=False``), the
  Equal Bits setting (its ImageNet code defines 1W/1A ResNets only).
- **ours**: 1-bit weights, full-precision activations, centred levels ``scale * (codes - mu)``, the
  tool's default.

For each: ``ot`` at every ratio, ``sign`` (BWN) and ``irnet`` (IR-Net's Libra-PB forward with a
straight-through gradient; see docs/method.md), each fine-tuned once per seed from the same teacher
with the same recipe. A full-precision resnet18 teacher is trained first on the same data. Rows go to
``WORKDIR/*.jsonl`` as they finish, so an interrupted run goes on where it stopped; the summary (mean
and sample standard deviation over seeds) and the plot go to ``--out`` and ``--plot``.

    python benchmarks/sweep_chars.py [--workdir bench_chars] [--seeds 0,1,2] [--epochs 2]
        [--ratios 0.1,0.3,0.5,0.7,0.9] [--settings paper,ours] [--out docs/sweep_chars.json]
        [--plot docs/sweep_chars.png] [--variants "lr=0.002;augment=light;calibrate_batches=0"]

``--variants`` re-checks the fine-tune defaults (issue 24, item 5): each ``;``-separated variant changes
one or more ``FinetuneConfig`` fields (``name=value,name=value``) and runs every setting, ratio and
seed again; the table gets one block per variant, the defaults first, and each variant's difference
from the defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from _variants import paired, parse_variants

SETTINGS = {"paper": {"activations": "sign", "center": False}, "ours": {"activations": "none", "center": None}}


def teacher(workdir: Path, model: str, data: Path, epochs: int) -> Path:
    """A full-precision teacher trained on ``data`` (reused if the workdir holds one)."""
    import timm

    from equalbits_cli.data.config import DataOverrides, resolve_data_config
    from equalbits_cli.model.convert import save_full_precision
    from equalbits_cli.train.finetune import train_classifier

    path = workdir / f"{model}.teacher.safetensors"
    if path.is_file():
        return path
    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False, num_classes=36)
    whole = DataOverrides(img_size=32, crop_pct=1.0)  # the characters' frame is the whole image
    t0 = time.perf_counter()
    top1 = train_classifier(net, data, epochs=epochs, lr=2e-3, data=whole, workers=0)["top1"]
    print(f"# teacher {model}: {top1:.2f}% after {epochs} epochs in {time.perf_counter() - t0:.0f} s", flush=True)
    return save_full_precision(net, path, data_config=resolve_data_config(net, whole), top1=top1)


def _seeds(rows: list[dict], setting: str, method: str, ratio: float, variant: str) -> list[tuple[int, float]]:
    """``(seed, top1)`` of one setting's runs."""
    key = (setting, method, ratio, variant)
    return [(r["seed"], r["top1"]) for r in rows if (r["setting"], r["method"], r["ratio"], r["variant"]) == key]


def main() -> None:
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.data.builtin import make_dataset
    from equalbits_cli.recipes.sweep import run_sweep
    from equalbits_cli.report.plots import plot_sweep
    from equalbits_cli.report.stats import summarize_sweep

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("bench_chars"))
    p.add_argument("--model", default="resnet18")
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ratios", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--methods", default="ot,sign,irnet")
    p.add_argument("--settings", default="paper,ours")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--variants", default="", help="';'-separated FinetuneConfig changes, e.g. 'lr=0.01;epochs=2'")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = make_dataset("chars", args.workdir / "chars", size=32)
    ckpt = teacher(args.workdir, args.model, data, args.teacher_epochs)
    seeds = [int(s) for s in args.seeds.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = parse_variants(args.variants)
    rows = []
    for variant, changes in variants.items():
        config = FinetuneConfig(**{"epochs": args.epochs, "workers": 0, "seed": seeds[0], **changes})
        for name in args.settings.split(","):
            t0 = time.perf_counter()
            got = run_sweep(
                args.model,
                data,
                ratios=ratios,
                methods=args.methods.split(","),
                seeds=seeds,
                checkpoint=str(ckpt),
                finetune_config=config,
                rows_file=args.workdir / f"{args.model}.{name}.jsonl",  # rows are keyed by their settings
                **SETTINGS[name],
            )
            rows += [{**r, "setting": name, "variant": variant} for r in got]
            print(f"# {variant}, {name}: {len(got)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
    teacher_top1 = rows[0]["teacher_top1"]
    print(f"teacher top-1 {teacher_top1:.2f}%")
    print("| variant | setting | method | +1 ratio | entropy | seeds | top-1 mean | sd | below teacher ", end="")
    print("| vs defaults (paired, ± s.e.) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for variant in variants:
        for name in args.settings.split(","):
            for s in summarize_sweep([r for r in rows if r["setting"] == name and r["variant"] == variant]):
                summary.append({**s, "setting": name, "variant": variant})
                diff = ""
                if variant != "defaults":  # seed by seed against the defaults' run of the same setting
                    mean, se, _ = paired(
                        *(_seeds(rows, name, s["method"], s["ratio"], v) for v in (variant, "defaults"))
                    )
                    diff = f"{mean:+.2f} ± {se:.2f}"
                print(
                    f"| {variant} | {name} | {s['method']} | {s['ratio']:.3f} | {s['entropy_bits']:.3f} | "
                    f"{s['seeds']} | {s['top1_mean']:.2f}% | {s['top1_std']:.2f} | "
                    f"{teacher_top1 - s['top1_mean']:.2f} | {diff} |"
                )
    if args.plot:
        plot_sweep(
            [r for r in rows if r["variant"] == "defaults"],
            args.plot,
            title=f"{args.model} on chars (32x32, 36 classes), fine-tune epochs: {args.epochs}",
        )
    if args.out:
        env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor()}
        args.out.write_text(json.dumps({"env": env, "teacher_top1": teacher_top1, "summary": summary, "rows": rows}))


if __name__ == "__main__":
    main()
