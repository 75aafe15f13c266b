"""The paper's key experiment on your own model and data: accuracy and entropy across bit ratios.

For each setting the full-precision model is binarized, fine-tuned by distillation with the same
recipe, and evaluated. ``ot`` runs at every ratio (and prune); ``sign`` and ``irnet`` cannot enforce
a ratio, so each runs once and is reported at the +1 ratio it happens to give.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import BinarizeConfig, FinetuneConfig
from ..errors import Interrupted, SettingError
from ..progress import NullProgress, Progress

__all__ = ["parse_floats", "read_rows", "run_sweep", "sweep_settings"]


def parse_floats(text: str, name: str) -> list[float]:
    """``"0.1,0.5"`` -> ``[0.1, 0.5]``; a clear error for anything else (empty entries, repeats).

    Example:
        >>> parse_floats("0.1, 0.5", "ratios")
        [0.1, 0.5]
        >>> parse_floats("0.5,,0.5", "ratios")
        Traceback (most recent call last):
        ...
        equalbits_cli.errors.SettingError: `ratios` has an empty entry in '0.5,,0.5'; separate numbers by single commas
    """
    parts = [v.strip() for v in text.split(",")]
    if not any(parts):
        raise SettingError(f"`{name}` is empty")
    if not all(parts):
        raise SettingError(f"`{name}` has an empty entry in {text!r}; separate numbers by single commas")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise SettingError(f"`{name}` must be comma-separated numbers, got {text!r}") from None
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise SettingError(f"`{name}` lists {repeated[0]:g} more than once; each setting runs once")
    return values


def _source(model_or_ckpt: str, checkpoint: str | None) -> tuple[str, str | None, bool]:
    """(timm name, full-precision checkpoint, pretrained) of what to binarize."""
    from ..formats.files import file_info

    path = Path(model_or_ckpt)
    if path.is_file():
        info = file_info(path)
        src = info.source or {}
        if not src.get("checkpoint") and not src.get("pretrained"):
            raise SettingError(f"{path} does not record a full-precision source; pass a timm name and `checkpoint`")
        return src.get("model") or info.model, src.get("checkpoint"), bool(src.get("pretrained"))
    return model_or_ckpt, checkpoint, checkpoint is None


def sweep_settings(
    name: str,
    ratios: list[float],
    prunes: list[float],
    methods: list[str],
    activations: str = "none",
    center: bool | None = None,
) -> list[BinarizeConfig]:
    """Every setting of a sweep, each checked against the model's layers before any work.

    ``activations`` and ``center`` apply to every setting (``center=None``: each method's default,
    centred levels for ``ot``, plain ones for ``sign`` and ``irnet``; ``False`` is the paper's form).

    Raises:
        ValueError: an unknown method, a ratio or prune out of range or leaving a layer one sign only,
            or prune shares with no ``ot`` method to use them.
    """
    import timm
    import torch

    from ..model.convert import check_fits

    common = {"activations": activations, "center": center}
    for m in methods:
        BinarizeConfig(method=m, **common)  # validates the names
    if len(set(methods)) != len(methods):
        raise SettingError("`methods` lists a method more than once")
    if "ot" not in methods and any(p != 0 for p in prunes):
        raise SettingError("`prune` applies to `methods` ot only; add ot or leave `prune` out")
    settings: list[BinarizeConfig] = []
    for method in methods:
        if method == "ot":
            settings += [BinarizeConfig(ratio=r, prune=p, **common) for p in prunes for r in ratios]
        else:
            settings.append(BinarizeConfig(method=method, **common))
    if not name.startswith("hf-hub:") and timm.is_model(name):
        with torch.device("meta"):  # shapes only: no memory, no weights
            model = timm.create_model(name, pretrained=False)
        for cfg in settings:
            check_fits(model, cfg)  # reads the layers' shapes only: one model serves every setting
    return settings


def _key(cfg: BinarizeConfig, source: tuple, config: FinetuneConfig, data_dir) -> str:
    """What decides a setting's row: rows with the same key are reused by a rerun."""
    from ..train.state import RESUME_KEYS

    tuned = json.loads(config.to_json())
    return json.dumps(
        {
            "binarize": json.loads(cfg.to_json()),
            "source": [None if s is None else str(s) for s in source],
            "finetune": {k: tuned.get(k) for k in RESUME_KEYS},
            "data": str(Path(data_dir).resolve()),
        },
        sort_keys=True,
    )


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Finished rows recorded in a sweep's rows file, by key (a damaged line is skipped)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and isinstance(item.get("key"), str) and isinstance(item.get("row"), dict):
            done[item["key"]] = item["row"]
    return done


class _Terminated(BaseException):
    """SIGTERM between two fine-tunes of a sweep."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def run_sweep(
    model_or_ckpt: str,
    data_dir: str | os.PathLike,
    *,
    ratios: list[float],
    prunes: list[float] | None = None,
    methods: list[str] | None = None,
    activations: str = "none",
    center: bool | None = None,
    seeds: list[int] | None = None,
    checkpoint: str | None = None,
    finetune_config: FinetuneConfig | None = None,
    rows_file: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Binarize, fine-tune and evaluate at every setting and seed; one row per setting and seed.

    Args:
        activations: ``none`` (1-bit weights, full-precision activations) or ``sign`` (1W/1A, the
            paper's setting), for every setting.
        center: Centred levels for every setting, or ``None`` for each method's default.
        seeds: Fine-tune seeds, each setting run once per seed (default: ``finetune_config.seed``).
        rows_file: A JSON-lines file that keeps every finished row; a rerun reuses the rows whose
            setting, source, fine-tune settings and data are the same, so an interrupted sweep goes on
            where it stopped.

    Returns:
        Rows with ``method``, ``ratio`` (target for ot, measured otherwise), ``prune``, ``center``,
        ``activations``, ``seed``, ``top1``, ``top5``, ``top1_before``, ``entropy_bits``.

    Raises:
        ValueError: a bad setting (before any work). Interrupted: Ctrl-C or SIGTERM; its ``rows`` holds
            the rows finished so far, which ``rows_file`` keeps.
    """
    from ..formats.latent import load_model, save_checkpoint
    from ..model.convert import binarize_model
    from ..report.inspect import collect_stats
    from ..train.finetune import finetune

    progress = progress or NullProgress()
    name, ckpt, pretrained = _source(model_or_ckpt, checkpoint)
    settings = sweep_settings(name, ratios, prunes or [0.0], methods or ["ot"], activations, center)
    config = finetune_config or FinetuneConfig(epochs=2)
    seeds = [config.seed] if seeds is None else seeds
    if not seeds or len(set(seeds)) != len(seeds):
        raise SettingError("`seeds` must list at least one seed, each once")
    runs = [(cfg, replace(config, seed=seed)) for cfg in settings for seed in seeds]
    rows_path = Path(rows_file) if rows_file is not None else None
    done = read_rows(rows_path) if rows_path is not None else {}
    rows: list[dict[str, Any]] = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            for i, (cfg, run_config) in enumerate(runs):
                key = _key(cfg, (name, ckpt, pretrained), run_config, data_dir)
                what = (
                    f"run {i + 1}/{len(runs)}: {cfg.method} ratio {cfg.ratio:g} prune {cfg.prune:g} "
                    f"seed {run_config.seed}"
                )
                if key in done:
                    progress.note(f"{what}: reusing the finished row in {rows_path}")
                    rows.append(done[key])
                    continue
                progress.phase(what, 1)
                student = binarize_model(name, cfg, checkpoint=ckpt, pretrained=pretrained)
                path = save_checkpoint(student, Path(tmp) / f"s{i}.safetensors")
                out = Path(tmp) / f"s{i}.ft.safetensors"
                result = finetune(path, data_dir, run_config, output=out, progress=progress)
                assert result is not None
                row = _row(cfg, run_config.seed, result, collect_stats(load_model(out)))
                rows.append(row)
                if rows_path is not None:
                    with open(rows_path, "a") as fh:
                        fh.write(json.dumps({"key": key, "row": row}) + "\n")
    except (Interrupted, KeyboardInterrupt, _Terminated) as exc:
        signum = getattr(exc, "signum", signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT)
        kept = f"; they are kept in {rows_path}, and the same command goes on from there" if rows_path else ""
        raise Interrupted(f"sweep interrupted after {len(rows)} of {len(runs)} runs{kept}", signum, rows=rows) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return rows


def _row(cfg: BinarizeConfig, seed: int, result: Any, stats: Any) -> dict[str, Any]:
    binar = [s for s in stats.layers if s.binarized]
    measured = sum(s.n_plus or 0 for s in binar) / max(1, sum((s.n_plus or 0) + (s.n_minus or 0) for s in binar))
    return {
        "method": cfg.method,
        "ratio": cfg.ratio if cfg.method == "ot" else round(measured, 4),
        "measured_ratio": measured,
        "prune": cfg.prune,
        "center": cfg.center,
        "activations": cfg.activations,
        "seed": seed,
        "top1": result.student_top1,
        "top5": result.student_top5,
        "top1_before": result.student_top1_before,
        "teacher_top1": result.teacher_top1,
        "entropy_bits": stats.entropy_bits,
    }
