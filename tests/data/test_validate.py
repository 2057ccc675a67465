"""check_label and check_label_folder: messages name the file and the cause."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray.data.label_io import write_label
from mars_ray.data.validate import check_label, check_label_folder
from mars_ray.data.voc import VOCDataset


def test_check_label_ok_and_errors() -> None:
    lab = np.zeros((120, 160), np.uint8)
    lab[0, :4] = [1, 5, 254, 255]
    check_label(lab, num_classes=5, image_hw=(120, 160), path="x.png")
    check_label(lab, num_classes=5, image_hw=None, path=None)
    with pytest.raises(ValueError, match=r"x.png: label 120x160 but image 128x160"):
        check_label(lab, num_classes=5, image_hw=(128, 160), path="x.png")
    lab[1, :3] = [6, 9, 9]
    with pytest.raises(ValueError, match=r"y.png: label values \[6, 9\] outside \{0..5, 254, 255\}"):
        check_label(lab, num_classes=5, image_hw=(120, 160), path="y.png")


def _dataset(root: Path, n: int) -> VOCDataset:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = [f"im{i}" for i in range(n)]
    for i in ids:
        Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids))
    return VOCDataset(root)


def test_check_label_folder(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "ds", 8)
    folder = tmp_path / "pl"
    for i in ds.ids("train")[:-3]:
        write_label(folder / f"{i}.png", np.zeros((12, 16), np.uint8))
    msg = r"pl: 3 of 8 pseudo label files.*missing.*im5.png, im6.png, im7.png"
    with pytest.raises(ValueError, match=msg):
        check_label_folder(ds, "train", folder)
    for i in ds.ids("train")[-3:]:
        write_label(folder / f"{i}.png", np.zeros((12, 16), np.uint8))
    out = check_label_folder(ds, "train", folder)
    assert list(out) == ds.ids("train") and out["im0"] == folder / "im0.png"
    write_label(folder / "im4.png", np.zeros((12, 15), np.uint8))
    with pytest.raises(ValueError, match=r"im4.png: mask 12x15 but image 12x16"):
        check_label_folder(ds, "train", folder, name="mask")
    with pytest.raises(FileNotFoundError, match="nofolder"):
        check_label_folder(ds, "train", tmp_path / "nofolder")
