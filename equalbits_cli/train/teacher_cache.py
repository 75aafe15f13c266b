"""The teacher's outputs, computed once per training image and reused in later epochs.

Without augmentation (``augment="none"``) a training image is prepared the same way in every epoch and
the frozen teacher (eval mode, no dropout) computes the same logits for it, so a fine-tune that
recomputes them each epoch spends a teacher forward per step for nothing. The cache keeps every logit
the teacher computed, in the dtype it computed them in (exact: no top-k, no rounding), on the training
device, and a step whose images are all cached skips the teacher.

It lives in memory for one ``finetune`` call only: nothing is written to disk, so no later run, other
teacher, data folder, transform or version can read it; a resumed run fills it again. A cache larger
than its bound is not kept (the fine-tune says so once and runs the teacher every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["DEFAULT_BOUND", "TeacherCache"]

DEFAULT_BOUND = 1 << 30  # bytes: 1 GiB holds 268 million float32 logits (ImageNet-1k: 268k images)


@dataclass
class TeacherCache:
    """Logits of the teacher for ``n`` training images, filled as the teacher computes them.

    Example:
        >>> cache = TeacherCache(n=4)
        >>> cache.lookup(np.array([0, 1])) is None
        True
        >>> cache.store(np.array([0, 1]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> cache.lookup(np.array([1, 0])).tolist()
        [[3.0, 4.0], [1.0, 2.0]]
    """

    n: int
    bound: int = DEFAULT_BOUND
    logits: torch.Tensor | None = None
    filled: np.ndarray = field(init=False)
    too_large: str | None = None  # why the cache was given up, said once
    hits: int = 0  # batches served from the cache

    def __post_init__(self) -> None:
        self.filled = np.zeros(self.n, dtype=bool)

    def lookup(self, indices: np.ndarray) -> torch.Tensor | None:
        """The cached logits of ``indices`` (in that order), or None unless every one is cached.

        The check reads a host-side array: a lookup never waits for the device.
        """
        if self.logits is None or not self.filled[indices].all():
            return None
        self.hits += 1
        return self.logits[torch.from_numpy(indices).to(self.logits.device, non_blocking=True)]

    def store(self, indices: np.ndarray, logits: torch.Tensor) -> None:
        """Keep ``logits`` (one row per index) unless the whole cache would pass its bound."""
        if self.too_large is not None:
            return
        if self.logits is None:
            size = self.n * logits.shape[1] * logits.element_size()
            if size > self.bound:
                self.too_large = (
                    f"the teacher's outputs are not cached: {self.n} images x {logits.shape[1]} classes would take "
                    f"{size / 2**30:.1f} GiB (bound {self.bound / 2**30:.1f} GiB); the teacher runs every step"
                )
                return
            self.logits = torch.empty((self.n, logits.shape[1]), dtype=logits.dtype, device=logits.device)
        self.logits[torch.from_numpy(indices).to(logits.device, non_blocking=True)] = logits.detach()
        self.filled[indices] = True
