"""The distillation objective.

Knowledge distillation (Hinton et al. 2015): the student matches the teacher's softened class
distribution, ``KL(softmax(t / T) || softmax(s / T)) * T^2`` (the ``T^2`` keeps gradient magnitudes
comparable across temperatures), optionally mixed with cross-entropy on the labels:

    loss = (1 - alpha) * KD + alpha * CE

With ``T = 1`` and ``alpha = 0`` this is ReActNet's distributional loss (Liu et al. 2020), the usual
choice for recovering a binarized network from its own full-precision model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


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
