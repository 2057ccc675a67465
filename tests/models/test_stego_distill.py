"""A STEGO head on the frozen adaptive extractor: trains without labels, and its checkpoint carries the statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mars_ray.data.label_io import read_image
from mars_ray.data.synthetic import make_biased_dataset
from mars_ray.data.voc import VOCDataset
from mars_ray.models.adaptive import AdaptiveExtractor, backbone_kwargs, fit_adaptive_stats
from mars_ray.models.stego import load_stego_checkpoint, save_stego_checkpoint
from mars_ray.models.stego_distill import pooled_features, train_distilled_head


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    root = make_biased_dataset(tmp_path_factory.mktemp("sd") / "d", n_train=10, n_val=1, size=48, seed=4, cue="colour")
    ds = VOCDataset(root)
    return [read_image(ds.image_path(i)) for i in ds.ids("train")]


def _x(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


def test_trains_and_round_trips(tmp_path: Path, images: list[np.ndarray]) -> None:
    stats = fit_adaptive_stats(images, seed=0)
    backbone = AdaptiveExtractor(stats).eval()
    model, history = train_distilled_head(backbone, images, steps=25, batch_size=4, dim=12, seed=0)
    assert len(history) == 25 and all(np.isfinite(history))
    assert np.mean(history[-5:]) < np.mean(history[:5])  # the correspondence loss goes down
    codes = model(_x(images[0]))
    assert codes.shape == (1, 12, 48, 48) and torch.isfinite(codes).all()
    # deterministic for a seed
    again, _ = train_distilled_head(AdaptiveExtractor(stats).eval(), images, steps=25, batch_size=4, dim=12, seed=0)
    assert torch.allclose(again(_x(images[0])), codes)
    # the checkpoint embeds the fitted statistics as the backbone's state: no stats file needed to reload
    path = save_stego_checkpoint(model, tmp_path / "uss.pt", "adaptive", backbone_kwargs(stats))
    loaded = load_stego_checkpoint(path)
    assert loaded.backbone.digest == stats.digest
    assert torch.equal(loaded(_x(images[1])), model(_x(images[1])))


def test_pooled_features_and_bad_input(images: list[np.ndarray]) -> None:
    backbone = AdaptiveExtractor(fit_adaptive_stats(images, seed=0)).eval()
    f = pooled_features(backbone, images[:2], pool=4)
    assert [t.shape for t in f] == [(backbone.dim, 12, 12)] * 2
    with pytest.raises(ValueError, match="at least 2 images"):
        train_distilled_head(backbone, images[:1], steps=1)
