"""Figures (matplotlib, headless): per-layer statistics, ratio sweeps, and the toy example."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .stats import ModelStats, summarize_sweep

__all__ = ["plot_history", "plot_layers", "plot_sweep"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, exclusive: bool) -> Path:
    from ..paths import atomic_write

    path = Path(path)
    with atomic_write(path, exclusive=exclusive) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_layers(stats: ModelStats, path: str | os.PathLike, title: str = "", *, exclusive: bool = False) -> Path:
    """Per-layer bit ratio, entropy and SQNR of the binarized layers, as a PNG."""
    plt = _pyplot()
    layers = [s for s in stats.layers if s.binarized]
    if not layers:
        raise ValueError("no binarized layers to plot")
    x = range(len(layers))
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.35 * len(layers)), 7), sharex=True)
    axes[0].bar(x, [s.ratio or 0 for s in layers], color="tab:blue")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("+1 ratio")
    axes[0].set_ylim(0, 1)
    axes[1].bar(x, [s.entropy_bits or 0 for s in layers], color="tab:green")
    axes[1].set_ylabel("entropy (bits)")
    sq = [s.sqnr_db for s in layers]
    axes[2].bar(x, [v if v is not None else 0 for v in sq], color="tab:orange")
    axes[2].set_ylabel("SQNR (dB)" if any(v is not None for v in sq) else "SQNR (n/a: packed)")
    axes[2].set_xticks(list(x), [s.name for s in layers], rotation=90, fontsize=7)
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    out = _save(fig, path, exclusive)
    plt.close(fig)
    return out


def plot_history(
    history: list[dict[str, Any]], path: str | os.PathLike, title: str = "", *, exclusive: bool = False
) -> Path:
    """Per-epoch training loss, learning rate and validation top-1 of a fine-tune, as a PNG."""
    if not history:
        raise ValueError("no epochs to plot")
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
    axes[0].plot(epochs, [h["loss"] for h in history], marker="o")
    axes[0].set_ylabel("train loss")
    axes[1].plot(epochs, [h["lr"] for h in history], marker="o", color="tab:orange")
    axes[1].set_ylabel("learning rate\n(epoch end)")
    axes[2].plot(epochs, [h.get("val_top1") for h in history], marker="o", color="tab:green")
    axes[2].set_ylabel("val top-1 (%)")
    axes[2].set_xlabel("epoch")
    axes[0].set_title(title)
    fig.tight_layout()
    try:
        return _save(fig, path, exclusive)
    finally:
        plt.close(fig)


def plot_sweep(
    rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "", *, exclusive: bool = False
) -> Path:
    """Accuracy and entropy against the +1 ratio, one line per (method, prune, levels, activations);
    with several seeds a point is their mean and its bar one standard deviation either way."""
    plt = _pyplot()
    fig, (ax_acc, ax_h) = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    summary = summarize_sweep(rows)
    for r in summary:
        groups.setdefault((r["method"], r["prune"], r["center"], r["activations"]), []).append(r)
    several = len({(m, c, a) for m, _, c, a in groups}) > 1
    for (method, prune, center, activations), items in sorted(groups.items(), key=str):
        items = sorted(items, key=lambda r: r["ratio"])
        name = "irnet (Libra-PB, STE)" if method == "irnet" else method  # not IR-Net's EDE: docs/method.md
        label = name if prune == 0 else f"{name}, prune {prune:g}"
        if several:
            label += f", {'centred' if center else 'plain'}" + (", 1-bit act." if activations == "sign" else "")
        xs = [r["ratio"] for r in items]
        marker = "o" if len(items) > 1 else "s"
        ax_acc.errorbar(
            xs,
            [r["top1_mean"] for r in items],
            yerr=[r["top1_std"] for r in items],
            marker=marker,
            capsize=3,
            label=label,
        )
        ax_h.plot(xs, [r["entropy_bits"] for r in items], marker=marker, label=label)
    ax_acc.set_xlabel("+1 ratio")
    seeds = max((r["seeds"] for r in summary), default=1)
    ax_acc.set_ylabel("top-1 after fine-tune (%)" + (f", mean ± sd of {seeds} seeds" if seeds > 1 else ""))
    ax_h.set_xlabel("+1 ratio")
    ax_h.set_ylabel("weight entropy (bits)")
    for ax in (ax_acc, ax_h):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = _save(fig, path, exclusive)
    plt.close(fig)
    return out
