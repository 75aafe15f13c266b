"""1-bit activations (1W/1A) across families: which binarized layers should keep real-valued inputs.

For each model it trains (or reuses, with ``--teachers DIR``) a full-precision teacher on a built-in
dataset at 32x32, then for each input variant binarizes it with ``activations="sign"``, lets the
chosen binarized layers compute on real inputs, fine-tunes with the CLI defaults and reports top-1,
the gap to the teacher, the share of binarized layers with binary inputs and the +1 share range of
the activation bits on validation images. Variants (names of binarized layers that keep real inputs):

- ``all``: none; every binarized layer binarizes its input (equalbits 0.8 and earlier).
- ``gate``: the layers inside squeeze-excite modules (``*.se.*``).
- ``default``: the shipped policy: every layer whose input is a pooled vector (gates, a head
  convolution after global pooling).
- ``default+pwl``: also the projection convolutions of inverted residuals (``*.conv_pwl``, their
  input is the depthwise output); ``default+pw``: also their expansion convolutions (``*.conv_pw``).

Every number is measured in this run, or in the run that trained the reused teachers.

    python benchmarks/activations.py --models mobilenetv3_small_100 --variants all,gate,default
        [--teachers DIR] [--epochs 5] [--seeds 0,1,2] [--dataset digits] [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

TEACHER_EPOCHS = {"resnet18": 4, "mobilenetv3_small_100": 12, "efficientnet_b0": 12, "convnext_atto": 12}
TEACHER_EPOCHS |= {"vit_tiny_patch16_224": 30, "deit_tiny_patch16_224": 30}
VARIANTS = {  # name -> LayerPolicy fields
    "all": {"all_binary_inputs": True},
    "gate": {"all_binary_inputs": True, "real_inputs": ("*.se.*",)},
    "default": {},
    "default+pwl": {"real_inputs": ("*.conv_pwl",)},
    "default+pw": {"real_inputs": ("*.conv_pw",)},
    "none": {"real_inputs": ("*",)},
    "noskip": {"real_inputs": tuple(f"blocks.{i}.0.*" for i in range(6))},  # MobileNetV3-small
    "shortcut": {"real_inputs": ("*.downsample.*",)},  # ResNet: the shortcut's own convolution
    "last-stage": {"real_inputs": ("layer4.*",)},  # ResNet
}


def teacher(name: str, data: Path, folder: Path, classes: int, dataset: str) -> tuple[Path, float]:
    from equalbits_cli.data.config import DataOverrides, resolve_data_config
    from equalbits_cli.model.convert import create_model, save_full_precision
    from equalbits_cli.train.finetune import train_classifier

    path = folder / f"teacher-{dataset}-{name}.safetensors"
    if path.exists():
        from equalbits_cli.model.convert import read_checkpoint_record

        return path, read_checkpoint_record(path).top1
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, img_size=32)  # a ViT is built for 32x32 (2x2 patches)
    t0 = time.perf_counter()
    overrides = DataOverrides(img_size=32, crop_pct=1.0)
    top1 = train_classifier(model, data, epochs=TEACHER_EPOCHS.get(name, 12), lr=2e-3, data=overrides, workers=0)
    top1 = top1["top1"]
    save_full_precision(model, path, data_config=resolve_data_config(model, overrides), top1=top1)
    print(f"# teacher {name}: {top1:.2f}% in {time.perf_counter() - t0:.0f} s", flush=True)
    return path, top1


def run_one(name: str, variant: str, teacher_path: Path, data: Path, tmp: Path, epochs: int, seed: int = 0) -> dict:
    from equalbits_cli import BinarizeConfig, LayerPolicy, binarize_model, load_model, save_checkpoint
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.report.inspect import activation_shares
    from equalbits_cli.train.evaluate import activation_batch
    from equalbits_cli.train.finetune import finetune

    torch.manual_seed(seed)
    policy = LayerPolicy(**VARIANTS[variant])
    student = binarize_model(name, BinarizeConfig(activations="sign"), checkpoint=teacher_path, policy=policy)
    binary = [m for m in student.modules() if getattr(m, "config", None) is not None and hasattr(m, "act_threshold")]
    path = save_checkpoint(student, tmp / f"{name}-{variant}.safetensors")
    out = tmp / f"{name}-{variant}.ft.safetensors"
    t0 = time.perf_counter()
    res = finetune(path, data, FinetuneConfig(epochs=epochs, workers=0, seed=seed), output=out)
    tuned = load_model(out)
    shares = activation_shares(tuned, activation_batch(tuned, data))
    return {
        "model": name,
        "variant": variant,
        "seed": seed,
        "epochs": epochs,
        "teacher_top1": res.teacher_top1,
        "finetuned_top1": res.student_top1,
        "gap": res.student_top1 - res.teacher_top1,
        "history_top1": [h["val_top1"] for h in res.history],
        "binary_input_layers": sum(m.act_threshold is not None for m in binary),
        "binarized_layers": len(binary),
        "act_plus_share_min": min(shares.values()) if shares else None,
        "act_plus_share_max": max(shares.values()) if shares else None,
        "seconds": time.perf_counter() - t0,
    }


def workspace(teachers: Path | None, tmp: Path, dataset: str) -> tuple[Path, Path, int]:
    """``(folder for teachers, data folder, classes)``: the built-in data at 32x32, built once in
    ``teachers`` (else in ``tmp``)."""
    from equalbits_cli.data.builtin import make_dataset
    from equalbits_cli.data.folders import find_splits

    keep = teachers or tmp
    keep.mkdir(parents=True, exist_ok=True)
    data = keep / dataset
    if not (data / "train").is_dir():
        data = make_dataset(dataset, data, size=32)
    return keep, data, len(find_splits(data).classes)


def table(rows: list[dict]) -> str:
    lines = [
        "| model | real inputs | seed | teacher | 1W/1A fine-tuned | gap | binary-input layers | act. +1 share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = (
            f"{r['act_plus_share_min']:.2f}-{r['act_plus_share_max']:.2f}"
            if r["act_plus_share_min"] is not None
            else "-"
        )
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['seed']} | {r['teacher_top1']:.1f}% "
            f"| **{r['finetuned_top1']:.1f}%** | {r['gap']:+.1f} "
            f"| {r['binary_input_layers']}/{r['binarized_layers']} | {share} |"
        )
    return "\n".join(lines)


def main() -> None:
    import timm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenetv3_small_100,efficientnet_b0")
    ap.add_argument("--variants", default="all,default")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", default="0", help="Comma-separated fine-tune seeds (the teacher is trained once).")
    ap.add_argument("--dataset", default="digits", choices=["digits", "chars"])
    ap.add_argument("--teachers", type=Path, default=None, help="Keep and reuse teachers (and data) here.")
    ap.add_argument("--out", type=Path, default=None, help="Append the rows as JSON lines here.")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keep, data, classes = workspace(args.teachers, tmp, args.dataset)
        for name in args.models.split(","):
            teacher_path, _ = teacher(name, data, keep, classes, args.dataset)
            for variant in args.variants.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    row = run_one(name, variant, teacher_path, data, tmp, args.epochs, seed)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out is not None:
                        with args.out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
    print(f"\ntorch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads\n")
    print(table(rows))


if __name__ == "__main__":
    main()
