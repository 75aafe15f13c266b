"""The resumable training state of a fine-tune: where it lives, how it is saved, checked and restored.

The state is a ``torch.save`` file read back with ``weights_only=True`` (no code is unpickled). It is
written atomically, so the previous state survives until the new one is complete, and temporaries
left by a killed save are removed at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["STATE_FORMAT", "STATE_VERSION", "state_path_for", "load_state", "save_state", "check_resume_config"]

STATE_FORMAT = "equalbits.train_state"
STATE_VERSION = 1

# Settings that decide the result: a resume must use the same ones. Workers, device, AMP, the save
# interval and logging may change between runs.
RESUME_KEYS = (
    "epochs",
    "lr",
    "batch_size",
    "img_size",
    "temperature",
    "alpha",
    "weight_decay",
    "warmup_steps",
    "calibrate_batches",
    "seed",
    "augment",
)


def state_path_for(output: str | os.PathLike) -> Path:
    """Where the training state of a fine-tune writing ``output`` lives."""
    return Path(str(output) + ".train-state.pt")


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` that a killed save left behind (``.NAME.XXXX.tmp``)."""
    parent = path.parent if str(path.parent) else Path(".")
    for tmp in parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def load_state(path: Path) -> dict[str, Any]:
    """Read and check a training state.

    Raises:
        FileNotFoundError: there is none.
        ValueError: it is corrupt or not an equalbits training state.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume at {path}; run without --resume to start afresh")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"{path}: corrupt training state ({first}); delete it and run without --resume") from None
    required = {"format", "version", "model", "optimizer", "scheduler", "step", "epoch", "batch", "rng"}
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not required <= set(state):
        raise ValueError(f"{path}: not an equalbits training state; delete it and run without --resume")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state['version']!r} is not supported")
    bad = [k for k in ("model", "optimizer", "scheduler") if not isinstance(state[k], dict)]
    bad += [k for k in ("step", "epoch", "batch") if not isinstance(state[k], int) or isinstance(state[k], bool)]
    if not isinstance(state["rng"], torch.Tensor) or state["rng"].dtype != torch.uint8:
        bad.append("rng")
    if not isinstance(state.get("history", []), list) or not isinstance(state.get("evals", {}), dict):
        bad.append("history")
    if bad:
        raise ValueError(f"{path}: damaged training state (bad {', '.join(bad)}); delete it and run without --resume")
    return state


def check_resume_config(path: Path, state: dict[str, Any], config_json: str) -> None:
    """Refuse a resume whose result-deciding settings differ from the saved run's, naming them.

    Raises:
        ValueError: a setting differs.
    """
    try:
        saved = json.loads(state.get("config") or "{}")
    except (TypeError, json.JSONDecodeError):
        raise ValueError(f"{path}: damaged training state (bad config); delete it and run without --resume") from None
    now = json.loads(config_json)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: damaged training state (bad config); delete it and run without --resume")
    differ = [
        f"--{k.replace('_', '-')} {saved[k]} (now {now.get(k)})"
        for k in RESUME_KEYS
        if k in saved and saved[k] != now.get(k)
    ]
    if differ:
        raise ValueError(
            f"{path} was saved with other settings: {', '.join(differ)}; resume with the saved settings, "
            "or delete the state to start afresh"
        )


def save_state(path: Path, payload: dict[str, Any]) -> None:
    """Write the state atomically (the previous one stays until this one is complete)."""
    from .paths import atomic_write

    with atomic_write(path) as tmp:
        torch.save(payload, str(tmp))
