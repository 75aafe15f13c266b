"""int8 ONNX of a 1W/1A model: the default route (QLinearConv, +-1 inputs quantized exactly) against the
exact one (``--exact-binary``: ConvInteger on the packed codes), the 1W/32A int8 file and the float ONNX
of the same network, all timed in the same run; top-1 of each on the digits after a 1W/1A fine-tune.

Speed at 224x224 (``--size``), batch 8, 2 onnxruntime threads; accuracy at 32x32 on the built-in digits
(a teacher trained in the run, or reused with ``--teachers DIR``, then 5 fine-tune epochs).

    python benchmarks/int8_binary.py [--models resnet18] [--teachers DIR] [--size 224]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


def latency(path: Path, x: np.ndarray, threads: int, calls: int = 7) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    session.run(None, {"input": x})
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def top1(path: Path, data: Path) -> float:
    from equalbits_cli.train.evaluate import evaluate_source

    return evaluate_source(str(path), data, workers=0, device="cpu")["top1"]


def files(model, tmp: Path, data: Path, size: int | None) -> dict[str, Path]:
    """The four files of one 1W/1A model, by name (``size`` None: the model's own input size)."""
    from equalbits_cli.export.int8 import export_onnx_int8, with_real_inputs
    from equalbits_cli.export.onnx import export_onnx

    out = {"float ONNX": tmp / "float.onnx", "1W/32A int8": tmp / "w1a32.onnx"}
    export_onnx(model, out["float ONNX"], weights="float", img_size=size)
    export_onnx_int8(with_real_inputs(model), out["1W/32A int8"], data, img_size=size, check_images=0)
    for name, exact in (("1W/1A int8, exact (ConvInteger)", True), ("1W/1A int8, default (QLinearConv)", False)):
        out[name] = tmp / f"w1a1-{exact}.onnx"
        export_onnx_int8(model, out[name], data, img_size=size, check_images=0, exact_binary=exact)
    return out


def main() -> None:
    import onnxruntime
    import timm
    from activations import teacher, workspace

    from equalbits_cli import BinarizeConfig, binarize_model, load_model, save_checkpoint
    from equalbits_cli.config import FinetuneConfig
    from equalbits_cli.train.finetune import finetune

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18")
    ap.add_argument("--teachers", type=Path, default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keep, data, classes = workspace(args.teachers, tmp, "digits")
        for name in args.models.split(","):
            teacher_path, _ = teacher(name, data, keep, classes, "digits")
            student = binarize_model(name, BinarizeConfig(activations="sign"), checkpoint=teacher_path)
            path = save_checkpoint(student, tmp / f"{name}.safetensors")
            tuned = tmp / f"{name}.ft.safetensors"
            finetune(path, data, FinetuneConfig(epochs=5, workers=0), output=tuned)
            model = load_model(tuned).eval()
            acc = {"PyTorch (packed)": top1(tuned, data)}
            (tmp / "acc").mkdir(exist_ok=True)
            acc.update({k: top1(p, data) for k, p in files(model, tmp / "acc", data, None).items()})
            fresh = binarize_model(name, BinarizeConfig(activations="sign"), num_classes=classes).eval()
            (tmp / "speed").mkdir(exist_ok=True)
            speed_files = files(fresh, tmp / "speed", data, args.size)
            x = np.random.default_rng(0).standard_normal((8, 3, args.size, args.size)).astype(np.float32)
            ms = {k: latency(p, x, args.threads) for k, p in speed_files.items()}
            for k in ms:
                rows.append((name, k, acc.get(k), ms[k], ms["float ONNX"] / ms[k]))
    print(f"\ntorch {torch.__version__}, timm {timm.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"speed: {args.size}x{args.size}, batch 8, {args.threads} threads; top-1: digits 32x32, 5 epochs\n")
    print("| model | file | top-1 | latency | vs float ONNX |\n|---|---|---|---|---|")
    for name, k, a, t, r in rows:
        print(f"| {name} | {k} | {a:.1f}% | {t:.1f} ms | {r:.2f}x |")


if __name__ == "__main__":
    main()
