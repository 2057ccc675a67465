"""Image-level labels in the formats of IRN/AMN/ToCo/MCTformer/VOC, read through VOCDataset.

Every file is built the way the original repository writes it (cited per test).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray.data.coco import COCO_CLASSES
from mars_ray.data.voc import VOC_CLASSES, VOCDataset

# id → VOC class names of its objects (the last entry of each is "difficult")
OBJECTS = {
    "2007_000032": ["aeroplane", "person"],
    "2007_000039": ["tvmonitor", "tvmonitor"],
    "2008_000123": ["dog", "cat", "chair"],
    "2007_000042": ["train", "bird"],
}
TRAIN = ["2007_000032", "2007_000039", "2008_000123"]
VAL = ["2007_000042"]
EXTRA = ["2009_000001", "2010_000002"]  # train_aug ids the user's dataset does not have


def _voc(root: Path, ids_train: list[str] = TRAIN, ids_val: list[str] = VAL) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i in ids_train + ids_val:
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids_train) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids_val) + "\n")
    return root


def _annotations(folder: Path) -> None:
    """VOC ``Annotations/{id}.xml``: objects with name, difficult flag and a part (whose name is no class)."""
    folder.mkdir(parents=True)
    for i, names in OBJECTS.items():
        objs = "".join(
            f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{int(k == len(names) - 1)}</difficult><bndbox><xmin>1</xmin></bndbox>"
            f"<part><name>head</name><bndbox><xmin>1</xmin></bndbox></part></object>"
            for k, n in enumerate(names))
        (folder / f"{i}.xml").write_text(f"<annotation><folder>VOC2012</folder><filename>{i}.jpg</filename>{objs}</annotation>")


def _expected(include_difficult: bool = True) -> dict[str, list[int]]:
    return {i: sorted({VOC_CLASSES.index(n) for k, n in enumerate(names)
                       if include_difficult or k != len(names) - 1})
            for i, names in OBJECTS.items()}


def _irn_vector(image_id: str) -> np.ndarray:
    """IRN ``load_image_label_from_xml``: float32[20], 1.0 at CAT_LIST index (no background slot)."""
    v = np.zeros(20, np.float32)
    for n in OBJECTS.get(image_id, ["boat"]):
        v[VOC_CLASSES.index(n) - 1] = 1.0
    return v


def test_irn_cls_labels_npy_int_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # IRN voc12/make_cls_labels.py: d[img_name] = label with img_name an np.int32 from
    # np.loadtxt(train_aug.txt, dtype=np.int32) (old numpy parsed "2007_000032" as 2007000032), np.save(out, d)
    d = {np.int32(int(i)): _irn_vector(i) for i in TRAIN + VAL + EXTRA}
    np.save(tmp_path / "cls_labels.npy", d)
    ds = VOCDataset(_voc(tmp_path / "voc"), image_labels=str(tmp_path / "cls_labels.npy"))
    exp = _expected()
    assert all(ds.image_labels(i) == exp[i] for i in TRAIN + VAL)
    with caplog.at_level(logging.INFO, logger="mars_ray.data.voc"):
        line = ds.check_image_labels("train")
    assert "IRN/AMN" in line and "3 of 3 ids of split 'train'" in line and "6 entries" in line
    assert "2 naming no image" in line and line in caplog.text


def test_toco_onehot_and_mctformer_jpg_keys(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc")
    exp = _expected()
    # ToCo datasets/voc.py: np.load(cls_labels_onehot.npy).item()[img_name] with str names, uint8 one-hot
    toco = {i: _irn_vector(i).astype(np.uint8) for i in TRAIN + VAL + EXTRA}
    np.save(tmp_path / "cls_labels_onehot.npy", toco)
    ds = VOCDataset(root, image_labels=str(tmp_path / "cls_labels_onehot.npy"))
    assert [ds.image_labels(i) for i in TRAIN] == [exp[i] for i in TRAIN]
    assert "ToCo" in ds.check_image_labels("val")
    # MCTformer datasets.py: looks up id, then id + '.jpg'
    mct = {f"{i}.jpg": _irn_vector(i) for i in TRAIN + VAL}
    np.save(tmp_path / "mct.npy", mct)
    ds = VOCDataset(root, image_labels=str(tmp_path / "mct.npy"))
    assert ds.image_labels("2008_000123") == exp["2008_000123"]
    assert "MCTformer" in ds.check_image_labels("train")


def test_amn_coco_int_ids(tmp_path: Path) -> None:
    # AMN coco14/dataloader.py: cls_labels_dict[int(img_name)], 80 values; our ids come from convert-coco
    ids = ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    root = _voc(tmp_path / "coco", ids, ["COCO_val2014_000000000042"])
    (root / "classes.txt").write_text("\n".join(COCO_CLASSES) + "\n")
    labels = {9: [1, 80], 25: [], 42: [3], 999: [5]}
    d = {}
    for k, cls in labels.items():
        v = np.zeros(80, np.float32)
        v[[c - 1 for c in cls]] = 1.0
        d[k] = v
    np.save(tmp_path / "cls_labels_coco.npy", d)
    ds = VOCDataset(root, image_labels=str(tmp_path / "cls_labels_coco.npy"))
    assert ds.image_labels(ids[0]) == [1, 80] and ds.image_labels(ids[1]) == []
    assert ds.image_labels("COCO_val2014_000000000042") == [3]
    line = ds.check_image_labels("train")
    assert "AMN" in line and "2 of 2" in line and "1 naming no image" in line


@pytest.mark.parametrize("difficult", [True, False])
def test_voc_xml_annotations(tmp_path: Path, difficult: bool) -> None:
    root = _voc(tmp_path / "voc")
    _annotations(root / "Annotations")
    ds = VOCDataset(root, image_labels=str(root), image_labels_difficult=difficult)
    exp = _expected(difficult)
    assert {i: ds.image_labels(i) for i in TRAIN + VAL} == {i: exp[i] for i in TRAIN + VAL}
    assert ("included" if difficult else "excluded") in ds.check_image_labels("train")
    # the folder itself may be given too
    assert VOCDataset(root, image_labels=str(root / "Annotations")).image_labels("2007_000039") == [20]


def test_xml_and_npy_from_the_same_annotations_agree(tmp_path: Path) -> None:
    """IRN builds cls_labels.npy from the XMLs including difficult objects: both readers must agree."""
    root = _voc(tmp_path / "voc")
    _annotations(root / "Annotations")
    np.save(tmp_path / "cls_labels.npy", {np.int32(int(i)): _irn_vector(i) for i in OBJECTS})
    a = VOCDataset(root, image_labels=str(root / "Annotations"))
    b = VOCDataset(root, image_labels=str(tmp_path / "cls_labels.npy"))
    assert all(a.image_labels(i) == b.image_labels(i) for i in OBJECTS)


def test_bad_inputs_name_file_and_id(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc")
    # a background slot: 21 values
    np.save(tmp_path / "bg.npy", {i: np.ones(21, np.float32) for i in TRAIN})
    with pytest.raises(ValueError, match=r"bg.npy.*'2007_000032'.*21 entries.*background slot"):
        VOCDataset(root, image_labels=str(tmp_path / "bg.npy")).image_labels("2007_000032")
    # soft values
    np.save(tmp_path / "soft.npy", {i: np.full(20, 0.5, np.float32) for i in TRAIN})
    with pytest.raises(ValueError, match=r"soft.npy.*0/1"):
        VOCDataset(root, image_labels=str(tmp_path / "soft.npy")).image_labels("2007_000032")
    # CLIMS caches a label matrix without ids
    np.save(tmp_path / "clims.npy", np.zeros((3, 20)))
    with pytest.raises(ValueError, match=r"clims.npy.*without ids"):
        VOCDataset(root, image_labels=str(tmp_path / "clims.npy")).image_labels("2007_000032")
    # a split id without an entry
    np.save(tmp_path / "part.npy", {np.int32(int(i)): _irn_vector(i) for i in TRAIN[:2]})
    ds = VOCDataset(root, image_labels=str(tmp_path / "part.npy"))
    with pytest.raises(ValueError, match=r"part.npy.*1 of 3 ids.*2008_000123"):
        ds.check_image_labels("train")
    with pytest.raises(ValueError, match=r"part.npy.*'2008_000123'"):
        ds.image_labels("2008_000123")
    # json: class id outside 1..C, and an id in no split
    (root / "image_labels.json").write_text(json.dumps({"2007_000032": [21]}))
    with pytest.raises(ValueError, match=r"image_labels.json.*'2007_000032'.*outside 1..20"):
        VOCDataset(root).image_labels("2007_000032")
    (root / "image_labels.json").write_text(json.dumps({"2007_000032": [1], "nope_1": [2]}))
    with pytest.raises(ValueError, match=r"image_labels.json.*'nope_1'.*no split"):
        VOCDataset(root).image_labels("2007_000032")
    # an unknown class name in an XML, a missing file, an unknown type
    _annotations(tmp_path / "ann")
    (tmp_path / "ann" / "2007_000032.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(ValueError, match=r"2007_000032.xml.*'unicorn'"):
        VOCDataset(root, image_labels=str(tmp_path / "ann")).image_labels("2007_000032")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        VOCDataset(root, image_labels=str(tmp_path / "missing.npy")).image_labels("2007_000032")
    (tmp_path / "labels.csv").write_text("x")
    with pytest.raises(ValueError, match=r"labels.csv.*unknown image-label file type"):
        VOCDataset(root, image_labels=str(tmp_path / "labels.csv")).image_labels("2007_000032")


def test_pickled_code_in_a_label_file_does_not_run(tmp_path: Path) -> None:
    root = _voc(tmp_path / "voc")
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    np.save(tmp_path / "evil.npy", {"2007_000032": Evil()}, allow_pickle=True)
    with pytest.raises(ValueError, match="evil.npy"):
        VOCDataset(root, image_labels=str(tmp_path / "evil.npy")).image_labels("2007_000032")
    assert not marker.exists()


def test_voc_aug_gt_dir_and_two_path_split_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _voc(tmp_path / "voc")
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    for i in TRAIN:
        Image.fromarray(np.full((6, 8), 7, np.uint8)).save(aug / f"{i}.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_aug.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in TRAIN))
    ds = VOCDataset(root, gt_dir="SegmentationClassAug", split_files={"train_aug": str(lists / "train_aug.txt")})
    assert ds.ids("train_aug") == TRAIN and ds.ids("val") == VAL
    assert ds.gt_path(TRAIN[0]) == aug / f"{TRAIN[0]}.png" and ds.has_gt("train_aug")
    assert ds.image_labels(TRAIN[1]) == [7]  # from the aug GT
    # plain ids work too; an absolute gt_dir as well
    (lists / "plain.txt").write_text("\n".join(TRAIN) + "\n")
    ds2 = VOCDataset(root, gt_dir=str(aug), split_files={"train": str(lists / "plain.txt")})
    assert ds2.ids("train") == TRAIN and ds2.gt_path(TRAIN[2]) == aug / f"{TRAIN[2]}.png"
    # the list names another GT folder than the one read: a warning
    with caplog.at_level(logging.WARNING, logger="mars_ray.data.voc"):
        assert VOCDataset(root, split_files={"t": str(lists / "train_aug.txt")}).ids("t") == TRAIN
    assert "SegmentationClassAug" in caplog.text and "data.gt_dir" in caplog.text
    # malformed lines
    (lists / "bad.txt").write_text("/JPEGImages/a.jpg /SegmentationClassAug/b.png\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 1"):
        VOCDataset(root, split_files={"b": str(lists / "bad.txt")}).ids("b")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        VOCDataset(root, split_files={"b": str(lists / "nope.txt")})


def test_data_config_dataset_kwargs(tmp_path: Path) -> None:
    from mars_ray import config as C

    cfg = C.build(overrides={"data.root": str(tmp_path), "data.split": "train_aug", "data.gt_dir": "SegmentationClassAug",
                             "data.split_file": "/x/train_aug.txt", "data.image_labels": "/x/cls_labels.npy",
                             "data.image_labels_difficult": "false"})
    assert cfg.data.dataset_kwargs() == {"gt_dir": "SegmentationClassAug", "split_files": {"train_aug": "/x/train_aug.txt"},
                                         "image_labels": "/x/cls_labels.npy", "image_labels_difficult": False}
    assert C.Config().data.dataset_kwargs()["split_files"] is None
