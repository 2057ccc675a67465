"""Stage ``features``: USS embeddings F + per-image, per-class K-means → centroid table (Sec 3.2).

Ray Data shards the split's image ids over an actor pool; each actor loads its extractor once,
reads image + pseudo label Y^b, computes F and clusters every region (K_fg per present class, K_bg
on background). Output ``RUN/features/centroids.parquet`` (a Parquet dataset folder), one row a
centroid:

    image_id: string, class_id: int16, is_bg: bool, k: int16, count: int64,
    gt_match: float32 (share of the centroid's pixels whose ground truth is its class; NaN without GT),
    vector: fixed_size_list<float32>[d]

With ``features.cache_dir`` set the artifact is content-addressed: it is computed once into
``CACHE/features-<key>/`` and ``RUN/features`` points at it, so runs that differ only downstream
(e.g. Tune trials differing in α) share one clustering. Local cache and run folder: an exclusive
``fcntl`` lock per key and a symlink ``RUN/features -> CACHE/features-<key>``. When either is an
object-store URI (``mars_ray.storage``): a cluster-wide lease lock (``stages.locks``) and, since
object stores have no symlinks, ``RUN/features/manifest.json`` is a complete copy of the cache's
manifest plus ``"link": "<cache folder>"``. Readers find the table through ``resolve(RUN)``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Union

import numpy as np
import pyarrow as pa
import torch

from mars_ray import config as C
from mars_ray import storage
from mars_ray.algo.clustering import cluster_regions
from mars_ray.artifacts import MANIFEST, StageDir, atomic_write_json, fingerprint_files, fingerprint_path, read_manifest
from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.validate import check_label, check_label_folder
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource, check_feature_folder
from mars_ray.stages.runtime import ensure_ray, map_images
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

TABLE = "centroids.parquet"
LINK = "link"  # manifest field of RUN/features pointing at a cache folder (object stores)

RunDir = Union[str, "os.PathLike[str]", storage.ObjectPath]


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


def feature_source_kwargs(cfg: C.Config, run_dir: RunDir) -> dict[str, Any]:
    """How to build the ``FeatureSource`` for this run (shared by ``features`` and ``debias``)."""
    if cfg.data.features_dir:
        return {"features_dir": cfg.data.features_dir}
    kwargs: dict[str, Any] = {}
    checkpoint = cfg.features.checkpoint
    if not checkpoint and cfg.features.extractor == "stego":
        checkpoint = str(upath(run_dir) / "uss" / "checkpoint.pt")
    if checkpoint:
        kwargs["checkpoint"] = checkpoint
    return {"extractor": cfg.features.extractor, "extractor_kwargs": kwargs}


def feature_source_fingerprint(source_kwargs: dict[str, Any]) -> dict[str, str]:
    """Input fingerprints of the feature source (external folder or extractor checkpoint)."""
    if "features_dir" in source_kwargs:
        folder = upath(source_kwargs["features_dir"])
        if storage.is_uri(folder):  # one listing, not a request a file: the readable files lie directly in it
            names = sorted(n for n in storage.list_files(folder) if not n.startswith("."))
            return {"features_dir": fingerprint_files(folder / n for n in names)}
        return {"features_dir": fingerprint_path(source_kwargs["features_dir"])}
    ckpt = source_kwargs.get("extractor_kwargs", {}).get("checkpoint", "")
    return {"extractor": source_kwargs["extractor"], "checkpoint": fingerprint_path(ckpt) if ckpt else "none"}


def pseudo_label_dir(cfg: C.Config, run_dir: RunDir) -> AnyPath:
    """Y^b folder: ``--pseudo-labels`` or the built-in CAM baseline's ``RUN/wsss`` (local or URI)."""
    return upath(cfg.data.pseudo_labels) if cfg.data.pseudo_labels else upath(run_dir) / "wsss"


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
        self.pseudo_dir = upath(pseudo_dir)
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


def stage_dir(cfg: C.Config, run_dir: RunDir) -> StageDir:
    """The ``features`` artifact folder and its key (config slice + input fingerprints)."""
    run_dir = upath(run_dir)
    dataset = VOCDataset(cfg.data.root)
    ids = dataset.ids(cfg.data.split)
    pseudo = pseudo_label_dir(cfg, run_dir)
    source = feature_source_kwargs(cfg, run_dir)
    slice_ = {
        "data": {"root": storage.absolute(cfg.data.root), "split": cfg.data.split},
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


def validate_inputs(cfg: C.Config, run_dir: RunDir) -> VOCDataset:
    """Everything checkable before any output is touched (``ValueError`` naming the file)."""
    dataset = VOCDataset(cfg.data.root)
    check_label_folder(dataset, cfg.data.split, pseudo_label_dir(cfg, run_dir), name="pseudo label")
    if cfg.data.features_dir:
        check_feature_folder(upath(cfg.data.features_dir), dataset.ids(cfg.data.split))
    return dataset


def run(cfg: C.Config, run_dir: RunDir) -> AnyPath:
    """Compute the centroid table; returns ``RUN/features`` (skipped when already complete).

    With the cache on, ``RUN/features`` may be a link (symlink or link manifest): read the table
    from ``resolve(run_dir)``.
    """
    run_dir = upath(run_dir)
    dataset = validate_inputs(cfg, run_dir)
    sd = stage_dir(cfg, run_dir)
    if cfg.features.cache_dir:
        return _run_cached(cfg, run_dir, dataset, sd)
    if sd.is_complete():
        logger.info("features: up to date in %s, skipping", sd.path)
        return sd.path
    if sd.path.is_symlink():  # a link into a cache from an earlier cached run: compute here instead
        sd.path.unlink()
    # (a link manifest of another key is set aside by ``begin`` and restored if the stage fails)
    _compute(cfg, run_dir, dataset, sd)
    return sd.path


def resolve(run_dir: RunDir) -> AnyPath:
    """The folder that really holds this run's ``features`` artifact (its table and manifest).

    ``RUN/features`` itself, or the cache folder it links to: a local symlink is followed, and a
    link manifest (``"link"`` in ``RUN/features/manifest.json``, written when the cache or the
    run is on an object store) names its target. ``FileNotFoundError`` naming both when the
    target no longer holds the finished artifact the link was made for.
    """
    p = upath(run_dir) / "features"
    if p.is_symlink():
        return p.resolve()
    m = read_manifest(p)
    if not m or not m.get(LINK):
        return p
    target = upath(m[LINK])
    tm = read_manifest(target)
    if not tm or tm.get("status") != "complete" or tm.get("key") != m.get("key"):
        raise FileNotFoundError(
            f"{p / MANIFEST}: links to {target}, which holds no finished features artifact with key "
            f"{m.get('key')} (the cache was cleared?); run `mars features` again"
        )
    return target


def cache_path(cfg: C.Config, run_dir: RunDir) -> AnyPath | None:
    """``CACHE/features-<key>`` for this config and inputs (``None`` when the cache is off)."""
    if not cfg.features.cache_dir:
        return None
    return upath(cfg.features.cache_dir) / f"features-{stage_dir(cfg, run_dir).key}"


def _run_cached(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset, sd: StageDir) -> AnyPath:
    """Content-addressed artifact: compute ``CACHE/features-<key>`` once, link ``RUN/features`` to it.

    A lock per key makes concurrent runs (Tune trials sharing K_bg) wait for the one computing it
    and then find it complete; different keys proceed in parallel. Locally an exclusive ``fcntl``
    lock and a symlink; with the cache or the run on an object store a cluster-wide lease lock
    (``stages.locks.cluster_lock``) and a link manifest. The key is the same as without the cache,
    so select/debias manifests do not see the difference.
    """
    cache = upath(cfg.features.cache_dir)
    target = cache / f"features-{sd.key}"
    csd = StageDir(target, sd.stage, sd.key, sd.config, sd.inputs)
    if not storage.is_uri(cache) and not storage.is_uri(run_dir):
        import fcntl

        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f".features-{sd.key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _compute_once(cfg, run_dir, dataset, csd)
        _link(sd.path, target)
        return sd.path
    from mars_ray.stages.locks import cluster_lock

    ensure_ray(cfg.ray)
    with cluster_lock(f"features:{storage.absolute(target)}"):
        _compute_once(cfg, run_dir, dataset, csd)
    _link_manifest(sd.path, target)
    return sd.path


def _compute_once(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset, csd: StageDir) -> None:
    if csd.is_complete():
        logger.info("features: cached in %s, reusing", csd.path)
    else:
        _compute(cfg, run_dir, dataset, csd)


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


def _link_manifest(link: AnyPath, target: AnyPath) -> None:
    """Make ``link/manifest.json`` the cache's complete manifest plus ``"link": target`` (no symlinks).

    Left as it is when it already links there with the same key (a rerun changes nothing). A
    finished stage folder or an older link is replaced; a folder without a manifest is refused.
    """
    tm = read_manifest(target)
    if not tm or tm.get("status") != "complete":
        raise FileNotFoundError(f"{target}: no finished features artifact to link {link} to")
    where = storage.absolute(target)
    if link.is_symlink():  # a local symlink from an earlier run with a local cache
        link.unlink()
    m = read_manifest(link)
    if m and m.get(LINK) == where and m.get("key") == tm.get("key") and m.get("status") == "complete":
        return
    if link.exists():
        if m is None and any(link.iterdir()):
            raise ValueError(f"{link} exists, is not empty and has no {MANIFEST}: refusing to replace it")
        storage.rmtree(link)
    atomic_write_json(link / MANIFEST, {**tm, LINK: where})


def _compute(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset, sd: StageDir) -> None:
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
        if storage.is_uri(out):
            # No folder renames on an object store (a copy + delete): write in place; the
            # manifest's "running" status marks the table unfinished until ``finish``.
            storage.rmtree(out)
            fs, path = storage.arrow_fs(out)
            ds.write_parquet(path, filesystem=fs)
        else:
            tmp = sd.path / f".{TABLE}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            ds.write_parquet(str(tmp))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        stats = table_stats(out)
        sd.finish({"table": TABLE, **stats})
    logger.info("features: %d centroids (%d fg, %d bg) from %d images", stats["rows"], stats["fg_rows"], stats["bg_rows"], len(ids))


def open_table(path: "str | os.PathLike[str] | storage.ObjectPath") -> Any:
    """The centroid table at ``path`` (local or URI) as a ``pyarrow.dataset.Dataset``."""
    import pyarrow.dataset as pads

    fs, fs_path = storage.arrow_fs(path)
    return pads.dataset(fs_path, filesystem=fs, format="parquet")


def table_stats(path: "str | os.PathLike[str] | storage.ObjectPath") -> dict[str, int]:
    data = open_table(path)
    t = data.to_table(columns=["is_bg"])
    n_bg = int(np.asarray(t.column("is_bg")).sum()) if t.num_rows else 0
    dim = data.schema.field("vector").type.list_size if "vector" in data.schema.names else 0
    return {"rows": t.num_rows, "fg_rows": t.num_rows - n_bg, "bg_rows": n_bg, "dim": dim}
