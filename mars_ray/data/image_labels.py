"""Image-level labels in the formats WSSS users already hold, read into ``{image id: class ids 1..C}``.

Formats (detected from the path and the file's content):

* ``image_labels.json``: ``{id: [class ids 1..C]}`` (mars_ray's own; strict: every id must belong to
  a split of the dataset).
* ``cls_labels.npy`` of IRN / AMN / W-OoD / BECO: ``np.save`` of a dict with **int** keys
  (``2007000032`` for ``2007_000032``) and ``float32[C]`` multi-hot values without a background slot
  (IRN ``voc12/make_cls_labels.py`` + ``voc12/dataloader.py``: keys from ``np.loadtxt(dtype=np.int32)``,
  values from ``load_image_label_list_from_xml``).
* ``cls_labels_coco.npy`` of AMN: the same with the int COCO image id as key (``coco14/dataloader.py``:
  ``cls_labels_dict[int(img_name)]``), 80 values.
* ``cls_labels_onehot.npy`` of ToCo: string keys (``datasets/voc.py`` ``load_cls_label_list``;
  ``self.label_list[img_name]``), ``uint8[C]`` one-hot values.
* MCTformer ``cls_labels.npy``: string keys that may end in ``.jpg`` (``datasets.py``
  ``load_image_label_list_from_npy`` looks up ``id`` then ``id + '.jpg'``).
* VOC ``Annotations/{id}.xml``: the ``object/name`` of each object; ``difficult`` objects are
  included by default, as IRN's ``make_cls_labels.py`` does (it reads every ``name`` element).

The ``.npy`` dicts are pickles: they are read with :mod:`mars_ray.safe_pickle` (no code runs), and
only because the user named the file. A published ``cls_labels.npy`` covers train_aug + val, so keys
that name no image of the dataset are counted, not an error; for ``image_labels.json`` they are.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping, Optional, Union

import numpy as np

from mars_ray import safe_pickle, storage
from mars_ray.data.naming import IdMatcher, strip_image_suffix

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]", storage.ObjectPath]

FORMATS: dict[str, str] = {
    "json": "image_labels.json ({id: [class ids]})",
    "voc-int-npy": "cls_labels.npy with int VOC ids (IRN/AMN/W-OoD/BECO)",
    "coco-int-npy": "cls_labels_coco.npy with int COCO ids (AMN)",
    "str-npy": "cls_labels_onehot.npy with string ids (ToCo)",
    "jpg-npy": "cls_labels.npy with '.jpg' ids (MCTformer)",
    "voc-xml": "VOC Annotations/*.xml (difficult objects included)",
    "voc-xml-nodifficult": "VOC Annotations/*.xml (difficult objects excluded)",
}
_VOC_INT_MIN = 10**9  # YYYYNNNNNN (10 digits); COCO image ids are below 600k


@dataclass(frozen=True)
class ImageLabels:
    """Image-level labels read from one file or folder.

    ``labels``: dataset image id → sorted foreground class ids (1..C; ``()`` = background only).
    ``entries``: entries the file holds; ``unmatched``: file keys naming no image of the dataset
    (the first few; ``n_unmatched`` counts all).
    """

    path: str
    fmt: str
    labels: Mapping[str, tuple[int, ...]]
    entries: int
    n_unmatched: int = 0
    unmatched: tuple[str, ...] = field(default=())

    @property
    def description(self) -> str:
        return FORMATS[self.fmt]

    def get(self, image_id: str) -> tuple[int, ...]:
        """Class ids of ``image_id``; ``ValueError`` naming the file and the id when it has no entry."""
        if image_id not in self.labels:
            raise ValueError(f"{self.path}: no image-level labels for image {image_id!r} ({self.description})")
        return self.labels[image_id]

    def summary(self, split: str, ids: Collection[str]) -> tuple[str, list[str]]:
        """The one log line for ``split`` and the ids of the split that have no entry."""
        missing = [i for i in ids if i not in self.labels]
        line = (f"image labels: {self.description} from {self.path}: {len(ids) - len(missing)} of {len(ids)} ids "
                f"of split {split!r} found ({self.entries} entries in the file"
                + (f", {self.n_unmatched} naming no image of the dataset" if self.n_unmatched else "") + ")")
        return line, missing


def _multi_hot(value: Any, path: str, key: str, num_classes: int) -> tuple[int, ...]:
    """A float/uint8 ``[C]`` 0/1 vector (numpy or torch) → sorted class ids 1..C."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1 or (not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool):
        raise ValueError(f"{path}: labels of {key!r} must be a 1-D numeric vector, got {arr.dtype} {arr.shape}")
    if arr.shape[0] != num_classes:
        hint = " (a background slot? these files hold foreground classes only)" if arr.shape[0] == num_classes + 1 else ""
        raise ValueError(f"{path}: labels of {key!r} have {arr.shape[0]} entries, the dataset has "
                         f"{num_classes} foreground classes{hint}")
    vals = arr.astype(np.float64)
    if not np.all((vals == 0) | (vals == 1)):
        raise ValueError(f"{path}: labels of {key!r} must be 0/1 multi-hot, got values {sorted(set(vals.tolist()))[:5]}")
    return tuple(int(c) + 1 for c in np.flatnonzero(vals))


def _read_json(path: storage.AnyPath, num_classes: int, matcher: IdMatcher) -> ImageLabels:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object {{id: [class ids]}}, got {type(raw).__name__}")
    out: dict[str, tuple[int, ...]] = {}
    for k, v in raw.items():
        if not isinstance(v, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in v):
            raise ValueError(f"{path}: labels of {k!r} must be a list of integers, got {v!r}")
        bad = [c for c in v if not 1 <= c <= num_classes]
        if bad:
            raise ValueError(f"{path}: {k!r} has class ids {bad} outside 1..{num_classes}")
        if matcher.ids and str(k) not in matcher.ids:
            raise ValueError(f"{path}: image id {k!r} is in no split of the dataset")
        out[str(k)] = tuple(sorted(set(v)))
    return ImageLabels(str(path), "json", out, len(raw))


def _read_npy(path: storage.AnyPath, num_classes: int, matcher: IdMatcher) -> ImageLabels:
    with storage.open_read(path) as f:
        obj = safe_pickle.load_npy(f.read(), str(path))
    if isinstance(obj, np.ndarray):
        raise ValueError(f"{path}: holds a plain {obj.dtype} array of shape {obj.shape}, not a dict keyed by image "
                         "id (a label matrix without ids, as CLIMS caches, cannot be matched to images)")
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a non-empty dict {{image id: multi-hot vector}}, got {type(obj).__name__}")
    keys = list(obj)
    is_int = [isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in keys]
    if all(is_int):
        voc = [int(k) >= _VOC_INT_MIN for k in keys]
        if all(voc):
            fmt, match = "voc-int-npy", matcher.match_voc_int
        elif not any(voc):
            fmt, match = "coco-int-npy", matcher.match_coco_int
        else:
            raise ValueError(f"{path}: int keys mix VOC-style ids (>= {_VOC_INT_MIN}) and COCO ids")
    elif all(isinstance(k, str) for k in keys):
        fmt = "jpg-npy" if any(strip_image_suffix(k) != k for k in keys) else "str-npy"
        match = matcher.match_name
    else:
        kinds = sorted({type(k).__name__ for k in keys})
        raise ValueError(f"{path}: keys must all be ints or all strings, got {kinds}")
    out: dict[str, tuple[int, ...]] = {}
    source: dict[str, Any] = {}
    unmatched: list[str] = []
    for k in keys:
        image_id = match(k)
        if image_id is None:
            unmatched.append(str(k))
            continue
        if image_id in out:
            raise ValueError(f"{path}: keys {source[image_id]!r} and {k!r} both name image {image_id!r}")
        out[image_id] = _multi_hot(obj[k], str(path), str(k), num_classes)
        source[image_id] = k
    return ImageLabels(str(path), fmt, out, len(keys), len(unmatched), tuple(unmatched[:5]))


def _read_xml_folder(folder: storage.AnyPath, class_names: list[str], ids: Iterable[str],
                     include_difficult: bool) -> ImageLabels:
    index = {name: c for c, name in enumerate(class_names) if c > 0}
    listing = storage.list_files(folder)
    out: dict[str, tuple[int, ...]] = {}
    for image_id in sorted(set(ids)):
        name = f"{image_id}.xml"
        if name not in listing:
            continue
        path = folder / name
        try:
            root = ET.fromstring(path.read_bytes())
        except ET.ParseError as e:
            raise ValueError(f"{path}: not valid XML ({e})") from None
        classes: set[int] = set()
        for obj in root.findall("object"):  # object/name only: part names (head, hand, …) are not classes
            cls_name = (obj.findtext("name") or "").strip()
            if (obj.findtext("difficult") or "0").strip() == "1" and not include_difficult:
                continue
            if cls_name not in index:
                raise ValueError(f"{path}: object class {cls_name!r} is not a class of the dataset")
            classes.add(index[cls_name])
        out[image_id] = tuple(sorted(classes))
    return ImageLabels(str(folder), "voc-xml" if include_difficult else "voc-xml-nodifficult", out, len(out))


def read_image_labels(
    path: PathLike,
    *,
    class_names: list[str],
    known_ids: Collection[str],
    include_difficult: bool = True,
) -> ImageLabels:
    """Read image-level labels from ``path`` in any format of the module docstring.

    Args:
        path: a ``.json`` or ``.npy`` file, or a folder of VOC ``{id}.xml`` (or holding ``Annotations/``).
        class_names: the dataset's class names, background first (C = ``len(class_names) - 1``).
        known_ids: every image id of the dataset's splits; file keys are matched onto them.
        include_difficult: VOC XML only: count objects marked ``difficult``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown file type, malformed content, a class id outside 1..C, a vector of the
            wrong length, an unknown class name, or (json) an id in no split; the message names the
            file and the key.
    """
    p = storage.upath(path)
    num_classes = len(class_names) - 1
    matcher = IdMatcher(known_ids)
    if p.is_dir():
        folder = p / "Annotations" if (p / "Annotations").is_dir() else p
        return _read_xml_folder(folder, class_names, known_ids, include_difficult)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: image-label file does not exist")
    if p.suffix.lower() == ".json":
        return _read_json(p, num_classes, matcher)
    if p.suffix.lower() == ".npy":
        return _read_npy(p, num_classes, matcher)
    raise ValueError(f"{p}: unknown image-label file type (expected .json, .npy or a folder of VOC .xml)")


__all__ = ["FORMATS", "ImageLabels", "read_image_labels"]
