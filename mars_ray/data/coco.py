"""COCO 2014 for WSSS: class names and a converter into the VOC-style layout.

The common WSSS COCO layout (as used by IRN/RIB/MARS code bases)::

    src/train2014/COCO_train2014_000000000009.jpg ...
    src/val2014/COCO_val2014_000000000042.jpg ...
    src/SegmentationClass/train2014/{id}.png    class-index GT (0..80, 255)
    src/SegmentationClass/val2014/{id}.png      (a flat src/SegmentationClass/{id}.png also works)

The layouts of the WSSS repositories are converted too, with separate ``images`` and ``gt`` folders
(each holding ``train2014/``/``val2014/`` or flat) and the GT name pattern they use:

* ToCo ``SegmentationClass/train2014/COCO_train2014_000000000009.png`` (``datasets/coco.py``):
  pattern ``coco`` = ``COCO_{split}2014_{012d}``;
* AMN ``coco_seg_anno/000000000009.png`` (``step/eval_sem_seg_coco.py``, ``coco14/dataloader.py``
  ``decode_int_filename``): pattern ``012d``; AMN's images lie in ``JPEGImages/train2014/``;
* CLIMS / BECO ``mask/train2014/9.png`` (``mscoco/annToMask.py``: ``str(imgId) + '.png'``): pattern ``int``.

``auto`` tries the image's own name, then ``012d``, then ``int``. GT written by coco2voc
(``class_labels/{id}.png``) holds raw COCO category ids 1..90; ``category_ids="auto"`` scans the GT
and, when a value lies in 81..254, maps the 91-id space onto the 80 contiguous classes (the
``category_map`` of CLIMS/BECO), writing new PNGs instead of links. ``rename_labels`` renames a
pseudo-label folder written under another naming (``000000000009.png``, ``9.png``) to the
dataset's ids, with the same remap.

``convert_coco`` writes ``dst/JPEGImages``, ``dst/SegmentationClass`` (symlinks, or copies with
``link=False``), ``dst/ImageSets/Segmentation/{train,val}.txt`` and ``dst/classes.txt``, and returns
the ``VOCDataset``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from mars_ray.data.label_io import read_label, write_label
from mars_ray.data.naming import IdMatcher, coco_number
from mars_ray.data.voc import VOCDataset
from mars_ray.labels import IGNORE

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

COCO_CLASSES: list[str] = [
    "background",
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip

_SPLITS = {"train": "train2014", "val": "val2014"}

#: The 80 COCO category ids in class order (1..90 with gaps); index + 1 is the contiguous class id.
COCO91_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip
GT_PATTERNS: tuple[str, ...] = ("auto", "coco", "012d", "int")
CATEGORY_IDS: tuple[str, ...] = ("auto", "contiguous", "coco91")


def remap_coco91(label: np.ndarray, path: str = "<label>") -> np.ndarray:
    """Raw COCO category ids (1..90, 0 background, 255 ignore) → contiguous class ids 1..80.

    Raises ``ValueError`` naming ``path`` for a value that is no COCO category id.
    """
    lut = np.full(256, -1, np.int16)
    lut[0], lut[IGNORE] = 0, IGNORE
    lut[list(COCO91_IDS)] = np.arange(1, 81)
    out = lut[label]
    if (out < 0).any():
        bad = sorted(set(label[out < 0].tolist()))
        raise ValueError(f"{path}: values {bad[:10]} are no COCO category id (1..90 without 12, 26, 29, 30, 45, 66, "
                         "68, 69, 71, 83)")
    return out.astype(np.uint8)


def gt_names(stem: str, split: str, pattern: str) -> list[str]:
    """GT file names to look for, for image ``stem`` of ``split`` under ``pattern`` (see the module docstring)."""
    n = coco_number(stem)
    if pattern not in GT_PATTERNS:
        raise ValueError(f"unknown GT name pattern {pattern!r}; known: {', '.join(GT_PATTERNS)}")
    if n is None:
        return [f"{stem}.png"] if pattern == "auto" else []
    named = {"coco": f"COCO_{_SPLITS.get(split, split + '2014')}_{n:012d}.png", "012d": f"{n:012d}.png",
             "int": f"{n}.png"}
    if pattern != "auto":
        return [named[pattern]]
    return list(dict.fromkeys([f"{stem}.png", named["coco"], named["012d"], named["int"]]))


def _place(src: Path, dst: Path, link: bool) -> None:
    """Symlink (absolute target) or copy ``src`` to ``dst``, replacing a stale entry."""
    if dst.is_symlink() or dst.exists():
        if link and dst.is_symlink() and Path(os.readlink(dst)) == src:
            return
        dst.unlink()
    if link:
        dst.symlink_to(src)
    else:
        shutil.copy2(src, dst)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _split_dir(root: Path, sub: str) -> Path:
    """``root/train2014`` when it exists, else ``root`` (a flat folder)."""
    return root / sub if (root / sub).is_dir() else root


def _needs_remap(paths: Sequence[Path], category_ids: str) -> bool:
    """Whether the GT holds raw COCO category ids (``coco91``): given, or (``auto``) any value in 81..254."""
    if category_ids not in CATEGORY_IDS:
        raise ValueError(f"unknown category ids {category_ids!r}; known: {', '.join(CATEGORY_IDS)}")
    if category_ids != "auto":
        return category_ids == "coco91"
    for p in paths:
        label = read_label(p)
        if ((label > 80) & (label < 254)).any():
            logger.info("%s holds values above 80: raw COCO category ids (coco2voc); remapping to 1..80", p)
            return True
    return False


def _put_label(src: Path, dst: Path, *, link: bool, remap: bool) -> None:
    if remap:
        if dst.is_symlink():
            dst.unlink()
        write_label(dst, remap_coco91(read_label(src), str(src)))
    else:
        _place(src, dst, link)


def convert_coco(
    src: Optional[PathLike],
    dst: PathLike,
    *,
    images: Optional[PathLike] = None,
    gt: Optional[PathLike] = None,
    gt_pattern: str = "auto",
    category_ids: str = "auto",
    splits: Sequence[str] = ("train", "val"),
    link: bool = True,
) -> VOCDataset:
    """Convert a WSSS COCO 2014 layout into a VOC-style dataset at ``dst``.

    ``src`` holds ``train2014/``, ``val2014/`` and ``SegmentationClass/``; ``images`` and ``gt``
    override those two (each with ``{split}2014/`` subfolders or flat). Each split lists the images
    that have a GT PNG (found by ``gt_pattern``), sorted by id; the GT is stored under the image's
    id. Images without GT are skipped with a warning count. Raw COCO category ids are remapped to
    1..80 (see the module docstring). Raises ``FileNotFoundError`` naming a missing image or GT
    folder, ``ValueError`` when a split ends up empty, for an unknown pattern or bad category ids.
    Re-running over an existing ``dst`` refreshes it.
    """
    if src is None and (images is None or gt is None):
        raise ValueError("convert-coco needs SRC, or both --images and --gt")
    s = Path(src).absolute() if src is not None else None
    if s is not None and not s.is_dir():
        raise FileNotFoundError(f"{s}: COCO source folder does not exist")
    img_root = Path(images).absolute() if images is not None else s
    gt_root = Path(gt).absolute() if gt is not None else s / "SegmentationClass"  # type: ignore[operator]
    if not gt_root.is_dir():
        raise FileNotFoundError(f"{gt_root}: COCO ground-truth folder (SegmentationClass) does not exist")
    if not img_root.is_dir():  # type: ignore[union-attr]
        raise FileNotFoundError(f"{img_root}: COCO image folder does not exist")
    for split in splits:
        if split not in _SPLITS:
            raise ValueError(f"unknown COCO split {split!r}; known: {', '.join(_SPLITS)}")
        if not (img_root / _SPLITS[split]).is_dir():  # type: ignore[operator]
            raise FileNotFoundError(f"{img_root / _SPLITS[split]}: COCO image folder does not exist")  # type: ignore[operator]

    d = Path(dst)
    img_out, gt_out = d / "JPEGImages", d / "SegmentationClass"
    split_out = d / "ImageSets" / "Segmentation"
    for p in (img_out, gt_out, split_out):
        p.mkdir(parents=True, exist_ok=True)

    found: dict[str, list[tuple[Path, Path]]] = {}
    for split in splits:
        sub = _SPLITS[split]
        gt_dir, img_dir = _split_dir(gt_root, sub), img_root / sub  # type: ignore[operator]
        listing = {p.name for p in gt_dir.iterdir()}
        images_ = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        pairs: list[tuple[Path, Path]] = []
        for img in images_:
            name = next((n for n in gt_names(img.stem, split, gt_pattern) if n in listing), None)
            if name is not None:
                pairs.append((img, gt_dir / name))
        if len(pairs) < len(images_):
            logger.warning("%s: %d of %d images have no GT in %s (pattern %s); skipped",
                           img_dir, len(images_) - len(pairs), len(images_), gt_dir, gt_pattern)
        if not pairs:
            raise ValueError(f"{img_dir}: no image of split {split!r} has a GT PNG in {gt_dir} (pattern {gt_pattern})")
        found[split] = pairs

    remap = _needs_remap([g for pairs in found.values() for _, g in pairs], category_ids)
    for split, pairs in found.items():
        for img, gt_path in pairs:
            _place(img, img_out / img.name, link)
            _put_label(gt_path, gt_out / f"{img.stem}.png", link=link, remap=remap)
        _write_text_atomic(split_out / f"{split}.txt", "\n".join(img.stem for img, _ in pairs) + "\n")
        logger.info("COCO %s: %d images%s", split, len(pairs), " (category ids remapped 91 → 80)" if remap else "")

    _write_text_atomic(d / "classes.txt", "\n".join(COCO_CLASSES) + "\n")
    return VOCDataset(d)


def rename_labels(src: PathLike, dst: PathLike, *, root: PathLike, category_ids: str = "auto",
                  link: bool = True) -> int:
    """A label folder named another way (``000000000009.png``, ``9.png``, …) → ``dst/{dataset id}.png``.

    Names are matched onto the ids of every split of the dataset at ``root`` (``naming.IdMatcher``);
    raw COCO category ids are remapped as in :func:`convert_coco`. Returns the number of labels.
    Raises ``ValueError`` naming the first files that match no image, or two files naming one image.
    """
    ds = VOCDataset(root)
    s, d = Path(src).absolute(), Path(dst)
    if not s.is_dir():
        raise FileNotFoundError(f"{s}: label folder does not exist")
    matcher = IdMatcher(ds.known_ids())
    pngs = sorted(p for p in s.iterdir() if p.suffix.lower() == ".png")
    if not pngs:
        raise ValueError(f"{s}: no .png labels")
    target: dict[str, Path] = {}
    unknown: list[str] = []
    for p in pngs:
        i = matcher.match_name(p.stem)
        if i is None:
            unknown.append(p.name)
        elif i in target:
            raise ValueError(f"{s}: {target[i].name} and {p.name} both name image {i!r}")
        else:
            target[i] = p
    if unknown:
        raise ValueError(f"{s}: {len(unknown)} labels name no image of {ds.root}: {unknown[:5]}")
    remap = _needs_remap(list(target.values()), category_ids)
    d.mkdir(parents=True, exist_ok=True)
    for i, p in target.items():
        _put_label(p, d / f"{i}.png", link=link, remap=remap)
    logger.info("renamed %d labels %s → %s%s", len(target), s, d, " (category ids remapped 91 → 80)" if remap else "")
    return len(target)


__all__ = ["COCO91_IDS", "COCO_CLASSES", "convert_coco", "gt_names", "remap_coco91", "rename_labels"]
