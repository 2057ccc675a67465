"""The weight-free texture extractor: contract, determinism, object/context separation.

Its speed is measured by ``benchmarks/extractor_speed.py`` (wall clock is no test on a shared machine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.synthetic import PSEUDO_DIR, make_biased_dataset
from mars_ray.data.voc import VOCDataset
from mars_ray.models.handcrafted import TextureExtractor, build_texture_extractor
from mars_ray.models.registry import FEATURES


def test_registered() -> None:
    assert "texture" in FEATURES
    ext = FEATURES.get("texture")
    assert isinstance(ext, TextureExtractor) and ext.stride == 1 and ext.dim == 3 * 4 + 4


@pytest.mark.parametrize("hw", [(96, 96), (37, 53), (12, 9)])
def test_shape_dtype_any_size(hw: tuple[int, int]) -> None:
    ext = build_texture_extractor()
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    f = ext(x)
    assert f.shape == (2, ext.dim, *hw) and f.dtype == torch.float32
    assert torch.isfinite(f).all()
    profile = f[:, : ext.n_tex]
    assert profile.mean(1).abs().max() < 1e-4  # signed: centred across channels per pixel


def test_deterministic_and_batch_independent() -> None:
    ext = build_texture_extractor()
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    a, b = ext(x), build_texture_extractor()(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ext(x[1:2]), a[1:2], rtol=1e-5, atol=1e-5)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        build_texture_extractor()(torch.rand(1, 1, 8, 8))


def test_separates_objects_from_contexts(tmp_path: Path) -> None:
    """Per image, object pixels sit close to the object's centroid, its context pixels do not."""
    root = make_biased_dataset(tmp_path / "d", n_train=12, n_val=1, size=64, seed=5, n_background_only=0.0)
    ds, ext = VOCDataset(root), build_texture_extractor()
    obj_cos, ctx_cos = [], []
    for i in ds.ids("train"):
        img = torch.from_numpy(read_image(ds.image_path(i))).permute(2, 0, 1)[None].float() / 255
        f = torch.nn.functional.normalize(ext(img)[0], dim=0).numpy()  # [d, H, W]
        gt = read_label(ds.gt_path(i))  # type: ignore[arg-type]
        pseudo = read_label(root / PSEUDO_DIR / f"{i}.png")
        for c in ds.image_labels(i):
            obj, ctx = gt == c, (pseudo == c) & (gt == 0)
            cen = f[:, obj].mean(1)
            cen /= np.linalg.norm(cen)
            obj_cos.append(cen @ f[:, obj])
            ctx_cos.append(cen @ f[:, ctx])
    o, c = np.concatenate(obj_cos), np.concatenate(ctx_cos)
    assert o.mean() > 0.85 and (o > 0.5).mean() > 0.9, (o.mean(), (o > 0.5).mean())
    # at 64 px the context ring is thin, so pooled features near the edge still leak (~0.27 here)
    assert c.mean() < 0.35 and (c > 0.5).mean() < 0.35, (c.mean(), (c > 0.5).mean())
    assert o.mean() - c.mean() > 0.55
