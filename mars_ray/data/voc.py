"""VOC-style dataset folders: the one layout every stage reads.

Layout (``ROOT`` is the dataset folder)::

    ROOT/JPEGImages/{id}.jpg | .jpeg | .png          images (required)
    ROOT/SegmentationClass/{id}.png                  ground truth (optional)
    ROOT/ImageSets/Segmentation/{split}.txt          one id a line
    ROOT/classes.txt                                 optional: class names, background first
    ROOT/image_labels.json                           optional: {id: [class ids 1..C]}

Without ``classes.txt`` the 21 PASCAL VOC names are used. Image-level labels come from
``image_labels.json`` when present, else from the classes present in the ground truth.
``ROOT`` may be a local folder or an object-store URI (``s3://bucket/voc``, see ``mars_ray.storage``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional, Union

import numpy as np

from mars_ray import storage
from mars_ray.data.label_io import read_label
from mars_ray.labels import MAX_CLASSES

logger = logging.getLogger(__name__)

VOC_CLASSES: list[str] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip

IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png")


class VOCDataset:
    """A VOC-style dataset folder (see the module docstring for the layout).

    Raises ``FileNotFoundError`` if ``root`` or ``root/JPEGImages`` is missing, ``ValueError``
    for a malformed ``classes.txt`` or ``image_labels.json``.
    """

    def __init__(self, root: Union[str, "os.PathLike[str]", storage.ObjectPath]) -> None:
        self.root = storage.upath(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: dataset folder does not exist")
        self.image_dir = self.root / "JPEGImages"
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{self.image_dir}: dataset has no JPEGImages folder")
        self.gt_dir = self.root / "SegmentationClass"
        self.split_dir = self.root / "ImageSets" / "Segmentation"
        self.classes: list[str] = self._read_classes()
        self._image_labels: Optional[dict[str, list[int]]] = None
        self._ids_cache: dict[str, list[str]] = {}
        self._listings: dict[str, dict[str, object]] = {}  # object stores only: folder → {name: stat}

    def _listed(self, folder: storage.AnyPath) -> Optional[dict[str, object]]:
        """On an object store, the folder's files (listed once): no request per image. Locally ``None``."""
        if not storage.is_uri(folder):
            return None
        key = str(folder)
        if key not in self._listings:
            self._listings[key] = storage.list_files(folder) if folder.is_dir() else {}
        return self._listings[key]

    def _exists(self, path: storage.AnyPath) -> bool:
        listing = self._listed(path.parent)
        return path.is_file() if listing is None else path.name in listing

    def _stat(self, path: storage.AnyPath) -> object:
        listing = self._listed(path.parent)
        return path.stat() if listing is None else listing[path.name]

    # -- metadata -------------------------------------------------------------------------------
    def _read_classes(self) -> list[str]:
        path = self.root / "classes.txt"
        if not path.is_file():
            return list(VOC_CLASSES)
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(names) < 2:
            raise ValueError(f"{path}: needs background plus at least one class, got {len(names)} names")
        if len(names) - 1 > MAX_CLASSES:
            raise ValueError(f"{path}: {len(names) - 1} foreground classes, at most {MAX_CLASSES} allowed")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{path}: duplicate class names {dup}")
        return names

    @property
    def num_classes(self) -> int:
        """Number of foreground classes C (class ids are 1..C; 0 is background)."""
        return len(self.classes) - 1

    def ids(self, split: str) -> list[str]:
        """Image ids of ``split`` in file order.

        Blank lines and surrounding whitespace are dropped. Raises ``FileNotFoundError`` naming the
        split file if missing, ``ValueError`` if it is empty or lists an id twice.
        """
        if split in self._ids_cache:
            return list(self._ids_cache[split])
        path = self.split_dir / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: split file for split {split!r} does not exist")
        ids = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not ids:
            raise ValueError(f"{path}: split {split!r} lists no image ids")
        seen: set[str] = set()
        dups: list[str] = []
        for i in ids:
            if i in seen:
                dups.append(i)
            seen.add(i)
        if dups:
            raise ValueError(f"{path}: duplicate ids {dups[:5]}{' …' if len(dups) > 5 else ''}")
        self._ids_cache[split] = ids
        return list(ids)

    # -- files ----------------------------------------------------------------------------------
    def image_path(self, image_id: str) -> storage.AnyPath:
        """Path of the image ``{id}.jpg``, ``.jpeg`` or ``.png``; ``FileNotFoundError`` if none exists."""
        for ext in IMAGE_EXTS:
            p = self.image_dir / f"{image_id}{ext}"
            if self._exists(p):
                return p
        tried = ", ".join(image_id + e for e in IMAGE_EXTS)
        raise FileNotFoundError(f"{self.image_dir}: no image for id {image_id!r} (looked for {tried})")

    def gt_path(self, image_id: str) -> Optional[storage.AnyPath]:
        """Path of the ground-truth label PNG, or ``None`` when the dataset has none for this id."""
        p = self.gt_dir / f"{image_id}.png"
        return p if self._exists(p) else None

    def has_gt(self, split: str) -> bool:
        """True when every id of ``split`` has a ground-truth PNG."""
        if not self.gt_dir.is_dir():
            return False
        return all(self.gt_path(i) is not None for i in self.ids(split))

    # -- image-level labels ---------------------------------------------------------------------
    def _load_image_labels(self) -> Optional[dict[str, list[int]]]:
        if self._image_labels is not None:
            return self._image_labels
        path = self.root / "image_labels.json"
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected an object {{id: [class ids]}}, got {type(raw).__name__}")
        out: dict[str, list[int]] = {}
        for k, v in raw.items():
            if not isinstance(v, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in v):
                raise ValueError(f"{path}: labels of {k!r} must be a list of integers, got {v!r}")
            bad = [c for c in v if not 1 <= c <= self.num_classes]
            if bad:
                raise ValueError(f"{path}: {k!r} has class ids {bad} outside 1..{self.num_classes}")
            out[str(k)] = sorted(set(v))
        self._image_labels = out
        return out

    def image_labels(self, image_id: str) -> list[int]:
        """Sorted foreground class ids (1..C) present in the image.

        From ``image_labels.json`` when the dataset has one, else from the ground truth; raises
        ``ValueError`` when neither knows the image.
        """
        table = self._load_image_labels()
        if table is not None:
            if image_id not in table:
                raise ValueError(f"{self.root / 'image_labels.json'}: no entry for image {image_id!r}")
            return list(table[image_id])
        gt = self.gt_path(image_id)
        if gt is None:
            raise ValueError(
                f"{self.root}: no image-level labels for {image_id!r} "
                "(no image_labels.json and no SegmentationClass PNG)"
            )
        vals = np.unique(read_label(gt))
        return [int(v) for v in vals if 1 <= v <= self.num_classes]

    # -- fingerprint ----------------------------------------------------------------------------
    def fingerprint(self, split: str) -> str:
        """Cheap hex digest of the split's ids, classes, and each image's and GT's size and mtime.

        Changes when an image or label file is replaced, added or removed; reads no pixels.
        """
        h = hashlib.sha256()
        h.update("\n".join(self.classes).encode())
        labels_json = self.root / "image_labels.json"
        if labels_json.is_file():
            st = labels_json.stat()
            h.update(f"{labels_json.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        for i in self.ids(split):
            h.update(b"\0" + i.encode())
            for p in (self.image_path(i), self.gt_path(i)):
                if p is None:
                    h.update(b"-")
                    continue
                st = self._stat(p)
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"VOCDataset(root={str(self.root)!r}, num_classes={self.num_classes})"


__all__ = ["IMAGE_EXTS", "VOCDataset", "VOC_CLASSES"]
