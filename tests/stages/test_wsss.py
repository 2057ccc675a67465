"""Stage ``wsss``: CAM classifier on Ray Train → pseudo-label PNGs (situation c)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mars_ray import config as C
from mars_ray.data.label_io import label_size, read_label
from mars_ray.data.validate import check_label
from mars_ray.data.voc import VOCDataset
from mars_ray.stages import wsss

pytestmark = [pytest.mark.timeout(300)]

TINY = {"wsss.epochs": 2, "wsss.batch_size": 8, "wsss.crop_size": 48, "wsss.cam_scales": [1.0, 0.5]}


def _cfg(data: Path, **over) -> C.Config:
    return C.build(overrides={"data.root": str(data), **TINY, **over})


@pytest.fixture(scope="module")
def run(tiny_data: Path, ray_local, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("wsss_run")
    wsss.run(_cfg(tiny_data), run_dir)
    return run_dir


@pytest.mark.ray
def test_pseudo_labels_cover_exactly_the_image_labels(run: Path, tiny_data: Path):
    ds = VOCDataset(tiny_data)
    ids = ds.ids("train") + ds.ids("val")  # the eval split is written too (cheap, inference only)
    n_bg_only = 0
    for i in ids:
        path = run / "wsss" / f"{i}.png"
        assert label_size(path) == label_size(ds.image_path(i))
        label = read_label(path)
        check_label(label, num_classes=ds.num_classes, image_hw=label.shape, path=path)
        classes = ds.image_labels(i)
        # every labelled class gets its CAM's peak; nothing else but background appears
        assert set(np.unique(label).tolist()) == {0, *classes} or (not classes and np.all(label == 0))
        n_bg_only += not classes
    assert n_bg_only > 0  # the tiny dataset has background-only images (empty label lists)
    m = json.loads((run / "wsss" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["config"]["data"]["splits"] == ["train", "val"]
    assert m["outputs"]["images"] == len(ids)


@pytest.mark.ray
def test_classifier_history_and_rerun_skips(run: Path, tiny_data: Path):
    history = json.loads((run / "wsss" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["step"] == 2 * history[0]["step"] > 0
    model = wsss.load_classifier(run / "wsss" / wsss.CLASSIFIER)
    assert model.num_classes == VOCDataset(tiny_data).num_classes
    assert not (run / "wsss" / "ray").exists()  # per-epoch checkpoints are dropped once finished
    before = (run / "wsss" / "manifest.json").stat().st_mtime_ns
    wsss.run(_cfg(tiny_data), run)
    assert (run / "wsss" / "manifest.json").stat().st_mtime_ns == before


def test_missing_image_labels_fail_before_outputs(tiny_data: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    labels = json.loads((data / "image_labels.json").read_text())
    victim = VOCDataset(data).ids("train")[4]
    del labels[victim]
    (data / "image_labels.json").write_text(json.dumps(labels))
    with pytest.raises(ValueError, match=victim):
        wsss.run(_cfg(data), tmp_path / "run")
    assert not (tmp_path / "run" / "wsss").exists()
    # config checks: C.build refuses them; a config merged without validation is stopped by the stage
    with pytest.raises(ValueError, match="wsss.classifier='nope' is not a classifier"):
        wsss.run(C.merge(_cfg(tiny_data), {"wsss.classifier": "nope"}), tmp_path / "run")
    with pytest.raises(ValueError, match="wsss.cam_scales"):
        wsss.run(C.merge(_cfg(tiny_data), {"wsss.cam_scales": [1.0, -2.0]}), tmp_path / "run")


def test_multi_hot_of_background_only_images():
    t = wsss.multi_hot([[1, 3], [], [2]], 4)
    np.testing.assert_array_equal(t, [[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
