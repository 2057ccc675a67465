"""convert_coco on a tiny fake COCO 2014 tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray.data.coco import COCO_CLASSES, convert_coco
from mars_ray.data.label_io import read_label, write_label


def _fake_coco(src: Path, *, flat: bool = False) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    ids: dict[str, list[str]] = {}
    for split, sub, nums in (("train", "train2014", [9, 25, 30]), ("val", "val2014", [42, 73])):
        (src / sub).mkdir(parents=True)
        gt_dir = src / "SegmentationClass" / ("" if flat else sub)
        ids[split] = []
        for n in nums:
            i = f"COCO_{sub}_{n:012d}"
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(src / sub / f"{i}.jpg")
            lab = rng.choice([0, 1, 80, 255], (10, 12)).astype(np.uint8)
            write_label(gt_dir / f"{i}.png", lab, palette=False)
            ids[split].append(i)
    # an image with no GT is skipped
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(src / "train2014" / "COCO_train2014_000000000001.jpg")
    return ids


def test_coco_classes() -> None:
    assert len(COCO_CLASSES) == 81 and COCO_CLASSES[0] == "background"
    assert COCO_CLASSES[1:4] == ["person", "bicycle", "car"] and COCO_CLASSES[-1] == "toothbrush"
    assert len(set(COCO_CLASSES)) == 81


@pytest.mark.parametrize("link,flat", [(True, False), (False, True)])
def test_convert_coco(tmp_path: Path, link: bool, flat: bool) -> None:
    ids = _fake_coco(tmp_path / "src", flat=flat)
    ds = convert_coco(tmp_path / "src", tmp_path / "dst", link=link)
    assert ds.num_classes == 80 and ds.classes == COCO_CLASSES
    assert ds.ids("train") == ids["train"] and ds.ids("val") == ids["val"]
    assert ds.has_gt("train") and ds.has_gt("val")
    i = ids["val"][0]
    p = ds.image_path(i)
    assert p.is_symlink() == link and ds.gt_path(i).is_symlink() == link  # type: ignore[union-attr]
    src_gt = tmp_path / "src" / "SegmentationClass" / ("" if flat else "val2014") / f"{i}.png"
    np.testing.assert_array_equal(read_label(ds.gt_path(i)), read_label(src_gt))  # type: ignore[arg-type]
    assert set(ds.image_labels(i)) <= {1, 80}
    # rerun over an existing output works
    convert_coco(tmp_path / "src", tmp_path / "dst", link=link)


def test_convert_coco_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nosrc"):
        convert_coco(tmp_path / "nosrc", tmp_path / "dst")
    (tmp_path / "src" / "train2014").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        convert_coco(tmp_path / "src", tmp_path / "dst")
    (tmp_path / "src" / "SegmentationClass").mkdir()
    with pytest.raises(FileNotFoundError, match="val2014"):
        convert_coco(tmp_path / "src", tmp_path / "dst")
    (tmp_path / "src" / "val2014").mkdir()
    with pytest.raises(ValueError, match="no image of split 'train'"):
        convert_coco(tmp_path / "src", tmp_path / "dst")
