"""Label PNG I/O: modes, palette indices, header-only size, atomic writes, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray.data.label_io import VOC_PALETTE, label_size, read_image, read_label, write_label


def _label(h: int = 6, w: int = 9) -> np.ndarray:
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 21, (h, w)).astype(np.uint8)
    lab[0, 0], lab[0, 1] = 254, 255
    return lab


def test_write_read_roundtrip_palette(tmp_path: Path) -> None:
    lab = _label()
    p = write_label(tmp_path / "sub" / "a.png", lab)
    with Image.open(p) as im:
        assert im.mode == "P"
        pal = np.asarray(im.getpalette()[: 256 * 3], dtype=np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(pal, VOC_PALETTE)
    out = read_label(p)
    assert out.dtype == np.uint8 and out.shape == (6, 9)
    np.testing.assert_array_equal(out, lab)
    assert label_size(p) == (6, 9)
    assert not [f for f in os.listdir(p.parent) if ".tmp-" in f]


def test_palette_basics() -> None:
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    assert tuple(VOC_PALETTE[1]) == (128, 0, 0) and tuple(VOC_PALETTE[0]) == (0, 0, 0)
    assert tuple(VOC_PALETTE[254]) != tuple(VOC_PALETTE[255])
    assert VOC_PALETTE[254].sum() > 0 and VOC_PALETTE[255].sum() > 0


def test_read_label_l_mode_and_raw_indices(tmp_path: Path) -> None:
    lab = _label()
    write_label(tmp_path / "l.png", lab, palette=False)
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "L"
    np.testing.assert_array_equal(read_label(tmp_path / "l.png"), lab)
    # a palette PNG whose colours are NOT the indices: we must get the indices back
    im = Image.frombytes("P", (9, 6), lab.tobytes())
    im.putpalette([255 - (i % 256) for i in range(768)])
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_label(tmp_path / "p.png"), lab)


def test_read_label_16bit(tmp_path: Path) -> None:
    lab = _label().astype(np.uint16)
    Image.fromarray(lab).save(tmp_path / "i16.png")
    np.testing.assert_array_equal(read_label(tmp_path / "i16.png"), lab.astype(np.uint8))
    lab[2, 2] = 300
    Image.fromarray(lab).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="big.png.*outside 0..255"):
        read_label(tmp_path / "big.png")


def test_read_label_rejects_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb.png.*single-channel \(palette or L\) label PNG, got RGB"):
        read_label(tmp_path / "rgb.png")


def test_corrupt_and_missing(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for fn in (read_label, read_image, label_size):
        with pytest.raises(ValueError, match="bad.png"):
            fn(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_label(tmp_path / "nope.png")


def test_truncated_png_is_value_error(tmp_path: Path) -> None:
    write_label(tmp_path / "t.png", np.random.default_rng(1).integers(0, 255, (64, 64)).astype(np.uint8))
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="t.png"):
        read_label(tmp_path / "t.png")


def test_read_image_any_mode_to_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 5), 77, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((4, 5, 4), 9, np.uint8), mode="RGBA").save(tmp_path / "a.png")
    for name in ("g.png", "a.png"):
        img = read_image(tmp_path / name)
        assert img.shape == (4, 5, 3) and img.dtype == np.uint8


def test_write_label_rejects_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2-D"):
        write_label(tmp_path / "x.png", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="0..255"):
        write_label(tmp_path / "x.png", np.full((2, 3), 256, np.int32))
    assert not (tmp_path / "x.png").exists()
