"""CAM classifier (Zhou et al. 2016): the WSSS baseline that produces the biased pseudo labels Y^b.

A backbone + bias-free 1x1 conv classifier; global average pooling gives multi-label logits, and the
same classifier applied per pixel gives the class activation maps. ``compute_cams`` aggregates
multi-scale, flipped CAMs as IRN/PSA do; ``cams_to_label`` turns them into a label map with a constant
background score (optionally refined by a dense CRF).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mars_ray.models import small_cnn as _small_cnn  # noqa: F401  (registers "small_cnn")
from mars_ray.models.registry import BACKBONES, CLASSIFIERS

logger = logging.getLogger(__name__)


class CamClassifier(nn.Module):
    """Backbone + 1x1 conv classifier without bias: B x 3 x H x W in [0, 1] → B x C logits (GAP).

    ``num_classes`` counts foreground classes only; channel ``c`` is class id ``c + 1``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(int(getattr(backbone, "dim")), num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    def cam(self, images: Tensor) -> Tensor:
        """Raw class activation maps (before ReLU): B x 3 x H x W → B x C x h x w."""
        return self.classifier(self.backbone(images))

    def forward(self, images: Tensor) -> Tensor:
        # GAP commutes with the linear 1x1 classifier: mean of the CAM = logits
        return self.cam(images).mean(dim=(2, 3))


def _build(num_classes: int, backbone: str = "small_cnn", **backbone_kwargs: Any) -> CamClassifier:
    return CamClassifier(BACKBONES.get(backbone, **backbone_kwargs), num_classes)


@CLASSIFIERS.register("cam")
def cam(num_classes: int, backbone: str = "small_cnn", **backbone_kwargs: Any) -> CamClassifier:
    """A CAM classifier over any BACKBONES entry (built fresh, with ``backbone_kwargs``)."""
    return _build(num_classes, backbone, **backbone_kwargs)


@CLASSIFIERS.register("cam_small")
def cam_small(num_classes: int, **backbone_kwargs: Any) -> CamClassifier:
    """A CAM classifier on the ``small_cnn`` backbone, trainable from scratch on CPU."""
    return _build(num_classes, "small_cnn", **backbone_kwargs)


def cam_loss(model: nn.Module, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Multi-label soft-margin loss: images B x 3 x H x W, targets B x C multi-hot → {"cls": scalar}."""
    logits = model(images)
    if targets.shape != logits.shape:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    return {"cls": F.multilabel_soft_margin_loss(logits, targets.to(logits.dtype))}


@torch.no_grad()
def compute_cams(
    model: CamClassifier,
    image: Tensor,
    classes: Sequence[int],
    *,
    scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
    flip: bool = True,
) -> Tensor:
    """Multi-scale, flip-augmented CAMs of the given classes, each scaled to [0, 1].

    Args:
        model: a :class:`CamClassifier` (put in eval mode here, its mode restored afterwards).
        image: 3 x H x W in [0, 1].
        classes: 1-based foreground class ids (channel ``id - 1``).

    Returns:
        len(classes) x H x W: ReLU CAMs upsampled to H x W, summed over scales and flips, divided by
        their max (an all-zero CAM stays zero).
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be 3 x H x W, got {tuple(image.shape)}")
    bad = [c for c in classes if not 1 <= int(c) <= model.num_classes]
    if bad:
        raise ValueError(f"class ids {bad} outside 1..{model.num_classes}")
    h, w = image.shape[1:]
    if not classes:
        return image.new_zeros((0, h, w))
    idx = torch.as_tensor([int(c) - 1 for c in classes], device=image.device)
    was_training = model.training
    model.eval()
    try:
        total = image.new_zeros((len(classes), h, w))
        x = image[None].float()
        for s in scales:
            size = (max(8, round(h * s)), max(8, round(w * s)))
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if s != 1.0 else x
            batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
            maps = F.relu(model.cam(batch)[:, idx])
            if flip:
                maps = maps[:1] + maps[1:].flip(-1)
            total += F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[0]
    finally:
        model.train(was_training)
    return total / (total.flatten(1).amax(dim=1).view(-1, 1, 1) + 1e-5)


def cams_to_label(
    cams: Tensor | np.ndarray,
    classes: Sequence[int],
    *,
    bg_threshold: float = 0.15,
    image: Optional[np.ndarray] = None,
    crf: Optional[Mapping[str, Any]] = None,
) -> np.ndarray:
    """A pseudo label from normalised CAMs: K x H x W in [0, 1] → H x W uint8 of {0} ∪ classes.

    Background scores a constant ``bg_threshold``; each pixel takes the argmax of [bg, cams]. With
    ``crf`` (keyword arguments for ``mars_ray.algo.crf.dense_crf``), the scores, normalised to sum
    to one per pixel, are refined by a dense CRF on ``image`` (H x W x 3 uint8) before the argmax.
    """
    scores = cams.detach().cpu().numpy() if isinstance(cams, Tensor) else np.asarray(cams)
    if scores.ndim != 3 or scores.shape[0] != len(classes):
        raise ValueError(f"cams must be len(classes)={len(classes)} x H x W, got {scores.shape}")
    if any(not 1 <= int(c) <= 253 for c in classes):
        raise ValueError(f"class ids must lie in 1..253, got {list(classes)}")
    h, w = scores.shape[1:]
    probs = np.concatenate([np.full((1, h, w), bg_threshold, dtype=np.float32), scores.astype(np.float32)])
    if crf is not None:
        if image is None or image.shape[:2] != (h, w):
            got = None if image is None else image.shape
            raise ValueError(f"dense CRF needs the H x W x 3 uint8 image of size {(h, w)}, got {got}")
        from mars_ray.algo.crf import dense_crf  # lazy: pydensecrf is optional at import time

        probs = np.clip(probs, 1e-5, None)
        probs = dense_crf(np.ascontiguousarray(image, dtype=np.uint8), probs / probs.sum(0, keepdims=True), **crf)
    lut = np.asarray([0] + [int(c) for c in classes], dtype=np.uint8)
    return lut[np.asarray(probs).argmax(0)]
