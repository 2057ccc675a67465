"""Checks on label maps and label folders, with errors that name the file and the cause.

``check_label`` validates one decoded label (size and value set); ``check_label_folder``
validates that a folder holds one PNG per id of a split, reading PNG headers only so it stays
fast on 80k-image datasets.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import numpy as np

from mars_ray import storage
from mars_ray.data.label_io import label_size
from mars_ray.data.voc import VOCDataset
from mars_ray.labels import BIASED, IGNORE

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]", storage.ObjectPath]


def check_label(
    label: np.ndarray,
    *,
    num_classes: int,
    image_hw: Optional[tuple[int, int]],
    path: Optional[PathLike],
) -> None:
    """Raise ``ValueError`` naming ``path`` unless ``label`` is a valid label map.

    ``label``: integer ``[H, W]``; allowed values 0..``num_classes``, 254 (biased), 255 (ignore).
    ``image_hw``: the image's ``(H, W)`` the label must match, or ``None`` to skip the size check.
    The message lists the offending values ("values [7, 9] outside {0..5, 254, 255}").
    """
    where = str(path) if path is not None else "<label>"
    if label.ndim != 2:
        raise ValueError(f"{where}: label must be 2-D [H, W], got shape {tuple(label.shape)}")
    if image_hw is not None and tuple(label.shape) != tuple(image_hw):
        h, w = label.shape
        raise ValueError(f"{where}: label {h}x{w} but image {image_hw[0]}x{image_hw[1]}")
    vals = np.unique(label)
    ok = ((vals >= 0) & (vals <= num_classes)) | (vals == BIASED) | (vals == IGNORE)
    if not ok.all():
        bad = [int(v) for v in vals[~ok]]
        shown = bad[:20] + (["…"] if len(bad) > 20 else [])  # type: ignore[list-item]
        raise ValueError(
            f"{where}: label values {shown} outside {{0..{num_classes}, {BIASED}, {IGNORE}}}"
        )


def check_label_folder(
    dataset: VOCDataset,
    split: str,
    folder: storage.AnyPath,
    *,
    name: str = "pseudo label",
) -> dict[str, storage.AnyPath]:
    """Map each id of ``split`` to ``{folder}/{id}.png``, checking presence and size
    (``label_folder_sizes``, which raises what it finds wrong)."""
    return {i: folder / f"{i}.png" for i in label_folder_sizes(dataset, split, folder, name=name)}


def label_folder_sizes(
    dataset: VOCDataset,
    split: str,
    folder: storage.AnyPath,
    *,
    name: str = "pseudo label",
) -> dict[str, tuple[int, int]]:
    """Map each id of ``split`` to the ``(H, W)`` of ``{folder}/{id}.png``, checking presence and size.

    Raises ``FileNotFoundError`` if ``folder`` does not exist, ``ValueError`` naming the first
    missing files and how many are missing, or naming the first file whose header size differs
    from its image. Reads PNG headers only (no pixel decode); values are checked by the reader
    of each label (``check_label``).
    """
    root = folder
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {name} folder does not exist")
    ids = dataset.ids(split)
    present = {n for n in storage.list_files(root) if n.endswith(".png")}
    missing = [i for i in ids if f"{i}.png" not in present]
    if missing:
        first = ", ".join(f"{i}.png" for i in missing[:5])
        raise ValueError(
            f"{root}: {len(missing)} of {len(ids)} {name} files of split {split!r} are missing "
            f"(first: {first})"
        )
    def sizes(i: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
        return i, label_size(root / f"{i}.png", label=True), label_size(dataset.image_path(i))

    out: dict[str, tuple[int, int]] = {}
    for i, hw, img_hw in storage.map_reads(sizes, ids, remote=storage.is_uri(root) or storage.is_uri(dataset.root)):
        if hw != img_hw:
            raise ValueError(f"{root / f'{i}.png'}: {name} {hw[0]}x{hw[1]} but image {img_hw[0]}x{img_hw[1]}")
        out[i] = hw
    logger.debug("%s: %d %s files checked for split %s", root, len(out), name, split)
    return out


__all__ = ["check_label", "check_label_folder", "label_folder_sizes"]
