"""Inference latency and file size: PyTorch eager fp32, ONNX fp32, ONNX with packed weights and ONNX int8
(``export --format onnx-int8``), all in onnxruntime on the CPU, in one run; accuracy of the int8 file.

Speed: for each model (random init, fixed seed, 1000 classes, 224x224; latency does not depend on the
values) it binarizes at ratio 0.5 with the default layer policy, writes the packed safetensors file and
the three ONNX files, and times a forward pass at batch 1 and 8 with 1 and 2 threads: PyTorch best of
``--reps`` after a warm-up, the ONNX files with the function ``export``'s speed report uses
(``equalbits_cli.export.speed.time_onnx``: blocks of calls in turn for ``--seconds``, median). The int8
file is calibrated on 64 UCI-digits images resized to 224 (scikit-learn ships them).
``int8 vs fp32`` is ONNX fp32 time / ONNX int8 time.

Accuracy (``--accuracy``): runs ``quickstart`` (teacher trained from scratch on the digits at 32x32,
binarized, fine-tuned), exports the fine-tuned student as packed safetensors, ONNX and ONNX int8 and
scores each with ``equalbits eval`` on the 359 held-out images.

    python benchmarks/inference.py [--models resnet18,resnet50,mobilenetv3_large_100,vit_small_patch16_224]
        [--reps 5] [--seconds 3] [--accuracy] [--accuracy-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from _timing import best_ms

from equalbits_cli import BinarizeConfig, binarize_model, save_packed
from equalbits_cli.export.int8 import export_onnx_int8
from equalbits_cli.export.onnx import export_onnx
from equalbits_cli.export.speed import onnx_session, time_onnx
from equalbits_cli.nn.packed import pack_model

MODELS = "resnet18,resnet50,mobilenetv3_large_100,vit_small_patch16_224"


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def speed(names: list[str], reps: int, seconds: float, tmp: Path) -> tuple[list[dict], list[dict]]:
    from equalbits_cli.data.builtin import make_digits_imagefolder

    data = make_digits_imagefolder(tmp / "digits224", size=224, val_fraction=0.05)
    timings, sizes = [], []
    for name in names:
        torch.manual_seed(0)
        model = binarize_model(name, BinarizeConfig(), num_classes=1000).eval()
        plain = pack_model(model)
        files = {
            "packed": save_packed(model, tmp / f"{name}.packed.safetensors"),
            "onnx_fp32": Path(export_onnx(model, tmp / f"{name}.fp32.onnx", weights="float", img_size=224).path),
            "onnx_packed": Path(export_onnx(model, tmp / f"{name}.packed.onnx", img_size=224).path),
        }
        int8 = export_onnx_int8(model, tmp / f"{name}.int8.onnx", data, img_size=224, check_images=0)
        files["onnx_int8"] = Path(int8.path)
        size = {k: p.stat().st_size for k, p in files.items()}
        sizes.append({"model": name, **size, "int8_ops": int8.int8_ops, "float_ops": int8.float_ops})
        print(f"# {name}: int8 ops {int8.int8_ops}, float matrix ops left {int8.float_ops}", flush=True)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            sessions = {k: onnx_session(files[k], threads) for k in ("onnx_fp32", "onnx_packed", "onnx_int8")}
            for batch in (1, 8):
                x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
                xn = x.numpy()
                row = {"model": name, "batch": batch, "threads": threads}
                with torch.inference_mode():
                    row["torch_fp32_ms"] = best_ms(lambda: plain(x), reps)
                for k, (ms, _) in time_onnx(sessions, xn, seconds=seconds).items():
                    row[f"{k}_ms"] = ms
                row["int8_speedup"] = row["onnx_fp32_ms"] / row["onnx_int8_ms"]
                timings.append(row)
                print(json.dumps(row), flush=True)
    return timings, sizes


def accuracy(models: list[str], tmp: Path) -> list[dict]:
    import subprocess
    import sys

    from equalbits_cli.export.write import export_file
    from equalbits_cli.recipes.quickstart import run_quickstart

    rows = []
    for name in models:
        out = tmp / f"qs_{name}"
        qs = run_quickstart(out, model=name)
        ft = out / "student.ft.safetensors"
        int8 = export_file(ft, out / "student.int8.onnx", format="onnx-int8", data=out / "digits")
        row = {"model": name, "teacher_top1": qs["teacher_top1"], "int8_agreement": int8["agreement"]}
        for key, target in (
            ("latent_top1", ft),
            ("packed_top1", out / "student.packed.safetensors"),
            ("onnx_top1", out / "student.onnx"),
            ("int8_top1", out / "student.int8.onnx"),
        ):
            extra = [] if target.suffix == ".onnx" else ["--img-size", "32"]
            r = subprocess.run(
                [sys.executable, "-m", "equalbits_cli", "eval", str(target), "--data", str(out / "digits"), "--json"]
                + extra,
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                check=True,
            )
            row[key] = json.loads(r.stdout)["top1"]
        row["int8_minus_packed"] = row["int8_top1"] - row["packed_top1"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--reps", type=int, default=5, help="PyTorch: best of this many calls")
    ap.add_argument("--seconds", type=float, default=3.0, help="ONNX: time the three files for this long")
    ap.add_argument("--accuracy", action="store_true", help="also run the accuracy check (quickstart, ~1 min a model)")
    ap.add_argument("--accuracy-only", action="store_true")
    ap.add_argument("--accuracy-models", default="resnet18,mobilenetv3_small_100")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from equalbits_cli.export.speed import int8_dot_product

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "int8_dot": int8_dot_product(),  # '' : no VNNI / dot-product instructions, where int8 gains little
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }
    print(f"# {info}")
    result: dict = {"machine": info}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.accuracy_only:
            timings, sizes = speed(args.models.split(","), args.reps, args.seconds, Path(tmp))
            result.update(timings=timings, sizes=sizes)
            cols = ["model", "batch", "threads", "PyTorch fp32 ms", "ONNX fp32 ms", "ONNX packed ms", "ONNX int8 ms"]
            print("\n| " + " | ".join(cols + ["int8 vs fp32"]) + " |")
            print("|---|---|---|---|---|---|---|---|")
            for r in timings:
                print(
                    f"| {r['model']} | {r['batch']} | {r['threads']} | {r['torch_fp32_ms']:.1f} "
                    f"| {r['onnx_fp32_ms']:.1f} "
                    f"| {r['onnx_packed_ms']:.1f} | {r['onnx_int8_ms']:.1f} | {r['int8_speedup']:.2f}x |"
                )
            print(
                "\n| model | packed safetensors MiB | ONNX fp32 MiB | ONNX packed MiB | ONNX int8 MiB | int8/packed |"
            )
            print("|---|---|---|---|---|---|")
            for s in sizes:
                print(
                    f"| {s['model']} | {mib(s['packed'])} | {mib(s['onnx_fp32'])} | {mib(s['onnx_packed'])} "
                    f"| {mib(s['onnx_int8'])} | {s['onnx_int8'] / s['packed']:.2f}x |"
                )
        if args.accuracy or args.accuracy_only:
            rows = accuracy(args.accuracy_models.split(","), Path(tmp))
            result["accuracy"] = rows
            print("\n| model | teacher | latent | packed | ONNX | ONNX int8 | int8 - packed | top-1 agreement |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(
                    f"| {r['model']} | {r['teacher_top1']:.2f}% | {r['latent_top1']:.2f}% | {r['packed_top1']:.2f}% "
                    f"| {r['onnx_top1']:.2f}% | {r['int8_top1']:.2f}% | {r['int8_minus_packed']:+.2f} "
                    f"| {r['int8_agreement']:.2f}% |"
                )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
