"""Quantizer speed: exact-ratio OT codes against torch.sign and the sort-based reference, in one run.

For every conv/linear weight of each model (latent weights from a fixed seed) it times, over all
tensors together: torch.sign; the sort-based reference; ot_codes cold (first call, no cache); and
ot_codes warm (cache from the previous call, after an Adam-like step ``w += lr * sign(noise)``) for
several step sizes (on the CPU; elsewhere no cache is kept, so warm = cold); and ``binary_weight``, the
weight a training step builds (codes, scale and ``scale * (codes - mu)`` in the compute dtype: fp32 on
the CPU, fp16 on CUDA, where it is one Triton launch per layer). Every result is checked against the
reference before it is timed.

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

from equalbits_cli.quantize import OTCache, binary_weight, ot_codes, ot_codes_reference, ot_spec  # noqa: E402

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


def grouped_fn(ws: list[torch.Tensor], dtype: torch.dtype):
    """All weights' training weights in grouped launches (what a step does through StepWeights)."""
    from equalbits_cli.kernels.ot_triton import binary_rows_grouped

    flat = [w.view(w.shape[0], -1) for w in ws]
    specs = [ot_spec(w.shape[1], 0.5, 0.0, True)[0:2] + (ot_spec(w.shape[1], 0.5, 0.0, True)[3],) for w in flat]
    plan = binary_rows_grouped(flat, specs, "ot", center=True, out_dtype=dtype)[1]
    return lambda: binary_rows_grouped(flat, specs, "ot", center=True, out_dtype=dtype, plan=plan)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50,vit_tiny_patch16_224")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--lrs", default="1e-5,1e-4,1e-3")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    lrs = [float(x) for x in args.lrs.split(",")]
    print(f"machine: {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else machine()}; torch {torch.__version__}")
    wdtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    header = ["model", "weights", "sign ms", "reference ms", "cold ms", "cold/sign", "ref/cold"]
    header += ["train weight ms", "train weight/sign"]
    if DEVICE.type == "cuda":  # no threshold cache there; the grouped launches and the GPU time instead
        lrs = []
        header += ["grouped ms", "grouped/sign", "GPU only: sign ms", "1-by-1 ms", "grouped ms"]
    header += [f"warm@{lr:g} ms" for lr in lrs] + [f"warm@{lr:g}/sign" for lr in lrs] + [f"hit@{lr:g}" for lr in lrs]
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
        for w in ws:  # exactness first
            assert torch.equal(ot_codes(w)[0], ot_codes_reference(w)[0])
        sign = best_ms(synced(lambda: [torch.sign(w) for w in ws]), args.reps)
        ref = best_ms(synced(lambda: [ot_codes_reference(w) for w in ws]), max(2, args.reps // 4))
        cold = best_ms(synced(lambda: [ot_codes(w) for w in ws]), args.reps)
        train = best_ms(synced(lambda: [binary_weight(w, center=True, dtype=wdtype) for w in ws]), args.reps)
        extra = []
        if DEVICE.type == "cuda":
            grouped = grouped_fn(ws, wdtype)
            for w, q in zip(ws, grouped()):  # exactness first: the same weights as layer by layer
                torch.testing.assert_close(q.view(w.shape), binary_weight(w, center=True, dtype=wdtype))
            g_ms = best_ms(synced(grouped), args.reps)
            extra = [f"{g_ms:.2f}", f"{g_ms / sign:.2f}x"]
            extra += [
                f"{graph_ms(lambda: [torch.sign(w) for w in ws], args.reps):.2f}",
                f"{graph_ms(lambda: [binary_weight(w, center=True, dtype=wdtype) for w in ws], args.reps):.2f}",
                f"{graph_ms(grouped, args.reps):.2f}",
            ]
        warm_ms, hits = [], []
        for lr in lrs:
            g = torch.Generator().manual_seed(1)
            step = [lr * torch.sign(torch.randn(w.shape, generator=g)) for w in ws]
            caches = [OTCache() for _ in ws]
            for w, c in zip(ws, caches):
                ot_codes(w, cache=c)
            moved = [w + s for w, s in zip(ws, step)]
            for w, c in zip(moved, caches):  # exactness first
                assert torch.equal(ot_codes(w, cache=c)[0], ot_codes_reference(w)[0])
            # Time the first warm call after the step (a fresh copy of the caches each repetition).
            snapshots = [{k: t.clone() for k, t in c.thresholds.items()} for c in caches]
            for c, snap in zip(caches, snapshots):
                c.thresholds = {k: t.clone() for k, t in snap.items()}
                c.hits = c.misses = 0
            ws2 = [w + s for w, s in zip(moved, step)]

            def warm(ws2=ws2, caches=caches, snapshots=snapshots):
                for c, snap in zip(caches, snapshots):
                    c.thresholds = {k: t.clone() for k, t in snap.items()}
                return [ot_codes(w, cache=c) for w, c in zip(ws2, caches)]

            for c in caches:
                c.hits = c.misses = 0
            warm()
            hit = sum(c.hits for c in caches) / max(1, sum(c.hits + c.misses for c in caches))
            warm_ms.append(best_ms(synced(warm), args.reps))
            hits.append(hit)
        row = [
            name,
            f"{numel / 1e6:.1f}M",
            f"{sign:.1f}",
            f"{ref:.1f}",
            f"{cold:.1f}",
            f"{cold / sign:.2f}x",
            f"{ref / cold:.1f}x",
            f"{train:.1f}",
            f"{train / sign:.2f}x",
        ] + extra
        row += [f"{w:.1f}" for w in warm_ms] + [f"{w / sign:.2f}x" for w in warm_ms] + [f"{h:.0%}" for h in hits]
        rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
