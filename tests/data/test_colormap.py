"""Colour-map PNGs (ToCo ``encode_cmap``) → class indices; the label reader points at the converter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray.data.colormap import convert_colormap_folder, decode_colormap
from mars_ray.data.label_io import read_label, write_label


def toco_colormap(N: int = 256) -> np.ndarray:
    """ToCo utils/imutils.py colormap(): bitget-based VOC colour map, uint8 [N, 3]."""
    def bitget(byteval, idx):
        return (byteval & (1 << idx)) != 0

    cmap = np.zeros((N, 3), dtype="uint8")
    for i in range(N):
        r = g = b = 0
        c = i
        for j in range(8):
            r = r | (bitget(c, 0) << 7 - j)
            g = g | (bitget(c, 1) << 7 - j)
            b = b | (bitget(c, 2) << 7 - j)
            c = c >> 3
        cmap[i] = np.array([r, g, b])
    return cmap


def encode_cmap(label: np.ndarray) -> np.ndarray:
    """ToCo utils/imutils.py encode_cmap: cmap[label.astype(np.int16), :]."""
    return toco_colormap()[label.astype(np.int16), :]


def test_decode_inverts_toco_encode_cmap_for_coco_and_voc(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    coco = rng.choice([0, 1, 17, 44, 80, 255], (9, 11)).astype(np.uint8)
    np.testing.assert_array_equal(decode_colormap(encode_cmap(coco), 80), coco)
    voc = rng.choice([0, 3, 20, 255], (9, 11)).astype(np.uint8)
    np.testing.assert_array_equal(decode_colormap(encode_cmap(voc), 20), voc)
    with pytest.raises(ValueError, match=r"x.png: 2 colours are no class colour of the 20-class palette.*--palette coco"):
        decode_colormap(encode_cmap(coco), 20, "x.png")


def test_read_label_suggests_the_converter_and_folder_conversion(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src, dst = tmp_path / "segs", tmp_path / "labels"
    src.mkdir()
    labels = {}
    for n in ("COCO_val2014_000000000042", "COCO_val2014_000000000073"):
        labels[n] = rng.choice([0, 5, 80, 255], (6, 8)).astype(np.uint8)
        # tools/infer_seg_coco_ddp.py: imageio.imsave(..., encode_cmap(pred).astype(np.uint8)) → an RGB PNG
        Image.fromarray(encode_cmap(labels[n]).astype(np.uint8)).save(src / f"{n}.png")
    write_label(src / "already_indices.png", labels[n])
    with pytest.raises(ValueError, match=r"000000000042.png.*colour-map PNG.*mars convert-labels SRC DST --from-colormap"):
        read_label(src / "COCO_val2014_000000000042.png")
    counts = convert_colormap_folder(src, dst, palette="coco")
    assert counts == {"colormap": 2, "indices": 1}
    for n, lab in labels.items():
        np.testing.assert_array_equal(read_label(dst / f"{n}.png"), lab)
    np.testing.assert_array_equal(read_label(dst / "already_indices.png"), labels[n])
    with pytest.raises(ValueError, match="unknown palette"):
        convert_colormap_folder(src, dst, palette="ade")
