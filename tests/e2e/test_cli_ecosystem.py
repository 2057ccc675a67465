"""The issue-13 subcommands through ``mars`` (no Ray: conversions that run in the driver)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mars_ray.cli import build_parser, main, overrides_from_args
from mars_ray.data.label_io import read_label


def test_convert_labels_from_colormap(tmp_path: Path, capsys) -> None:
    from mars_ray.data.label_io import VOC_PALETTE

    (tmp_path / "rgb").mkdir()
    lab = np.array([[0, 1, 20], [255, 15, 0]], np.uint8)
    Image.fromarray(VOC_PALETTE[lab]).save(tmp_path / "rgb" / "a.png")
    assert main(["convert-labels", str(tmp_path / "rgb"), str(tmp_path / "out"), "--from-colormap"]) == 0
    np.testing.assert_array_equal(read_label(tmp_path / "out" / "a.png"), lab)
    assert main(["convert-labels", str(tmp_path / "rgb"), str(tmp_path / "o2")]) == 2
    assert "--from-colormap" in capsys.readouterr().err


def test_convert_coco_and_rename_labels(tmp_path: Path, capsys) -> None:
    for split, nums in (("train", [9, 25]), ("val", [42])):
        (tmp_path / "JPEGImages" / f"{split}2014").mkdir(parents=True)
        for n in nums:
            Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(
                tmp_path / "JPEGImages" / f"{split}2014" / f"COCO_{split}2014_{n:012d}.jpg")
            (tmp_path / "anno").mkdir(exist_ok=True)
            Image.fromarray(np.full((4, 5), 3, np.uint8)).save(tmp_path / "anno" / f"{n:012d}.png")
    assert main(["convert-coco", "--images", str(tmp_path / "JPEGImages"), "--gt", str(tmp_path / "anno"),
                 str(tmp_path / "coco")]) == 0
    assert "2 train, 1 val images, 80 classes" in capsys.readouterr().out
    assert main(["convert-coco", "--rename-labels", str(tmp_path / "anno"), "--data", str(tmp_path / "coco"),
                 str(tmp_path / "renamed")]) == 0
    assert (tmp_path / "renamed" / "COCO_val2014_000000000042.png").exists()
    assert main(["convert-coco", str(tmp_path / "coco")]) == 2
    assert "--images IMAGES --gt GT DST" in capsys.readouterr().err


def test_import_uss_leopart_and_cli_errors(tmp_path: Path, capsys) -> None:
    from tests.models.test_import_uss import dino_vit_state

    torch.save({f"teacher.{k}": v for k, v in dino_vit_state(384, 1, 16, 2, seed=0).items()}, tmp_path / "l.ckpt")
    assert main(["import-uss", str(tmp_path / "l.ckpt"), str(tmp_path / "l.pt"), "--from", "leopart"]) == 0
    assert "features.checkpoint=" in capsys.readouterr().out
    assert main(["import-uss", str(tmp_path / "l.ckpt"), str(tmp_path / "x.pt"), "--from", "stego"]) == 2
    assert "not a Lightning checkpoint" in capsys.readouterr().err
    assert main(["convert-cams", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "--format and --bg-threshold, or a --preset" in capsys.readouterr().err


def test_image_labels_flag_sets_the_config_key() -> None:
    args = build_parser().parse_args(["features", "--data", "d", "--out", "r", "--image-labels", "cls_labels.npy"])
    assert overrides_from_args(args)["data.image_labels"] == "cls_labels.npy"
    args = build_parser().parse_args(["convert-cams", "a", "b", "--preset", "irn-band"])
    assert args.preset == "irn-band"
