"""VOCDataset: layout, ids, classes, image labels, fingerprint, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray.data.label_io import write_label
from mars_ray.data.voc import VOC_CLASSES, VOCDataset


def _make(root: Path, ids: list[str], *, gt: bool = True) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for k, i in enumerate(ids):
        ext = ".png" if k % 2 else ".jpg"
        Image.fromarray(np.full((8, 10, 3), 100, np.uint8)).save(root / "JPEGImages" / f"{i}{ext}")
        if gt:
            lab = np.zeros((8, 10), np.uint8)
            lab[2:4, 2:4] = k % 3 + 1
            lab[0, 0] = 255
            write_label(root / "SegmentationClass" / f"{i}.png", lab)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_defaults(tmp_path: Path) -> None:
    ds = VOCDataset(_make(tmp_path, ["a", "b", "c"]))
    assert ds.root == tmp_path
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"
    assert ds.classes == VOC_CLASSES and ds.num_classes == 20
    assert ds.ids("train") == ["a", "b", "c"]
    assert ds.image_path("a").suffix == ".jpg" and ds.image_path("b").suffix == ".png"
    assert ds.gt_path("a") == tmp_path / "SegmentationClass" / "a.png"
    assert ds.has_gt("train")
    assert ds.image_labels("a") == [1] and ds.image_labels("b") == [2]


def test_ids_whitespace_order_and_errors(tmp_path: Path) -> None:
    ds = VOCDataset(_make(tmp_path, ["a", "b"]))
    split_dir = tmp_path / "ImageSets" / "Segmentation"
    (split_dir / "ws.txt").write_text("  b \n\n a\r\n\n")
    assert ds.ids("ws") == ["b", "a"]
    (split_dir / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"dup.txt.*duplicate.*'a'"):
        ds.ids("dup")
    (split_dir / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt"):
        ds.ids("empty")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        ds.ids("nope")


def test_missing_root_and_images(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        VOCDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        VOCDataset(tmp_path)
    ds = VOCDataset(_make(tmp_path / "d", ["a"]))
    with pytest.raises(FileNotFoundError, match=r"zz\.jpg, zz\.jpeg, zz\.png"):
        ds.image_path("zz")


def test_classes_txt_and_image_labels_json(tmp_path: Path) -> None:
    root = _make(tmp_path, ["a", "b"], gt=False)
    (root / "classes.txt").write_text("background\ncat\ndog\n\n")
    (root / "image_labels.json").write_text(json.dumps({"a": [2, 1, 2], "b": []}))
    ds = VOCDataset(root)
    assert ds.classes == ["background", "cat", "dog"] and ds.num_classes == 2
    assert ds.image_labels("a") == [1, 2] and ds.image_labels("b") == []
    assert not ds.has_gt("train") and ds.gt_path("a") is None
    (root / "image_labels.json").write_text(json.dumps({"a": [3]}))
    with pytest.raises(ValueError, match=r"image_labels.json.*outside 1..2"):
        VOCDataset(root).image_labels("a")
    (root / "image_labels.json").unlink()
    with pytest.raises(ValueError, match="no image-level labels"):
        VOCDataset(root).image_labels("a")
    (root / "classes.txt").write_text("background\n")
    with pytest.raises(ValueError, match="classes.txt"):
        VOCDataset(root)


def test_fingerprint_changes_with_files(tmp_path: Path) -> None:
    root = _make(tmp_path, ["a", "b"])
    ds = VOCDataset(root)
    f1 = ds.fingerprint("train")
    assert f1 == VOCDataset(root).fingerprint("train") and isinstance(f1, str)
    gt = root / "SegmentationClass" / "b.png"
    st = gt.stat()
    os.utime(gt, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert VOCDataset(root).fingerprint("train") != f1
