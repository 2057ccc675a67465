"""A small stride-8 conv backbone and a dense self-supervised objective to train it on the data itself.

For when no pretrained weights are available (no model hub here). The objective is a pixel-level
InfoNCE between two augmented views of each image (in the spirit of VADeR / DenseCL's dense term):
the two random resized crops (+ flip + colour jitter) share a known geometry, so for points sampled
in the crops' overlap the features at corresponding positions are positives, and the features at all
other sampled points of the batch (same image and other images) are negatives. Matching a point
across a rescale and a colour change forces the features to describe local texture and structure,
not colour or position. Everything is pure torch (``affine_grid`` / ``grid_sample``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mars_ray.models.registry import BACKBONES

logger = logging.getLogger(__name__)

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Conv/BN/ReLU stem + three (stride-2, stride-1) stages + 1x1 linear embedding.

    B x 3 x H x W in [0, 1] → B x out_dim x ceil(H/8) x ceil(W/8). ImageNet normalisation inside.
    ``dim`` and ``stride`` (8) describe the output map; the receptive field is 45 pixels.
    """

    def __init__(self, *, widths: Sequence[int] = (32, 64, 128, 128), out_dim: int = 128) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths must have 4 entries (stem + 3 stages), got {list(widths)}")
        self.dim = out_dim
        self.stride = 8
        layers: list[nn.Module] = [_conv_bn_relu(3, widths[0], 1)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [_conv_bn_relu(cin, cout, 2), _conv_bn_relu(cout, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.embed = nn.Conv2d(widths[-1], out_dim, 1)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        """B x 3 x H x W in [0, 1] → B x D x ceil(H/8) x ceil(W/8)."""
        return self.embed(self.body((images - self.mean) / self.std))


def _build(**arch: Any) -> SmallCNN:
    return SmallCNN(**arch)


@BACKBONES.register("small_cnn")
def small_cnn(**kw: Any) -> SmallCNN:
    """The default: widths (32, 64, 128, 128), 128-dim output, stride 8 (~0.5 M parameters)."""
    return _build(**{"widths": (32, 64, 128, 128), "out_dim": 128, **kw})


# ---------------------------------------------------------------------------------------------
# augmentation with known geometry


def _sample_boxes(
    b: int, scale: tuple[float, float], ratio: tuple[float, float], gen: Optional[torch.Generator]
) -> Tensor:
    """Random crop boxes in normalised coordinates: B x 4 (cx, cy, half_w, half_h), inside [-1, 1]²."""
    area = torch.empty(b).uniform_(*scale, generator=gen)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(log_r)
    hw = torch.sqrt(area * r).clamp(max=1.0)
    hh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - hw)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - hh)
    return torch.stack([cx, cy, hw, hh], dim=1)


def _colour_jitter(x: Tensor, strength: float, gray_p: float, gen: Optional[torch.Generator]) -> Tensor:
    """Per-image random brightness, contrast, saturation and grayscale: B x 3 x H x W in [0, 1]."""
    b = x.shape[0]

    def factor() -> Tensor:
        return (1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * strength).to(x)

    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = x * factor()
    mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    gray = (x * weights).sum(1, keepdim=True)
    x = (x - gray) * factor() + gray
    to_gray = (torch.rand(b, 1, 1, 1, generator=gen) < gray_p).to(x)
    x = x * (1 - to_gray) + (x * weights).sum(1, keepdim=True) * to_gray
    return x.clamp(0, 1)


def random_views(
    images: Tensor,
    *,
    n_points: int = 64,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    jitter: float = 0.4,
    gray_p: float = 0.2,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two augmented views of each image and corresponding points in them.

    Each view is a random resized crop (resampled to the input size), randomly flipped, with
    colour jitter. Points are drawn uniformly in the overlap of the two crops.

    Args:
        images: B x 3 x H x W in [0, 1].

    Returns:
        (view1, view2, pts1, pts2): views B x 3 x H x W; pts B x P x 2 as (x, y) in [-1, 1]
        (``grid_sample`` convention, ``align_corners=False``): ``pts1[b, i]`` in view 1 and
        ``pts2[b, i]`` in view 2 are the same image location.
    """
    b, _, h, w = images.shape
    box1 = _sample_boxes(b, scale, ratio, generator)
    box2 = _sample_boxes(b, scale, ratio, generator)
    for _ in range(10):  # resample the second crop where the two do not overlap
        lo = torch.maximum(box1[:, :2] - box1[:, 2:], box2[:, :2] - box2[:, 2:])
        hi = torch.minimum(box1[:, :2] + box1[:, 2:], box2[:, :2] + box2[:, 2:])
        empty = ((hi - lo) <= 0.05).any(dim=1)
        if not empty.any():
            break
        box2[empty] = _sample_boxes(int(empty.sum()), scale, ratio, generator)
    else:
        box2[empty] = box1[empty]
        lo = torch.maximum(box1[:, :2] - box1[:, 2:], box2[:, :2] - box2[:, 2:])
        hi = torch.minimum(box1[:, :2] + box1[:, 2:], box2[:, :2] + box2[:, 2:])
    pts = lo[:, None] + torch.rand(b, n_points, 2, generator=generator) * (hi - lo)[:, None]  # image coords

    views, view_pts = [], []
    for box in (box1, box2):
        flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = box[:, 2] * flip
        theta[:, 0, 2] = box[:, 0]
        theta[:, 1, 1] = box[:, 3]
        theta[:, 1, 2] = box[:, 1]
        grid = F.affine_grid(theta.to(images), [b, 3, h, w], align_corners=False)
        view = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        views.append(_colour_jitter(view, jitter, gray_p, generator))
        u = (pts[..., 0] - box[:, None, 0]) / (box[:, None, 2] * flip[:, None])
        v = (pts[..., 1] - box[:, None, 1]) / box[:, None, 3]
        view_pts.append(torch.stack([u, v], dim=-1).to(images))
    return views[0], views[1], view_pts[0], view_pts[1]


def sample_points(feats: Tensor, pts: Tensor) -> Tensor:
    """Bilinear features at points: feats B x D x h x w, pts B x P x 2 in [-1, 1] → B x P x D."""
    out = F.grid_sample(feats, pts[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


def ssl_loss(
    model: nn.Module,
    images: Tensor,
    *,
    n_points: int = 64,
    temperature: float = 0.2,
    generator: Optional[torch.Generator] = None,
    **aug: Any,
) -> dict[str, Tensor]:
    """Dense InfoNCE between two augmented views: images B x 3 x H x W in [0, 1] → {"dense_nce": scalar}.

    The B·P sampled points of view 1 are matched against the B·P points of view 2 (cosine similarity
    / ``temperature``, symmetric cross-entropy); the corresponding point is the positive.
    ``aug`` goes to :func:`random_views`. Chance level is ``log(B·P)``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be B x 3 x H x W, got {tuple(images.shape)}")
    v1, v2, p1, p2 = random_views(images, n_points=n_points, generator=generator, **aug)
    feats = model(torch.cat([v1, v2]))
    f1, f2 = feats.chunk(2)
    z1 = F.normalize(sample_points(f1, p1).flatten(0, 1), dim=1)  # BP x D
    z2 = F.normalize(sample_points(f2, p2).flatten(0, 1), dim=1)
    logits = z1 @ z2.t() / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    return {"dense_nce": loss}
