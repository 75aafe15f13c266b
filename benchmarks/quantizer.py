"""Quantizer speed: exact-ratio OT codes against torch.sign and the sort-based reference, in one run.

For every conv/linear weight of each model (latent weights from a fixed seed) it times, over all
tensors together: torch.sign; the sort-based reference; ot_codes (int8 codes and scales, what export
and evaluation compute); ``binary_weight`` layer by layer (the weight a training step builds: codes,
scale and ``scale * (codes - mu)`` in the compute dtype: fp32 on the CPU, fp16 on CUDA); and all
layers' training weights together, as a model's StepWeights builds them (one round of the numpy
threads on the CPU; one Triton launch per filter-width class on CUDA, also timed as GPU work alone
from a CUDA graph's replay). Every result is checked against the reference before it is timed.

    python benchmarks/quantizer.py [--models resnet18,resnet50,vit_tiny_patch16_224] [--reps 10]
    python benchmarks/quantizer.py --device cuda --models resnet50,vit_small_patch16_224
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import best_ms, machine  # noqa: E402

from equalbits_cli.quant.cpu_select import ot_weights_cpu  # noqa: E402
from equalbits_cli.quant.quantize import OTCache, binary_weight, ot_codes, ot_codes_reference, ot_spec  # noqa: E402

DEVICE = torch.device("cpu")


def weights_of(name: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000)
    return [
        p.detach().clone().to(DEVICE) for n, p in model.named_parameters() if p.dim() in (2, 4) and n.endswith("weight")
    ]


def synced(fn):
    """``fn`` followed by a device synchronization, so that the wall time covers the kernels."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def graph_ms(fn, reps: int) -> float:
    """GPU time of ``fn``'s kernels alone: ``fn`` captured once in a CUDA graph, best replay (ms)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on a side stream, as graph capture asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return best_ms(synced(graph.replay), reps)


def _specs(flat: list[torch.Tensor]) -> list[tuple[int, int, float]]:
    specs = [ot_spec(w.shape[1], 0.5, 0.0, True) for w in flat]
    return [(n_minus, n_zero, mu) for n_minus, n_zero, _, mu in specs]


def grouped_fn(ws: list[torch.Tensor], dtype: torch.dtype):
    """All weights' training weights together, as a model's StepWeights builds them: grouped Triton
    launches on CUDA, one round of the numpy threads (its buffers kept, as in training) on the CPU."""
    flat = [w.view(w.shape[0], -1) for w in ws]
    specs = _specs(flat)
    if DEVICE.type != "cuda":
        scratches = [{} for _ in flat]
        return lambda: ot_weights_cpu(flat, specs, scratches)
    from equalbits_cli.quant.kernels.ot_triton import binary_rows_grouped

    plan = binary_rows_grouped(flat, specs, "ot", center=True, out_dtype=dtype)[1]
    return lambda: binary_rows_grouped(flat, specs, "ot", center=True, out_dtype=dtype, plan=plan)[0]


def moving_fn(ws: list[torch.Tensor], move: float, calls: int, keep_thresholds: bool):
    """All layers' training weights together on the CPU, each call on latents one step further on
    (``calls`` steps made in advance), with or without the last call's thresholds."""
    flat = [w.reshape(w.shape[0], -1) for w in ws]
    g = torch.Generator().manual_seed(1)
    steps = [flat]
    for _ in range(calls):
        steps.append([v + move * v.std(dim=1, keepdim=True) * torch.randn(v.shape, generator=g) for v in steps[-1]])
    specs, scratches, at = _specs(flat), [{} for _ in flat], iter(steps)

    def forget(d: dict) -> None:
        for key in [k for k in d if str(k).endswith(".hint")]:
            del d[key]
        for value in d.values():
            if isinstance(value, dict):
                forget(value)

    def call():
        if not keep_thresholds:
            [forget(s) for s in scratches]
        return ot_weights_cpu(next(at), specs, scratches)

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50,vit_tiny_patch16_224")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--move", type=float, default=0.01, help="CPU: latents' step between calls, in filter stds")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    print(f"machine: {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else machine()}; torch {torch.__version__}")
    wdtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    header = ["model", "weights", "sign ms", "reference ms", "ot_codes ms", "ot_codes/sign", "ref/ot_codes"]
    header += ["train weight 1-by-1 ms", "1-by-1/sign", "train weights together ms", "together/sign"]
    if DEVICE.type == "cuda":
        header += ["GPU only: sign ms", "1-by-1 ms", "together ms"]
    else:
        header += ["moving: introselect ms", "moving: last thresholds ms", "introselect / last thresholds"]
    rows = []
    # Warm-up over the largest model first: glibc's allocator adapts its mmap threshold to the sizes
    # it sees, and until then every fresh output page-faults. Without this the first model's
    # baseline (sign) is measured slower than the others' and flatters the ratios.
    warm_ws = max((weights_of(n) for n in args.models.split(",")), key=lambda ws: sum(w.numel() for w in ws))
    for _ in range(3):
        [torch.sign(w) for w in warm_ws]
        [ot_codes(w) for w in warm_ws]
    del warm_ws
    for name in args.models.split(","):
        ws = weights_of(name)
        numel = sum(w.numel() for w in ws)
        caches = [OTCache() for _ in ws]  # kept buffers, as each layer keeps its own in training
        for w in ws:  # exactness first
            assert torch.equal(ot_codes(w)[0], ot_codes_reference(w)[0])
        together = grouped_fn(ws, wdtype)
        for w, q in zip(ws, together()):  # the same weights as layer by layer
            torch.testing.assert_close(q.view(w.shape), binary_weight(w, center=True, dtype=wdtype))
        sign = best_ms(synced(lambda: [torch.sign(w) for w in ws]), args.reps)
        ref = best_ms(synced(lambda: [ot_codes_reference(w) for w in ws]), max(2, args.reps // 4))
        cold = best_ms(synced(lambda: [ot_codes(w) for w in ws]), args.reps)
        one = best_ms(
            synced(lambda: [binary_weight(w, center=True, dtype=wdtype, cache=c) for w, c in zip(ws, caches)]),
            args.reps,
        )
        tog = best_ms(synced(together), args.reps)
        row = [name, f"{numel / 1e6:.1f}M", f"{sign:.2f}", f"{ref:.1f}", f"{cold:.2f}", f"{cold / sign:.2f}x"]
        row += [f"{ref / cold:.1f}x", f"{one:.2f}", f"{one / sign:.2f}x", f"{tog:.2f}", f"{tog / sign:.2f}x"]
        if DEVICE.type == "cuda":
            row += [
                f"{graph_ms(lambda: [torch.sign(w) for w in ws], args.reps):.2f}",
                f"{graph_ms(lambda: [binary_weight(w, center=True, dtype=wdtype) for w in ws], args.reps):.2f}",
                f"{graph_ms(together, args.reps):.2f}",
            ]
        else:
            fresh = best_ms(moving_fn(ws, args.move, args.reps + 1, False), args.reps)
            kept = best_ms(moving_fn(ws, args.move, args.reps + 1, True), args.reps)
            row += [f"{fresh:.2f}", f"{kept:.2f}", f"{fresh / kept:.2f}x"]
        rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
