"""``convert_cams`` on Ray Data: CAM folders → label PNGs named by the dataset's ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mars_ray.data.cams import cams_to_label, parse_cams
from mars_ray.data.label_io import read_image, read_label
from mars_ray.stages.convert_cams import convert_cams, plan

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

H, W = 10, 14


def _coco_like(root: Path, ids: list[str]) -> None:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")


def _amn_coco_cams(folder: Path, numbers: list[int]) -> None:
    """AMN step/make_cam_coco.py names its files '%012d' and keeps keys/cam as torch tensors."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for n, classes in zip(numbers, ([1, 5], [80], [])):
        label = torch.zeros(80)
        label[[c - 1 for c in classes]] = 1
        valid = torch.nonzero(label)[:, 0]
        if not len(valid):
            np.save(folder / f"{n:012d}.npy", {"keys": valid})
            continue
        hr = torch.rand(len(valid), H, W, generator=g)
        hr /= torch.nn.functional.adaptive_max_pool2d(hr, (1, 1)) + 1e-5
        np.save(folder / f"{n:012d}.npy", {"keys": valid, "cam": hr[:, ::4, ::4], "high_res": hr.numpy()})


def test_convert_cams_names_outputs_by_dataset_id(tmp_path: Path, ray_local) -> None:
    ids = [f"COCO_train2014_{n:012d}" for n in (9, 25, 30)]
    root = tmp_path / "coco"
    _coco_like(root, ids)
    (root / "classes.txt").write_text("background\n" + "\n".join(f"c{i}" for i in range(1, 81)) + "\n")
    _amn_coco_cams(tmp_path / "cams", [9, 25, 30])
    assert plan(tmp_path / "cams", root=str(root), split="train") == {
        "000000000009": ids[0], "000000000025": ids[1], "000000000030": ids[2]}
    report = convert_cams(tmp_path / "cams", tmp_path / "out", fmt="irn", bg_threshold=0.05, fg_threshold=0.3,
                          crf=True, root=str(root), split="train")
    assert report["images"] == 3 and report["crf"] == "labels"
    assert json.loads((tmp_path / "out" / "convert_cams.json").read_text())["images"] == 3
    for n, i in zip((9, 25, 30), ids):
        d = np.load(tmp_path / "cams" / f"{n:012d}.npy", allow_pickle=True).item()
        exp = cams_to_label(parse_cams(d, "irn"), bg_threshold=0.05, fg_threshold=0.3, crf="labels",
                            image=read_image(root / "JPEGImages" / f"{i}.jpg"), size=(H, W))
        np.testing.assert_array_equal(read_label(tmp_path / "out" / f"{i}.png"), exp)
    assert not read_label(tmp_path / "out" / f"{ids[2]}.png").any()  # the image without classes: all background
    # without --data: names are the CAM stems; a file without maps then has no size
    with pytest.raises(Exception, match=r"000000000030.npy: holds no maps"):  # a ValueError inside a Ray task error
        convert_cams(tmp_path / "cams", tmp_path / "plain", fmt="irn", bg_threshold=0.15)
    (tmp_path / "cams" / "000000000030.npy").unlink()
    convert_cams(tmp_path / "cams", tmp_path / "plain2", fmt="irn", bg_threshold=0.15)
    assert sorted(p.name for p in (tmp_path / "plain2").glob("*.png")) == [f"{n:012d}.png" for n in (9, 25)]


def test_plan_errors(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _coco_like(root, ["a", "b"])
    (tmp_path / "cams").mkdir()
    with pytest.raises(ValueError, match="no .npy CAM files"):
        plan(tmp_path / "cams")
    np.save(tmp_path / "cams" / "a.npy", {"keys": np.zeros(0, np.int64)})
    with pytest.raises(ValueError, match=r"no CAM file for 1 of 2 ids.*'b'"):
        plan(tmp_path / "cams", root=str(root), split="train")
    np.save(tmp_path / "cams" / "zz.npy", {"keys": np.zeros(0, np.int64)})
    with pytest.raises(ValueError, match=r"1 CAM files name no image.*'zz'"):
        plan(tmp_path / "cams", root=str(root))
    with pytest.raises(ValueError, match="--crf needs the images"):
        convert_cams(tmp_path / "cams", tmp_path / "o", fmt="irn", bg_threshold=0.1, crf=True)
