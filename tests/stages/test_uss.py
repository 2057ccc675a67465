"""Stage ``uss``: STEGO-style USS on Ray Train, no labels (situation b)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mars_ray import config as C
from mars_ray.data.label_io import read_image
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource
from mars_ray.models.registry import BACKBONES
from mars_ray.models.vit import save_dino_checkpoint
from mars_ray.stages import uss

pytestmark = [pytest.mark.timeout(300)]

TINY = {"uss.backbone": "small_cnn", "uss.ssl_epochs": 1, "uss.epochs": 3, "uss.batch_size": 8, "uss.crop_size": 48,
        "uss.lr": 5e-3, "uss.dim": 16, "uss.min_steps": 0}


def _cfg(data: Path, **over) -> C.Config:
    return C.build(overrides={"data.root": str(data), **TINY, **over})


@pytest.fixture(scope="module")
def run(tiny_data: Path, ray_local, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uss_run")
    uss.run(_cfg(tiny_data), run_dir)
    return run_dir


@pytest.mark.ray
def test_correspondence_loss_decreases(run: Path):
    history = json.loads((run / "uss" / "history.json").read_text())
    assert [(h["phase"], h["epoch"]) for h in history] == [("ssl", 1), ("stego", 1), ("stego", 2), ("stego", 3)]
    steps = [h["step"] for h in history]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # one global step counter
    stego = [h["loss"] for h in history if h["phase"] == "stego"]
    assert stego[-1] < stego[0]
    assert {"corr_self", "corr_knn", "corr_random"} <= set(history[-1])  # all three STEGO pair types


@pytest.mark.ray
def test_checkpoint_loads_as_stego_extractor(run: Path, tiny_data: Path):
    ds = VOCDataset(tiny_data)
    image_id = ds.ids("train")[0]
    image = read_image(ds.image_path(image_id))
    src = FeatureSource(extractor="stego", extractor_kwargs={"checkpoint": str(run / "uss" / uss.CHECKPOINT)})
    f = src(image_id, image)
    assert f.shape == (16, *image.shape[:2]) and np.isfinite(f).all() and f.std() > 0
    m = json.loads((run / "uss" / "manifest.json").read_text())
    assert m["status"] == "complete" and set(m["inputs"]) == {"dataset", "backbone_weights"}
    assert m["inputs"]["backbone_weights"] == "none" and "num_workers" not in m["config"]["uss"]
    assert not (run / "uss" / "ray").exists()


def test_wrong_dino_weights_fail_before_training(tiny_data: Path, tmp_path: Path):
    bad = tmp_path / "dino_wrong.pth"
    save_dino_checkpoint(BACKBONES.get("small_cnn"), bad)  # a state dict of another architecture
    cfg = _cfg(tiny_data, **{"uss.backbone": "vit_tiny_test", "uss.backbone_weights": str(bad)})
    with pytest.raises(ValueError, match=r"dino_wrong\.pth.*missing keys \[.*blocks\.0"):
        uss.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "uss").exists()
    with pytest.raises(ValueError, match="needs uss.backbone_weights"):
        uss.run(_cfg(tiny_data, **{"uss.backbone": "vit_base_8"}), tmp_path / "run")


@pytest.mark.ray
@pytest.mark.slow
def test_vit_with_dino_weights_resumes_the_step_counter(tiny_data: Path, tmp_path: Path, ray_local):
    """Same Ray Train name + storage: the second fit starts from the first one's checkpoint."""
    torch.manual_seed(0)
    weights = save_dino_checkpoint(BACKBONES.get("vit_tiny_test"), tmp_path / "dino_tiny.pth")
    over = {"uss.backbone": "vit_tiny_test", "uss.backbone_weights": str(weights), "uss.ssl_epochs": 0}
    ds = VOCDataset(tiny_data)
    first = uss.fit(_cfg(tiny_data, **over, **{"uss.epochs": 1}), ds, tmp_path / "ray")
    second = uss.fit(_cfg(tiny_data, **over, **{"uss.epochs": 2}), ds, tmp_path / "ray")
    s1 = first["step"]
    assert first["resumed_at_step"] is None and second["resumed_at_step"] == s1 > 0
    assert [(h["epoch"], h["step"]) for h in second["history"]] == [(1, s1), (2, 2 * s1)]
    assert torch.equal(first["knn"], second["knn"])  # the k-NN table is computed once per run
    assert second["backbone"] is None  # given weights are not copied into every checkpoint


@pytest.mark.ray
@pytest.mark.slow
def test_adaptive_backbone_distils_the_head(tiny_data: Path, tmp_path: Path, ray_local):
    """The default backbone: statistics fitted on the split, no SSL phase, a checkpoint that embeds them;
    uss.min_steps adds epochs (16 images in batches of 8: 2 steps an epoch, 5 steps need 3 epochs)."""
    from mars_ray.models.adaptive import AdaptiveStats

    cfg = _cfg(tiny_data, **{"uss.backbone": "adaptive", "uss.epochs": 2, "uss.min_steps": 5})
    run_dir = tmp_path / "run"
    uss.run(cfg, run_dir)
    history = json.loads((run_dir / "uss" / "history.json").read_text())
    assert [h["phase"] for h in history] == ["stego"] * 3  # nothing to pretrain
    assert history[-1]["step"] == 6
    m = json.loads((run_dir / "uss" / "manifest.json").read_text())
    assert AdaptiveStats.load(run_dir / "uss" / m["outputs"]["uss_stats"]).digest == m["outputs"]["uss_stats_digest"]
    ds = VOCDataset(tiny_data)
    image = read_image(ds.image_path(ds.ids("train")[0]))
    src = FeatureSource(extractor="stego", extractor_kwargs={"checkpoint": str(run_dir / "uss" / uss.CHECKPOINT)})
    f = src("x", image)
    assert f.shape == (16, *image.shape[:2]) and np.isfinite(f).all() and f.std() > 0
    # the checkpoint carries the statistics: the same features without the stats file
    (run_dir / "uss" / "uss_stats.npz").unlink()
    np.testing.assert_array_equal(FeatureSource(extractor="stego", extractor_kwargs={
        "checkpoint": str(run_dir / "uss" / uss.CHECKPOINT)})("x", image), f)


def test_native_crops_keep_the_image_scale():
    from mars_ray.engine import fit_crop

    rng = np.random.default_rng(0)
    image = np.zeros((60, 80, 3), np.uint8)
    image[:, ::2] = 255  # a 2 px period: any resize blurs it
    crop = fit_crop(image, 48, rng, scale=None, flip=False)
    assert crop.shape == (3, 48, 48)
    assert set(np.unique(crop.numpy())) == {0.0, 1.0}  # pixels copied, not resampled
    resized = fit_crop(image, 48, rng, flip=False)  # the default: short side resized to 48-72 px
    assert len(np.unique(resized.numpy())) > 2
    small = fit_crop(image[:40, :40], 48, rng, scale=None)  # smaller than the crop: up-scaled just enough
    assert small.shape == (3, 48, 48)


def test_native_crop_side_never_exceeds_the_median_short_side(tiny_data: Path):
    ds = VOCDataset(tiny_data)
    short = int(np.median([min(read_image(ds.image_path(i)).shape[:2]) for i in ds.ids("train")]))
    native = uss.loop_settings(_cfg(tiny_data, **{"uss.crop_size": short + 40}), ds)
    assert native.crop_size == short and native.native
    resize = uss.loop_settings(_cfg(tiny_data, **{"uss.crop_size": short + 40, "uss.crop_scale": "resize"}), ds)
    assert resize.crop_size == short + 40 and not resize.native
    assert uss.loop_settings(_cfg(tiny_data, **{"uss.crop_size": 16}), ds).crop_size == 16
    with pytest.raises(ValueError, match="uss.crop_scale must be"):
        _cfg(tiny_data, **{"uss.crop_scale": "stretch"})


def test_min_steps_extends_the_stego_epochs_of_a_small_split(tiny_data: Path):
    ds = VOCDataset(tiny_data)
    s = uss.loop_settings(_cfg(tiny_data, **{"uss.epochs": 20, "uss.min_steps": 300}), ds)
    assert s.min_steps == 300
    assert uss.stego_epochs(s, steps_per_epoch=2) == 150  # 20 epochs of 2 steps fall short: 150 epochs
    assert uss.stego_epochs(s, steps_per_epoch=100) == 20  # enough steps already
    assert uss.stego_epochs(uss.loop_settings(_cfg(tiny_data), ds), steps_per_epoch=2) == 3  # min_steps 0 (TINY)
    with pytest.raises(ValueError, match="uss.min_steps must be"):
        _cfg(tiny_data, **{"uss.min_steps": -1})
