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
    floats_t: list[torch.Tensor] = []
    floats_s: list[torch.Tensor] = []
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
                floats_t.append(t)
                floats_s.append(s.to(t.dtype))
            else:
                t.copy_(s)
    if floats_t:
        # the same two element-wise ops as ``t.mul_(m).add_(s, alpha=1-m)`` (bit-identical), batched:
        # a ResNet-101 has ~600 float tensors, i.e. ~1,200 kernel launches a step one by one
        torch._foreach_mul_(floats_t, momentum)
        torch._foreach_add_(floats_t, floats_s, alpha=1.0 - momentum)


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


def image_class_mask(class_sets: "list[list[int]] | list[tuple[int, ...]]", num_classes: int) -> torch.Tensor:
    """The classes each image may take in the fill: background plus its image-level classes C_{I_i}.

    ``class_sets``: per image of the batch, its foreground class ids (1..C); ``num_classes`` counts
    the background (C + 1). Returns ``[B, C+1]`` bool with column 0 (background) always True.

    Background is *allowed in the fill* (most biased pixels are context, i.e. background) but is not
    one of C_{I_i}: in the paper C_{I_i} is the image-level label set, which in WSSS never holds the
    background, and Eq. 6 takes its max over C_{I_i} only (see ``certain_mask``).

    Raises ValueError for a class id outside 1..C.
    """
    mask = torch.zeros(len(class_sets), num_classes, dtype=torch.bool)
    mask[:, 0] = True
    for b, classes in enumerate(class_sets):
        for c in classes:
            c = int(c)
            if not 1 <= c < num_classes:
                raise ValueError(f"image {b}: class id {c} outside 1..{num_classes - 1}")
            mask[b, c] = True
    return mask


def _check_class_mask(class_mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    if class_mask.dtype != torch.bool or tuple(class_mask.shape) != tuple(probs.shape[:2]):
        raise ValueError(
            f"class_mask must be bool [B, C+1] = {tuple(probs.shape[:2])}, got {class_mask.dtype} {tuple(class_mask.shape)}"
        )
    return class_mask.to(probs.device)


def restrict_probs(probs: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """Teacher probabilities restricted to each image's allowed classes and renormalised.

    probs ``[B, C+1, H, W]`` (softmax), class_mask ``[B, C+1]`` bool (``image_class_mask``) →
    ``[B, C+1, H, W]``: zero for classes the image does not contain, summing to 1 over the rest
    (used before the CRF and the argmax that fill Y^co, so the fill never picks an absent class).
    A pixel whose allowed classes all have zero probability falls back to background.

    Raises ValueError when the mask's shape or dtype is wrong.
    """
    m = _check_class_mask(class_mask, probs)[:, :, None, None].to(probs.dtype)
    kept = probs * m
    total = kept.sum(dim=1, keepdim=True)
    empty = total <= 0
    if bool(empty.any()):
        kept = kept.clone()
        kept[:, :1] = torch.where(empty, torch.ones_like(total), kept[:, :1])
        total = torch.where(empty, torch.ones_like(total), total)
    return kept / total


def certain_mask(
    y_db: torch.Tensor, teacher_probs: torch.Tensor, class_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 6: W = max_{c ∈ C_{I_i}} p_t(c) on BIASED pixels, 1 elsewhere.

    ``teacher_probs`` are the teacher's softmax probabilities as predicted (not renormalised);
    ``class_mask`` ``[B, C+1]`` bool marks each image's classes C_{I_i} (its background column is
    ignored: C_{I_i} holds foreground classes only). Without ``class_mask`` the max runs over all
    foreground classes (the image's classes unknown). A teacher confident in a class the image does
    not contain therefore gets a low W, as in the paper.

    Background is not in C_{I_i}: the paper takes the max over the image's classes, C_{I_i} is its
    image-level label set, and WSSS image-level labels never name the background. This is also what
    makes W mean something: it is the teacher's confidence that a removed pixel is an object of this
    image (a pixel debiasing removed wrongly, to restore). With background in the max, every removed
    context pixel the teacher calls background would get W ≈ 1, and complementing would train all
    removed pixels at full weight whatever the teacher's doubt. The fill does allow background
    (``image_class_mask``): a biased pixel the teacher calls background becomes background in Y^co,
    with the small W of its best foreground class.

    y_db ``[B, H, W]``, teacher_probs ``[B, C+1, H, W]`` → W ``[B, H, W]`` float (no gradient).
    Raises ValueError when the shapes do not agree or C + 1 < 2.
    """
    if teacher_probs.ndim != 4 or teacher_probs.shape[1] < 2:
        raise ValueError(f"teacher_probs must be [B, C+1, H, W] with C >= 1, got {tuple(teacher_probs.shape)}")
    _check_same("y_db", y_db, "teacher_probs[:, 0]", teacher_probs[:, 0])
    fg = teacher_probs.detach()[:, 1:].float()
    if class_mask is not None:
        m = _check_class_mask(class_mask, teacher_probs)[:, 1:, None, None]
        fg = torch.where(m, fg, torch.zeros_like(fg))
    fg_conf = fg.amax(dim=1)
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
    valid = target != ignore_index
    n_valid = valid.sum()
    # the three checks in one device→host transfer (each ``bool(...)`` on a GPU waits for the queue)
    has_biased = (target == BIASED).any() if ignore_index != BIASED else torch.zeros((), dtype=torch.bool, device=target.device)
    out_of_range = (valid & ((target < 0) | (target >= logits.shape[1]))).any()
    has_biased, out_of_range, n = torch.stack([has_biased.long(), out_of_range.long(), n_valid.long()]).tolist()
    if has_biased:
        raise ValueError("target contains BIASED (254) pixels: complement the labels first")
    if out_of_range:
        raise ValueError(f"target values must be in 0..{logits.shape[1] - 1} or {ignore_index}")
    if n == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="none")  # [B, H, W]
    return (ce * weight * valid).sum() / n_valid
