"""Situation (a): external USS features from files (``--features-dir``) in ``features`` and ``debias``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mars_ray import config as C
from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource, load_feature_file
from mars_ray.models import load_all
from mars_ray.models.registry import FEATURES
from mars_ray.stages import debias, features, inputs, select

pytestmark = [pytest.mark.timeout(240)]


def texture_features(root: Path, split: str = "train") -> dict[str, np.ndarray]:
    """The built-in ``texture`` extractor's own output per image id: float32 [d, H, W]."""
    load_all()
    model = FEATURES.get("texture").eval()
    ds = VOCDataset(root)
    out = {}
    with torch.no_grad():
        for i in ds.ids(split):
            x = torch.from_numpy(read_image(ds.image_path(i))).permute(2, 0, 1)[None].float().div(255.0)
            out[i] = model(x)[0].float().numpy()
    return out


def write_features(folder: Path, feats: dict[str, np.ndarray]) -> Path:
    """One file per id, cycling through the three accepted formats (.npy, .npz, .pt)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, (i, f) in enumerate(sorted(feats.items())):
        kind = n % 3
        if kind == 0:
            np.save(folder / f"{i}.npy", f)
        elif kind == 1:
            np.savez(folder / f"{i}.npz", features=f)
        else:
            torch.save(torch.from_numpy(f), folder / f"{i}.pt")
    return folder


@pytest.fixture(scope="module")
def feats_dir(tiny_data: Path, tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("feats") / "f", texture_features(tiny_data))


def _cfg(data: Path, **over) -> C.Config:
    return C.build(overrides={"data.root": str(data), "data.pseudo_labels": str(data / "pseudo_labels"),
                              "debias.crf": False, **over})


# -- clear errors (no Ray) ------------------------------------------------------------------------


def test_loader_errors_name_the_file(tmp_path: Path):
    np.save(tmp_path / "rank2.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"rank2\.npy.*\[d, h, w\]"):
        load_feature_file(tmp_path / "rank2.npy")
    bad = np.zeros((3, 4, 4), np.float32)
    bad[1, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match=r"nan\.npy.*NaN or inf"):
        load_feature_file(tmp_path / "nan.npy")
    bad[1, 2, 2] = np.inf
    torch.save({"features": torch.from_numpy(bad)}, tmp_path / "inf.pt")
    with pytest.raises(ValueError, match=r"inf\.pt.*NaN or inf"):
        load_feature_file(tmp_path / "inf.pt")


def test_source_upsamples_small_maps_and_checks_d(tmp_path: Path):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((5, 6, 8), dtype=np.float32))
    np.save(tmp_path / "b.npy", np.zeros((6, 6, 8), np.float32))
    np.save(tmp_path / "c.npy", np.zeros((5, 6, 8), np.float32))
    src = FeatureSource(features_dir=tmp_path)
    image = np.zeros((24, 32, 3), np.uint8)
    f = src("a", image)
    assert f.shape == (5, 24, 32) and f.dtype == np.float32  # bilinear upsampling to the image size
    assert src("c", image).shape == (5, 24, 32)
    with pytest.raises(ValueError, match=r"b\.npy.*dimension 6 differs from the 5"):
        src("b", image)
    with pytest.raises(FileNotFoundError, match=r"'zz'"):
        src("zz", image)


# -- through the stages ---------------------------------------------------------------------------


def test_missing_id_fails_before_outputs(tiny_data: Path, feats_dir: Path, tmp_path: Path):
    partial = tmp_path / "partial"
    shutil.copytree(feats_dir, partial)
    victim = VOCDataset(tiny_data).ids("train")[5]
    next(partial.glob(f"{victim}.*")).unlink()
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=victim):
        features.run(_cfg(tiny_data, **{"data.features_dir": str(partial)}), run)
    assert not (run / "features").exists()


@pytest.mark.ray
@pytest.mark.parametrize("defect", ["dim"])  # rank and NaN/inf: same path, checked by the loader test above
def test_bad_file_is_named_by_the_stage(tiny_data: Path, feats_dir: Path, tmp_path: Path, ray_local, defect: str):
    bad_dir = tmp_path / "bad"
    shutil.copytree(feats_dir, bad_dir)
    ids = VOCDataset(tiny_data).ids("train")
    victim = ids[3]  # not the first id: "dim" needs an earlier file to compare with
    for p in bad_dir.glob(f"{victim}.*"):
        p.unlink()
    f = np.ones((11, 12, 12), np.float32)
    if defect == "rank":
        f = f[0]
    elif defect == "nan":
        f[0, 0, 0] = np.nan
    else:
        f = np.ones((5, 12, 12), np.float32)  # texture features have another d
    np.save(bad_dir / f"{victim}.npy", f)
    cfg = _cfg(tiny_data, **{"data.features_dir": str(bad_dir), "features.batch_size": 16})
    with pytest.raises(Exception) as err:
        features.run(cfg, tmp_path / "run")
    assert f"{victim}.npy" in str(err.value)


@pytest.mark.ray
@pytest.mark.slow
def test_external_texture_features_round_trip(tiny_data: Path, feats_dir: Path, tmp_path: Path, ray_local):
    """Files written from the built-in extractor's own output give the built-in result exactly."""
    built_in, external = tmp_path / "built_in", tmp_path / "external"
    for run, over in ((built_in, {"features.extractor": "texture"}), (external, {"data.features_dir": str(feats_dir)})):
        cfg = _cfg(tiny_data, **over)
        for stage in (features, select, debias):
            stage.run(cfg, run)
    m = json.loads((external / "features" / "manifest.json").read_text())
    assert m["config"]["source"] == {"features_dir": str(feats_dir)}
    np.testing.assert_allclose(np.load(external / "select" / "centroids.npy"),
                               np.load(built_in / "select" / "centroids.npy"), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.load(external / "select" / "present.npy"), np.load(built_in / "select" / "present.npy"))
    ids = VOCDataset(tiny_data).ids("train")
    for i in ids:
        np.testing.assert_array_equal(read_label(external / "debias" / f"{i}.png"), read_label(built_in / "debias" / f"{i}.png"))
    assert json.loads((external / "debias" / "stats.json").read_text())["biased_pixels"] > 0


def test_npy_headers_are_checked_before_the_stage_starts(tiny_data: Path, feats_dir: Path, tmp_path: Path):
    bad_dir = tmp_path / "bad"
    shutil.copytree(feats_dir, bad_dir)
    ids = VOCDataset(tiny_data).ids("train")
    for p in bad_dir.glob(f"{ids[4]}.*"):
        p.unlink()
    np.save(bad_dir / f"{ids[4]}.npy", np.ones((5, 12, 12), np.float32))
    run = tmp_path / "run"
    # no Ray needed: the header pass in validate_inputs names the file
    with pytest.raises(ValueError, match=f"{ids[4]}.npy: feature dimension 5"):
        inputs.validate_inputs(_cfg(tiny_data, **{"data.features_dir": str(bad_dir)}), run)
    np.save(bad_dir / f"{ids[4]}.npy", np.ones((12, 12), np.float32))
    with pytest.raises(ValueError, match=r"shape \[d, h, w\]"):
        inputs.validate_inputs(_cfg(tiny_data, **{"data.features_dir": str(bad_dir)}), run)
