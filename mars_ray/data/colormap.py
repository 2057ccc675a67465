"""Colour-map label PNGs (RGB) back to class indices: ``mars convert-labels SRC DST --from-colormap``.

ToCo writes its predictions as RGB images through ``utils/imutils.py`` ``encode_cmap`` (``cmap[label]``
with ``colormap()``: the PASCAL VOC bit-interleaving colour map, the same function for VOC and COCO,
``tools/infer_seg_coco_ddp.py`` and ``infer_cam_crf_label.py``'s ``pred_rgb``). Decoding inverts that
map for the indices a dataset can hold: ``0..C`` (VOC: C = 20, COCO: C = 80), ``255`` (ignore,
(224, 224, 192)) and ``254`` in mars_ray's own colour (magenta, ``label_io.VOC_PALETTE``).
Palette-mode (``P``) and greyscale PNGs already hold indices and are copied as they are.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Union

import numpy as np
from PIL import Image

from mars_ray import storage
from mars_ray.data.label_io import VOC_PALETTE, _open, read_label, write_label
from mars_ray.labels import BIASED, IGNORE

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]", storage.ObjectPath]

#: palette name → number of foreground classes whose colours may appear
PALETTES: dict[str, int] = {"voc": 20, "coco": 80}


def _color_table(num_classes: int) -> dict[int, int]:
    """Packed ``0xRRGGBB`` → label index for 0..C, 254 and 255."""
    table = {}
    for idx in [*range(num_classes + 1), BIASED, IGNORE]:
        r, g, b = (int(v) for v in VOC_PALETTE[idx])
        table[(r << 16) | (g << 8) | b] = idx
    return table


def decode_colormap(rgb: np.ndarray, num_classes: int, path: str = "<image>") -> np.ndarray:
    """``uint8 [H, W, 3]`` colour-map image → ``uint8 [H, W]`` indices (inverse of VOC/ToCo ``encode_cmap``).

    Raises ``ValueError`` naming ``path`` and the first unknown colours (with their pixel counts)
    when a pixel's colour is no class colour of the palette.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{path}: expected a uint8 [H, W, 3] colour-map image, got {rgb.dtype} {rgb.shape}")
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    colors, inverse = np.unique(packed.reshape(-1), return_inverse=True)
    table = _color_table(num_classes)
    unknown = [c for c in colors.tolist() if c not in table]
    if unknown:
        counts = {c: int((packed == c).sum()) for c in unknown[:3]}
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) x{n}" for c, n in counts.items())
        hint = " (COCO predictions? use --palette coco)" if num_classes < 80 else ""
        raise ValueError(f"{path}: {len(unknown)} colours are no class colour of the {num_classes}-class palette: "
                         f"{shown}{hint}")
    lut = np.asarray([table[c] for c in colors.tolist()], np.uint8)
    return lut[inverse].reshape(packed.shape)


def read_colormap_label(path: PathLike, num_classes: int) -> np.ndarray:
    """A label PNG as indices: RGB/RGBA colour maps decoded, ``P``/``L`` PNGs read as they are."""
    with _open(path) as im:
        mode = im.mode
        if mode in ("RGB", "RGBA"):
            arr = np.asarray(im.convert("RGBA"))
            if mode == "RGBA" and (arr[..., 3] != 255).any():
                raise ValueError(f"{path}: RGBA colour map with transparent pixels; expected an opaque colour map")
            return decode_colormap(np.ascontiguousarray(arr[..., :3]), num_classes, str(path))
    return read_label(path)


def convert_colormap_folder(src: PathLike, dst: PathLike, *, palette: str = "voc", workers: int = 0) -> dict[str, int]:
    """Every ``SRC/*.png`` → ``DST/{name}.png`` single-channel palette labels; returns counts per input kind.

    Raises ``ValueError`` for an unknown palette, an empty folder, or the first file that does not
    decode (naming it).
    """
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; known: {', '.join(PALETTES)}")
    num_classes = PALETTES[palette]
    src_dir, dst_dir = storage.upath(src), storage.upath(dst)
    names = sorted(n for n in storage.list_files(src_dir) if n.lower().endswith(".png"))
    if not names:
        raise ValueError(f"{src_dir}: no .png labels")
    dst_dir.mkdir(parents=True, exist_ok=True)

    def one(name: str) -> str:
        path = src_dir / name
        with _open(path) as im:
            kind = "colormap" if im.mode in ("RGB", "RGBA") else "indices"
        write_label(dst_dir / name, read_colormap_label(path, num_classes))
        return kind

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        kinds = list(pool.map(one, names))
    counts = {"colormap": kinds.count("colormap"), "indices": kinds.count("indices")}
    logger.info("convert-labels: %d colour-map and %d index PNGs (%s palette) → %s",
                counts["colormap"], counts["indices"], palette, dst_dir)
    return counts


__all__ = ["PALETTES", "convert_colormap_folder", "decode_colormap", "read_colormap_label"]
