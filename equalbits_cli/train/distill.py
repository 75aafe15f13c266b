"""The distillation objective.

Knowledge distillation (Hinton et al. 2015): the student matches the teacher's softened class
distribution, ``KL(softmax(t / T) || softmax(s / T)) * T^2`` (the ``T^2`` keeps gradient magnitudes
comparable across temperatures), optionally mixed with cross-entropy on the labels:

    loss = (1 - alpha) * KD + alpha * CE

With ``T = 1`` and ``alpha = 0`` this is ReActNet's distributional loss (Liu et al. 2020), the usual
choice for recovering a binarized network from its own full-precision model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.config import DataConfig
from ..errors import SettingError

__all__ = ["Teacher", "distillation_loss", "match_normalization", "teacher_for"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Distillation loss of a batch (mean over samples).

    Args:
        student_logits: ``(batch, classes)``.
        teacher_logits: ``(batch, classes)``; no gradient flows into it.
        labels: ``(batch,)`` class indices; needed when ``alpha > 0``.
        temperature: Softening temperature ``T``.
        alpha: Share of label cross-entropy.

    Example:
        >>> s = torch.tensor([[2.0, 0.0]]); t = torch.tensor([[2.0, 0.0]])
        >>> float(distillation_loss(s, t))
        0.0
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kd = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * (t * t)
    if alpha == 0:
        return kd
    if labels is None:
        raise ValueError("alpha > 0 needs labels")
    return (1 - alpha) * kd + alpha * F.cross_entropy(student_logits.float(), labels)


def _pretrained_classes(name: str) -> int | None:
    """Classes of the classifier timm's pretrained weights for ``name`` have (None if unknown)."""
    from ..model.convert import pretrained_cfg

    cfg = pretrained_cfg(name)
    return getattr(cfg, "num_classes", None) if cfg is not None else None


def _refuse_random_head(name: str, num_classes: int) -> None:
    pretrained = _pretrained_classes(name)
    if pretrained is not None and pretrained != num_classes:
        raise SettingError(
            f"the teacher would be pretrained {name}, whose classifier has {pretrained} classes, not this "
            f"data's {num_classes}: its head would be random. Pass `teacher` CHECKPOINT (a full-precision "
            f"{name} fine-tuned on this data), or `alpha` 1 to train on the labels alone"
        )


@dataclass
class Teacher:
    """The full-precision teacher of a fine-tune.

    Attributes:
        model: The timm model, in eval mode.
        data_config: The preprocessing it expects, where known (pretrained weights, or a checkpoint that
            records it); None: the student's (a plain checkpoint says nothing, so it is the user's config).
        recorded_top1: Its validation top-1 as its file records it, if it does.
    """

    model: nn.Module
    data_config: DataConfig | None = None
    recorded_top1: float | None = None


def _from_file(name: str, path: str) -> Teacher:
    from ..model.convert import create_model, read_checkpoint_record

    record = read_checkpoint_record(path)
    return Teacher(create_model(name, checkpoint=path), record.data_config, record.top1)


def _from_hub(name: str, num_classes: int) -> Teacher:
    from ..model.convert import create_model

    _refuse_random_head(name, num_classes)
    model = create_model(name, pretrained=True, num_classes=num_classes)
    return Teacher(model, DataConfig.of_model(model))


def teacher_for(student_meta: dict[str, Any], teacher: str | None, num_classes: int) -> Teacher:
    """The full-precision teacher: ``teacher`` (a file or a pretrained timm name) or the student's source.

    A pretrained teacher whose classifier does not have ``num_classes`` classes is refused: timm would
    give it a randomly initialized head, and the student would learn from noise.

    Raises:
        ValueError: no usable teacher (named in the message, with what to pass instead).
    """
    if teacher is None:
        source = student_meta.get("source") or {}
        name = source.get("model") or student_meta["model"]
        ckpt = source.get("checkpoint")
        if not isinstance(name, str) or not (ckpt is None or isinstance(ckpt, str)) or len(str(ckpt)) > 4096:
            raise SettingError("the student's metadata names no usable teacher; pass `teacher` NAME_OR_CHECKPOINT")
        if ckpt is not None:
            if not Path(ckpt).is_file():
                raise SettingError(
                    f"the student's full-precision source {ckpt} is gone; pass `teacher` NAME_OR_CHECKPOINT"
                )
            return _from_file(name, ckpt)
        if source.get("pretrained") is True:
            return _from_hub(name, num_classes)
        raise SettingError(
            "the student was binarized from a randomly initialized model, which is no teacher; "
            "pass `teacher` NAME_OR_CHECKPOINT, or `alpha` 1 to train on the labels alone"
        )
    if Path(teacher).is_file():
        return _from_file(student_meta["model"], teacher)
    return _from_hub(teacher, num_classes)


class _Renormalized(nn.Module):
    """The teacher behind a change of input normalization, when its data config differs from the
    student's (the student's loader normalizes; the teacher is fed what its own config expects)."""

    def __init__(self, model: nn.Module, src: tuple, dst: tuple) -> None:
        super().__init__()
        self.model = model
        for name, value in zip(("src_mean", "src_std", "dst_mean", "dst_std"), (*src, *dst)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = x * self.src_std + self.src_mean
        return self.model((raw - self.dst_mean) / self.dst_std)


def match_normalization(teacher: Teacher, data_config: DataConfig) -> nn.Module:
    """The teacher's model, fed images normalized as it expects: the loader normalizes with the
    student's ``data_config``; a teacher known to expect another mean and std gets them."""
    want = teacher.data_config
    if want is None or (want.mean == data_config.mean and want.std == data_config.std):
        return teacher.model
    return _Renormalized(teacher.model, (data_config.mean, data_config.std), (want.mean, want.std)).eval()
