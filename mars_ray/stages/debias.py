"""Stage ``debias``: debiased labels Y^db (Eq 4–5) as PNGs, one per image id.

Ray Data shards the ids over an actor pool; each actor loads V^c and its feature source once. Per
image: M = ReLU(max over the image's classes of cos(F, V^c)) (Eq 4), dense-CRF refinement and
binarisation, then foreground pixels of Y^b with M = 0 become BIASED (254) (Eq 5). PNGs are written
by the actors themselves with deterministic names (temp + rename locally, one upload on an object
store), so a retried task overwrites cleanly and a resumed run skips the ids already written (each
actor lists the folder once). Output: ``RUN/debias/{id}.png`` and ``RUN/debias/stats.json``
(foreground / biased pixel counts). ``RUN``, the dataset and the pseudo labels may be local or
object-store URIs (``mars_ray.storage``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mars_ray import config as C
from mars_ray import storage
from mars_ray.algo.debias import activation_map, binarize_activation, debias_label
from mars_ray.artifacts import StageDir, atomic_write_json, load_npy, require_complete
from mars_ray.data.label_io import read_image, read_label, write_label
from mars_ray.data.validate import check_label
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource
from mars_ray.labels import MAX_CLASSES
from mars_ray.stages import inputs
from mars_ray.stages.runtime import ensure_ray, map_images
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)


def debias_one(
    image: np.ndarray,
    pseudo: np.ndarray,
    feats: np.ndarray,
    centroids: np.ndarray,
    present: np.ndarray,
    *,
    threshold: float,
    crf: dict[str, float] | None,
) -> np.ndarray:
    """Y^b ``[H, W]`` uint8 + F ``[d, H, W]`` + V ``[C+1, d]`` → Y^db ``[H, W]`` uint8 (Eq 4–5).

    The image's classes are those in its pseudo label; a class without a debiased centroid
    (never seen in the split the centroids came from) cannot be judged and is kept as it is.
    """
    classes = [int(c) for c in np.unique(pseudo) if 1 <= c <= MAX_CLASSES]
    known = [c for c in classes if c < len(present) and present[c]]
    activation = activation_map(feats, centroids[known])
    keep = binarize_activation(activation, threshold=threshold, image=image, crf=crf)
    unknown = [c for c in classes if c not in known]
    if unknown:
        keep |= np.isin(pseudo, unknown)
    return debias_label(pseudo, keep)


class DebiasImages:
    """Ray Data callable: a batch of image ids → Y^db PNGs written; returns per-image pixel counts."""

    def __init__(
        self,
        *,
        root: str,
        pseudo_dir: str,
        out_dir: str,
        select_dir: str,
        source_kwargs: dict[str, Any],
        threshold: float,
        crf: dict[str, float] | None,
        skip_existing: bool,
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.dataset = VOCDataset(root)
        self.pseudo_dir = upath(pseudo_dir)
        self.out_dir = upath(out_dir)
        select = upath(select_dir)
        self.centroids = load_npy(select / "centroids.npy")
        self.present = load_npy(select / "present.npy")
        self.source = FeatureSource(**source_kwargs)
        self.threshold = threshold
        self.crf = crf
        self.skip_existing = skip_existing
        # resuming: the labels written before this run, from one listing (not a request per id)
        self.written: frozenset[str] = frozenset(storage.list_files(self.out_dir)) if skip_existing else frozenset()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        fg, biased = zip(*(self._one(i) for i in ids)) if ids else ((), ())
        return {"image_id": np.array(ids), "n_fg": np.array(fg, np.int64), "n_biased": np.array(biased, np.int64)}

    def _one(self, image_id: str) -> tuple[int, int]:
        out = self.out_dir / f"{image_id}.png"
        label_path = self.pseudo_dir / f"{image_id}.png"
        pseudo = read_label(label_path)
        if self.skip_existing and out.name in self.written:
            debiased = read_label(out)
        else:
            image = read_image(self.dataset.image_path(image_id))
            check_label(pseudo, num_classes=self.dataset.num_classes, image_hw=image.shape[:2], path=label_path)
            feats = self.source(image_id, image)
            if feats.shape[0] != self.centroids.shape[1]:
                raise ValueError(
                    f"features of {image_id} have d={feats.shape[0]} but the selected centroids d={self.centroids.shape[1]}"
                )
            debiased = debias_one(
                image, pseudo, feats, self.centroids, self.present, threshold=self.threshold, crf=self.crf
            )
            write_label(out, debiased)
        is_fg = (pseudo >= 1) & (pseudo <= MAX_CLASSES)
        return int(is_fg.sum()), int((is_fg & (debiased == 254)).sum())


def stage_dir(cfg: C.Config, run_dir: AnyPath) -> StageDir:
    """``RUN/debias`` and its key: the debias slice + the keys of the finished select and features
    artifacts (the features key already fingerprints Y^b and F)."""
    upstream = require_complete(run_dir / "select", "select")
    feats = require_complete(run_dir / "features", "features")
    d = cfg.debias
    slice_ = {
        "debias": {k: v for k, v in C.to_dict(d).items() if k not in {"num_actors", "cpus_per_actor", "batch_size"}},
        "split": cfg.data.split,
    }
    inputs = {"select": upstream["key"], "features": feats["key"]}
    return StageDir(run_dir / "debias", "debias", C.slice_hash(slice_, inputs), slice_, inputs)


def run(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Write ``RUN/debias/{id}.png`` for every id of the split; returns the folder.

    Needs finished ``features`` and ``select`` artifacts (``FileNotFoundError`` naming the stage to
    run); their inputs are not checked again: each label is checked as its actor reads it.
    """
    sd = stage_dir(cfg, run_dir)
    dataset = VOCDataset(cfg.data.root)
    if sd.is_complete():
        logger.info("debias: up to date in %s, skipping", sd.path)
        return sd.path
    with sd.guard() as resuming:
        ensure_ray(cfg.ray)
        ids = dataset.ids(cfg.data.split)
        d = cfg.debias
        ds = map_images(
            ids,
            DebiasImages,
            dict(
                root=storage.absolute(dataset.root),
                pseudo_dir=storage.absolute(inputs.pseudo_label_dir(cfg, run_dir)),
                out_dir=storage.absolute(sd.path),
                select_dir=storage.absolute(run_dir / "select"),
                source_kwargs=inputs.feature_source_kwargs(cfg, run_dir, absolute=True),
                threshold=d.threshold,
                crf=d.crf_kwargs(),
                skip_existing=resuming,
                threads=max(1, int(d.cpus_per_actor)),
            ),
            num_actors=d.num_actors,
            cpus_per_actor=d.cpus_per_actor,
            batch_size=d.batch_size,
        )
        n_images = n_fg = n_biased = 0
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            n_images += len(batch["image_id"])
            n_fg += int(batch["n_fg"].sum())
            n_biased += int(batch["n_biased"].sum())
        stats = {
            "images": n_images,
            "foreground_pixels": n_fg,
            "biased_pixels": n_biased,
            "biased_fraction": n_biased / n_fg if n_fg else 0.0,
            "resumed": resuming,
        }
        atomic_write_json(sd.path / "stats.json", stats)
        sd.finish(stats)
    logger.info("debias: %d images, %.1f%% of pseudo-label foreground marked biased", n_images, 100 * stats["biased_fraction"])
    return sd.path
