"""dump-features → --features-dir: the same F as the extractor, within float16 rounding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mars_ray import config as C
from mars_ray.data.label_io import read_image
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource, load_feature_file
from mars_ray.stages.dump_features import dump_features, to_fp16

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_dump_then_read_back_gives_the_same_features(tiny_data: Path, ray_local, tmp_path: Path) -> None:
    cfg = C.build(overrides={"data.root": str(tiny_data), "data.split": "val", "features.extractor": "texture"})
    info = dump_features(cfg, tmp_path / "feats")
    ds = VOCDataset(tiny_data)
    ids = ds.ids("val")
    assert info["written"] == len(ids) and info["dtype"] == "float16" and info["dim"] > 0
    assert json.loads((tmp_path / "feats" / "features.json").read_text())["images"] == len(ids)
    with np.load(tmp_path / "feats" / f"{ids[0]}.npz") as z:
        assert list(z.keys()) == ["features"] and z["features"].dtype == np.float16 and z["features"].ndim == 3
    assert load_feature_file(tmp_path / "feats" / f"{ids[0]}.npz").dtype == np.float32
    direct = FeatureSource(extractor="texture")
    dumped = FeatureSource(features_dir=tmp_path / "feats")
    for i in ids:
        image = read_image(ds.image_path(i))
        a, b = direct(i, image), dumped(i, image)
        assert a.shape == b.shape == (info["dim"], *image.shape[:2])
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3 * float(np.abs(a).max()))
    # a rerun skips what is there
    again = dump_features(cfg, tmp_path / "feats")
    assert again["written"] == 0 and again["skipped"] == len(ids) and again["dim"] == info["dim"]


def test_bad_settings_fail_before_ray(tmp_path: Path, tiny_data: Path) -> None:
    cfg = C.build(overrides={"data.root": str(tiny_data), "features.extractor": "stego"})
    with pytest.raises(ValueError, match="needs features.checkpoint"):
        dump_features(cfg, tmp_path / "o")
    cfg = C.build(overrides={"data.root": str(tiny_data)})  # the default adaptive extractor: its fitted file
    with pytest.raises(ValueError, match="adaptive needs features.checkpoint.*uss_stats.npz"):
        dump_features(cfg, tmp_path / "o")
    cfg = C.build(overrides={"data.root": str(tiny_data), "data.features_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="already holds dumped ones"):
        dump_features(cfg, tmp_path / "o")
    with pytest.raises(ValueError, match=r"img 3: features reach 70000.*float16"):
        to_fp16(np.array([[[70000.0]]], np.float32), "img 3")
