"""The image's classes C_I in Eq 4 (debias) and in training: image-level labels when given, else Y^b."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mars_ray import config as C
from mars_ray.cli import main
from mars_ray.data.label_io import read_label
from mars_ray.data.voc import VOCDataset
from mars_ray.labels import BIASED
from mars_ray.stages import debias, inputs, train
from mars_ray.stages.debias import debias_one

from tests.conftest import copy_run


# -- Eq 4 on one image (no Ray) ------------------------------------------------------------------


def _two_region_image():
    """Y^b: left half class 1, right half class 2, one right-half column class 2 but with class 1's
    features. F: class 1's direction e0 on the left (and that column), class 2's e1 on the right."""
    h, w = 4, 8
    pseudo = np.zeros((h, w), np.uint8)
    pseudo[:, :4], pseudo[:, 4:] = 1, 2
    feats = np.zeros((2, h, w), np.float32)
    feats[0, :, :4] = 1.0
    feats[1, :, 4:] = 1.0
    feats[:, :, 7] = [[1.0], [0.0]]  # class 2 in Y^b, but it looks like class 1
    centroids = np.array([[0, 0], [1, 0], [0, 1]], np.float32)  # V^0 unused, V^1 = e0, V^2 = e1
    present = np.array([False, True, True])
    return np.zeros((h, w, 3), np.uint8), pseudo, feats, centroids, present


def test_eq4_ignores_a_pseudo_class_the_image_labels_lack():
    image, pseudo, feats, cents, present = _two_region_image()
    from_pseudo = debias_one(image, pseudo, feats, cents, present, threshold=0.5, crf=None)
    assert not (from_pseudo == BIASED).any()  # C_I = {1, 2} from Y^b: everything activates
    only_1 = debias_one(image, pseudo, feats, cents, present, threshold=0.5, crf=None, image_classes=[1])
    # class 2 takes no part in Eq 4: its pixels are removed ...
    assert (only_1[:, 4:7] == BIASED).all()
    # ... unless another class of C_I activates them (the column with class 1's features is kept)
    assert (only_1[:, 7] == 2).all() and (only_1[:, :4] == 1).all()
    # both classes labelled: the same as from Y^b
    both = debias_one(image, pseudo, feats, cents, present, threshold=0.5, crf=None, image_classes=[2, 1])
    assert np.array_equal(both, from_pseudo)


def test_eq4_keeps_a_labelled_class_without_centroid_and_uses_labelled_classes_absent_from_y_b():
    image, pseudo, feats, cents, present = _two_region_image()
    no_v2 = np.array([False, True, False])
    out = debias_one(image, pseudo, feats, cents, no_v2, threshold=0.5, crf=None, image_classes=[1, 2])
    assert (out[:, 4:] == 2).all()  # class 2 cannot be judged without V^2: kept as it is
    # the image labels name class 2 only, Y^b holds class 1 too: class 1 is judged by V^2 alone
    out = debias_one(image, pseudo, feats, cents, present, threshold=0.5, crf=None, image_classes=[2])
    assert (out[:, :4] == BIASED).all() and (out[:, 4:7] == 2).all()


# -- the debias and train stages -----------------------------------------------------------------


@pytest.fixture(scope="module")
def run(debiased_run: Path, tmp_path_factory) -> Path:
    return copy_run(debiased_run, tmp_path_factory)


def _cfg(data: Path, **over) -> C.Config:
    return C.build(overrides={"data.root": str(data), "data.pseudo_labels": str(data / "pseudo_labels"),
                              "debias.crf": False, **over})


def _labels(data: Path) -> dict[str, list[int]]:
    return json.loads((data / "image_labels.json").read_text())


def _dropped(data: Path, n: int) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The dataset's image labels with one class removed from the first ``n`` train images that have one."""
    labels = _labels(data)
    dropped: dict[str, int] = {}
    for image_id in VOCDataset(data).ids("train"):
        if labels[image_id] and len(dropped) < n:
            dropped[image_id] = labels[image_id][0]
            labels[image_id] = labels[image_id][1:]
    return labels, dropped


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_debias_counts_images_whose_labels_disagree_with_y_b(run: Path, tiny_data: Path, tmp_path: Path, caplog):
    before = {i: read_label(run / "debias" / f"{i}.png") for i in VOCDataset(tiny_data).ids("train")}
    labels, dropped = _dropped(tiny_data, 3)
    path = tmp_path / "image_labels.json"
    path.write_text(json.dumps(labels))
    with caplog.at_level(logging.INFO, logger="mars_ray.stages.debias"):
        debias.run(_cfg(tiny_data, **{"data.image_labels": str(path)}), run)
    stats = json.loads((run / "debias" / "stats.json").read_text())
    assert stats["image_classes"] == "image_labels"
    assert stats["image_label_disagreements"]["images"] == 3
    assert {e["image_id"]: e["classes"] for e in stats["image_label_disagreements"]["examples"]} == {
        i: [c] for i, c in dropped.items()}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 16 images" in warnings[0]
    assert any("from the image-level labels" in r.getMessage() for r in caplog.records)
    for image_id, old in before.items():
        new = read_label(run / "debias" / f"{image_id}.png")
        if image_id not in dropped:  # image labels = Y^b's classes here: Eq 4 unchanged
            assert np.array_equal(new, old), image_id
        else:  # fewer classes in the max: M only falls, so removal only grows
            pseudo = read_label(tiny_data / "pseudo_labels" / f"{image_id}.png")
            c = dropped[image_id]
            assert ((old == BIASED) <= (new == BIASED)).all()
            assert (new[pseudo == c] == BIASED).mean() >= (old[pseudo == c] == BIASED).mean()
    assert any(((read_label(run / "debias" / f"{i}.png") == BIASED).sum() > (before[i] == BIASED).sum())
               for i in dropped)


@pytest.mark.parametrize("edit, match", [
    (lambda lab: lab.update({"train_0000": [9]}), r"image_labels\.json: 'train_0000' has class ids \[9\] outside 1\.\.4"),
    (lambda lab: lab.update({"nowhere_0001": [1]}), r"image_labels\.json: image id 'nowhere_0001' is in no split"),
    (lambda lab: lab.pop("train_0003"), r"image_labels\.json: no image-level labels for 1 of 16 ids.*train_0003"),
])
@pytest.mark.ray
@pytest.mark.timeout(120)
def test_bad_image_labels_are_named_before_debias_and_train(run: Path, tiny_data: Path, tmp_path: Path, edit, match):
    labels = _labels(tiny_data)
    edit(labels)
    path = tmp_path / "image_labels.json"
    path.write_text(json.dumps(labels))
    cfg = _cfg(tiny_data, **{"data.image_labels": str(path)})
    manifest = (run / "debias" / "manifest.json").read_text()
    with pytest.raises(ValueError, match=match):
        debias.run(cfg, run)
    assert (run / "debias" / "manifest.json").read_text() == manifest  # nothing touched
    with pytest.raises(ValueError, match=match):
        train.validate_inputs(cfg, run)


def test_bad_image_labels_are_one_cli_line(run: Path, tiny_data: Path, tmp_path: Path, capsys):
    labels = _labels(tiny_data)
    labels["train_0001"] = [0, 2]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(labels))
    code = main(["debias", "--data", str(tiny_data), "--pseudo-labels", str(tiny_data / "pseudo_labels"),
                 "--image-labels", str(path), "--out", str(run), "--set", "debias.crf=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"mars: error: {path}: 'train_0001' has class ids [0] outside 1..4 (")
    assert all(" debias " in line for line in err[:-1])  # the stage's start and "failed" lines, nothing else


def test_class_source_prefers_image_labels_and_never_reads_ground_truth(tiny_data: Path, tmp_path: Path):
    cfg = _cfg(tiny_data)
    ds = inputs.open_dataset(cfg)
    src = inputs.image_class_source(cfg, tmp_path, ds)
    assert src == {"kind": "image_labels", "path": str(tiny_data / "image_labels.json")}
    assert inputs.ImageClasses(ds, src)("train_0000") == tuple(_labels(tiny_data)["train_0000"])
    # a copy of the dataset without image_labels.json: Y^b's classes, not the ground truth's
    bare = tmp_path / "bare"
    bare.mkdir()
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets", "pseudo_labels"):
        (bare / sub).symlink_to(tiny_data / sub)
    (bare / "classes.txt").write_text((tiny_data / "classes.txt").read_text())
    cfg = _cfg(bare)
    ds = inputs.open_dataset(cfg)
    src = inputs.image_class_source(cfg, tmp_path, ds)
    assert src["kind"] == "pseudo_labels" and Path(src["path"]) == (bare / "pseudo_labels").resolve()
    pseudo = read_label(bare / "pseudo_labels" / "train_0000.png")
    want = tuple(int(c) for c in np.unique(pseudo) if 1 <= c <= 4)
    assert inputs.ImageClasses(ds, src)("train_0000") == want
    mask = inputs.ImageClasses(ds, src).mask("train_0000")
    assert mask.dtype == bool and mask[0] and mask.sum() == 1 + len(want)
    # train.labels without any Y^b folder: the training labels' classes
    cfg = C.build(overrides={"data.root": str(bare), "train.labels": str(bare / "pseudo_labels")})
    src = inputs.image_class_source(cfg, tmp_path, ds, fallback=bare / "pseudo_labels")
    assert src["kind"] == "training_labels"
