"""Frozen, self-checking configuration records.

Each config validates itself on creation, so an invalid setting fails where it is made, with a message
that names the field and the accepted range.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

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
            raise ValueError(f"prune applies to --method ot only; method {self.method!r} has no pruning")
        if self.method != "ot" and self.ratio != 0.5:
            raise ValueError(f"ratio applies to --method ot only; method {self.method!r} cannot enforce a ratio")
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
