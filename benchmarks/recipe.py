"""Accuracy of the binarize + fine-tune recipe across model families and ratios, old defaults and new, in one run.

On a built-in dataset (``--dataset digits``, the default: the UCI digits that scikit-learn ships, 32x32,
1,438 train / 359 val images; or ``chars``), it trains a full-precision teacher per family from scratch,
then for each (model, ratio) binarizes it and
fine-tunes it by distillation twice:

- ``before``: the defaults of equalbits 0.1: every Conv2d/Linear but the stem and classifier binarized
  (depthwise and squeeze-excite too), levels ``scale * codes``, timm's ImageNet training augmentation,
  learning rate 5e-4.
- ``after``: the current defaults: depthwise layers kept, centred levels, no augmentation,
  learning rate 5e-3 (BatchNorm is re-estimated on un-augmented images in both).

Columns: teacher top-1, student top-1 just binarized, after BatchNorm re-estimation, after the
fine-tune; the share of all parameters binarized and the packed size. Every number is measured in
this run; nothing is copied from elsewhere.

    python benchmarks/recipe.py [--out recipe.json] [--quick] [--models resnet18,...] [--activations sign]
        [--recipes before,after] [--dataset digits|chars] [--teachers DIR] [--seeds 0,1,2]
        [--variants "temperature=4;lr=0.01"]

``--seeds`` fine-tunes every student once per seed (the teachers stay those of seed 0). ``--variants``
re-checks fine-tune defaults across families: each ``;``-separated variant changes ``FinetuneConfig``
fields (``name=value,name=value``) and runs every student again; the summary gives each variant's
difference from the defaults seed by seed (mean and standard error).

With ``--activations sign`` the students binarize their activations too (1W/1A); the fine-tune starts
each activation threshold at its channel's median before re-estimating BatchNorm.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _variants import paired, parse_variants

# (model, teacher epochs, fine-tune epochs, ratios)
PLAN = [
    ("resnet18", 4, 3, (0.3, 0.5, 0.7)),
    ("mobilenetv3_small_100", 12, 5, (0.5,)),
    ("efficientnet_b0", 12, 5, (0.5,)),
    ("convnext_atto", 12, 3, (0.5,)),
    ("vit_tiny_patch16_224", 30, 5, (0.5,)),  # built for 32x32: 2x2 patches of 16
    ("deit_tiny_patch16_224", 30, 5, (0.5,)),
]
QUICK = [("resnet18", 2, 1, (0.3, 0.7))]


def recipes():
    from equalbits_cli import FinetuneConfig, LayerPolicy

    return {
        "before": {"policy": LayerPolicy(depthwise=True, gates=True), "center": False, "augment": "full", "lr": 5e-4},
        "after": {"policy": None, "center": None, "augment": "none", "lr": FinetuneConfig().lr},
    }


def run(
    out_json: Path | None,
    quick: bool,
    models: list[str] | None = None,
    activations: str = "none",
    which: tuple[str, ...] = ("before", "after"),
    ratios_override: tuple[float, ...] | None = None,
    epochs_override: int | None = None,
    dataset: str = "digits",
    teachers: Path | None = None,
    seeds: tuple[int, ...] = (0,),
    variants: dict[str, dict] | None = None,
) -> list[dict]:

    from equalbits_cli import BinarizeConfig, binarize_model, collect_stats, save_checkpoint
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.data.builtin import make_dataset
    from equalbits_cli.data.config import DataOverrides, resolve_data_config
    from equalbits_cli.data.folders import find_splits
    from equalbits_cli.model.convert import create_model, save_full_precision
    from equalbits_cli.train.finetune import finetune, train_classifier

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if teachers is None:
            data = make_dataset(dataset, tmp / dataset, size=32)
            classes = len(find_splits(data).classes)
        else:  # teachers (and the data) shared with benchmarks/activations.py
            from activations import teacher as shared_teacher
            from activations import workspace

            teachers, data, classes = workspace(teachers, tmp, dataset)
        for name, teacher_epochs, epochs, ratios in QUICK if quick else PLAN:
            if models and name not in models:
                continue
            ratios = ratios_override or ratios
            epochs = epochs_override or epochs
            if teachers is not None:
                teacher_path, top1 = shared_teacher(name, data, teachers, classes, dataset)
            else:
                torch.manual_seed(0)
                teacher = create_model(name, num_classes=classes, img_size=32)  # ViTs: position embeddings, 32x32
                t0 = time.perf_counter()
                digits = DataOverrides(img_size=32, crop_pct=1.0)  # the built-in images fill their frame
                top1 = train_classifier(teacher, data, epochs=teacher_epochs, lr=2e-3, data=digits, workers=0)["top1"]
                teacher_path = save_full_precision(
                    teacher, tmp / f"{name}.safetensors", data_config=resolve_data_config(teacher, digits), top1=top1
                )
                print(f"# teacher {name}: {top1:.2f}% in {time.perf_counter() - t0:.0f} s", flush=True)
            runs = [
                (ratio, recipe, r, variant, changes, seed)
                for ratio in ratios
                for recipe, r in recipes().items()
                if recipe in which
                for variant, changes in (variants or {"defaults": {}}).items()
                for seed in seeds
            ]
            students = {}  # (ratio, recipe) -> (file, stats): one binarization serves every variant and seed
            for ratio, recipe, r, variant, changes, seed in runs:
                if (ratio, recipe) not in students:
                    cfg = BinarizeConfig(ratio=ratio, center=r["center"], activations=activations)
                    student = binarize_model(name, cfg, checkpoint=teacher_path, policy=r["policy"])
                    path = save_checkpoint(student, tmp / f"{name}-{ratio}-{recipe}.safetensors")
                    students[ratio, recipe] = (path, collect_stats(student))
                path, stats = students[ratio, recipe]
                t0 = time.perf_counter()
                config = FinetuneConfig(
                    **({"epochs": epochs, "workers": 0, "augment": r["augment"], "lr": r["lr"], "seed": seed} | changes)
                )
                res = finetune(
                    path,
                    data,
                    config,
                    output=tmp / f"{name}-{ratio}-{recipe}-{variant}-{seed}.ft.safetensors",
                )
                assert res is not None
                row = {
                    "model": name,
                    "ratio": ratio,
                    "recipe": recipe if activations == "none" else f"{recipe}, 1W/1A",
                    "variant": variant,
                    "seed": seed,
                    "epochs": config.epochs,
                    "teacher_top1": res.teacher_top1,
                    "binarized_top1": res.student_top1_before,
                    "bn_top1": res.student_top1_calibrated,  # None: nothing to re-estimate (no BatchNorm)
                    "finetuned_top1": res.student_top1,
                    "history_top1": [h["val_top1"] for h in res.history],
                    "binarized_share": stats.binarized_params / stats.params,
                    "packed_mib": stats.packed_bytes / 2**20,
                    "fp32_mib": stats.fp32_bytes / 2**20,
                    "seconds": time.perf_counter() - t0,
                }
                if activations == "sign":  # do the activation bits carry information?
                    from equalbits_cli import load_model
                    from equalbits_cli.report.inspect import activation_shares
                    from equalbits_cli.train.evaluate import activation_batch

                    tuned = load_model(tmp / f"{name}-{ratio}-{recipe}-{variant}-{seed}.ft.safetensors")
                    shares = activation_shares(tuned, activation_batch(tuned, data))
                    row["act_plus_share_min"], row["act_plus_share_max"] = (
                        min(shares.values()),
                        max(shares.values()),
                    )
                (tmp / f"{name}-{ratio}-{recipe}-{variant}-{seed}.ft.safetensors").unlink()
                rows.append(row)
                print(json.dumps(row), flush=True)
    if out_json is not None:
        out_json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return rows


def machine() -> str:
    import timm

    return (
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}"
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| model | ratio | recipe | variant | seed | epochs | teacher | just binarized | BN re-estimated | fine-tuned "
        "| gap to teacher | binarized share | packed MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ratio']} | {r['recipe']} | {r['variant']} | {r['seed']} | {r['epochs']} "
            f"| {r['teacher_top1']:.1f}% "
            f"| {r['binarized_top1']:.1f}% | {'-' if r['bn_top1'] is None else format(r['bn_top1'], '.1f') + '%'} "
            f"| **{r['finetuned_top1']:.1f}%** "
            f"| {r['finetuned_top1'] - r['teacher_top1']:+.1f} | {100 * r['binarized_share']:.0f}% "
            f"| {r['packed_mib']:.2f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Mean and spread over seeds per (model, ratio, recipe, variant), and each variant's paired
    difference from the defaults."""
    lines = [
        "| model | ratio | recipe | variant | teacher | fine-tuned (mean ± sd) | seeds "
        "| vs defaults (mean ± s.e., paired) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["ratio"], r["recipe"], r["variant"]), []).append(r)
    for (model, ratio, recipe, variant), group in groups.items():
        top1 = [r["finetuned_top1"] for r in group]
        sd = statistics.stdev(top1) if len(top1) > 1 else float("nan")
        base = groups.get((model, ratio, recipe, "defaults"), [])
        diff = ""
        if variant != "defaults" and base:
            mean, se, n = paired(
                [(r["seed"], r["finetuned_top1"]) for r in group], [(r["seed"], r["finetuned_top1"]) for r in base]
            )
            diff = f"{mean:+.2f} ± {se:.2f} ({n} seeds)"
        lines.append(
            f"| {model} | {ratio} | {recipe} | {variant} | {group[0]['teacher_top1']:.1f}% "
            f"| {statistics.fmean(top1):.2f} ± {sd:.2f}% | {','.join(str(r['seed']) for r in group)} | {diff} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="Also write the rows as JSON here.")
    ap.add_argument("--quick", action="store_true", help="resnet18 at 0.3/0.7, 1 epoch: a smoke run.")
    ap.add_argument("--models", default="", help="Comma-separated subset of the plan's models.")
    ap.add_argument("--activations", default="none", choices=["none", "sign"], help="sign: 1-bit activations too.")
    ap.add_argument("--recipes", default="before,after", help="Which recipes to run.")
    ap.add_argument("--ratios", default="", help="Comma-separated ratios instead of the plan's.")
    ap.add_argument("--epochs", type=int, default=None, help="Fine-tune epochs instead of the plan's.")
    ap.add_argument("--dataset", default="digits", choices=["digits", "chars"], help="The built-in dataset.")
    ap.add_argument("--teachers", type=Path, default=None, help="Keep and reuse teachers (and data) here, shared "
                    "with benchmarks/activations.py (its teacher epochs).")  # fmt: skip
    ap.add_argument("--seeds", default="0", help="Comma-separated fine-tune seeds; each student runs once per seed.")
    ap.add_argument("--variants", default="", help="';'-separated FinetuneConfig changes to compare with the "
                    "defaults, e.g. 'temperature=4;lr=0.01'.")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    models = [m for m in args.models.split(",") if m]
    ratios = tuple(float(r) for r in args.ratios.split(",") if r) or None
    rows = run(
        args.out,
        args.quick,
        models,
        args.activations,
        tuple(args.recipes.split(",")),
        ratios,
        args.epochs,
        args.dataset,
        args.teachers,
        tuple(int(s) for s in args.seeds.split(",")),
        parse_variants(args.variants),
    )
    print(f"\n{machine()}\n")
    print(table(rows))
    if len({r["seed"] for r in rows}) > 1 or len({r["variant"] for r in rows}) > 1:
        print()
        print(summary(rows))


if __name__ == "__main__":
    main()
