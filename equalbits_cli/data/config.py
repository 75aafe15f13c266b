"""The preprocessing a model was trained with: one record, resolved once, recorded in every file.

A model's accuracy is only meaningful on images framed and normalized the way it was trained: resized
so that the centre crop is ``crop_pct`` of the image, with its interpolation, mean and standard
deviation (timm's data config). :func:`resolve_data_config` gives the config a command uses, in this
order: what the user asks for (:class:`DataOverrides`), else what the model's file records, else the
model's ``pretrained_cfg`` as timm resolves it. Nothing is overridden behind the user's back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "CROP_MODES",
    "INTERPOLATIONS",
    "MAX_SIZE",
    "MIN_SIZE",
    "DataConfig",
    "DataOverrides",
    "built_input_size",
    "resolve_data_config",
]

MIN_SIZE, MAX_SIZE = 8, 4096  # one input-size range for every command and every file
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


def _floats(name: str, value: Any, channels: int) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != channels:
        raise ValueError(f"{name} must hold {channels} numbers (one per channel), got {value!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ValueError(f"{name} must hold finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for a model (timm's data config, checked).

    Attributes:
        input_size: ``(channels, height, width)`` of the model's input.
        interpolation: Resize filter (one of :data:`INTERPOLATIONS`).
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation divided by.
        crop_pct: Evaluation resizes the shorter side to ``size / crop_pct``, then centre-crops ``size``.
        crop_mode: timm's ``center``, ``squash`` or ``border``.

    Example:
        >>> cfg = DataConfig((3, 32, 32), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.875)
        >>> cfg.describe()
        '32x32, crop 0.875 (center), bicubic, mean 0.5/0.5/0.5, std 0.5/0.5/0.5'
        >>> DataConfig((3, 5000, 5000), "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
        Traceback (most recent call last):
        ...
        ValueError: input size must be between 8 and 4096 pixels, got 5000x5000
    """

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        size = self.input_size
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
        ):
            raise ValueError(f"input size must be (channels, height, width) integers, got {size!r}")
        c, h, w = size
        if c not in (1, 3):
            raise ValueError(f"input channels must be 1 or 3, got {c}")
        if not (MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE):
            raise ValueError(f"input size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {h}x{w}")
        object.__setattr__(self, "input_size", (int(c), int(h), int(w)))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        object.__setattr__(self, "mean", _floats("mean", self.mean, c))
        std = _floats("std", self.std, c)
        if not all(v > 0 for v in std):
            raise ValueError(f"std must be positive, got {self.std!r}")
        object.__setattr__(self, "std", std)
        crop = self.crop_pct
        if not (isinstance(crop, (int, float)) and not isinstance(crop, bool) and math.isfinite(crop)):
            raise ValueError(f"crop_pct must be a number in (0, 1], got {crop!r}")
        if not 0.05 <= crop <= 1:
            raise ValueError(f"crop_pct must be in [0.05, 1] (the share of the resized image kept), got {crop}")
        object.__setattr__(self, "crop_pct", float(crop))
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")

    @property
    def size(self) -> int:
        """The input height (equal to the width for every model equalbits exports)."""
        return self.input_size[1]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in timm's data-config keys (the form recorded in files)."""
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self) for v in [getattr(self, f.name)]}

    def transform_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.data.create_transform``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        """One line for reports: size, crop, interpolation, normalization."""
        _, h, w = self.input_size

        def nums(v: tuple[float, ...]) -> str:
            return "/".join(f"{x:.4g}" for x in v)

        return (
            f"{h}x{w}, crop {self.crop_pct:.4g} ({self.crop_mode}), {self.interpolation}, "
            f"mean {nums(self.mean)}, std {nums(self.std)}"
        )

    @classmethod
    def from_dict(cls, data: Any) -> DataConfig:
        """Build from a recorded dict (unknown keys refused: a forged file must not pass silently).

        Raises:
            ValueError: not a dict, a key missing or unknown, or a value out of range.
        """
        if not isinstance(data, dict):
            raise ValueError("data config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data config has unknown keys: {', '.join(unknown[:5])}")
        missing = sorted(known - set(data) - {"crop_mode"})
        if missing:
            raise ValueError(f"data config lacks {', '.join(missing)}")
        size = data["input_size"]
        size = tuple(size) if isinstance(size, list) else size
        return cls(**{**data, "input_size": size})

    @classmethod
    def of_model(cls, model: nn.Module) -> DataConfig:
        """The model's own config, as timm resolves it from its ``pretrained_cfg``."""
        from timm.data import resolve_data_config as timm_resolve

        cfg = timm_resolve({}, model=model)
        return cls.from_dict(
            {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
        )


@dataclass(frozen=True)
class DataOverrides:
    """What the user asks to change in a model's data config; ``None`` keeps the recorded value.

    Example:
        >>> DataOverrides(img_size=32).apply(
        ...     DataConfig((3, 224, 224), "bicubic", (0.5,) * 3, (0.5,) * 3, 0.9)).describe()
        '32x32, crop 0.9 (center), bicubic, mean 0.5/0.5/0.5, std 0.5/0.5/0.5'
    """

    img_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        size = self.img_size
        if size is not None and (
            not isinstance(size, int) or isinstance(size, bool) or not MIN_SIZE <= size <= MAX_SIZE
        ):
            raise ValueError(f"img_size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size!r}")
        # The remaining fields are checked where they are applied, against the model's channels.
        if self.mean is not None:
            object.__setattr__(self, "mean", tuple(self.mean))
        if self.std is not None:
            object.__setattr__(self, "std", tuple(self.std))

    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def apply(self, cfg: DataConfig) -> DataConfig:
        """``cfg`` with these overrides (checked as a whole).

        Raises:
            ValueError: an override out of range for this model.
        """
        changes: dict[str, Any] = {}
        if self.img_size is not None:
            changes["input_size"] = (cfg.input_size[0], self.img_size, self.img_size)
        for name in ("crop_pct", "interpolation", "mean", "std"):
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)
        return replace(cfg, **changes) if changes else cfg

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve_data_config(model: nn.Module, overrides: DataOverrides | None = None) -> DataConfig:
    """The data config to use with ``model``: the user's overrides, else its file's record, else timm's.

    Args:
        model: A model equalbits loaded (its ``equalbits_meta`` may record a config), or any timm model.
        overrides: What the user asked for.

    Raises:
        ValueError: an override out of range.

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> resolve_data_config(m, DataOverrides(img_size=32)).describe()
        '32x32, crop 0.95 (center), bicubic, mean 0.485/0.456/0.406, std 0.229/0.224/0.225'
    """
    recorded = (getattr(model, "equalbits_meta", None) or {}).get("data_config")
    base = recorded if isinstance(recorded, DataConfig) else DataConfig.of_model(model)
    cfg = overrides.apply(base) if overrides is not None else base
    built = built_input_size(model)
    if built is not None and not getattr(model, "dynamic_img_size", False) and cfg.input_size[1:] != (built, built):
        raise ValueError(
            f"`img_size` {cfg.input_size[-1]} does not fit this model: it was built for {built}x{built} images (a "
            f"ViT's position embeddings are made for one size); leave `img_size` out or pass {built}"
        )
    return cfg


def built_input_size(model: nn.Module) -> int | None:
    """The square input side a model built for one size (a ViT's ``patch_embed.img_size``, which sizes
    its position embeddings) was built for, None for models that take any size."""
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed is None:
        return None
    fixed = tuple(fixed)
    return int(fixed[0]) if len(fixed) == 2 and fixed[0] == fixed[1] else None
