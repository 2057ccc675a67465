"""VOC-style dataset folders: the one layout every stage reads.

Layout (``ROOT`` is the dataset folder)::

    ROOT/JPEGImages/{id}.jpg | .jpeg | .png          images (required)
    ROOT/SegmentationClass/{id}.png                  ground truth (optional)
    ROOT/ImageSets/Segmentation/{split}.txt          one id a line
    ROOT/classes.txt                                 optional: class names, background first
    ROOT/image_labels.json                           optional: {id: [class ids 1..C]}

Without ``classes.txt`` the 21 PASCAL VOC names are used. Image-level labels come from the file
given as ``image_labels`` (any format of ``mars_ray.data.image_labels``: ``cls_labels.npy`` of
IRN/AMN/ToCo/MCTformer, VOC ``Annotations/``, …), else from ``image_labels.json`` when present, else
from the classes present in the ground truth.

VOC-aug: ``gt_dir`` names the ground-truth folder (``SegmentationClassAug``; relative to ``ROOT``, or
an absolute path / URI) and ``split_files`` maps a split name to a list file anywhere (``train_aug.txt``
usually lives outside ``ImageSets``). A list file holds one id a line, or the two-path lines of the
DeepLab/SBD lists, ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` (the id is
the image's stem; the GT folder named there is only checked against ``gt_dir``).
``ROOT`` may be a local folder or an object-store URI (``s3://bucket/voc``, see ``mars_ray.storage``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import PurePosixPath
from typing import Any, Mapping, Optional, Union

import numpy as np

from mars_ray import storage
from mars_ray.console import SHOW
from mars_ray.data.image_labels import ImageLabels, read_image_labels
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

    def __init__(
        self,
        root: Union[str, "os.PathLike[str]", storage.ObjectPath],
        *,
        gt_dir: str = "SegmentationClass",
        split_files: Optional[Mapping[str, str]] = None,
        image_labels: str = "",
        image_labels_difficult: bool = True,
    ) -> None:
        self.root = storage.upath(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: dataset folder does not exist")
        self.image_dir = self.root / "JPEGImages"
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{self.image_dir}: dataset has no JPEGImages folder")
        gt = gt_dir or "SegmentationClass"
        self.gt_dir = storage.upath(gt) if storage.is_uri(gt) or os.path.isabs(gt) else self.root / gt
        self.split_dir = self.root / "ImageSets" / "Segmentation"
        self.split_files = {k: storage.upath(v) for k, v in (split_files or {}).items() if v}
        for split, path in self.split_files.items():
            if not path.is_file():
                raise FileNotFoundError(f"{path}: split file for split {split!r} does not exist")
        self.image_labels_path = storage.upath(image_labels) if image_labels else self.root / "image_labels.json"
        self.image_labels_given = bool(image_labels)
        self.image_labels_difficult = image_labels_difficult
        self.classes: list[str] = self._read_classes()
        self._image_labels: Optional[ImageLabels] = None
        self._gt_dir_warned = False
        self._ids_cache: dict[str, list[str]] = {}
        self._listings: dict[str, dict[str, object]] = {}  # object stores only: folder → {name: stat}

    def spec(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this dataset in another process: ``VOCDataset(**ds.spec())``.

        Every path is absolute (a Ray actor's working directory differs from the driver's); what Ray
        actors get instead of the dataset object.
        """
        return {
            "root": storage.absolute(self.root),
            "gt_dir": storage.absolute(self.gt_dir),
            "split_files": {k: storage.absolute(v) for k, v in self.split_files.items()} or None,
            "image_labels": storage.absolute(self.image_labels_path) if self.image_labels_given else "",
            "image_labels_difficult": self.image_labels_difficult,
        }

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
        """Image ids of ``split`` in file order (from ``split_files[split]`` or ``ImageSets/Segmentation``).

        Blank lines and surrounding whitespace are dropped. Raises ``FileNotFoundError`` naming the
        split file if missing, ``ValueError`` if it is empty, lists an id twice or has a malformed line.
        """
        if split in self._ids_cache:
            return list(self._ids_cache[split])
        path = self.split_path(split)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: split file for split {split!r} does not exist")
        ids = self._read_split_file(path)
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

    def split_path(self, split: str) -> storage.AnyPath:
        """The list file of ``split``: the one given in ``split_files``, else ``ImageSets/Segmentation/{split}.txt``."""
        return self.split_files.get(split) or self.split_dir / f"{split}.txt"

    def _read_split_file(self, path: storage.AnyPath) -> list[str]:
        """Ids of a list file: plain ids, or ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` lines."""
        ids = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2 or len(parts) == 2 and not any("/" in q or "." in q for q in parts):
                raise ValueError(f"{path}: line {n} {line.strip()!r}: an image id cannot contain spaces "
                                 "(expected one id, or 'image gt' paths as in train_aug.txt)")
            image_id = PurePosixPath(parts[0]).stem if len(parts) == 2 else parts[0]
            if len(parts) == 2:
                gt = PurePosixPath(parts[1])
                if gt.stem != image_id:
                    raise ValueError(f"{path}: line {n} pairs image {parts[0]!r} with another image's GT {parts[1]!r}")
                if gt.parent.name and gt.parent.name != self.gt_dir.name and not self._gt_dir_warned:
                    logger.warning("%s names GT folder %s, but the dataset reads %s (data.gt_dir)",
                                   path, gt.parent.name, self.gt_dir)
                    self._gt_dir_warned = True
            ids.append(image_id)
        return ids

    def known_ids(self) -> set[str]:
        """Every id of every split file (``ImageSets/Segmentation/*.txt`` and ``split_files``)."""
        paths = list(self.split_files.values())
        if self.split_dir.is_dir():
            paths += [self.split_dir / n for n in sorted(storage.list_files(self.split_dir)) if n.endswith(".txt")]
        return {i for p in paths for i in self._read_split_file(p)}

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
    def _load_image_labels(self) -> Optional[ImageLabels]:
        """The image-label table (read once), or ``None`` when the dataset has none."""
        if self._image_labels is None:
            if not self.image_labels_given and not self.image_labels_path.is_file():
                return None
            self._image_labels = read_image_labels(
                self.image_labels_path, class_names=self.classes, known_ids=self.known_ids(),
                include_difficult=self.image_labels_difficult)
        return self._image_labels

    def image_label_table(self) -> Optional[ImageLabels]:
        """The dataset's own image-level labels (``image_labels`` or ``ROOT/image_labels.json``), read
        once; ``None`` when it has none. Unlike :meth:`image_labels` there is no ground-truth fallback:
        what MARS's Eq 4 and Eq 6 may use (ground truth is not an input of WSSS). Raises what
        ``read_image_labels`` raises (naming the file and the bad id or class)."""
        return self._load_image_labels()

    def image_labels(self, image_id: str) -> list[int]:
        """Sorted foreground class ids (1..C) present in the image.

        From the image-label file when the dataset has one (``image_labels`` or ``image_labels.json``),
        else from the ground truth; raises ``ValueError`` naming the file and the id when neither knows it.
        """
        table = self._load_image_labels()
        if table is not None:
            return list(table.get(image_id))
        gt = self.gt_path(image_id)
        if gt is None:
            raise ValueError(
                f"{self.root}: no image-level labels for {image_id!r} "
                f"(no image_labels.json and no {self.gt_dir.name} PNG)"
            )
        vals = np.unique(read_label(gt))
        return [int(v) for v in vals if 1 <= v <= self.num_classes]

    def check_image_labels(self, split: str) -> str:
        """Log (and return) one line: which image-label format was read and how many ids of ``split`` it has.

        Raises ``ValueError`` naming the file and the first ids of the split that have no entry.
        Without an image-label file the line says the labels come from the ground truth.
        """
        ids = self.ids(split)
        table = self._load_image_labels()
        if table is None:
            line = f"image labels: none given; taken from the ground truth in {self.gt_dir}"
        else:
            line, missing = table.summary(split, ids)
            if missing:
                more = f" … (+{len(missing) - 5} more)" if len(missing) > 5 else ""
                raise ValueError(f"{table.path}: no image-level labels for {len(missing)} of {len(ids)} ids of split "
                                 f"{split!r}: {missing[:5]}{more}")
        logger.info(line, extra=SHOW)  # the terminal shows it: which file was read is worth knowing
        return line

    # -- fingerprint ----------------------------------------------------------------------------
    def fingerprint(self, split: str) -> str:
        """Cheap hex digest of the split's ids, classes, and each image's and GT's size and mtime.

        Changes when an image or label file is replaced, added or removed; reads no pixels.
        """
        h = hashlib.sha256()
        h.update("\n".join(self.classes).encode())
        labels = self.image_labels_path
        if labels.is_file():
            st = labels.stat()
            h.update(f"{labels.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        elif labels.is_dir():  # VOC Annotations/: every XML's size and mtime, from one listing
            folder = labels / "Annotations" if (labels / "Annotations").is_dir() else labels
            h.update(f"{folder}:{self.image_labels_difficult}".encode())
            for name, st in sorted(storage.list_files(folder).items()):
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
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
