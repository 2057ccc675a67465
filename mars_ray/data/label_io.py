"""Image and label-PNG I/O with clear errors.

Label PNGs are single-channel: palette (``P``, the raw indices are the labels) or greyscale
(``L``); values follow ``mars_ray.labels`` (0 background, 1..C classes, 254 biased, 255 ignore).
``write_label`` writes a palette PNG with the VOC colour map, atomically (temporary file in the
same folder, then ``os.replace``; one upload on an object store), so a killed run never leaves a
half-written label. Paths may be local or object-store URIs (``mars_ray.storage``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from mars_ray import storage
from mars_ray.labels import BIASED, IGNORE

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]", storage.ObjectPath]


def _voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map: ``uint8 [256, 3]``; 254 (biased) is magenta, 255 (ignore) white-ish."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[BIASED] = (255, 0, 255)
    pal[IGNORE] = (224, 224, 192)  # VOC's own boundary colour
    return pal


VOC_PALETTE: np.ndarray = _voc_palette()
"""``uint8 [256, 3]`` VOC colour map; entries 254 and 255 are distinct visible colours."""


def _open(path: PathLike) -> Image.Image:
    p = storage.upath(path)
    if isinstance(p, Path) and not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        # On an object store: one GET (its FileNotFoundError names the URI), no existence probe.
        return Image.open(p if isinstance(p, Path) else p.open("rb"))
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{p}: cannot read image: {e}") from e


def read_image(path: PathLike) -> np.ndarray:
    """Read any image PIL understands as ``uint8 [H, W, 3]`` RGB (16-bit grey scaled to 8 bits, not clipped).

    Raises ``FileNotFoundError`` if missing, ``ValueError`` naming the file if corrupt.
    """
    with _open(path) as im:
        try:
            if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit grey: PIL's convert("RGB") would clip it
                grey = np.asarray(im).astype(np.int64)
                if im.mode.startswith("I;16") or grey.max(initial=0) > 255:
                    grey = grey >> 8
                return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"{path}: cannot decode image: {e}") from e


def read_label(path: PathLike) -> np.ndarray:
    """Read a single-channel label PNG as ``uint8 [H, W]``.

    Mode ``P``: the raw palette indices (not the colours); ``L``: the grey values; ``I``/``I;16``:
    accepted when every value fits in 0..255. RGB/RGBA (a colour map: the error points at
    ``mars convert-labels --from-colormap``) and other modes raise ``ValueError`` naming the file;
    a corrupt file raises ``ValueError`` with PIL's reason.
    """
    with _open(path) as im:
        mode = im.mode
        _check_label_mode(path, mode)
        try:
            arr = np.asarray(im)
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"{path}: cannot decode label: {e}") from e
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label, got array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(
                f"{path}: label mode {mode} has values outside 0..255 (min {arr.min()}, max {arr.max()})"
            )
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


LABEL_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")


def _check_label_mode(path: PathLike, mode: str) -> None:
    """``ValueError`` naming the file unless ``mode`` is a single-channel label mode (``LABEL_MODES``)."""
    if mode in ("RGB", "RGBA"):
        raise ValueError(
            f"{path}: expected a single-channel (palette or L) label PNG, got {mode}; this looks like a "
            "colour-map PNG (ToCo writes its predictions that way): turn the folder into class indices with "
            "`mars convert-labels SRC DST --from-colormap --palette voc|coco`")
    if mode not in LABEL_MODES:
        raise ValueError(f"{path}: expected a single-channel (palette or L) label PNG, got {mode}")


def label_size(path: PathLike, *, label: bool = False) -> tuple[int, int]:
    """``(H, W)`` of an image or label file, read from the header only (no pixel decode).

    ``label``: also check the header's mode is a label's (a colour-map PNG is named before any pixel is read).
    """
    with _open(path) as im:
        if label:
            _check_label_mode(path, im.mode)
        w, h = im.size
    return h, w


def write_label(path: PathLike, label: np.ndarray, *, palette: bool = True) -> storage.AnyPath:
    """Write ``label`` (``uint8 [H, W]``, or any integer array with values 0..255) as a PNG.

    ``palette=True`` writes mode ``P`` with ``VOC_PALETTE``; otherwise mode ``L``. The file is
    written to ``{path}.tmp-{pid}`` in the same folder and moved into place with ``os.replace``.
    Raises ``ValueError`` for a non-2-D array or values outside 0..255. Returns the path.
    """
    p = storage.upath(path)
    arr = np.asarray(label)
    if arr.ndim != 2:
        raise ValueError(f"{p}: label must be 2-D [H, W], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{p}: label must be an integer array, got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{p}: label values must be in 0..255 (min {arr.min()}, max {arr.max()})")
        arr = arr.astype(np.uint8)
    im = _to_palette(arr) if palette else Image.fromarray(np.ascontiguousarray(arr))
    with storage.atomic_open(p) as f:
        im.save(f, format="PNG")
    return p


def _to_palette(arr: np.ndarray) -> Image.Image:
    """``uint8 [H, W]`` indices → mode ``P`` image with ``VOC_PALETTE`` (indices kept as-is)."""
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
    im.putpalette(VOC_PALETTE.tobytes())
    return im


__all__ = ["VOC_PALETTE", "label_size", "read_image", "read_label", "write_label"]
