"""The small stride-8 backbone, its crop geometry and its dense self-supervised loss."""

from __future__ import annotations

import pytest
import torch

from mars_ray.models.registry import BACKBONES
from mars_ray.models.small_cnn import random_views, sample_points, ssl_loss

TINY = {"widths": (8, 16, 16, 16), "out_dim": 16}


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (37, 50)])
def test_forward_shape(size: tuple[int, int]) -> None:
    model = BACKBONES.get("small_cnn", **TINY).eval()
    out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 16, -(-size[0] // 8), -(-size[1] // 8))
    assert model.stride == 8 and model.dim == 16


def test_default_preset() -> None:
    model = BACKBONES.get("small_cnn")
    assert model.dim == 128 and sum(p.numel() for p in model.parameters()) < 1_000_000
    with pytest.raises(ValueError, match="widths"):
        BACKBONES.get("small_cnn", widths=(8, 16))


def test_views_points_correspond() -> None:
    """An image of coordinate ramps: corresponding points must read the same colour in both views."""
    h, w = 48, 64
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([xx, yy, 0.5 * (xx + yy)])[None].repeat(4, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    v1, v2, p1, p2 = random_views(img, n_points=50, jitter=0.0, gray_p=0.0, generator=gen)
    assert v1.shape == img.shape and p1.shape == (4, 50, 2)
    assert p1.abs().max() <= 1 and p2.abs().max() <= 1
    torch.testing.assert_close(sample_points(v1, p1), sample_points(v2, p2), atol=0.03, rtol=0)
    assert not torch.allclose(v1, v2)


def test_ssl_loss_decreases_on_fixed_views() -> None:
    torch.manual_seed(0)
    model = BACKBONES.get("small_cnn", **TINY)
    gen = torch.Generator()
    images = torch.rand(6, 3, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        gen.manual_seed(0)  # same views each step: an optimisation check, not a learning curve
        out = ssl_loss(model, images, n_points=16, generator=gen)
        assert set(out) == {"dense_nce"}
        loss = sum(out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_ssl_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        ssl_loss(BACKBONES.get("small_cnn", **TINY), torch.rand(3, 32, 32))
