"""The adaptive extractor: fit on a split, serialise, reload, identical features; bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mars_ray.data.label_io import read_image
from mars_ray.data.synthetic import make_biased_dataset
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource
from mars_ray.models import load_all
from mars_ray.config import FeaturesConfig
from mars_ray.models.adaptive import (
    CODEBOOK_COPIES,
    MIN_FIT_IMAGES,
    AdaptiveExtractor,
    AdaptiveStats,
    adaptive_backbone,
    backbone_kwargs,
    fit_adaptive_stats,
    fit_sample,
    wavelengths_for,
)
from mars_ray.models.registry import BACKBONES, FEATURES


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    root = make_biased_dataset(tmp_path_factory.mktemp("ad") / "d", n_train=10, n_val=1, size=48, seed=2, cue="both")
    ds = VOCDataset(root)
    return [read_image(ds.image_path(i)) for i in ds.ids("train")]


@pytest.fixture(scope="module")
def stats(images: list[np.ndarray]) -> AdaptiveStats:
    # one torch thread, as the tests that refit (conftest's _one_thread): the cues' float32 convolutions
    # round differently with another thread count, and the digest is over the exact bytes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit_adaptive_stats(images, seed=0)
    finally:
        torch.set_num_threads(before)


def _x(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def test_registered() -> None:
    load_all()
    assert "adaptive" in FEATURES and "adaptive" in BACKBONES and "texture" in FEATURES


def test_wavelengths_rule() -> None:
    assert wavelengths_for(48) == (3.0, 6.0)
    assert wavelengths_for(96) == (3.0, 6.0, 12.0)
    assert wavelengths_for(375) == (3.0, 6.0, 12.0, 24.0, 48.0)
    with pytest.raises(ValueError):
        wavelengths_for(0)


def test_fit_is_deterministic_and_data_dependent(images: list[np.ndarray], stats: AdaptiveStats) -> None:
    again = fit_adaptive_stats(images, seed=0)
    assert again.digest == stats.digest
    assert fit_adaptive_stats(images[::-1], seed=0).digest != stats.digest
    assert fit_adaptive_stats(images, seed=1).digest != stats.digest
    assert stats.n_images == 10 and stats.dim == stats.transform.shape[1] + 2 * (16 + 32 + 64)  # two copies


def test_save_load_gives_identical_features(tmp_path: Path, images: list[np.ndarray], stats: AdaptiveStats) -> None:
    path = stats.save(tmp_path / "stats.npz")
    loaded = AdaptiveStats.load(path)
    assert loaded.digest == stats.digest
    a, b = AdaptiveExtractor(stats).eval(), FEATURES.get("adaptive", stats=str(path))
    for image in images[:3]:
        fa, fb = a(_x(image)), b(_x(image))
        assert torch.equal(fa, fb)
        assert fa.shape == (1, stats.dim, 48, 48) and fa.dtype == torch.float32 and torch.isfinite(fa).all()
    # through the pipeline's FeatureSource too, the file given as features.checkpoint would give it
    src = FeatureSource(extractor="adaptive", extractor_kwargs={"checkpoint": str(path)})
    np.testing.assert_array_equal(src("x", images[0]), a(_x(images[0]))[0].numpy())
    with pytest.raises(ValueError, match="needs fitted statistics"):
        FEATURES.get("adaptive")


def test_digest_follows_the_fitted_values(tmp_path: Path, stats: AdaptiveStats) -> None:
    changed = AdaptiveStats(**{**stats.__dict__, "mean": stats.mean + np.float32(1e-3)})
    assert changed.digest != stats.digest
    protos = list(stats.prototypes)
    protos[1] = protos[1].copy()
    protos[1][0, 0] += 1e-4
    assert AdaptiveStats(**{**stats.__dict__, "prototypes": tuple(protos)}).digest != stats.digest
    # a file edited after it was written no longer loads
    path = stats.save(tmp_path / "s.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["sigmas"] = arrays["sigmas"] * 2
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="digest"):
        AdaptiveStats.load(path)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        AdaptiveStats.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        AdaptiveStats.load(tmp_path / "junk.npz")


def test_too_small_or_flat_split(images: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match=f"1 image\\(s\\) to fit on, at least {MIN_FIT_IMAGES}"):
        fit_adaptive_stats(images[:1])
    with pytest.raises(ValueError, match="no images"):
        fit_adaptive_stats([])
    flat = [np.full((32, 32, 3), 128, np.uint8)] * MIN_FIT_IMAGES
    with pytest.raises(ValueError, match="do not vary"):
        fit_adaptive_stats(flat)
    with pytest.raises(ValueError, match="uint8"):
        fit_adaptive_stats([np.zeros((8, 8), np.uint8)] * MIN_FIT_IMAGES)


@pytest.mark.parametrize("hw", [(37, 53), (12, 9), (96, 160)])
def test_any_image_size(stats: AdaptiveStats, hw: tuple[int, int]) -> None:
    ext = AdaptiveExtractor(stats).eval()
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    f = ext(x)
    assert f.shape == (2, stats.dim, *hw) and torch.isfinite(f).all()
    with pytest.raises(ValueError, match="B, 3, H, W"):
        ext(torch.rand(3, *hw))


def test_backbone_state_dict_carries_the_statistics(images: list[np.ndarray], stats: AdaptiveStats) -> None:
    ext = AdaptiveExtractor(stats).eval()
    rebuilt = adaptive_backbone(**backbone_kwargs(stats))
    assert rebuilt.digest != stats.digest  # zero placeholders until loaded
    rebuilt.load_state_dict(ext.state_dict())
    assert rebuilt.digest == stats.digest
    assert torch.equal(rebuilt.eval()(_x(images[0])), ext(_x(images[0])))


def test_features_are_centred_and_parts_balanced(images: list[np.ndarray], stats: AdaptiveStats) -> None:
    """Over the split, the linear part is zero-mean and the linear part and each codebook size (its two copies together) have similar RMS norms."""
    ext = AdaptiveExtractor(stats).eval()
    f = torch.cat([ext(_x(im)) for im in images]).permute(0, 2, 3, 1).reshape(-1, stats.dim)
    r = stats.transform.shape[1]
    assert f[:, :r].mean(0).abs().max() < 0.15
    bounds = np.cumsum([0, r, 16, 32, 64, 16, 32, 64])
    ms = [float(f[:, a:b].norm(dim=1).pow(2).mean()) for a, b in zip(bounds[:-1], bounds[1:])]
    norms = np.sqrt([ms[0], *(np.add(ms[1:4], ms[4:7]))])  # the linear part, then each size's two copies
    assert max(norms) / min(norms) < 1.3, norms


def test_codebook_copies_fit_an_ensemble_at_one_codebooks_weight(images: list[np.ndarray],
                                                                  stats: AdaptiveStats) -> None:
    """The default (``features.codebook_copies=2``): each codebook size twice, from other K-means starts;
    the two copies of a size weigh together what one codebook weighs, so the linear part keeps its
    share of F. ``copies=1`` is the one-quantisation design, whose codebooks are the first copies."""
    assert fit_adaptive_stats(images, seed=0, copies=2).digest == stats.digest
    one = fit_adaptive_stats(images, seed=0, copies=1)
    assert [p.shape[0] for p in stats.prototypes] == [16, 32, 64, 16, 32, 64]
    assert [p.shape[0] for p in one.prototypes] == [16, 32, 64] and stats.dim == one.dim + 16 + 32 + 64
    for i in range(3):
        np.testing.assert_array_equal(stats.prototypes[i], one.prototypes[i])  # the first copy: one's fit
        assert not np.allclose(stats.prototypes[i + 3], stats.prototypes[i])  # the second starts elsewhere
    np.testing.assert_array_equal(stats.transform, one.transform)
    for st, sizes in ((stats, [16, 32, 64] * 2), (one, [16, 32, 64])):
        ext = AdaptiveExtractor(st).eval()
        f = torch.cat([ext(_x(im)) for im in images]).permute(0, 2, 3, 1).reshape(-1, st.dim)
        bounds = np.cumsum([0, stats.transform.shape[1], *sizes])
        ms = [float(f[:, a:b].norm(dim=1).pow(2).mean()) for a, b in zip(bounds[:-1], bounds[1:])]
        share = 1.0 / (len(sizes) // 3)  # each copy's mean squared norm: 1/2 with two copies, 1 with one
        assert ms[0] == pytest.approx(1.0, rel=0.3)
        assert all(m == pytest.approx(share, rel=0.3) for m in ms[1:]), ms
    with pytest.raises(ValueError, match="copies must be >= 1"):
        fit_adaptive_stats(images, copies=0)
    assert FeaturesConfig().codebook_copies == CODEBOOK_COPIES == 2  # the stage's default is the extractor's


def test_fit_sample() -> None:
    ids = [f"i{k:04d}" for k in range(1000)]
    assert fit_sample(ids[:10]) == ids[:10]
    a = fit_sample(ids, max_images=50, seed=3)
    assert len(a) == 50 and a == sorted(a) and set(a) <= set(ids)
    assert a == fit_sample(ids, max_images=50, seed=3) and a != fit_sample(ids, max_images=50, seed=4)
