"""STEGO head, correspondence loss, checkpoint round trip through the FEATURES registry."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mars_ray.models.registry import BACKBONES, FEATURES
from mars_ray.models.stego import (
    SegHead,
    StegoModel,
    correspondence_loss,
    global_features,
    knn_table,
    save_stego_checkpoint,
    stego_step,
)
from mars_ray.models.vit import save_dino_checkpoint
from mars_ray.storage import upath

TINY_CNN = {"widths": (8, 16, 16, 16), "out_dim": 16}


def textured_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n x 3 x size x size: a striped disc on a differently striped / noisy background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    out = []
    for i in range(n):
        f = 2 * math.pi / (3 + 3 * torch.rand(1, generator=g).item())
        stripes = (torch.sin((xx if i % 2 else yy) * f) > 0).float()
        noise = torch.rand(size, size, generator=g)
        cx, cy = (size * (0.3 + 0.4 * torch.rand(2, generator=g))).tolist()
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (size / 4) ** 2
        colour = torch.rand(3, 1, 1, generator=g)
        img = torch.where(disc, stripes * colour, noise * 0.5 + 0.25)
        out.append(img)
    return torch.stack(out).clamp(0, 1)


def _model(backbone: str = "small_cnn", **kw) -> StegoModel:
    torch.manual_seed(0)
    bb = BACKBONES.get(backbone, **kw)
    return StegoModel(bb, SegHead(bb.dim, dim=8))


def test_head_and_frozen_backbone() -> None:
    model = _model(**TINY_CNN).train()
    assert not model.backbone.training and model.head.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    out = model(torch.rand(2, 3, 40, 48))
    assert out.shape == (2, 8, 5, 6) and model.dim == 8 and model.stride == 8


def test_loss_terms_and_shapes() -> None:
    feats, codes = torch.randn(3, 16, 6, 6), torch.randn(3, 8, 6, 6, requires_grad=True)
    out = correspondence_loss(feats, codes)
    assert set(out) == {"corr_self", "corr_random"}
    out = correspondence_loss(feats, codes, knn_feats=feats.flip(0), knn_codes=codes.flip(0))
    assert set(out) == {"corr_self", "corr_knn", "corr_random"}
    sum(out.values()).backward()
    assert codes.grad is not None
    assert set(correspondence_loss(feats[:1], codes[:1])) == {"corr_self"}  # no partner for B = 1
    with pytest.raises(ValueError, match="together"):
        correspondence_loss(feats, codes, knn_feats=feats)
    with pytest.raises(ValueError, match="disagree"):
        correspondence_loss(feats, codes[:, :, :5])


def test_correspondence_loss_decreases() -> None:
    model = _model(**TINY_CNN)
    images = textured_images(6)
    knn = knn_table(global_features(model.backbone, images), k=1)[:, 0]
    opt = torch.optim.Adam(model.head.parameters(), lr=5e-3)
    model.train()
    losses = []
    for _ in range(12):
        torch.manual_seed(0)  # same sampled points and partners each step
        out = stego_step(model, images, images[knn], images.roll(1, 0))
        assert set(out) == {"corr_self", "corr_knn", "corr_random"}
        loss = sum(out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses


def test_knn_table_excludes_self() -> None:
    g = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]]), dim=1)
    assert knn_table(g, k=1)[:, 0].tolist() == [1, 0, 3, 2]
    with pytest.raises(ValueError, match="at least 2"):
        knn_table(g[:1])


@pytest.mark.parametrize("backbone,kwargs,external", [
    ("small_cnn", TINY_CNN, False),
    ("vit_tiny_test", {}, True),
])
def test_checkpoint_round_trip_via_registry(tmp_path: Path, backbone: str, kwargs: dict, external: bool) -> None:
    model = _model(backbone, **kwargs).eval()
    weights = save_dino_checkpoint(model.backbone, tmp_path / "backbone.pth") if external else None
    path = save_stego_checkpoint(model, tmp_path / "stego.pt", backbone, kwargs, backbone_weights=weights)
    extractor = FEATURES.get("stego", checkpoint=str(path))
    x = torch.rand(2, 3, 40, 32)
    with torch.no_grad():
        expected = model(x)
    got = extractor(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert extractor.dim == 8 and extractor.stride == 8 and not got.requires_grad


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        FEATURES.get("stego", checkpoint=str(tmp_path / "absent.pt"))
    torch.save({"format": "mars_ray.stego/1", "backbone": "small_cnn"}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt.*missing keys.*head_state"):
        FEATURES.get("stego", checkpoint=str(tmp_path / "partial.pt"))
    model = _model("vit_tiny_test")
    path = save_stego_checkpoint(model, tmp_path / "s.pt", "vit_tiny_test", {}, backbone_weights=tmp_path / "gone.pth")
    with pytest.raises(FileNotFoundError, match="gone.pth"):
        FEATURES.get("stego", checkpoint=str(path))
    with pytest.raises(ValueError, match="unknown backbone"):
        save_stego_checkpoint(model, tmp_path / "x.pt", "no_such_backbone")


def test_checkpoint_and_backbone_weights_on_object_store(s3_bucket: str) -> None:
    model = _model("vit_tiny_test").eval()
    weights = save_dino_checkpoint(model.backbone, upath(s3_bucket) / "w" / "backbone.pth")
    path = save_stego_checkpoint(model, upath(s3_bucket) / "uss" / "stego.pt", "vit_tiny_test", {},
                                 backbone_weights=weights)
    extractor = FEATURES.get("stego", checkpoint=str(path))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x), model(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"s3://.*/absent\.pt"):
        FEATURES.get("stego", checkpoint=f"{s3_bucket}/uss/absent.pt")
