"""Frozen, self-checking configuration records.

Each config validates itself on creation, so an invalid setting fails where it is made, with a message
that names the field and the accepted range.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .data.config import DataOverrides
from .errors import SettingError

METHODS = ("ot", "sign", "irnet")
ACTIVATIONS = ("none", "sign")


@dataclass(frozen=True)
class BinarizeConfig:
    """How to binarize the weights of a layer.

    Attributes:
        ratio: Share of +1 codes among each filter's unpruned weights; 0.5 is "equal bits". Only the
            ``ot`` method can enforce it; ``sign`` and ``irnet`` decide each code on its own.
        prune: Share of each filter's weights set to 0 (ternary codes), in [0, 1). ``ot`` only.
        method: ``ot`` (optimal-transport quantile map, Equal Bits), ``sign`` (BWN/XNOR-Net) or
            ``irnet`` (IR-Net's balanced, standardized weights before sign).
        activations: ``none`` keeps activations full precision; ``sign`` binarizes each binarized
            layer's input (1-bit weights and 1-bit activations).
        center: Compute with mean-centred levels ``scale * (codes - mu)`` (see
            :func:`equalbits_cli.quant.quantize.dequantize`); the bits are the same. Default: on for ``ot``,
            off for ``sign`` and ``irnet`` (their methods define their own levels).

    Example:
        >>> BinarizeConfig(ratio=0.3, prune=0.2).ratio
        0.3
        >>> BinarizeConfig(ratio=1.5)
        Traceback (most recent call last):
        ...
        ValueError: ratio must be strictly between 0 and 1 (0.5 = equal bits), got 1.5
    """

    ratio: float = 0.5
    prune: float = 0.0
    method: str = "ot"
    activations: str = "none"
    center: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not math.isfinite(self.ratio) or not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be strictly between 0 and 1 (0.5 = equal bits), got {self.ratio}")
        if not isinstance(self.prune, (int, float)) or not math.isfinite(self.prune) or not 0 <= self.prune < 1:
            raise ValueError(f"prune must be in [0, 1) (share of weights set to 0), got {self.prune}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if self.method != "ot" and self.prune != 0:
            raise SettingError(f"prune applies to `method` ot only; method {self.method!r} has no pruning")
        if self.method != "ot" and self.ratio != 0.5:
            raise SettingError(f"ratio applies to `method` ot only; method {self.method!r} cannot enforce a ratio")
        if self.center is None:
            object.__setattr__(self, "center", self.method == "ot")
        if not isinstance(self.center, bool):
            raise ValueError(f"center must be true or false, got {self.center!r}")
        object.__setattr__(self, "ratio", float(self.ratio))
        object.__setattr__(self, "prune", float(self.prune))

    def to_json(self) -> str:
        """Serialize to a JSON string (the form stored in file metadata)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BinarizeConfig:
        """Build from a dict, rejecting unknown keys.

        Raises:
            ValueError: if a key is unknown or a value is out of range.
        """
        if not isinstance(data, dict):
            raise ValueError("binarize config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown binarize config keys: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune a binarized student by distillation. See README "Fine-tune recipe" for why.

    Example:
        >>> FinetuneConfig(epochs=2).lr
        0.005
        >>> FinetuneConfig(alpha=2.0)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be in [0, 1] (share of label cross-entropy in the loss), got 2.0
    """

    epochs: int = 5
    lr: float = 5e-3
    batch_size: int = 64
    img_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    temperature: float = 4.0
    alpha: float = 0.0
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    calibrate_batches: int = 20
    save_every: int = 200
    seed: int = 0
    workers: int | None = None  # None: default_workers() when the run starts
    amp: bool = False
    device: str = "auto"
    augment: str = "none"
    compile: bool = False
    channels_last: bool = False
    # Keep the teacher's logits after their first computation (augment "none" only; exact, in memory,
    # at most train.teacher_cache.DEFAULT_BOUND bytes): later epochs skip the teacher's forward.
    cache_teacher: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object, low: int = 1) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        positive_int("warmup_steps", self.warmup_steps, 0)
        positive_int("calibrate_batches", self.calibrate_batches, 0)
        positive_int("save_every", self.save_every)
        if self.workers is not None:
            positive_int("workers", self.workers, 0)
        positive_int("seed", self.seed, 0)
        self.data_overrides()  # checks the size range; the rest is checked against the model's channels
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr < 1):
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature <= 100):
            raise ValueError(f"temperature must be in (0, 100] (1 to 10 is usual), got {self.temperature}")
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ValueError(f"alpha must be in [0, 1] (share of label cross-entropy in the loss), got {self.alpha}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < 1):
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay}")
        if self.augment not in ("none", "light", "full"):
            raise ValueError(f"augment must be none, light or full, got {self.augment!r}")
        if not isinstance(self.cache_teacher, bool):
            raise ValueError(f"cache_teacher must be true or false, got {self.cache_teacher!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def data_overrides(self) -> DataOverrides:
        """The data-config fields the user set (``None``: the student file's recorded value)."""
        return DataOverrides(self.img_size, self.crop_pct, self.interpolation, self.mean, self.std)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
