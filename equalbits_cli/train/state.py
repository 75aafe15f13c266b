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

from ..errors import SettingError

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "check_resume_config",
    "check_resume_identity",
    "load_state",
    "run_identity",
    "save_state",
    "state_path_for",
]

STATE_FORMAT = "equalbits.train_state"
STATE_VERSION = 1

# Settings that decide the result: a resume must use the same ones. Workers, device, AMP, the save
# interval and logging may change between runs.
RESUME_KEYS = (
    "epochs",
    "lr",
    "batch_size",
    "img_size",
    "crop_pct",
    "interpolation",
    "mean",
    "std",
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
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a training state; move it away to resume or start afresh")
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume at {path}; run without `resume` to start afresh")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).strip()
        # torch's own advice (weights_only=False) would run code from the file: never right for us.
        first = "it holds objects other than tensors" if "weights only" in text.lower() else text.split("\n")[0][:200]
        raise ValueError(f"{path}: corrupt training state ({first}); delete it and run without `resume`") from None
    required = {"format", "version", "model", "optimizer", "scheduler", "step", "epoch", "batch", "rng"}
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not required <= set(state):
        raise ValueError(f"{path}: not an equalbits training state; delete it and run without `resume`")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state['version']!r} is not supported")
    bad = [k for k in ("model", "optimizer", "scheduler") if not isinstance(state[k], dict)]
    bad += [k for k in ("step", "epoch", "batch") if not isinstance(state[k], int) or isinstance(state[k], bool)]
    if not isinstance(state["rng"], torch.Tensor) or state["rng"].dtype != torch.uint8:
        bad.append("rng")
    if not isinstance(state.get("history", []), list) or not isinstance(state.get("evals", {}), dict):
        bad.append("history")
    if bad:
        raise ValueError(f"{path}: damaged training state (bad {', '.join(bad)}); delete it and run without `resume`")
    return state


def check_resume_config(path: Path, state: dict[str, Any], config_json: str) -> None:
    """Refuse a resume whose result-deciding settings differ from the saved run's, naming them.

    Raises:
        ValueError: a setting differs.
    """
    try:
        saved = json.loads(state.get("config") or "{}")
    except (TypeError, json.JSONDecodeError):
        raise ValueError(f"{path}: damaged training state (bad config); delete it and run without `resume`") from None
    now = json.loads(config_json)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: damaged training state (bad config); delete it and run without `resume`")
    differ = [f"`{k}` {saved[k]} (now {now.get(k)})" for k in RESUME_KEYS if k in saved and saved[k] != now.get(k)]
    if differ:
        raise SettingError(
            f"{path} was saved with other settings: {', '.join(differ)}; resume with the saved settings, "
            "or delete the state to start afresh"
        )


# What a training state was made for, beyond the settings: the student (its file's content and what its
# metadata says about the binarization), the teacher asked for, and the data folder. In this order.
IDENTITY_KEYS = {
    "binarization": "the student's binarization (ratio, prune, method, activations, layers)",
    "student": "the student file's content",
    "teacher": "the teacher",
    "data": "the data folder",
}


def run_identity(student: str | os.PathLike, teacher: str | None, data: str | os.PathLike) -> dict[str, str]:
    """What a fine-tune's training state belongs to (see :data:`IDENTITY_KEYS`), as short strings."""
    import hashlib

    from ..paths import read_metadata

    meta = read_metadata(student)
    keys = ("model", "model_kwargs", "binarize_config", "binarized", "kept", "layer_policy")
    binarization = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True)
    digest = hashlib.sha256()
    with open(student, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {
        "binarization": hashlib.sha256(binarization.encode()).hexdigest()[:16],
        "binarize_config": meta.get("binarize_config", ""),
        "student": digest.hexdigest()[:16],
        "teacher": "" if teacher is None else str(Path(teacher).resolve() if Path(teacher).is_file() else teacher),
        "data": str(Path(data).resolve()),
    }


def check_resume_identity(path: Path, state: dict[str, Any], identity: dict[str, str]) -> None:
    """Refuse a resume of a state saved for another student, teacher or data folder, naming which.

    States from before 0.5 record none of these and are accepted as before.

    Raises:
        ValueError: what the state was made for differs.
    """
    saved = state.get("identity")
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: damaged training state (bad identity); delete it and run without `resume`")
    differ = [what for key, what in IDENTITY_KEYS.items() if saved.get(key) != identity.get(key)]
    if not differ:
        return
    detail = ""
    if saved.get("binarize_config") != identity.get("binarize_config"):
        detail = f" (saved {saved.get('binarize_config')}, now {identity.get('binarize_config')})"
    raise ValueError(
        f"{path} was saved for another run: {', '.join(differ)} changed{detail}; finish with the same student, "
        "teacher and data, or delete the state to start afresh"
    )


def save_state(path: Path, payload: dict[str, Any]) -> None:
    """Write the state atomically (the previous one stays until this one is complete, and is flushed to
    disk). Without torch's CRC-32 of each record: two thirds of the save's time (resnet18's 133 MiB with
    AdamW moments: 229 ms with it, 75 ms without), and like the safetensors files equalbits writes, the
    state then relies on the atomic write, not on a checksum."""
    from torch.utils.serialization import config

    from ..paths import atomic_write

    with atomic_write(path) as tmp, config.patch({"save.compute_crc32": False}):
        torch.save(payload, str(tmp))
