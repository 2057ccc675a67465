"""A STEGO head distilled from a frozen, weight-free backbone's correspondences, trained in one process.

For a learned USS without pretrained weights (no model hub, CPU only). Instead of training a
backbone self-supervised first (``small_cnn`` + dense InfoNCE, which on a few dozen CPU minutes
learns little), the frozen backbone is the split's :class:`~mars_ray.models.adaptive.AdaptiveExtractor`
(fitted statistics, no weights): the STEGO head (``stego.SegHead``) learns codes whose cosine
similarities follow the adaptive features' correspondences (``stego.correspondence_loss``: pairs
of an image with itself, with one of its k nearest images, and with a random image). The
correspondence loss pulls together pixels whose feature correlation is above a shift and pushes
apart the rest, so the codes come out more cluster-like than the features they are distilled from.

The loop is a plain in-process one (research harness, tests); the ``uss`` stage runs the same
``stego_step`` per batch on Ray Train. Features are computed once per image and average-pooled by
``pool`` (the loss samples an ``n_samples``² grid of points per image, so full resolution buys
nothing), then random equal-size crops of these maps form the batches.

Shifts. STEGO's published shifts (0.18, 0.12, 0.46) are tuned to DINO ViT correlations. Here every
shift is ``DEFAULT_SHIFT`` = 0.5, the debias threshold of Eq 4: pairs of points whose features Eq 4
would call the same thing (cosine above 0.5) are pulled together, the others pushed apart. Measured
on three make-dataset variants (80 images each, seeds 21-24): STEGO's shifts gave debiased mIoU
0.77 / 0.86 / 0.64, shifts at the median of each pair type's feature correlations collapsed the
codes (0.49-0.56), their 0.8-quantile gave 0.80 / 0.70, and 0.5 gave 0.81 / 0.81 / 0.82 (the
adaptive features themselves: 0.82 / 0.89 / 0.78).
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mars_ray.models.stego import DEFAULT_WEIGHTS, SegHead, StegoModel, correspondence_loss, knn_table

logger = logging.getLogger(__name__)

DEFAULT_SHIFT = 0.5  # the debias threshold (module docstring)


@torch.no_grad()
def pooled_features(backbone: nn.Module, images: Sequence[np.ndarray], pool: int) -> list[Tensor]:
    """Backbone features of each image (uint8 ``[H, W, 3]``), average-pooled by ``pool``: ``[D, h, w]`` each."""
    out = []
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        f = backbone(x)
        out.append(F.avg_pool2d(f, pool, ceil_mode=True)[0] if pool > 1 else f[0])
    return out


def _crop(f: Tensor, size: tuple[int, int], g: torch.Generator) -> Tensor:
    h, w = f.shape[-2:]
    y = int(torch.randint(0, h - size[0] + 1, (1,), generator=g))
    x = int(torch.randint(0, w - size[1] + 1, (1,), generator=g))
    return f[:, y : y + size[0], x : x + size[1]]


def train_distilled_head(
    backbone: nn.Module,
    images: Sequence[np.ndarray],
    *,
    dim: int = 70,
    steps: Optional[int] = None,
    batch_size: int = 16,
    lr: float = 5e-4,
    knn: int = 7,
    n_samples: int = 11,
    pool: int = 4,
    shifts: Sequence[float] = (DEFAULT_SHIFT,) * 3,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    seed: int = 0,
) -> tuple[StegoModel, list[float]]:
    """Train a :class:`SegHead` on a frozen ``backbone`` over ``images`` (no labels); returns (model, loss history).

    ``steps`` None → ``max(300, 20 · len(images) / batch_size)`` (about 20 passes); ``shifts``: (self, k-NN,
    random), see the module docstring. The model is in eval mode; ``model(images)`` gives ``[B, dim, H/s, W/s]`` codes
    (s the backbone's stride). Raises ``ValueError`` for fewer than 2 images.
    """
    if len(images) < 2:
        raise ValueError(f"the STEGO head needs at least 2 images (k-NN and random pairs), got {len(images)}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    backbone = backbone.eval()
    feats = pooled_features(backbone, images, pool)
    size = (min(f.shape[1] for f in feats), min(f.shape[2] for f in feats))
    glob = F.normalize(torch.stack([f.mean(dim=(1, 2)) for f in feats]), dim=1)
    table = knn_table(glob, knn)
    logger.info("STEGO head on %s: %d images, maps %s, shifts %s", type(backbone).__name__, len(images), size,
                [round(s, 3) for s in shifts])
    head = SegHead(int(feats[0].shape[0]), dim)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    n = len(feats)
    steps = steps if steps is not None else max(300, math.ceil(20 * n / batch_size))
    history: list[float] = []
    head.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        partner = table[idx, torch.randint(0, table.shape[1], (len(idx),), generator=g)]
        f1 = torch.stack([_crop(feats[int(i)], size, g) for i in idx])
        f2 = torch.stack([_crop(feats[int(j)], size, g) for j in partner])
        codes = head(torch.cat([f1, f2]))
        c1, c2 = codes.split(len(idx))
        terms = correspondence_loss(f1, c1, knn_feats=f2, knn_codes=c2, shifts=shifts, weights=weights,
                                    n_samples=n_samples)
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    model = StegoModel(backbone, head.eval()).eval()
    return model, history


__all__ = ["DEFAULT_SHIFT", "pooled_features", "train_distilled_head"]
