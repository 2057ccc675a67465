"""COCO 2014 for WSSS: class names and a converter into the VOC-style layout.

The common WSSS COCO layout (as used by IRN/RIB/MARS code bases)::

    src/train2014/COCO_train2014_000000000009.jpg ...
    src/val2014/COCO_val2014_000000000042.jpg ...
    src/SegmentationClass/train2014/{id}.png    class-index GT (0..80, 255)
    src/SegmentationClass/val2014/{id}.png      (a flat src/SegmentationClass/{id}.png also works)

``convert_coco`` turns it into ``dst/JPEGImages``, ``dst/SegmentationClass`` (symlinks, or
copies with ``link=False``), ``dst/ImageSets/Segmentation/{train,val}.txt`` and
``dst/classes.txt``, and returns the ``VOCDataset``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Union

from mars_ray.data.voc import VOCDataset

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


def convert_coco(src: PathLike, dst: PathLike, *, link: bool = True) -> VOCDataset:
    """Convert the WSSS COCO 2014 layout at ``src`` into a VOC-style dataset at ``dst``.

    Each split (``train`` from ``train2014``, ``val`` from ``val2014``) lists the images that
    have a GT PNG, sorted by id. GT is looked up in ``SegmentationClass/{train2014,val2014}/``
    then in a flat ``SegmentationClass/``. Images without GT are skipped with a warning count.
    Raises ``FileNotFoundError`` naming a missing image or GT folder, ``ValueError`` when a
    split ends up empty. Re-running over an existing ``dst`` refreshes it.
    """
    s, d = Path(src).absolute(), Path(dst)
    if not s.is_dir():
        raise FileNotFoundError(f"{s}: COCO source folder does not exist")
    gt_root = s / "SegmentationClass"
    if not gt_root.is_dir():
        raise FileNotFoundError(f"{gt_root}: COCO ground-truth folder (SegmentationClass) does not exist")
    for sub in _SPLITS.values():
        if not (s / sub).is_dir():
            raise FileNotFoundError(f"{s / sub}: COCO image folder does not exist")

    img_out, gt_out = d / "JPEGImages", d / "SegmentationClass"
    split_out = d / "ImageSets" / "Segmentation"
    for p in (img_out, gt_out, split_out):
        p.mkdir(parents=True, exist_ok=True)

    for split, sub in _SPLITS.items():
        gt_dir = gt_root / sub if (gt_root / sub).is_dir() else gt_root
        images = sorted(p for p in (s / sub).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        ids: list[str] = []
        no_gt = 0
        for img in images:
            gt = gt_dir / f"{img.stem}.png"
            if not gt.is_file():
                no_gt += 1
                continue
            _place(img, img_out / img.name, link)
            _place(gt, gt_out / gt.name, link)
            ids.append(img.stem)
        if no_gt:
            logger.warning("%s: %d of %d images have no GT in %s; skipped",
                           s / sub, no_gt, len(images), gt_dir)
        if not ids:
            raise ValueError(f"{s / sub}: no image of split {split!r} has a GT PNG in {gt_dir}")
        _write_text_atomic(split_out / f"{split}.txt", "\n".join(ids) + "\n")
        logger.info("COCO %s: %d images", split, len(ids))

    _write_text_atomic(d / "classes.txt", "\n".join(COCO_CLASSES) + "\n")
    return VOCDataset(d)


__all__ = ["COCO_CLASSES", "convert_coco"]
