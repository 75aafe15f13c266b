"""ONNX export across timm families: torch's exporter (what ``export`` uses) against its legacy one, in one run.

For each family (random init, fixed seed, 1W/32A, ratio 0.5, 64 px for convolutional models and the
native size of fixed-size transformers) it runs ``export_onnx`` (packed weights: ``torch.onnx.export``
with ``dynamo=True`` on the packed inference form, checked in onnxruntime) and, as the baseline, torch's
legacy TorchScript exporter (``dynamo=False``) on the same model with float weights (what 0.5 traced).
It prints whether each succeeds, the whole export's time (trace, onnxruntime check, write), the
exporters' own times (torch's new one on the packed form, the legacy one on the float form), the ONNX
size against the packed safetensors file and the output difference.

    python benchmarks/export_families.py [--models resnet18,mobilenetv3_small_050,...]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch

from equalbits_cli import BinarizeConfig, binarize_model, save_packed
from equalbits_cli.export.onnx import export_data_config, export_onnx, trace_graph
from equalbits_cli.nn.packed import float_model, pack_model

MODELS = (
    "resnet18,mobilenetv3_small_050,efficientnet_b0,convnext_atto,vit_tiny_patch16_224,"
    "deit_tiny_distilled_patch16_224,regnetx_002,ghostnet_100,mixer_s16_224,test_vit,test_efficientnet,test_convnext"
)


def legacy(model: torch.nn.Module, size: int) -> tuple[str, float]:
    """torch's TorchScript exporter on the float-weight model: ``(ok or the error, seconds)``."""
    net = float_model(pack_model(model))
    c, h, w = export_data_config(model, size).input_size
    x = torch.randn(2, c, h, w)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), io.BytesIO(), opset_version=18, dynamo=False,
                              input_names=["input"], dynamic_axes={"input": {0: "batch"}})  # fmt: skip
        return "ok", time.perf_counter() - start
    except Exception as exc:  # the baseline may fail; that is a result
        return f"{type(exc).__name__}", time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=MODELS)
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, onnxruntime {ort.__version__}")
    print("| model | export | export s | exporter s | ONNX / packed | max diff / range | legacy exporter | legacy s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            fixed = name.startswith(("vit_", "deit_", "mixer_"))
            model = binarize_model(name, BinarizeConfig(), num_classes=10).eval()
            size = None if fixed or name.startswith("test_") else 64
            packed = save_packed(model, Path(tmp) / f"{name}.safetensors").stat().st_size
            start = time.perf_counter()
            try:
                r = export_onnx(model, Path(tmp) / f"{name}.onnx", img_size=size)
                ours = ("ok", f"{r.bytes / packed:.3f}", f"{r.rel_diff:.1e}")
            except Exception as exc:
                ours = (f"fails: {str(exc)[:80]}", "", "")
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            try:
                trace_graph(model, size)
                traced = f"{time.perf_counter() - start:.1f}"
            except ValueError:
                traced = "fails"
            base, base_s = legacy(model, size)
            print(f"| {name} | {ours[0]} | {seconds:.1f} | {traced} | {ours[1]} | {ours[2]} | {base} | {base_s:.1f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
