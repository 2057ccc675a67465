"""Training on debiased labels (MARS Eq. 6-7): EMA teacher, complemented labels, certain mask, WCE."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mars_ray.labels import BIASED

logger = logging.getLogger(__name__)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Mean-teacher update θ_t ← m·θ_t + (1 − m)·θ_s, in place.

    Parameters and floating-point buffers (BatchNorm running stats) are averaged; integer buffers
    (``num_batches_tracked``) are copied from the student.

    Raises:
        ValueError: momentum not in [0, 1], or the two modules' parameter/buffer names differ.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for kind, t_items, s_items in (
        ("parameters", teacher.named_parameters(), student.named_parameters()),
        ("buffers", teacher.named_buffers(), student.named_buffers()),
    ):
        t_dict, s_dict = dict(t_items), dict(s_items)
        if t_dict.keys() != s_dict.keys():
            raise ValueError(f"teacher and student {kind} differ: {sorted(t_dict.keys() ^ s_dict.keys())}")
        for name, t in t_dict.items():
            s = s_dict[name].detach()
            if t.is_floating_point():
                t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
            else:
                t.copy_(s)


def _check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def complement_labels(y_db: torch.Tensor, teacher_pred: torch.Tensor) -> torch.Tensor:
    """Y^co: BIASED (254) pixels of Y^db take the teacher's (CRF-refined) prediction; others unchanged.

    y_db ``[B, H, W]`` long, teacher_pred ``[B, H, W]`` long → ``[B, H, W]`` long (a new tensor).
    Raises ValueError when the shapes differ.
    """
    _check_same("y_db", y_db, "teacher_pred", teacher_pred)
    return torch.where(y_db == BIASED, teacher_pred.to(y_db.dtype), y_db)


def certain_mask(y_db: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Eq. 6: W = max_{c≥1} p_t(c) (teacher's max foreground probability) on BIASED pixels, 1 elsewhere.

    y_db ``[B, H, W]``, teacher_probs ``[B, C+1, H, W]`` → W ``[B, H, W]`` float (no gradient).
    Raises ValueError when the shapes do not agree or C + 1 < 2.
    """
    if teacher_probs.ndim != 4 or teacher_probs.shape[1] < 2:
        raise ValueError(f"teacher_probs must be [B, C+1, H, W] with C >= 1, got {tuple(teacher_probs.shape)}")
    _check_same("y_db", y_db, "teacher_probs[:, 0]", teacher_probs[:, 0])
    fg_conf = teacher_probs.detach()[:, 1:].amax(dim=1).float()
    return torch.where(y_db == BIASED, fg_conf, torch.ones_like(fg_conf))


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, *, ignore_index: int = 255
) -> torch.Tensor:
    """Eq. 7: sum over valid pixels of W·CE(logits, target), divided by the number of valid pixels.

    Args:
        logits: ``[B, C+1, H, W]``.
        target: ``[B, H, W]`` long, Y^co (no BIASED pixels); ``ignore_index`` pixels are not valid.
        weight: W ``[B, H, W]`` (Eq. 6).

    Returns:
        scalar loss; 0 (still attached to the graph) when no pixel is valid.

    Raises:
        ValueError: shapes disagree, target contains 254 (complement it first), or a valid target
            is outside 0..C.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, C+1, H, W], got {tuple(logits.shape)}")
    _check_same("target", target, "logits[:, 0]", logits[:, 0])
    _check_same("weight", weight, "target", target)
    if ignore_index != BIASED and bool((target == BIASED).any()):
        raise ValueError("target contains BIASED (254) pixels: complement the labels first")
    valid = target != ignore_index
    if bool(((target[valid] < 0) | (target[valid] >= logits.shape[1])).any()):
        raise ValueError(f"target values must be in 0..{logits.shape[1] - 1} or {ignore_index}")
    n_valid = valid.sum()
    if int(n_valid) == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")  # [B, H, W]
    return (ce * weight * valid).sum() / n_valid
