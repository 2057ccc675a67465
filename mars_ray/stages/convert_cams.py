"""``mars convert-cams``: a folder of CAM files (IRN/AMN/PSA/MCTformer/ToCo) → pseudo-label PNGs, on Ray Data.

Each ``SRC/{name}.npy`` becomes ``DST/{id}.png`` (0 background, 1..C, 255 ignore band), written by
a Ray Data actor pool (``runtime.map_images``) with ``label_io.write_label`` (temporary file, then
rename: a retried task overwrites cleanly). ``{id}`` is the dataset's image id when ``--data`` is
given (CAM names such as AMN's ``000000000009`` are matched to ``COCO_train2014_000000000009``),
else the CAM file's stem. The conversion itself is ``mars_ray.data.cams``; ``DST/convert_cams.json``
records the settings and counts.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from mars_ray import safe_pickle, storage
from mars_ray.artifacts import atomic_write_json
from mars_ray.config import RayConfig
from mars_ray.data.cams import CRF_KIND, cams_to_label, parse_cams
from mars_ray.data.label_io import label_size, read_image, write_label
from mars_ray.data.naming import IdMatcher
from mars_ray.data.voc import VOCDataset
from mars_ray.labels import IGNORE
from mars_ray.stages.runtime import ensure_ray, map_images
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

REPORT = "convert_cams.json"


class ConvertCams:
    """Ray Data callable: a batch of CAM file stems → label PNGs written; returns per-image pixel counts."""

    def __init__(self, *, src: str, dst: str, names: dict[str, str], fmt: str, bg_threshold: float,
                 fg_threshold: Optional[float], crf: bool, root: str = "", num_classes: int = 0,
                 dataset_kwargs: Optional[dict[str, Any]] = None) -> None:
        self.src, self.dst, self.names = upath(src), upath(dst), names
        self.fmt, self.crf = fmt, CRF_KIND[fmt] if crf else None
        self.kw = {"bg_threshold": bg_threshold, "fg_threshold": fg_threshold}
        self.dataset = VOCDataset(root, **(dataset_kwargs or {})) if root else None
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stems = [str(s) for s in batch["image_id"]]
        counts = np.array([self._one(s) for s in stems], np.int64).reshape(-1, 3)
        return {"image_id": np.array(stems), "fg": counts[:, 0], "ignore": counts[:, 1], "pixels": counts[:, 2]}

    def _one(self, stem: str) -> tuple[int, int, int]:
        path = self.src / f"{stem}.npy"
        with storage.open_read(path) as f:
            cams = parse_cams(safe_pickle.load_npy(f.read(), str(path)), self.fmt, str(path))
        if self.num_classes and any(c > self.num_classes for c in cams.classes):
            raise ValueError(f"{path}: class ids {list(cams.classes)} exceed the dataset's {self.num_classes} classes")
        image, size = None, None
        image_id = self.names[stem]
        if self.dataset is not None:
            image_path = self.dataset.image_path(image_id)
            if self.crf is not None:
                image = read_image(image_path)
                size = image.shape[:2]
            else:
                size = label_size(image_path)
            if cams.scores is not None and tuple(cams.scores.shape[1:]) != tuple(size):
                raise ValueError(f"{path}: CAMs are {tuple(cams.scores.shape[1:])}, image {image_id!r} is {tuple(size)}")
        if cams.scores is None and size is None:
            raise ValueError(f"{path}: holds no maps (an image without classes); pass --data so its size is known")
        label = cams_to_label(cams, crf=self.crf, image=image, size=size, **self.kw)
        write_label(self.dst / f"{image_id}.png", label)
        return int(((label > 0) & (label != IGNORE)).sum()), int((label == IGNORE).sum()), int(label.size)


def plan(src: "str | AnyPath", *, root: str = "", split: str = "",
         dataset_kwargs: Optional[dict[str, Any]] = None) -> dict[str, str]:
    """CAM file stem → output image id. With ``split`` every id of it must have a CAM file.

    Raises ``FileNotFoundError`` for a missing folder, ``ValueError`` for an empty one, a CAM name
    that matches no image (with ``root``), or split ids without a CAM file.
    """
    folder = upath(src)
    stems = sorted(n[:-4] for n in storage.list_files(folder) if n.endswith(".npy"))
    if not stems:
        raise ValueError(f"{folder}: no .npy CAM files")
    if not root:
        if split:
            raise ValueError("--split needs --data (the dataset whose split it is)")
        return {s: s for s in stems}
    ds = VOCDataset(root, **(dataset_kwargs or {}))
    ids = ds.ids(split) if split else sorted(ds.known_ids())
    matcher = IdMatcher(ids)
    names: dict[str, str] = {}
    unknown: list[str] = []
    for s in stems:
        i = matcher.match_name(s)
        if i is None:
            unknown.append(s)
        else:
            names[s] = i
    if split:
        missing = sorted(set(ids) - set(names.values()))
        if missing:
            raise ValueError(f"{folder}: no CAM file for {len(missing)} of {len(ids)} ids of split {split!r}: {missing[:5]}")
        return {s: i for s, i in names.items()}
    if unknown:
        raise ValueError(f"{folder}: {len(unknown)} CAM files name no image of {ds.root}: {unknown[:5]}")
    return names


def convert_cams(
    src: "str | AnyPath",
    dst: "str | AnyPath",
    *,
    fmt: str,
    bg_threshold: float,
    fg_threshold: Optional[float] = None,
    crf: bool = False,
    root: str = "",
    split: str = "",
    dataset_kwargs: Optional[dict[str, Any]] = None,
    ray: RayConfig = RayConfig(),
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Convert every CAM file of ``src`` (or of ``split``) into ``dst/{id}.png``; returns the report dict.

    ``crf`` applies the CRF of the format's repository (``data.cams.CRF_KIND``) and needs ``root``
    for the images. Raises ``ValueError`` for bad settings before any work starts.
    """
    if crf and not root:
        raise ValueError("--crf needs the images: pass --data ROOT")
    if fg_threshold is not None and not fg_threshold > bg_threshold:
        raise ValueError(f"--fg-threshold {fg_threshold} must be above --bg-threshold {bg_threshold}")
    names = plan(src, root=root, split=split, dataset_kwargs=dataset_kwargs)
    num_classes = VOCDataset(root, **(dataset_kwargs or {})).num_classes if root else 0
    out = upath(dst)
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray(ray)
    ds = map_images(
        sorted(names), ConvertCams,
        dict(src=storage.absolute(src), dst=storage.absolute(out), names=names, fmt=fmt,
             bg_threshold=bg_threshold, fg_threshold=fg_threshold, crf=crf,
             root=storage.absolute(root) if root else "", num_classes=num_classes, dataset_kwargs=dataset_kwargs),
        num_actors=num_actors, cpus_per_actor=cpus_per_actor, batch_size=batch_size)
    fg = ignore = pixels = images = 0
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        images += len(batch["image_id"])
        fg, ignore, pixels = fg + int(batch["fg"].sum()), ignore + int(batch["ignore"].sum()), pixels + int(batch["pixels"].sum())
    report = {"src": storage.absolute(src), "format": fmt, "bg_threshold": bg_threshold, "fg_threshold": fg_threshold,
              "crf": CRF_KIND[fmt] if crf else None, "data": storage.absolute(root) if root else None,
              "split": split or None, "images": images, "fg_share": fg / max(pixels, 1),
              "ignore_share": ignore / max(pixels, 1)}
    atomic_write_json(out / REPORT, report)
    logger.info("convert-cams: %d %s CAM files → %s (foreground %.1f%%, ignore band %.1f%%)", images, fmt, out,
                100 * report["fg_share"], 100 * report["ignore_share"])
    return report


__all__ = ["ConvertCams", "REPORT", "convert_cams", "plan"]
