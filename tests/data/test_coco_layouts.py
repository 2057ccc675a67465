"""convert-coco on the COCO layouts of ToCo, AMN, CLIMS/BECO and coco2voc; 91 → 80 remap; label renaming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray.data.coco import COCO91_IDS, COCO_CLASSES, convert_coco, gt_names, remap_coco91, rename_labels
from mars_ray.data.label_io import read_label, write_label

NUMS = {"train": [9, 25, 30], "val": [42, 73]}


def _images(root: Path) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    ids = {}
    for split, nums in NUMS.items():
        sub = root / f"{split}2014"
        sub.mkdir(parents=True)
        ids[split] = [f"COCO_{split}2014_{n:012d}" for n in nums]
        for i in ids[split]:
            Image.fromarray(rng.integers(0, 255, (6, 7, 3), dtype=np.uint8)).save(sub / f"{i}.jpg")
    return ids


def _gt(n: int, values: list[int]) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.choice(values, (6, 7)).astype(np.uint8)


def test_gt_name_patterns() -> None:
    assert gt_names("COCO_train2014_000000000009", "train", "int") == ["9.png"]
    assert gt_names("COCO_train2014_000000000009", "train", "012d") == ["000000000009.png"]
    assert gt_names("COCO_val2014_000000000042", "val", "coco") == ["COCO_val2014_000000000042.png"]
    assert gt_names("COCO_train2014_000000000009", "train", "auto") == [
        "COCO_train2014_000000000009.png", "000000000009.png", "9.png"]
    with pytest.raises(ValueError, match="unknown GT name pattern"):
        gt_names("x", "train", "{id}")


def test_amn_layout_separate_images_and_flat_012d_gt(tmp_path: Path) -> None:
    # AMN: coco14_root/JPEGImages/train2014/COCO_train2014_{012d}.jpg; GT coco_seg_anno/{012d}.png (0..80)
    ids = _images(tmp_path / "coco_2014" / "JPEGImages")
    anno = tmp_path / "coco_2014" / "coco_seg_anno"
    anno.mkdir()
    for n in NUMS["train"] + NUMS["val"]:
        Image.fromarray(_gt(n, [0, 1, 80, 255])).save(anno / f"{n:012d}.png")  # imageio/PIL greyscale
    for pattern in ("auto", "012d"):
        ds = convert_coco(None, tmp_path / f"dst-{pattern}", images=tmp_path / "coco_2014" / "JPEGImages", gt=anno,
                          gt_pattern=pattern)
        assert ds.ids("train") == ids["train"] and ds.ids("val") == ids["val"] and ds.classes == COCO_CLASSES
        np.testing.assert_array_equal(read_label(ds.gt_path(ids["val"][1])), _gt(73, [0, 1, 80, 255]))
        assert ds.gt_path(ids["train"][0]).is_symlink()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="no image of split 'train' has a GT PNG.*pattern int"):
        convert_coco(None, tmp_path / "dst-int", images=tmp_path / "coco_2014" / "JPEGImages", gt=anno, gt_pattern="int")


def test_clims_beco_int_names_and_toco_names(tmp_path: Path) -> None:
    ids = _images(tmp_path / "coco")
    # CLIMS/BECO mscoco/annToMask.py: mask/{train,val}2014/{imgId}.png with category_map values 1..80
    for split, nums in NUMS.items():
        (tmp_path / "mask" / f"{split}2014").mkdir(parents=True)
        for n in nums:
            Image.fromarray(_gt(n, [0, 5, 80])).save(tmp_path / "mask" / f"{split}2014" / f"{n}.png")
    ds = convert_coco(None, tmp_path / "d1", images=tmp_path / "coco", gt=tmp_path / "mask", gt_pattern="int", link=False)
    assert ds.ids("val") == ids["val"] and not ds.gt_path(ids["val"][0]).is_symlink()  # type: ignore[union-attr]
    np.testing.assert_array_equal(read_label(ds.gt_path(ids["train"][2])), _gt(30, [0, 5, 80]))
    # ToCo datasets/coco.py: label_dir/train2014/{name}.png with name = COCO_train2014_...
    for split, names in ids.items():
        (tmp_path / "SegmentationClass" / f"{split}2014").mkdir(parents=True)
        for n, name in zip(NUMS[split], names):
            write_label(tmp_path / "SegmentationClass" / f"{split}2014" / f"{name}.png", _gt(n, [0, 7, 255]))
    ds = convert_coco(None, tmp_path / "d2", images=tmp_path / "coco", gt=tmp_path / "SegmentationClass",
                      gt_pattern="coco", splits=["val"])
    assert ds.ids("val") == ids["val"] and not (tmp_path / "d2" / "ImageSets" / "Segmentation" / "train.txt").exists()


def test_coco2voc_raw_category_ids_are_remapped(tmp_path: Path) -> None:
    ids = _images(tmp_path / "coco")
    # coco2voc.py: class_labels/{img}.png of raw category_id (1..90), saved with .convert("L")
    raw = tmp_path / "class_labels"
    raw.mkdir()
    for n in NUMS["train"] + NUMS["val"]:
        Image.fromarray(_gt(n, [0, 1, 44, 90])).save(raw / f"{n}.png")
    ds = convert_coco(None, tmp_path / "dst", images=tmp_path / "coco", gt=raw)
    got = read_label(ds.gt_path(ids["train"][1]))
    exp = _gt(25, [0, 1, 44, 90])
    np.testing.assert_array_equal(got, np.where(exp == 44, 40, np.where(exp == 90, 80, exp)))
    assert COCO_CLASSES[40] == "bottle" and COCO_CLASSES[80] == "toothbrush"
    assert not ds.gt_path(ids["train"][1]).is_symlink()  # type: ignore[union-attr]
    # an explicit "contiguous" keeps the raw values (no scan)
    ds2 = convert_coco(None, tmp_path / "dst2", images=tmp_path / "coco", gt=raw, category_ids="contiguous")
    np.testing.assert_array_equal(read_label(ds2.gt_path(ids["train"][1])), exp)
    assert len(COCO91_IDS) == 80 and len(set(COCO91_IDS)) == 80 and max(COCO91_IDS) == 90
    with pytest.raises(ValueError, match=r"x.png: values \[12\] are no COCO category id"):
        remap_coco91(np.array([[0, 12, 255]], np.uint8), "x.png")


def test_rename_pseudo_labels_to_dataset_ids(tmp_path: Path) -> None:
    ids = _images(tmp_path / "coco")
    (tmp_path / "SegmentationClass").mkdir()
    for name in ids["train"] + ids["val"]:
        write_label(tmp_path / "SegmentationClass" / f"{name}.png", np.zeros((6, 7), np.uint8))
    convert_coco(None, tmp_path / "dst", images=tmp_path / "coco", gt=tmp_path / "SegmentationClass")
    # AMN writes pseudo labels as {012d}.png (sem_seg_out_dir/%012d.png)
    pseudo = tmp_path / "amn_sem_seg"
    pseudo.mkdir()
    for n in NUMS["train"]:
        write_label(pseudo / f"{n:012d}.png", _gt(n, [0, 3, 255]))
    assert rename_labels(pseudo, tmp_path / "renamed", root=tmp_path / "dst") == 3
    np.testing.assert_array_equal(read_label(tmp_path / "renamed" / f"{ids['train'][0]}.png"), _gt(9, [0, 3, 255]))
    write_label(pseudo / "9.png", np.zeros((6, 7), np.uint8))
    with pytest.raises(ValueError, match=r"000000000009.png and 9.png both name image"):
        rename_labels(pseudo, tmp_path / "renamed2", root=tmp_path / "dst")
    (pseudo / "9.png").unlink()
    write_label(pseudo / "123456.png", np.zeros((6, 7), np.uint8))
    with pytest.raises(ValueError, match=r"1 labels name no image.*123456.png"):
        rename_labels(pseudo, tmp_path / "renamed3", root=tmp_path / "dst")
