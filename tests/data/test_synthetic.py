"""The built-in biased dataset: deterministic, complete layout, and biased pseudo labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mars_ray.algo.metrics import ConfusionMatrix
from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.synthetic import PSEUDO_DIR, SYNTHETIC_CLASSES, make_biased_dataset
from mars_ray.data.validate import check_label, check_label_folder
from mars_ray.data.voc import VOCDataset


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    kw = dict(n_train=6, n_val=3, size=48)
    a = _all_bytes(make_biased_dataset(tmp_path / "a", seed=1, **kw))
    b = _all_bytes(make_biased_dataset(tmp_path / "b", seed=1, **kw))
    c = _all_bytes(make_biased_dataset(tmp_path / "c", seed=2, **kw))
    assert a == b
    assert a.keys() == c.keys()
    assert a["JPEGImages/train_0000.png"] != c["JPEGImages/train_0000.png"]
    assert not [k for k in a if ".tmp-" in k]


def test_layout_complete(tmp_path: Path) -> None:
    root = make_biased_dataset(tmp_path / "d", n_train=8, n_val=4, size=40, seed=0, n_background_only=0.25)
    ds = VOCDataset(root)
    assert ds.classes == SYNTHETIC_CLASSES and ds.num_classes == 4
    assert len(ds.ids("train")) == 8 and len(ds.ids("val")) == 4
    assert ds.has_gt("train") and ds.has_gt("val")
    labels = json.loads((root / "image_labels.json").read_text())
    assert set(labels) == set(ds.ids("train")) | set(ds.ids("val"))
    assert sum(not v for v in labels.values()) == 2  # 25 % of train is background-only
    for split in ("train", "val"):
        check_label_folder(ds, split, root / PSEUDO_DIR)
        for i in ds.ids(split):
            img = read_image(ds.image_path(i))
            assert img.shape == (40, 40, 3)
            gt = read_label(ds.gt_path(i))  # type: ignore[arg-type]
            check_label(gt, num_classes=4, image_hw=(40, 40), path=i)
            assert ds.image_labels(i) == sorted(set(np.unique(gt).tolist()) - {0, 255})
            pseudo = read_label(root / PSEUDO_DIR / f"{i}.png")
            assert set(np.unique(pseudo).tolist()) - {0} == set(ds.image_labels(i))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        make_biased_dataset(tmp_path, size=8)
    with pytest.raises(ValueError, match="n_background_only"):
        make_biased_dataset(tmp_path, n_background_only=1.0)


def test_boundary_ring(tmp_path: Path) -> None:
    root = make_biased_dataset(tmp_path / "r", n_train=3, n_val=1, size=48, boundary=1, n_background_only=0.0)
    gt = read_label(root / "SegmentationClass" / "train_0000.png")
    assert (gt == 255).any() and (gt > 0).any()


def test_pseudo_labels_biased(tmp_path: Path) -> None:
    """Pseudo labels: mIoU in the intended band and FP far above what GT itself has (0)."""
    root = make_biased_dataset(tmp_path / "b", n_train=24, n_val=8, size=64, seed=0)
    ds = VOCDataset(root)
    cm_pseudo, cm_gt = ConfusionMatrix(5), ConfusionMatrix(5)
    for i in ds.ids("train") + ds.ids("val"):
        gt = read_label(ds.gt_path(i))  # type: ignore[arg-type]
        cm_pseudo.update(read_label(root / PSEUDO_DIR / f"{i}.png"), gt)
        cm_gt.update(gt, gt)
    s, g = cm_pseudo.compute(), cm_gt.compute()
    assert 0.40 < s["miou"] < 0.65, s
    assert s["fp"] > 0.3 > g["fp"], (s, g)
    assert s["fn"] < 0.1, s
