"""Stage ``features``: USS embeddings F + per-image, per-class K-means → centroid table (Sec 3.2).

Ray Data shards the split's image ids over an actor pool; each actor loads its extractor once,
reads image + pseudo label Y^b, computes F and clusters every region (K_fg per present class, K_bg
on background). Output ``RUN/features/centroids.parquet`` (a Parquet dataset folder), one row a
centroid:

    image_id: string, class_id: int16, is_bg: bool, k: int16, count: int64,
    gt_match: float32 (share of the centroid's pixels whose ground truth is its class; NaN without GT),
    vector: fixed_size_list<float32>[d]

With ``features.cache_dir`` set the artifact is content-addressed: it is computed once into
``CACHE/features-<key>/`` (under an exclusive file lock) and ``RUN/features`` is a symlink to it,
so runs that differ only downstream (e.g. Tune trials differing in α) share one clustering.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mars_ray import config as C
from mars_ray.algo.clustering import cluster_regions
from mars_ray.artifacts import StageDir, fingerprint_files, fingerprint_path, read_manifest
from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.validate import check_label, check_label_folder
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource, check_feature_folder
from mars_ray.stages.runtime import ensure_ray, map_images

logger = logging.getLogger(__name__)

TABLE = "centroids.parquet"


def table_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("class_id", pa.int16()),
            ("is_bg", pa.bool_()),
            ("k", pa.int16()),
            ("count", pa.int64()),
            ("gt_match", pa.float32()),
            ("vector", pa.list_(pa.float32(), dim)),
        ]
    )


def feature_source_kwargs(cfg: C.Config, run_dir: Path) -> dict[str, Any]:
    """How to build the ``FeatureSource`` for this run (shared by ``features`` and ``debias``)."""
    if cfg.data.features_dir:
        return {"features_dir": cfg.data.features_dir}
    kwargs: dict[str, Any] = {}
    checkpoint = cfg.features.checkpoint
    if not checkpoint and cfg.features.extractor == "stego":
        checkpoint = str(run_dir / "uss" / "checkpoint.pt")
    if checkpoint:
        kwargs["checkpoint"] = checkpoint
    return {"extractor": cfg.features.extractor, "extractor_kwargs": kwargs}


def feature_source_fingerprint(source_kwargs: dict[str, Any]) -> dict[str, str]:
    """Input fingerprints of the feature source (external folder or extractor checkpoint)."""
    if "features_dir" in source_kwargs:
        return {"features_dir": fingerprint_path(source_kwargs["features_dir"])}
    ckpt = source_kwargs.get("extractor_kwargs", {}).get("checkpoint", "")
    return {"extractor": source_kwargs["extractor"], "checkpoint": fingerprint_path(ckpt) if ckpt else "none"}


def pseudo_label_dir(cfg: C.Config, run_dir: Path) -> Path:
    """Y^b folder: ``--pseudo-labels`` or the built-in CAM baseline's ``RUN/wsss``."""
    return Path(cfg.data.pseudo_labels) if cfg.data.pseudo_labels else run_dir / "wsss"


def gt_match(assignment: np.ndarray, class_ids: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per centroid row, the share of its pixels whose ground truth equals its class id.

    ``assignment`` ``[h, w]`` row index or -1, ``class_ids`` ``[m]``, ``gt`` ``[h, w]`` → ``[m]`` float32.
    """
    m = len(class_ids)
    a = assignment.reshape(-1)
    valid = a >= 0
    rows = a[valid]
    hits = gt.reshape(-1)[valid] == class_ids[rows]
    total = np.bincount(rows, minlength=m)
    match = np.bincount(rows, weights=hits, minlength=m)
    return (match / np.maximum(total, 1)).astype(np.float32)


class ClusterImages:
    """Ray Data callable: a batch of image ids → centroid rows (``pyarrow.Table``)."""

    def __init__(
        self,
        *,
        root: str,
        pseudo_dir: str,
        source_kwargs: dict[str, Any],
        k_fg: int,
        k_bg: int,
        max_pixels: int,
        iters: int,
        seed: int,
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.dataset = VOCDataset(root)
        self.pseudo_dir = Path(pseudo_dir)
        self.source = FeatureSource(**source_kwargs)
        self.kw = dict(k_fg=k_fg, k_bg=k_bg, max_pixels=max_pixels, iters=iters, seed=seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        tables = [self._one(str(i)) for i in batch["image_id"]]
        return pa.concat_tables(tables) if tables else pa.table({})

    def _one(self, image_id: str) -> pa.Table:
        image = read_image(self.dataset.image_path(image_id))
        label_path = self.pseudo_dir / f"{image_id}.png"
        label = read_label(label_path)
        check_label(label, num_classes=self.dataset.num_classes, image_hw=image.shape[:2], path=label_path)
        n_pixels = label.size
        for key in ("k_fg", "k_bg"):
            if self.kw[key] > n_pixels:
                raise ValueError(
                    f"{label_path}: features.{key}={self.kw[key]} exceeds the image's {n_pixels} pixels"
                )
        feats = self.source(image_id, image)
        rc = cluster_regions(feats, label, **self.kw)
        gt_path = self.dataset.gt_path(image_id)
        if gt_path is not None and len(rc):
            gt = read_label(gt_path)
            match = gt_match(rc.assignment, rc.class_id, gt) if gt.shape == label.shape else None
        else:
            match = None
        m = len(rc)
        d = rc.vector.shape[1]
        return pa.table(
            {
                "image_id": pa.array([image_id] * m, pa.string()),
                "class_id": pa.array(rc.class_id.astype(np.int16)),
                "is_bg": pa.array(rc.is_bg),
                "k": pa.array(rc.k.astype(np.int16)),
                "count": pa.array(rc.count.astype(np.int64)),
                "gt_match": pa.array(match if match is not None else np.full(m, np.nan, np.float32)),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(rc.vector.reshape(-1)), d),
            },
            schema=table_schema(d),
        )


def stage_dir(cfg: C.Config, run_dir: Path) -> StageDir:
    """The ``features`` artifact folder and its key (config slice + input fingerprints)."""
    dataset = VOCDataset(cfg.data.root)
    ids = dataset.ids(cfg.data.split)
    pseudo = pseudo_label_dir(cfg, run_dir)
    source = feature_source_kwargs(cfg, run_dir)
    slice_ = {
        "data": {"root": str(Path(cfg.data.root).resolve()), "split": cfg.data.split},
        "features": {k: v for k, v in C.to_dict(cfg.features).items() if k not in _EXECUTION_KEYS},
        "source": source,
    }
    inputs = {
        "dataset": dataset.fingerprint(cfg.data.split),
        "pseudo_labels": fingerprint_files(pseudo / f"{i}.png" for i in ids),
        **feature_source_fingerprint(source),
    }
    return StageDir(run_dir / "features", "features", C.slice_hash(slice_, inputs), slice_, inputs)


_EXECUTION_KEYS = {"num_actors", "cpus_per_actor", "batch_size", "cache_dir"}  # do not change the result


def validate_inputs(cfg: C.Config, run_dir: Path) -> VOCDataset:
    """Everything checkable before any output is touched (``ValueError`` naming the file)."""
    dataset = VOCDataset(cfg.data.root)
    check_label_folder(dataset, cfg.data.split, pseudo_label_dir(cfg, run_dir), name="pseudo label")
    if cfg.data.features_dir:
        check_feature_folder(Path(cfg.data.features_dir), dataset.ids(cfg.data.split))
    return dataset


def run(cfg: C.Config, run_dir: Path) -> Path:
    """Compute the centroid table; returns ``RUN/features`` (skipped when already complete)."""
    run_dir = Path(run_dir)
    dataset = validate_inputs(cfg, run_dir)
    sd = stage_dir(cfg, run_dir)
    if cfg.features.cache_dir:
        return _run_cached(cfg, run_dir, dataset, sd)
    if sd.is_complete():
        logger.info("features: up to date in %s, skipping", sd.path)
        return sd.path
    if sd.path.is_symlink():  # a link into a cache from an earlier cached run: compute here instead
        sd.path.unlink()
    _compute(cfg, run_dir, dataset, sd)
    return sd.path


def cache_path(cfg: C.Config, run_dir: Path) -> Path | None:
    """``CACHE/features-<key>`` for this config and inputs (``None`` when the cache is off)."""
    if not cfg.features.cache_dir:
        return None
    return Path(cfg.features.cache_dir) / f"features-{stage_dir(cfg, Path(run_dir)).key}"


def _run_cached(cfg: C.Config, run_dir: Path, dataset: VOCDataset, sd: StageDir) -> Path:
    """Content-addressed artifact: compute ``CACHE/features-<key>`` once, link ``RUN/features`` to it.

    An exclusive ``fcntl`` lock per key makes concurrent runs (Tune trials sharing K_bg) wait for
    the one computing it and then find it complete; different keys proceed in parallel. The key
    is the same as without the cache, so select/debias manifests do not see the difference.
    """
    import fcntl

    cache = Path(cfg.features.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"features-{sd.key}"
    with open(cache / f".features-{sd.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        csd = StageDir(target, sd.stage, sd.key, sd.config, sd.inputs)
        if csd.is_complete():
            logger.info("features: cached in %s, reusing", target)
        else:
            _compute(cfg, run_dir, dataset, csd)
    _link(sd.path, target)
    return sd.path


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (replacing an older link or a finished stage folder)."""
    if link.is_symlink() and Path(os.readlink(link)) == target.resolve():
        return
    if link.is_dir() and not link.is_symlink():
        if read_manifest(link) is None and any(link.iterdir()):
            raise ValueError(f"{link} exists, is not empty and has no manifest.json: refusing to replace it")
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve(), target_is_directory=True)
    os.replace(tmp, link)


def _compute(cfg: C.Config, run_dir: Path, dataset: VOCDataset, sd: StageDir) -> None:
    """Cluster every image of the split into ``sd.path`` (Ray Data actor pool) and finish the manifest."""
    with sd.guard():
        ensure_ray(cfg.ray)
        ids = dataset.ids(cfg.data.split)
        fc = cfg.features
        ds = map_images(
            ids,
            ClusterImages,
            dict(
                root=str(dataset.root),
                pseudo_dir=str(pseudo_label_dir(cfg, run_dir)),
                source_kwargs=feature_source_kwargs(cfg, run_dir),
                k_fg=fc.k_fg,
                k_bg=fc.k_bg,
                max_pixels=fc.max_pixels,
                iters=fc.kmeans_iters,
                seed=fc.seed,
                threads=max(1, int(fc.cpus_per_actor)),
            ),
            num_actors=fc.num_actors,
            cpus_per_actor=fc.cpus_per_actor,
            batch_size=fc.batch_size,
        )
        out = sd.path / TABLE
        tmp = sd.path / f".{TABLE}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ds.write_parquet(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        stats = table_stats(out)
        sd.finish({"table": TABLE, **stats})
    logger.info("features: %d centroids (%d fg, %d bg) from %d images", stats["rows"], stats["fg_rows"], stats["bg_rows"], len(ids))


def table_stats(path: Path) -> dict[str, int]:
    import pyarrow.dataset as pads

    data = pads.dataset(str(path), format="parquet")
    t = data.to_table(columns=["is_bg"])
    n_bg = int(np.asarray(t.column("is_bg")).sum()) if t.num_rows else 0
    dim = data.schema.field("vector").type.list_size if "vector" in data.schema.names else 0
    return {"rows": t.num_rows, "fg_rows": t.num_rows - n_bg, "bg_rows": n_bg, "dim": dim}
