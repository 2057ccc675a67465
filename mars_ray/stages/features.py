"""Stage ``features``: USS embeddings F + per-image, per-class K-means → centroid table (Sec 3.2).

Ray Data shards the split's image ids over an actor pool; each actor loads its extractor once,
reads image + pseudo label Y^b, computes F and clusters every region (K_fg per present class, K_bg
on background). Output ``RUN/features/centroids.parquet`` (a Parquet dataset folder), one row a
centroid:

    image_id: string, class_id: int16, is_bg: bool, k: int16, count: int64,
    gt_match: float32 (share of the centroid's pixels whose ground truth is its class; NaN without GT),
    gt_iou: float32 (IoU of the centroid's pixels with its class's ground truth in the image, as the
        paper's target-centroid ratio counts them: target > 0.3, biased < 0.1; NaN without GT),
    vector: fixed_size_list<float32>[d]

Tables written before ``gt_iou`` existed lack that column; ``select`` reads them as NaN.

With the ``adaptive`` extractor (the default) and no ``features.checkpoint``, the stage first fits
the extractor's statistics on the split (``fit_sample``: up to 256 ids, chosen by ``features.seed``)
in a one-thread Ray task and stores them in the artifact as ``RUN/features/uss_stats.npz``; their
content hash (``AdaptiveStats.digest``) is part of the stage key and of the manifest
(``uss_stats_digest``), and ``debias`` loads the same file (``inputs.feature_source_kwargs``), so both
stages compute the same F. A rerun reuses the stored file when what it was fitted on (the split's
fingerprint, the seed, the file format) is unchanged (``uss_fit_key``), so the fit runs once. A split of
fewer than ``MIN_FIT_IMAGES`` images is fitted anyway, with a warning (the documented fallback).

Layout (our choice, for the streaming reader ``select``): files of at least ``ROWS_PER_FILE`` rows
(few files: one open per file and pass, not one per Ray block), background rows first in each file,
in row groups of ``ROW_GROUP_ROWS``; the row groups' ``is_bg`` statistics then let a reader that
filters on ``is_bg`` skip whole row groups, so ``select`` reads background vectors once and
foreground vectors twice instead of every vector three times.

Where Y^b and F come from is ``stages/inputs.py``. With ``features.cache_dir`` set the artifact is
content-addressed and shared between runs (``stages/cache.py``): readers find the table through
``table_path(RUN)``.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import fields
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data import Datasink

from mars_ray import config as C
from mars_ray import faults, storage
from mars_ray.algo.clustering import IMPLEMENTATION as CLUSTERING
from mars_ray.algo.clustering import cluster_regions
from mars_ray.algo.metrics import centroid_gt_iou
from mars_ray.artifacts import StageDir, fingerprint_files, read_manifest
from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.validate import check_label
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource
from mars_ray.stages import cache, inputs
from mars_ray.stages.plan import feature_gpus
from mars_ray.stages.runtime import ensure_ray, map_images
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

TABLE = "centroids.parquet"
USS_STATS = inputs.USS_STATS  # the adaptive extractor's fitted statistics, inside the artifact
ROWS_PER_FILE = 1 << 17  # ≥ 131,072 rows a file: 37 MB at d = 70, 200 MB at d = 384 (a write task holds one)
ROW_GROUP_ROWS = 1 << 14  # 16,384 rows: 4.6 MB of vectors at d = 70, 25 MB at d = 384


def table_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("class_id", pa.int16()),
            ("is_bg", pa.bool_()),
            ("k", pa.int16()),
            ("count", pa.int64()),
            ("gt_match", pa.float32()),
            ("gt_iou", pa.float32()),
            ("vector", pa.list_(pa.float32(), dim)),
        ]
    )


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
        dataset: dict[str, Any],
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
        self.dataset = VOCDataset(**dataset)
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
        match = iou = None
        if gt_path is not None and len(rc):
            gt = read_label(gt_path)
            if gt.shape == label.shape:
                match = gt_match(rc.assignment, rc.class_id, gt)
                iou = centroid_gt_iou(rc.assignment, rc.class_id, gt)
        m = len(rc)
        nan = np.full(m, np.nan, np.float32)
        d = rc.vector.shape[1]
        return pa.table(
            {
                "image_id": pa.array([image_id] * m, pa.string()),
                "class_id": pa.array(rc.class_id.astype(np.int16)),
                "is_bg": pa.array(rc.is_bg),
                "k": pa.array(rc.k.astype(np.int16)),
                "count": pa.array(rc.count.astype(np.int64)),
                "gt_match": pa.array(match if match is not None else nan),
                "gt_iou": pa.array(iou if iou is not None else nan),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(rc.vector.reshape(-1)), d),
            },
            schema=table_schema(d),
        )


def background_first(table: pa.Table) -> pa.Table:
    """``table`` with its background rows first (a stable reorder: each part keeps its order)."""
    is_bg = table.column("is_bg").to_numpy(zero_copy_only=False)
    return table.take(pa.array(np.argsort(~is_bg, kind="stable")))


def write_table_file(table: pa.Table, path: str, filesystem: Any = None) -> None:
    """One Parquet file of the centroid table in the layout above (background first, row groups of
    ``ROW_GROUP_ROWS``); ``path`` local or in ``filesystem`` (pyarrow), written in one piece."""
    pq.write_table(background_first(table), path, filesystem=filesystem, row_group_size=ROW_GROUP_ROWS)


class CentroidTableSink(Datasink):
    """Ray Data sink of the centroid table: one file per write task of >= ``ROWS_PER_FILE`` rows.

    File names carry the write's id and the task index, so a retried task overwrites its own file.
    """

    def __init__(self, path: str, filesystem: Any = None) -> None:
        self.path = path
        self.filesystem = filesystem
        self.write_id = uuid.uuid4().hex[:8]

    def on_write_start(self, schema: Any = None) -> None:
        if self.filesystem is None:
            os.makedirs(self.path, exist_ok=True)
        else:
            self.filesystem.create_dir(self.path, recursive=True)

    def write(self, blocks: Iterable[Any], ctx: Any) -> int:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return 0
        table = pa.concat_tables(tables)
        write_table_file(table, f"{self.path}/part-{self.write_id}-{ctx.task_idx:05d}.parquet", self.filesystem)
        return table.num_rows

    @property
    def min_rows_per_write(self) -> int:
        return ROWS_PER_FILE


def stage_dir(cfg: C.Config, run_dir: AnyPath, stats_digest: str | None = None) -> StageDir:
    """The ``features`` artifact folder and its key (config slice + input fingerprints).

    ``stats_digest``: the content hash of the adaptive statistics this stage fits (``inputs.fits_adaptive_stats``);
    it replaces the stats file's own fingerprint (the file lives inside this artifact), so the key
    changes exactly when the fitted values do. ``None`` where the stage fits nothing; where it does,
    ``None`` reads the digest of the stored fit (``stored_stats``) or, without one, of a fresh fit.
    """
    dataset = inputs.open_dataset(cfg)
    ids = dataset.ids(cfg.data.split)
    pseudo = inputs.pseudo_label_dir(cfg, run_dir)
    fitted = inputs.fits_adaptive_stats(cfg)
    if fitted and stats_digest is None:
        stats_digest = ensure_stats(cfg, run_dir, dataset, fit=False)[1]
    source = inputs.feature_source_kwargs(cfg, run_dir)
    if fitted:  # its path is this artifact's own file: the digest stands for it
        source = {"extractor": source["extractor"], "extractor_kwargs": {}}
    slice_ = {
        "data": inputs.dataset_key(cfg, [cfg.data.split]),
        "pseudo_labels": storage.absolute(pseudo),
        "features": _features_slice(cfg, fitted),
        "source": source,
        "clustering": CLUSTERING,  # a new K-means gives other centroids: never "up to date" across it
    }
    fingerprints = {
        "dataset": dataset.fingerprint(cfg.data.split),
        "pseudo_labels": fingerprint_files(pseudo / f"{i}.png" for i in ids),
        **({"extractor": source["extractor"], "uss_stats": stats_digest or "none"} if fitted
           else inputs.feature_source_fingerprint(source)),
    }
    return StageDir(run_dir / "features", "features", C.slice_hash(slice_, fingerprints), slice_, fingerprints)


def _features_slice(cfg: C.Config, fitted: bool) -> dict[str, Any]:
    """The ``features`` settings in the stage key: all but the execution knobs, and ``codebook_copies``
    only where the stage fits the adaptive extractor with more than one copy (elsewhere it is not read,
    and at 1 it is left out so that artifacts made before the setting existed keep their keys)."""
    skip = _EXECUTION_KEYS | {"codebook_copies"}  # (not read here: a setting read must be in the key)
    out = {f.name: C.to_dict(getattr(cfg.features, f.name)) for f in fields(cfg.features) if f.name not in skip}
    return {**out, **(inputs.codebook_copies_key(cfg) if fitted else {})}


def fit_key(cfg: C.Config, dataset: VOCDataset) -> str:
    """What a fit depends on: the split (ids, files' sizes and mtimes), the seed, the number of codebook
    copies, the file format. A stored fit with this key is reused instead of fitting again."""
    from mars_ray.models.adaptive import FORMAT, MAX_FIT_IMAGES

    spec = {"data": inputs.dataset_key(cfg, [cfg.data.split]), "seed": cfg.features.seed, "format": FORMAT,
            "max_images": MAX_FIT_IMAGES, **inputs.codebook_copies_key(cfg)}
    return C.slice_hash(spec, {"dataset": dataset.fingerprint(cfg.data.split)})


def median_short_side(ds: VOCDataset, ids: list[str]) -> int:
    """The median short side (px) of the images ``ids`` of ``ds``, from their headers (no pixel decode)."""
    from mars_ray.data.label_io import label_size

    return int(np.median([min(label_size(ds.image_path(i))) for i in ids]))


def fit_split_stats(dataset: dict[str, Any], ids: list[str], seed: int, copies: int | None = None) -> Any:
    """Fit :class:`AdaptiveStats` on ``fit_sample(ids)`` of the dataset in this process (one torch
    thread) and log what :func:`fit_split_stats_task` reports; returns the statistics."""
    return _logged(*fit_split_stats_task(dataset, ids, seed, copies))


def fit_split_stats_remote(dataset: VOCDataset, ids: list[str], seed: int, copies: int | None = None) -> Any:
    """:func:`fit_split_stats` in a one-CPU Ray task; its warnings are logged here, in the driver, so
    they reach the terminal (a worker's log lines go to the run's log file only)."""
    import ray

    task = ray.remote(num_cpus=1)(fit_split_stats_task)
    return _logged(*ray.get(task.remote(dataset.spec(), ids, seed, copies)))


def _logged(stats: Any, warnings: list[str]) -> Any:
    """``stats``, once each of the fit's ``warnings`` is logged (in the calling process)."""
    for w in warnings:
        logger.warning("%s", w)
    return stats


def fit_split_stats_task(dataset: dict[str, Any], ids: list[str], seed: int,
                         copies: int | None = None) -> tuple[Any, list[str]]:
    """Ray task body: ``(AdaptiveStats, warnings)`` fitted on ``fit_sample(ids)`` of the dataset
    (``copies``: ``features.codebook_copies``; None: the extractor's default).

    The Gabor wavelengths follow the median short side of the fitted images (header sizes). A split
    of fewer than ``MIN_FIT_IMAGES`` images is fitted anyway, with a warning; so is one whose images
    mix greyscale and colour (where a class differs from its context by colour, its targets are
    removed in the grey images). ``ValueError`` for an empty split or images without any variation.
    """
    from mars_ray.models.adaptive import CODEBOOK_COPIES, MIN_FIT_IMAGES, fit_adaptive_stats, fit_sample

    torch.set_num_threads(1)
    ds = VOCDataset(**dataset)
    chosen = fit_sample(ids, seed=seed)
    if not chosen:
        raise ValueError(f"{ds.root}: split has no images to fit the adaptive extractor on")
    warnings = []
    if len(chosen) < MIN_FIT_IMAGES:
        warnings.append(
            f"features: the adaptive extractor is fitted on only {len(chosen)} image(s) (fewer than {MIN_FIT_IMAGES}): "
            "its statistics describe these images rather than a dataset; fine when they are the images debiased, "
            "else use a larger split or features.extractor=texture")
    short = median_short_side(ds, chosen)
    grey: list[str] = []

    def images() -> Iterator[np.ndarray]:
        for i in chosen:
            image = read_image(ds.image_path(i))
            if is_greyscale(image):
                grey.append(i)
            yield image

    stats = fit_adaptive_stats(images(), short_side=short, seed=seed, min_images=1,
                               copies=CODEBOOK_COPIES if copies is None else copies)
    if 0 < len(grey) < len(chosen):
        warnings.append(
            f"features: {len(grey)} of the {len(chosen)} images the adaptive extractor was fitted on are greyscale "
            f"(first: {grey[0]}), the others in colour: in those images its colour cue is missing, so where a class "
            "differs from its context by colour, debiasing removes that class's targets there "
            "(benchmarks/variation_bench.py, 'grey'); features that do not depend on colour avoid it "
            "(features.extractor=texture, or --features-dir)")
    return stats, warnings


GREY_TOLERANCE = 2
"""Largest channel difference (8-bit levels) of a pixel of a greyscale image read as RGB: some JPEG
encoders store a grey picture as colour with ±1 rounding in R, G and B."""


def is_greyscale(image: np.ndarray) -> bool:
    """True when R, G and B of the ``uint8 [H, W, 3]`` image agree everywhere within ``GREY_TOLERANCE``."""
    x = np.asarray(image, dtype=np.int16)
    return bool(np.abs(x[..., 0] - x[..., 1]).max(initial=0) <= GREY_TOLERANCE
                and np.abs(x[..., 1] - x[..., 2]).max(initial=0) <= GREY_TOLERANCE)


def stored_stats(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset) -> tuple[AnyPath, str] | None:
    """The stats file of the finished ``features`` artifact and its digest, when it was fitted with
    this run's ``fit_key`` and the file still holds what the manifest recorded; else ``None``."""
    folder = cache.resolve(run_dir) if (run_dir / "features").exists() else run_dir / "features"
    m = read_manifest(folder) or {}
    out = m.get("outputs") or {}
    path = folder / USS_STATS
    if m.get("status") != "complete" or out.get("uss_fit_key") != fit_key(cfg, dataset) or not path.is_file():
        return None
    from mars_ray.models.adaptive import AdaptiveStats

    try:
        digest = AdaptiveStats.load(path).digest
    except ValueError:
        return None
    return (path, digest) if digest == out.get("uss_stats_digest") else None


def stats_cache_path(cfg: C.Config, dataset: VOCDataset) -> AnyPath | None:
    """``CACHE/uss_stats-<fit_key>.npz`` with ``features.cache_dir`` set (else ``None``): one fit per split
    and seed, shared by every run of the cache (Tune trials), so none refits and each knows the digest
    (hence its features key) before the stage runs."""
    cache_dir = inputs.config_path(cfg.features.cache_dir)
    return None if cache_dir is None else cache_dir / f"uss_stats-{fit_key(cfg, dataset)}.npz"


def _cached_stats(cfg: C.Config, dataset: VOCDataset) -> tuple[Any, str] | None:
    path = stats_cache_path(cfg, dataset)
    if path is None or not path.is_file():
        return None
    from mars_ray.models.adaptive import AdaptiveStats

    try:
        stats = AdaptiveStats.load(path)
    except ValueError as e:  # a damaged or foreign file: fit again and replace it
        logger.warning("features: ignoring the cached adaptive statistics (%s)", e)
        return None
    return stats, stats.digest


def ensure_stats(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset, *, fit: bool = True) -> tuple[Any, str | None]:
    """``(stats or None, digest)``: the stored fit when it is current (``stats`` None: nothing to write),
    else the fit in the features cache (``stats_cache_path``), else a fresh fit in a Ray task, which
    the cache then keeps (``fit``; with ``fit=False`` and no fit to reuse → ``(None, None)``)."""
    stored = stored_stats(cfg, run_dir, dataset)
    if stored is not None:
        return None, stored[1]
    cached = _cached_stats(cfg, dataset)
    if cached is not None:
        return cached
    if not fit:
        return None, None
    ensure_ray(cfg.ray)
    stats = fit_split_stats_remote(dataset, dataset.ids(cfg.data.split), cfg.features.seed,
                                   cfg.features.codebook_copies)
    path = stats_cache_path(cfg, dataset)
    if path is not None:  # deterministic content: concurrent writers write the same bytes, atomically
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
    return stats, stats.digest


_EXECUTION_KEYS = {"num_actors", "cpus_per_actor", "gpus_per_actor", "batch_size", "cache_dir"}  # do not change the result


def run(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Compute the centroid table; returns ``RUN/features`` (skipped when already complete).

    With the cache on, ``RUN/features`` may be a link (symlink or link manifest): read the table
    at ``table_path(run_dir)``.
    """
    dataset = inputs.validate_inputs(cfg, run_dir)
    stats, digest = ensure_stats(cfg, run_dir, dataset) if inputs.fits_adaptive_stats(cfg) else (None, None)
    sd = stage_dir(cfg, run_dir, digest)

    def compute(target: StageDir) -> None:
        _compute(cfg, run_dir, dataset, target, stats)

    cache_dir = inputs.config_path(cfg.features.cache_dir)
    if cache_dir is not None:
        return cache.run_cached(sd, cache_dir, compute, ray_cfg=cfg.ray)
    if sd.is_complete():
        logger.info("features: up to date in %s, skipping", sd.path)
        return sd.root
    if sd.root.is_symlink():  # a link into a cache from an earlier cached run: compute here instead
        sd.root.unlink()
    # (a link manifest of another key is set aside by ``begin`` and restored if the stage fails)
    compute(sd)
    return sd.root


def cache_path(cfg: C.Config, run_dir: AnyPath) -> AnyPath | None:
    """``CACHE/features-<key>`` for this config and inputs (``None`` when the cache is off)."""
    cache_dir = inputs.config_path(cfg.features.cache_dir)
    return None if cache_dir is None else cache.cache_folder(cache_dir, stage_dir(cfg, run_dir).key)


def table_path(run_dir: AnyPath) -> AnyPath:
    """This run's centroid table, through a cache link when there is one (``cache.resolve``)."""
    return cache.resolve(run_dir) / TABLE


def cluster_kwargs(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset,
                   source_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of :class:`ClusterImages` for this run (absolute paths, plain values);
    ``source_kwargs``: the feature source when the stage overrides it (the statistics it just fitted)."""
    fc = cfg.features
    return dict(
        dataset=dataset.spec(),
        pseudo_dir=storage.absolute(inputs.pseudo_label_dir(cfg, run_dir)),
        source_kwargs=source_kwargs or inputs.actor_source_kwargs(cfg, run_dir, fc.gpus_per_actor),
        k_fg=fc.k_fg,
        k_bg=fc.k_bg,
        max_pixels=fc.max_pixels,
        iters=fc.kmeans_iters,
        seed=fc.seed,
        threads=max(1, int(fc.cpus_per_actor)),
    )


def _compute(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset, sd: StageDir, stats: Any = None) -> None:
    """Cluster every image of the split into ``sd.path`` (Ray Data actor pool) and finish the manifest.

    ``stats``: freshly fitted adaptive statistics to store as ``sd.path/uss_stats.npz`` (``None``: the
    stored fit is current, or the stage fits nothing)."""
    fitted = inputs.fits_adaptive_stats(cfg)
    if fitted and stats is None:  # the stored fit is current: keep its bytes across begin's set-aside
        from mars_ray.models.adaptive import AdaptiveStats

        stats = AdaptiveStats.load(stored_stats(cfg, run_dir, dataset)[0])  # type: ignore[index]
    with sd.guard():
        ensure_ray(cfg.ray)
        ids = dataset.ids(cfg.data.split)
        fc = cfg.features
        source_kwargs = None  # the run's feature source (cluster_kwargs), unless the stage fits statistics
        extra: dict[str, Any] = {}
        if fitted:
            stats_path = stats.save(sd.path / USS_STATS)
            source_kwargs = {"extractor": cfg.features.extractor,
                             "extractor_kwargs": {"checkpoint": storage.absolute(stats_path)}}
            extra = {"uss_stats": USS_STATS, "uss_stats_digest": stats.digest, "uss_fit_key": fit_key(cfg, dataset),
                     "uss_fit_images": stats.n_images}
        ds = map_images(
            ids,
            ClusterImages,
            cluster_kwargs(cfg, run_dir, dataset, source_kwargs),
            num_actors=fc.num_actors,
            cpus_per_actor=fc.cpus_per_actor,
            gpus_per_actor=feature_gpus(cfg, fc.gpus_per_actor),
            batch_size=fc.batch_size,
        )
        out = sd.path / TABLE
        if storage.is_uri(out):
            # No folder renames on an object store (a copy + delete): write in place; the
            # manifest's "running" status marks the table unfinished until ``finish``.
            storage.rmtree(out)
            fs, path = storage.arrow_fs(out)
            ds.write_datasink(CentroidTableSink(path, fs))
        else:
            tmp = sd.path / f".{TABLE}.tmp"
            storage.rmtree(tmp)
            ds.write_datasink(CentroidTableSink(str(tmp)))
            faults.point("features.table")
            storage.rmtree(out)
            tmp.rename(out)
        counts = table_stats(out)
        sd.finish({"table": TABLE, **counts, **extra})
    logger.info("features: %d centroids (%d fg, %d bg) from %d images", counts["rows"], counts["fg_rows"], counts["bg_rows"],
                len(ids))


def open_table(path: AnyPath) -> Any:
    """The centroid table at ``path`` (local or URI) as a ``pyarrow.dataset.Dataset``."""
    import pyarrow.dataset as pads

    fs, fs_path = storage.arrow_fs(path)
    return pads.dataset(fs_path, filesystem=fs, format="parquet")


def table_stats(path: AnyPath) -> dict[str, int]:
    data = open_table(path)
    t = data.to_table(columns=["is_bg"])
    n_bg = int(np.asarray(t.column("is_bg")).sum()) if t.num_rows else 0
    dim = data.schema.field("vector").type.list_size if "vector" in data.schema.names else 0
    return {"rows": t.num_rows, "fg_rows": t.num_rows - n_bg, "bg_rows": n_bg, "dim": dim}
