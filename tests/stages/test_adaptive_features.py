"""The default ``adaptive`` extractor in the real stages: fitted by ``features``, stored in its artifact,
its content hash in the key, the same file loaded by ``debias``; the separation score in select's report."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray import config as C
from mars_ray.data.label_io import read_image
from mars_ray.data.synthetic import make_biased_dataset
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource
from mars_ray.models.adaptive import AdaptiveStats, fit_adaptive_stats
from mars_ray.stages import debias, features, inputs, select, uss


def _cfg(root: Path, **over) -> C.Config:
    return C.build(overrides={"data.root": str(root), "data.pseudo_labels": str(root / "pseudo_labels"),
                              "debias.crf": False, **over})


def test_features_fit_the_stats_and_key_them(debiased_run: Path, tiny_data: Path):
    m = json.loads((debiased_run / "features" / "manifest.json").read_text())
    assert m["config"]["features"]["extractor"] == "adaptive"  # the default
    path = debiased_run / "features" / m["outputs"]["uss_stats"]
    stats = AdaptiveStats.load(path)
    assert stats.digest == m["outputs"]["uss_stats_digest"] == m["inputs"]["uss_stats"]
    assert stats.n_images == len(VOCDataset(tiny_data).ids("train"))  # the split (<= 256 ids)
    assert m["outputs"]["dim"] == stats.dim
    cfg = _cfg(tiny_data)
    # the key is the stored fit's (no refit to compute it) and changes with the fitted values
    assert features.stage_dir(cfg, debiased_run).key == m["key"]
    assert features.stage_dir(cfg, debiased_run, stats.digest).key == m["key"]
    assert features.stage_dir(cfg, debiased_run, "0" * 64).key != m["key"]


def test_debias_computes_the_same_features(debiased_run: Path, tiny_data: Path):
    cfg = _cfg(tiny_data)
    dm = json.loads((debiased_run / "debias" / "manifest.json").read_text())
    fm = json.loads((debiased_run / "features" / "manifest.json").read_text())
    # the debias key holds the features key (and so the stats digest), not the run folder's path:
    # a copied run folder resumes its debias stage
    assert dm["config"]["source"] == {"extractor": "adaptive", "extractor_kwargs": {}}
    assert dm["inputs"]["features"] == fm["key"]
    src = inputs.feature_source_kwargs(cfg, debiased_run, absolute=True)  # what the debias actors are given
    assert src["extractor"] == "adaptive"
    assert src["extractor_kwargs"]["checkpoint"] == str((debiased_run / "features" / "uss_stats.npz").resolve())
    ds = VOCDataset(tiny_data)
    image_id = ds.ids("train")[3]
    image = read_image(ds.image_path(image_id))
    # what the features actors were built with (the stored file, as _compute passes it) and what debias builds
    f_features = FeatureSource(extractor="adaptive", extractor_kwargs={
        "checkpoint": str(debiased_run / "features" / "uss_stats.npz")})(image_id, image)
    f_debias = FeatureSource(**src)(image_id, image)
    np.testing.assert_array_equal(f_features, f_debias)
    debias.check_adaptive_stats(cfg, debiased_run)  # the recorded digest matches: no error


def test_replaced_stats_are_refused_and_not_reused(debiased_run: Path, tiny_data: Path, tmp_path: Path):
    run = Path(shutil.copytree(debiased_run, tmp_path / "run"))
    cfg = _cfg(tiny_data)
    ds = VOCDataset(tiny_data)
    assert features.stored_stats(cfg, run, ds) is not None
    other = fit_adaptive_stats([read_image(ds.image_path(i)) for i in ds.ids("val")], min_images=1, seed=1)
    other.save(run / "features" / "uss_stats.npz")
    with pytest.raises(ValueError, match="uss_stats.npz: adaptive statistics .* are not the ones"):
        debias.check_adaptive_stats(cfg, run)
    assert features.stored_stats(cfg, run, ds) is None  # the features stage refits instead of trusting it
    # another seed is another fit: the stored one is not reused for it
    assert features.stored_stats(_cfg(tiny_data, **{"features.seed": 7}), debiased_run, ds) is None


def test_codebook_copies_are_in_the_fit_key_and_the_stage_key(debiased_run: Path, tiny_data: Path):
    cfg, one = _cfg(tiny_data), _cfg(tiny_data, **{"features.codebook_copies": 1})
    ds = VOCDataset(tiny_data)
    m = json.loads((debiased_run / "features" / "manifest.json").read_text())
    two = features.stage_dir(cfg, debiased_run)
    assert two.key == m["key"] and two.config["features"]["codebook_copies"] == 2  # the default
    # one copy (the design before 2026-12-08) is left out of the keys: artifacts made then keep theirs
    assert "codebook_copies" not in features.stage_dir(one, debiased_run).config["features"]
    assert features.fit_key(one, ds) != features.fit_key(cfg, ds)
    assert features.stored_stats(one, debiased_run, ds) is None  # a two-copy fit is not reused for one
    assert features.stage_dir(one, debiased_run).key != two.key
    # not read where nothing is fitted: the key of another extractor does not move with it
    texture = _cfg(tiny_data, **{"features.extractor": "texture"})
    assert features.stage_dir(C.merge(texture, {"features.codebook_copies": 1}), debiased_run).key == \
        features.stage_dir(texture, debiased_run).key
    assert uss.stage_dir(one, debiased_run, ds).key != uss.stage_dir(cfg, debiased_run, ds).key  # its backbone fit


@pytest.mark.ray
def test_features_stage_fits_the_copies_it_is_given(debiased_run: Path, tiny_data: Path, tmp_path: Path):
    """``--set features.codebook_copies=1``: the stage fits three codebooks instead of the default six,
    stores them, and debias computes its F from the same file (the dimension recorded by features)."""
    before = AdaptiveStats.load(debiased_run / "features" / "uss_stats.npz")
    assert [p.shape[0] for p in before.prototypes] == [16, 32, 64, 16, 32, 64]
    run = Path(shutil.copytree(debiased_run, tmp_path / "run"))
    cfg = _cfg(tiny_data, **{"features.codebook_copies": 1})
    features.run(cfg, run)
    m = json.loads((run / "features" / "manifest.json").read_text())
    stats = AdaptiveStats.load(run / "features" / "uss_stats.npz")
    assert [p.shape[0] for p in stats.prototypes] == [16, 32, 64] and stats.dim == before.dim - 112
    assert m["outputs"]["dim"] == stats.dim
    ds = VOCDataset(tiny_data)
    image_id = ds.ids("train")[0]
    f = FeatureSource(**inputs.feature_source_kwargs(cfg, run, absolute=True))(image_id,
                                                                              read_image(ds.image_path(image_id)))
    assert f.shape[0] == stats.dim
    debias.check_adaptive_stats(cfg, run)


def test_tiny_split_is_fitted_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = make_biased_dataset(tmp_path / "d", n_train=1, n_val=1, size=48, seed=4)
    ds = VOCDataset(root)
    with caplog.at_level(logging.WARNING, logger="mars_ray.stages.features"):
        stats = features.fit_split_stats(ds.spec(), ds.ids("train"), 0)
    assert stats.n_images == 1
    assert "fitted on only 1 image(s)" in caplog.text
    with pytest.raises(ValueError, match="no images"):
        features.fit_split_stats(ds.spec(), [], 0)


def test_a_split_mixing_grey_and_colour_images_is_fitted_with_a_warning(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture):
    root = make_biased_dataset(tmp_path / "d", n_train=8, n_val=1, size=40, seed=4)
    ds = VOCDataset(root)
    ids = ds.ids("train")
    with caplog.at_level(logging.WARNING, logger="mars_ray.stages.features"):
        features.fit_split_stats(ds.spec(), ids, 0)
    assert "greyscale" not in caplog.text  # all in colour: nothing to say
    grey = Path(ds.image_path(ids[3]))
    Image.open(grey).convert("L").convert("RGB").save(grey)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mars_ray.stages.features"):
        features.fit_split_stats(ds.spec(), ids, 0)
    assert f"1 of the 8 images the adaptive extractor was fitted on are greyscale (first: {ids[3]})" in caplog.text
    for i in ids:  # all grey: there is no colour cue to miss anywhere, the fit adapts to it
        p = Path(ds.image_path(i))
        Image.open(p).convert("L").save(p)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mars_ray.stages.features"):
        features.fit_split_stats(ds.spec(), ids, 0)
    assert "greyscale" not in caplog.text
    assert features.is_greyscale(read_image(ds.image_path(ids[0])))
    near = np.full((4, 4, 3), 100, np.uint8)
    near[0, 0] = (100, 102, 101)  # a JPEG encoder's rounding: still grey
    assert features.is_greyscale(near)
    near[0, 0] = (100, 104, 100)
    assert not features.is_greyscale(near)


@pytest.mark.ray
def test_the_fit_tasks_warnings_are_logged_by_the_driver(tmp_path: Path, ray_local, caplog: pytest.LogCaptureFixture):
    """A Ray worker's log lines reach only the run's log file: the task returns its warnings instead."""
    root = make_biased_dataset(tmp_path / "d", n_train=2, n_val=1, size=40, seed=4)
    ds = VOCDataset(root)
    ids = ds.ids("train")
    p = Path(ds.image_path(ids[0]))
    Image.open(p).convert("L").save(p)
    with caplog.at_level(logging.WARNING, logger="mars_ray.stages.features"):
        stats = features.fit_split_stats_remote(ds, ids, 0)
    assert stats.n_images == 2
    msgs = [r.getMessage() for r in caplog.records if r.name == "mars_ray.stages.features"]
    assert any("fitted on only 2 image(s)" in m for m in msgs) and any("1 of the 2 images" in m for m in msgs)


def test_select_reports_the_separation_per_class(debiased_run: Path):
    report = json.loads((debiased_run / "select" / "report.json").read_text())
    for name, e in report["per_class"].items():
        s = e["separation"]
        assert set(s) >= {"score", "kept_chosen", "kept_not_chosen", "n_chosen", "n_not_chosen", "separates"}, name
        assert next(iter(s)) == "score"  # the run report shows the first number of the entry
        assert (name in report["classes_not_separating"]) == (s["separates"] is False)
        assert ("message" in s) == (s["separates"] is False)
    assert isinstance(report["classes_not_separating"], list)
    assert report["separation_threshold"] == 0.5


@pytest.mark.ray
@pytest.mark.slow
def test_features_without_signal_are_flagged(tiny_data: Path, ray_local, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture):
    """External features of pure noise: every class is named in the report and gets one log line."""
    rng = np.random.default_rng(0)
    ds = VOCDataset(tiny_data)
    feats = tmp_path / "noise"
    feats.mkdir()
    for i in ds.ids("train"):
        h, w = read_image(ds.image_path(i)).shape[:2]
        np.save(feats / f"{i}.npy", rng.normal(size=(16, h, w)).astype(np.float32))
    cfg = _cfg(tiny_data, **{"data.features_dir": str(feats)})
    run = tmp_path / "run"
    features.run(cfg, run)
    with caplog.at_level(logging.WARNING, logger="mars_ray.stages.select"):
        select.run(cfg, run)
    report = json.loads((run / "select" / "report.json").read_text())
    present = sorted(report["per_class"])
    assert sorted(report["classes_not_separating"]) == present
    lines = [r.getMessage() for r in caplog.records if "do not separate objects from their contexts" in r.getMessage()]
    assert len(lines) == len(present)
    for name in present:
        assert sum(f"for class {name}; debiasing may remove targets" in ln for ln in lines) == 1
    # external features rewritten after clustering (another dimension here): debias names the folder first
    victim = ds.ids("train")[2]
    np.save(feats / f"{victim}.npy", np.zeros((9, 4, 4), np.float32))
    with pytest.raises(ValueError, match="noise: external features changed since the features stage"):
        debias.run(cfg, run)
