"""Scaling of every stage on this machine (issue 14): throughput, flat memory, select at the memory limit, train.

Rows (``--rows``, all by default):

* ``throughput``: ``features`` and ``debias`` images/s on generated datasets (``mars make-dataset``,
  ``--image-size`` px) of each ``--sizes`` N, three ways: a bare single-process loop over the same
  per-image work (the stage's own ``ClusterImages`` / ``DebiasImages`` called in this process, one
  thread; its first image, with the one-time imports, counted as start-up), and the real stage
  (Ray Data actor pool) with 1 and 2 actors. Ray's start-up is timed apart; per stage run the
  driver's own checks, the same actor pool doing no per-image work (Ray Data's start-up and
  scheduling plus the actors' cold start) and the CPU seconds of the driver, of Ray's own
  processes and of the workers explain the ratio. The bare loops run before Ray starts.
* ``rss``: peak RSS and private RSS (RSS minus shared pages, i.e. without Ray's object store) of the
  driver and of every Ray worker, sampled every 0.2 s (``procmem.TreeSampler``), per stage at the
  smallest N and at 10·N (both must be in ``--sizes``); ``train`` for one epoch.
* ``select``: the real ``select`` stage (reduction actor, streamed Parquet) on generated centroid
  tables (``centroid_tables.py``) of COCO size (600k rows) and up to Open-Images size (60M rows)
  at each ``--select-d``, against pyarrow reading the same table once (every column select
  reads); the table grows file by file while it stays under ``--select-max-gb`` and the disk keeps
  ``--disk-reserve-gb`` free, larger sizes are extrapolated linearly (marked). Memory: the
  actor's peak private RSS against O(C·d) + O(N) scalars. The tables are deleted afterwards.
* ``eq13``: Eq 1–3 in memory (``select_debiased_centroids``) against one read pass over the same
  arrays (``fg.sum(); bg.sum()``), wall and single-thread CPU time.
* ``unit``: per-image costs at a photo's size (``--unit-size``): bare features and debias, and one
  dense CRF of 21 classes (what the teacher's fill costs a training image), for ``docs/scaling.md``.
* ``train``: Ray Train (``runtime.fit_torch`` + the stage's ``train_loop.train_worker``) against
  a bare torch loop on the same model (``deeplab_tiny``), labels (``RUN/debias``), augmentation
  and MARS step, one thread each; steady-state images/s (epochs after the first) and wall time.

Prints one table, writes JSON with ``--json``; ``--merge A.json B.json`` combines the JSON of runs of
different rows (a busy machine: measure in parts). ``benchmarks/scaling_doc.py`` renders
``docs/scaling.md`` from that JSON. Examples::

    python benchmarks/scale_bench.py --json benchmarks/results_scale_bench.json     # ~1-1.5 h, 2 quiet cores
    python benchmarks/scale_bench.py --smoke-test                                   # every row, minutes
    python benchmarks/scale_bench.py --rows select,eq13 --select-max-gb 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402

from procmem import TreeSampler, peak_of  # noqa: E402

ROWS = ("throughput", "rss", "select", "eq13", "train", "unit")
COCO_ROWS = 600_000  # 82,081 COCO train images x ~7.3 centroids (K_bg = 2, K_fg = 2 per class)
OPEN_IMAGES_ROWS = 60_000_000  # 9M images x ~6.7
TARGETS = {"ray_over_bare": 0.9, "two_over_one": 1.8, "rss_10n_over_n": 1.3, "select_over_read": 3.0,
           "eq13_over_read": 5.0, "train_ray_over_bare": 0.9}


def _now() -> float:
    return time.perf_counter()


# ------------------------------------------------------------------------------------------ setup


def make_data(root: Path, sizes: list[int], image_size: int) -> dict[str, Any]:
    """One generated dataset of max(sizes) train images; split ``n{N}`` = its first N ids."""
    from mars_ray.data.synthetic import make_biased_dataset

    t0 = _now()
    if not (root / "classes.txt").is_file():
        make_biased_dataset(root, n_train=max(sizes), n_val=4, size=image_size, seed=0)
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for n in sizes:
        (root / "ImageSets" / "Segmentation" / f"n{n}.txt").write_text("\n".join(ids[:n]) + "\n")
    return {"image_size": image_size, "images": len(ids), "generate_s": _now() - t0}


def stage_cfg(root: Path, n: int, actors: int, **over: Any) -> Any:
    from mars_ray import config as C

    return C.build(overrides={
        "data.root": str(root), "data.split": f"n{n}", "data.pseudo_labels": str(root / "pseudo_labels"),
        "features.extractor": "texture", "features.num_actors": actors, "debias.num_actors": actors,
        "ray.num_cpus": over.pop("ray_cpus", 0), **over})


class _InitOnly:
    """An actor that builds the stage's callable (imports, extractor, dataset) and then does no
    per-image work: the pipeline's wall time is Ray's start-up, scheduling and the actors' cold start."""

    def __init__(self, fn: type, kwargs: dict[str, Any]) -> None:
        self.fn = fn(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image_id": batch["image_id"]}


def _one_thread():
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    return threadpool_limits(1)  # as a Ray actor with num_cpus=1 (Ray sets OMP_NUM_THREADS=1)


# ------------------------------------------------------------------------------------------ throughput


def bare_features(cfg: Any, run: Path) -> dict[str, Any]:
    """The features stage's per-image work (``ClusterImages``) in this process, then one Parquet file."""
    import pyarrow as pa

    from mars_ray.stages import features, inputs

    dataset = inputs.open_dataset(cfg)
    ids = dataset.ids(cfg.data.split)
    with _one_thread(), TreeSampler() as mem:
        t0 = _now()
        worker = features.ClusterImages(**features.cluster_kwargs(cfg, run, dataset))
        worker({"image_id": np.array(ids[:1])})  # one-time costs (lazy imports, first K-means) count as init
        t1, c1 = _now(), time.process_time()
        tables = [worker({"image_id": np.array(ids[s : s + cfg.features.batch_size])})
                  for s in range(0, len(ids), cfg.features.batch_size)]
        t2, c2 = _now(), time.process_time()
        table = pa.concat_tables(tables)
        (run / "bare").mkdir(parents=True, exist_ok=True)
        features.write_table_file(table, str(run / "bare" / "centroids.parquet"))
        t3 = _now()
    return {"mode": "bare", "init_s": t1 - t0, "loop_s": t2 - t1, "write_s": t3 - t2, "wall_s": t3 - t0,
            "images_per_s": len(ids) / (t2 - t1), "s_per_image": (t2 - t1) / len(ids),
            "cpu_s_per_image": (c2 - c1) / len(ids), "rows": table.num_rows, "memory": mem.summary()}


def bare_debias(cfg: Any, run: Path) -> dict[str, Any]:
    """The debias stage's per-image work (``DebiasImages``: F, Eq 4, CRF, Eq 5, PNG) in this process,
    with V^c from the bare features table by the in-memory Eq 1–3."""
    import pyarrow.parquet as pq

    from mars_ray.algo.centroids import select_debiased_centroids
    from mars_ray.artifacts import atomic_save_npy
    from mars_ray.stages import debias, inputs
    from mars_ray.stages.select import _vectors

    dataset = inputs.open_dataset(cfg)
    ids = dataset.ids(cfg.data.split)
    t = pq.read_table(run / "bare" / "centroids.parquet")
    vec, is_bg = _vectors(t.combine_chunks().to_batches()[0]), np.asarray(t.column("is_bg"))
    sel = select_debiased_centroids(vec[~is_bg], np.asarray(t.column("class_id"))[~is_bg], vec[is_bg],
                                    alpha=cfg.select.alpha, num_classes=dataset.num_classes)
    select_dir, out_dir = run / "bare" / "select", run / "bare" / "debias"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(select_dir / "centroids.npy", sel.centroids)
    atomic_save_npy(select_dir / "present.npy", sel.present)
    with _one_thread(), TreeSampler() as mem:
        t0 = _now()
        worker = debias.DebiasImages(**debias.debias_kwargs(cfg, run, dataset, out_dir=out_dir, select_dir=select_dir,
                                                           skip_existing=False, image_labels=_image_labels(cfg, run)))
        worker({"image_id": np.array(ids[:1])})  # one-time costs count as init
        t1, c1 = _now(), time.process_time()
        for s in range(0, len(ids), cfg.debias.batch_size):
            worker({"image_id": np.array(ids[s : s + cfg.debias.batch_size])})
        t2, c2 = _now(), time.process_time()
    return {"mode": "bare", "init_s": t1 - t0, "loop_s": t2 - t1, "wall_s": t2 - t0,
            "images_per_s": len(ids) / (t2 - t1), "s_per_image": (t2 - t1) / len(ids),
            "cpu_s_per_image": (c2 - c1) / len(ids), "memory": mem.summary()}


def _image_labels(cfg: Any, run: Path) -> bool:
    """Whether the debias stage takes C_I from image-level labels (as ``debias.run`` decides)."""
    from mars_ray.stages import debias

    return debias.class_source(cfg, run)["kind"] == "image_labels"


def driver_checks(cfg: Any, run: Path, stage: str) -> float:
    """Seconds of what the stage does on the driver before Ray runs (input checks, fingerprints)."""
    from mars_ray.stages import debias, features, inputs

    t0 = _now()
    if stage == "features":
        inputs.validate_inputs(cfg, run)
        features.stage_dir(cfg, run)
    else:
        inputs.open_dataset(cfg).ids(cfg.data.split)
        debias.stage_dir(cfg, run)
    return _now() - t0


def pipeline_without_work(cfg: Any, run: Path, stage: str, ids: list[str], actors: int) -> float:
    """Wall seconds of the stage's actor pool over ``ids`` (same actors, same callable built) doing
    no per-image work: Ray Data's start-up and scheduling plus each actor's cold start."""
    from mars_ray.stages import debias, features, inputs
    from mars_ray.stages.runtime import map_images

    dataset = inputs.open_dataset(cfg)
    if stage == "features":
        fn, kw = features.ClusterImages, features.cluster_kwargs(cfg, run, dataset)
    else:
        fn, kw = debias.DebiasImages, debias.debias_kwargs(cfg, run, dataset, out_dir=run / "debias",
                                                          select_dir=run / "select", skip_existing=True,
                                                          image_labels=_image_labels(cfg, run))
    t0 = _now()
    ds = map_images(ids, _InitOnly, {"fn": fn, "kwargs": kw}, num_actors=actors,
                    batch_size=getattr(cfg, stage).batch_size)
    for _ in ds.iter_batches(batch_size=None):
        pass
    return _now() - t0


def ray_stage(cfg: Any, run: Path, stage: str) -> dict[str, Any]:
    """The real stage (``pipeline.run_stage``) under the memory sampler."""
    from mars_ray import pipeline

    with TreeSampler() as mem:
        t0 = _now()
        pipeline.run_stage(cfg, run, stage)
        wall = _now() - t0
    return {"wall_s": wall, "memory": mem.summary()}


def throughput(args: argparse.Namespace, root: Path, work: Path, out: dict[str, Any]) -> None:
    """Bare loops first (no Ray running), then Ray start-up, then every stage with 1 and 2 actors."""
    rows: list[dict[str, Any]] = out.setdefault("throughput", [])
    for n in args.sizes:
        cfg = stage_cfg(root, n, 1, ray_cpus=args.ray_cpus)
        run = work / f"bare_n{n}"
        for stage, fn in (("features", bare_features), ("debias", bare_debias)):
            r = fn(cfg, run)
            rows.append({"stage": stage, "n": n, **r})
            print(f"  bare {stage} N={n}: {r['images_per_s']:.1f} images/s", flush=True)
        shutil.rmtree(run / "bare" / "debias", ignore_errors=True)
    from mars_ray.config import RayConfig
    from mars_ray.stages.runtime import ensure_ray

    t0 = _now()
    ensure_ray(RayConfig(num_cpus=args.ray_cpus))
    out["ray_init_s"] = _now() - t0
    import ray

    out["ray_cpus"] = ray.cluster_resources().get("CPU")
    for n in args.sizes:
        for actors in args.actors:
            cfg = stage_cfg(root, n, actors, ray_cpus=args.ray_cpus)
            run = work / f"ray_n{n}_a{actors}"
            ids = [str(i) for i in (root / "ImageSets" / "Segmentation" / f"n{n}.txt").read_text().split()]
            for stage in ("features", "select", "debias"):
                checks = driver_checks(cfg, run, stage) if stage != "select" else 0.0
                r = ray_stage(cfg, run, stage)
                row = {"stage": stage, "n": n, "mode": f"ray{actors}", "actors": actors, **r}
                if stage != "select":
                    row["images_per_s"] = n / r["wall_s"]
                    row["driver_checks_s"] = checks
                    row["no_work_pipeline_s"] = pipeline_without_work(cfg, run, stage, ids, actors)
                rows.append(row)
                print(f"  ray{actors} {stage} N={n}: {r['wall_s']:.1f} s"
                      + (f", {row['images_per_s']:.1f} images/s" if "images_per_s" in row else ""), flush=True)


def throughput_ratios(out: dict[str, Any]) -> list[dict[str, Any]]:
    by = {(r["stage"], r["n"], r["mode"]): r for r in out.get("throughput", [])}
    ratios = []
    for (stage, n, mode), bare in sorted(by.items()):
        if mode != "bare":
            continue
        r1, r2 = by.get((stage, n, "ray1")), by.get((stage, n, "ray2"))
        row: dict[str, Any] = {"stage": stage, "n": n, "bare_images_per_s": bare["images_per_s"]}
        for k, r in (("ray1", r1), ("ray2", r2)):
            if r:
                row[f"{k}_images_per_s"] = r["images_per_s"]
                row[f"{k}_over_bare"] = r["images_per_s"] / bare["images_per_s"]
                # what the wall time is made of: start-up and scheduling vs the per-image work
                work_s = n * bare["s_per_image"] / r["actors"]
                row[f"{k}_explained"] = {"wall_s": r["wall_s"], "per_image_work_s": work_s,
                                         "driver_checks_s": r["driver_checks_s"],
                                         "no_work_pipeline_s": r["no_work_pipeline_s"],
                                         "rest_s": r["wall_s"] - work_s - r["driver_checks_s"] - r["no_work_pipeline_s"],
                                         "cpu_s": r["memory"]["cpu_s"]}
        if r1 and r2:
            row["two_over_one"] = r2["images_per_s"] / r1["images_per_s"]
        ratios.append(row)
    return ratios


# ------------------------------------------------------------------------------------------ memory


def rss_rows(out: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    """Peak RSS per stage at the smallest N and at 10·N (from the 1-actor runs and the train runs)."""
    small = min(sizes)
    large = 10 * small
    if large not in sizes:
        return []
    by = {(r["stage"], r["n"]): r for r in out.get("throughput", []) if r["mode"] == "ray1"}
    by.update({("train", r["n"]): r for r in out.get("train_rss", [])})
    rows = []
    for stage in ("features", "select", "debias", "train"):
        a, b = by.get((stage, small)), by.get((stage, large))
        if not (a and b):
            continue
        ma, mb = a["memory"], b["memory"]
        row: dict[str, Any] = {"stage": stage, "n": small, "n_large": large}
        for who, key in (("driver", None), ("worker", None)):
            if who == "driver":
                va, vb = ma["driver"]["peak_private_mb"], mb["driver"]["peak_private_mb"]
                ra, rb = ma["driver"]["peak_rss_mb"], mb["driver"]["peak_rss_mb"]
            else:
                va, vb = ma["max_worker_peak_private_mb"], mb["max_worker_peak_private_mb"]
                ra, rb = ma["max_worker_peak_rss_mb"], mb["max_worker_peak_rss_mb"]
            row[who] = {"private_mb": [va, vb], "rss_mb": [ra, rb],
                        "private_ratio": vb / va if va else None, "rss_ratio": rb / ra if ra else None}
        row["total_private_mb"] = [ma["peak_total_private_mb"], mb["peak_total_private_mb"]]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ select at scale


def one_read(table: Path, chunk_rows: int) -> float:
    """pyarrow reading every column ``select`` reads, once, into numpy (vectors as ``[n, d]``)."""
    from mars_ray.stages import features
    from mars_ray.stages.select import _vectors

    t0 = _now()
    data = features.open_table(table)
    for b in data.to_batches(columns=["image_id", "class_id", "is_bg", "k", "count", "gt_match", "gt_iou", "vector"],
                             batch_size=chunk_rows, batch_readahead=2, fragment_readahead=1):
        _vectors(b)
        b.column("image_id")
    return _now() - t0


def select_scale(args: argparse.Namespace, work: Path, out: dict[str, Any]) -> None:
    from centroid_tables import GrowingTable, dataset_root

    from mars_ray import config as C
    from mars_ray import pipeline
    from mars_ray.artifacts import read_manifest

    from mars_ray.config import RayConfig
    from mars_ray.stages.runtime import ensure_ray

    rows: list[dict[str, Any]] = out.setdefault("select", [])
    root = dataset_root(work / "select_data", args.select_classes)
    t0 = _now()
    ensure_ray(RayConfig(num_cpus=args.ray_cpus))  # started here, so no select row pays Ray's start-up
    out.setdefault("ray_init_s", _now() - t0)
    ladder = sorted(set(args.select_rows))
    for d in args.select_d:
        table = GrowingTable(work / f"select_d{d}", d, args.select_classes)
        cfg = C.build(overrides={"data.root": str(root), "select.chunk_rows": args.chunk_rows,
                                 "ray.num_cpus": args.ray_cpus})
        measured: list[dict[str, Any]] = []
        try:
            for target in ladder:
                per_row = (table.bytes / table.rows) if table.rows else 4.0 * d + 40
                need = (target - table.rows) * per_row
                free = shutil.disk_usage(work).free
                if target * per_row > args.select_max_gb * 1e9 or free - need < args.disk_reserve_gb * 1e9:
                    if measured:  # linear in rows from the largest measured size
                        last = measured[-1]
                        rows.append({"d": d, "rows": target, "extrapolated": True, "from_rows": last["rows"],
                                     "table_gb": target * per_row / 1e9,
                                     "select_s": last["select_s"] * target / last["rows"],
                                     "one_read_s": last["one_read_s"] * target / last["rows"],
                                     "select_over_read": last["select_over_read"],
                                     "why": f"table of {target * per_row / 1e9:.1f} GB: over --select-max-gb "
                                            f"{args.select_max_gb:g} or the disk's free space"})
                        print(f"  select d={d} rows={target:,}: extrapolated from {last['rows']:,}", flush=True)
                    continue
                t0 = _now()
                table.grow_to(target)
                table.mark_finished()
                gen_s = _now() - t0
                read_first = one_read(table.folder, args.chunk_rows)
                with TreeSampler() as mem:
                    t0 = _now()
                    pipeline.run_stage(cfg, table.run, "select")
                    sel_s = _now() - t0
                read_s = one_read(table.folder, args.chunk_rows)
                m = mem.summary()
                manifest = read_manifest(table.run / "select") or {}
                actor = peak_of(m, "CentroidSelector")
                n_fg = json.loads((table.run / "select" / "report.json").read_text())["n_foreground_centroids"]
                row = {"d": d, "rows": table.rows, "fg_rows": n_fg, "extrapolated": False, "files": table.files,
                       "table_gb": table.bytes / 1e9, "generate_s": gen_s, "one_read_first_s": read_first,
                       "one_read_s": read_s, "select_s": sel_s, "select_over_read": sel_s / read_s,
                       "passes_s": manifest.get("outputs", {}).get("seconds"),
                       # the actor's own work (its three passes and the report), without Ray's start-up
                       "passes_over_read": sum((manifest.get("outputs", {}).get("seconds") or {}).values()) / read_s,
                       "actor_peak_private_mb": actor["peak_private_mb"], "actor_peak_rss_mb": actor["peak_rss_mb"],
                       # what O(N) scalars + O(C·d) come to: distance f64, class int16, gt_match and gt_iou
                       # f32, chosen bool
                       "model_mb": (n_fg * (8 + 2 + 4 + 4 + 1) + (args.select_classes + 1) * d * 8) / 2**20,
                       "vectors_mb": table.rows * d * 4 / 2**20, "driver_peak_private_mb": m["driver"]["peak_private_mb"]}
                rows.append(row)
                measured.append(row)
                print(f"  select d={d} rows={table.rows:,} ({row['table_gb']:.2f} GB): select {sel_s:.1f} s, "
                      f"one read {read_s:.1f} s ({row['select_over_read']:.2f}x), actor peak private "
                      f"{row['actor_peak_private_mb']:.0f} MB", flush=True)
        finally:
            shutil.rmtree(table.run, ignore_errors=True)  # never leave tens of GB behind


# ------------------------------------------------------------------------------------------ Eq 1-3 in memory


def _best(fn: Callable[[], Any], clock: Callable[[], float], repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def eq13(args: argparse.Namespace, out: dict[str, Any]) -> None:
    from threadpoolctl import threadpool_limits

    from mars_ray.algo.centroids import select_debiased_centroids

    rows = out.setdefault("eq13", [])
    for d in args.eq_d:
        rng = np.random.default_rng(0)
        fg = rng.standard_normal((args.eq_fg, d), dtype=np.float32)
        bg = rng.standard_normal((args.eq_bg, d), dtype=np.float32) + 0.5
        cls = rng.integers(1, 21, size=args.eq_fg)

        def select() -> None:
            select_debiased_centroids(fg, cls, bg, alpha=0.4, num_classes=20)

        def read() -> None:
            fg.sum()
            bg.sum()

        row: dict[str, Any] = {"d": d, "fg": args.eq_fg, "bg": args.eq_bg}
        row["wall_s"], row["read_wall_s"] = _best(select, _now), _best(read, _now)
        with threadpool_limits(1):
            row["cpu1_s"], row["read_cpu1_s"] = _best(select, time.process_time), _best(read, time.process_time)
        row["wall_ratio"] = row["wall_s"] / row["read_wall_s"]
        row["cpu1_ratio"] = row["cpu1_s"] / row["read_cpu1_s"]
        rows.append(row)
        print(f"  Eq 1-3 d={d} {args.eq_fg:,}x{args.eq_bg:,}: {row['wall_s']:.3f} s = {row['wall_ratio']:.1f}x one read "
              f"(one thread, CPU time: {row['cpu1_ratio']:.1f}x)", flush=True)


# ------------------------------------------------------------------------------------------ train


def _train_cfg(root: Path, n: int, epochs: int, args: argparse.Namespace) -> Any:
    return stage_cfg(root, n, 1, ray_cpus=args.ray_cpus, **{"train.epochs": epochs, "train.val_every": 0,
                                                            "train.num_workers": 1, "train.cpus_per_worker": 1})


def ray_train(cfg: Any, run: Path, name: str) -> dict[str, Any]:
    """``fit_torch`` with the stage's worker loop and dataset, as ``train.run`` calls it (no val/predict)."""
    from mars_ray.stages import inputs, train, train_loop
    from mars_ray.stages.runtime import final_state, fit_torch

    dataset = inputs.open_dataset(cfg)
    settings = dataclasses.replace(train.loop_settings(cfg, dataset), val_ids=())
    storage = run / "bench_train" / name
    shutil.rmtree(storage, ignore_errors=True)
    with TreeSampler() as mem:
        t0 = _now()
        ds = train._training_dataset(dataset, cfg.data.split, run / "debias", trainer_cpus=1.0,
                                     class_source=train.class_source(cfg, run, dataset, run / "debias"))
        t1 = _now()
        result = fit_torch(train_loop.train_worker, {"settings": settings}, name=name, storage=storage, num_workers=1,
                           use_gpu=False, cpus_per_worker=1.0, max_failures=0, datasets={"train": ds})
        t2 = _now()
    history = final_state(result, storage, weights_only=False)["history"]
    shutil.rmtree(storage, ignore_errors=True)
    return {"data_s": t1 - t0, "fit_s": t2 - t1, "wall_s": t2 - t0, "epochs": [
        {"images_per_s": h["images_per_s"], "time_s": h["time"], "loss": h["loss"]} for h in history],
        "memory": mem.summary()}


def bare_train(cfg: Any, run: Path) -> dict[str, Any]:
    """The worker's loop without Ray: same model, SGD + poly LR, SegAugment, MARS step with CRF, EMA."""
    import torch

    from mars_ray.algo.complement import ema_update
    from mars_ray.data.label_io import read_image, read_label
    from mars_ray.engine import SegAugment, build_sgd, complement_step, make_ema_teacher, poly_lr_lambda, train_one_epoch
    from mars_ray.models import deeplab  # noqa: F401 - registers the segmenters
    from mars_ray.models.registry import SEGMENTERS
    from mars_ray.stages import inputs, train
    from mars_ray.stages.runtime import worker_seed

    dataset = inputs.open_dataset(cfg)
    s = train.loop_settings(cfg, dataset)
    ids = dataset.ids(cfg.data.split)
    with _one_thread():
        t0 = _now()
        pairs = [(read_image(dataset.image_path(i)), read_label(run / "debias" / f"{i}.png")) for i in ids]
        source = train.class_source(cfg, run, dataset, run / "debias")  # C_I, as the stage's rows carry it
        classes = inputs.ImageClasses(dataset, source) if source else None
        masks = [classes.mask(i) for i in ids] if classes else None
        t1 = _now()
        torch.manual_seed(s.seed)
        student = SEGMENTERS.get(s.model_name, **s.model_kwargs)
        teacher = make_ema_teacher(student)
        opt = build_sgd(student.param_groups(s.lr), s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lr_lambda(s.epochs * math.ceil(len(ids) / s.batch_size),
                                                                      s.poly_power))
        epochs = []
        for epoch in range(s.epochs):
            student.train()
            augment = SegAugment(s.crop_size, s.scale_range, flip=True, seed=worker_seed(s.seed, 0, epoch, stream="augment"))
            order = np.random.default_rng(worker_seed(s.seed, 0, epoch, stream="shuffle")).permutation(len(pairs))

            def batches() -> Any:
                for k in range(0, len(order), s.batch_size):
                    picked = order[k : k + s.batch_size]
                    aug = [augment.numpy(*pairs[i]) for i in picked]
                    img = torch.from_numpy(np.stack([a["image_uint8"] for a in aug]))
                    b = {"image": img.permute(0, 3, 1, 2).float().div_(255.0), "image_uint8": img,
                         "label": torch.from_numpy(np.stack([a["label"] for a in aug])).long()}
                    if masks is not None:
                        b["class_mask"] = torch.from_numpy(np.stack([masks[i] for i in picked]))
                    yield b

            te = _now()
            stats = train_one_epoch(
                lambda b: complement_step(student, teacher, b, num_classes=s.num_classes, crf=s.crf, use_wce=s.wce),
                batches(), opt,
                scheduler=sched, after_step=lambda _: ema_update(teacher, student, s.ema_momentum), log_every=0)
            epochs.append({"images_per_s": stats["images_per_s"], "time_s": _now() - te, "loss": stats["loss"]})
        t2 = _now()
    return {"data_s": t1 - t0, "fit_s": t2 - t1, "wall_s": t2 - t0, "epochs": epochs}


def _steady(epochs: list[dict[str, Any]]) -> float:
    later = epochs[1:] or epochs
    return float(np.mean([e["images_per_s"] for e in later]))


def train_rows(args: argparse.Namespace, root: Path, work: Path, out: dict[str, Any]) -> None:
    n = args.train_n
    run = work / f"ray_n{n}_a1"
    cfg = _train_cfg(root, n, args.train_epochs, args)
    bare = bare_train(cfg, run)
    ray_r = ray_train(cfg, run, "bench")
    row = {"n": n, "epochs": args.train_epochs, "bare": bare, "ray": ray_r,
           "bare_steady_images_per_s": _steady(bare["epochs"]), "ray_steady_images_per_s": _steady(ray_r["epochs"])}
    row["ray_over_bare_steady"] = row["ray_steady_images_per_s"] / row["bare_steady_images_per_s"]
    row["ray_over_bare_wall"] = bare["wall_s"] / ray_r["wall_s"]
    out["train"] = row
    print(f"  train N={n}: bare {row['bare_steady_images_per_s']:.1f} images/s, Ray Train "
          f"{row['ray_steady_images_per_s']:.1f} ({row['ray_over_bare_steady']:.2f}x; wall {bare['wall_s']:.0f} s vs "
          f"{ray_r['wall_s']:.0f} s)", flush=True)
    if "rss" in args.rows:  # one epoch at N and 10·N for the memory rows
        small, large = min(args.sizes), 10 * min(args.sizes)
        if large in args.sizes:
            out["train_rss"] = []
            for m in (small, large):
                r = ray_train(_train_cfg(root, m, 1, args), work / f"ray_n{m}_a1", f"rss{m}")
                out["train_rss"].append({"stage": "train", "n": m, **r})
                print(f"  train (1 epoch) N={m}: {r['wall_s']:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------ unit costs


def unit_costs(args: argparse.Namespace, work: Path, out: dict[str, Any]) -> None:
    """Per-image costs at a photo's size (``--unit-size`` px, ~ the 427x640 of VOC/COCO): the bare
    features and debias work, and one dense CRF of 21 classes (the teacher's fill in train)."""
    from mars_ray.algo.crf import dense_crf

    n, size = args.unit_images, args.unit_size
    root = work / f"unit_{size}"
    make_data(root, [n], size)
    cfg = stage_cfg(root, n, 1, ray_cpus=args.ray_cpus)
    feats = bare_features(cfg, work / "unit_run")
    deb = bare_debias(cfg, work / "unit_run")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(21), size=(size, size)).astype(np.float32).transpose(2, 0, 1)
    with _one_thread():
        crf = _best(lambda: dense_crf(image, probs, iters=10), _now)
        crf_cpu = _best(lambda: dense_crf(image, probs, iters=10), time.process_time)
    # wall seconds, and CPU seconds of the one thread: what a dedicated core takes even when other
    # processes share this machine's cores (the wall figures then grow, the CPU ones do not)
    out["unit"] = {"size": size, "images": n, "features_s_per_image": feats["s_per_image"],
                   "debias_s_per_image": deb["s_per_image"], "crf21_s_per_image": crf,
                   "features_cpu_s_per_image": feats["cpu_s_per_image"],
                   "debias_cpu_s_per_image": deb["cpu_s_per_image"], "crf21_cpu_s_per_image": crf_cpu,
                   "load_avg": os.getloadavg()}
    print(f"  at {size} px: features {feats['s_per_image']:.3f} s, debias {deb['s_per_image']:.3f} s an image; "
          f"CRF of 21 classes {crf:.3f} s (CPU seconds: {feats['cpu_s_per_image']:.3f}, "
          f"{deb['cpu_s_per_image']:.3f}, {crf_cpu:.3f})", flush=True)


# ------------------------------------------------------------------------------------------ report


def targets(out: dict[str, Any], args: argparse.Namespace | None) -> list[dict[str, Any]]:
    t: list[dict[str, Any]] = []
    ratios = out.get("ratios", [])
    n_ref = 2000 if any(r["n"] == 2000 for r in ratios) else max((r["n"] for r in ratios), default=None)
    for r in ratios:
        if r["n"] != n_ref:
            continue
        if "ray1_over_bare" in r:
            t.append({"target": f"{r['stage']}: Ray Data (1 actor) / bare at N={n_ref}", "value": r["ray1_over_bare"],
                      "goal": f">= {TARGETS['ray_over_bare']}", "met": r["ray1_over_bare"] >= TARGETS["ray_over_bare"]})
        if "two_over_one" in r:
            t.append({"target": f"{r['stage']}: 2 actors / 1 actor at N={n_ref}", "value": r["two_over_one"],
                      "goal": f">= {TARGETS['two_over_one']}", "met": r["two_over_one"] >= TARGETS["two_over_one"]})
    for r in out.get("rss", []):
        for who in ("driver", "worker"):
            v = r[who]["private_ratio"]
            if v is not None:
                t.append({"target": f"{r['stage']}: {who} peak private RSS at {r['n_large']} / at {r['n']}", "value": v,
                          "goal": f"<= {TARGETS['rss_10n_over_n']}", "met": v <= TARGETS["rss_10n_over_n"]})
    for r in out.get("select", []):
        if not r["extrapolated"]:
            t.append({"target": f"select / one read, d={r['d']}, {r['rows']:,} rows", "value": r["select_over_read"],
                      "goal": f"<= {TARGETS['select_over_read']}", "met": r["select_over_read"] <= TARGETS["select_over_read"]})
    for r in out.get("eq13", []):
        t.append({"target": f"Eq 1-3 in memory / one read pass, d={r['d']} (wall)", "value": r["wall_ratio"],
                  "goal": f"<= {TARGETS['eq13_over_read']}", "met": r["wall_ratio"] <= TARGETS["eq13_over_read"]})
    if "train" in out:
        v = out["train"]["ray_over_bare_steady"]
        t.append({"target": "Ray Train / bare loop (steady images/s)", "value": v,
                  "goal": f">= {TARGETS['train_ray_over_bare']}", "met": v >= TARGETS["train_ray_over_bare"]})
    return t


def print_table(out: dict[str, Any]) -> None:
    print("\n== throughput (images/s) ==")
    print(f"{'stage':<9} {'N':>6} {'bare':>7} {'ray1':>7} {'ray2':>7} {'ray1/bare':>9} {'2/1':>6}  "
          f"{'ray1 wall s = work + driver checks + start-up (no-work pipeline) + rest':<60}")
    for r in out.get("ratios", []):
        e = r.get("ray1_explained")
        expl = (f"{e['wall_s']:.1f} = {e['per_image_work_s']:.1f} + {e['driver_checks_s']:.1f}"
                f" + {e['no_work_pipeline_s']:.1f} + {e['rest_s']:.1f}") if e else ""
        print(f"{r['stage']:<9} {r['n']:>6} {r['bare_images_per_s']:>7.1f} {r.get('ray1_images_per_s', math.nan):>7.1f} "
              f"{r.get('ray2_images_per_s', math.nan):>7.1f} {r.get('ray1_over_bare', math.nan):>9.2f} "
              f"{r.get('two_over_one', math.nan):>6.2f}  {expl}")
    if out.get("ray_init_s") is not None:
        print(f"Ray start-up (ray.init): {out['ray_init_s']:.1f} s, {out.get('ray_cpus')} logical CPUs")
    if out.get("rss"):
        print("\n== peak private RSS, MB (RSS in brackets): at N and at 10·N ==")
        for r in out["rss"]:
            d, w = r["driver"], r["worker"]
            print(f"{r['stage']:<9} N={r['n']}/{r['n_large']}: driver {d['private_mb'][0]:.0f} -> {d['private_mb'][1]:.0f} "
                  f"({d['rss_mb'][0]:.0f} -> {d['rss_mb'][1]:.0f}), x{d['private_ratio']:.2f}; max worker "
                  f"{w['private_mb'][0]:.0f} -> {w['private_mb'][1]:.0f} ({w['rss_mb'][0]:.0f} -> {w['rss_mb'][1]:.0f}), "
                  f"x{w['private_ratio'] or math.nan:.2f}")
    if out.get("select"):
        print("\n== select at scale ==")
        print(f"{'d':>4} {'rows':>12} {'GB':>6} {'select s':>9} {'1 read s':>9} {'ratio':>6} {'passes':>7} "
              f"{'actor MB':>9} {'O(N) MB':>8}  seconds per pass")
        for r in out["select"]:
            mark = " (extrapolated)" if r["extrapolated"] else ""
            print(f"{r['d']:>4} {r['rows']:>12,} {r['table_gb']:>6.2f} {r['select_s']:>9.1f} {r['one_read_s']:>9.1f} "
                  f"{r['select_over_read']:>6.2f} {r.get('passes_over_read', math.nan):>7.2f} "
                  f"{r.get('actor_peak_private_mb', math.nan):>9.0f} {r.get('model_mb', math.nan):>8.0f}  "
                  f"{r.get('passes_s') or ''}{mark}")
    for r in out.get("eq13", []):
        print(f"\nEq 1-3 in memory d={r['d']} {r['fg']:,} fg x {r['bg']:,} bg: {r['wall_s']:.3f} s vs one read "
              f"{r['read_wall_s']:.4f} s = {r['wall_ratio']:.1f}x (one thread CPU: {r['cpu1_ratio']:.1f}x)")
    if "train" in out:
        tr = out["train"]
        print(f"\n== train N={tr['n']}, {tr['epochs']} epochs: bare {tr['bare_steady_images_per_s']:.1f} images/s, "
              f"Ray Train {tr['ray_steady_images_per_s']:.1f} ({tr['ray_over_bare_steady']:.2f}x); wall bare "
              f"{tr['bare']['wall_s']:.0f} s, Ray {tr['ray']['wall_s']:.0f} s (dataset {tr['ray']['data_s']:.0f} s)")
    if "unit" in out:
        u = out["unit"]
        print(f"\n== per image at {u['size']} px, one CPU: features {u['features_s_per_image']:.3f} s, debias "
              f"{u['debias_s_per_image']:.3f} s, CRF of 21 classes {u['crf21_s_per_image']:.3f} s")
    print("\n== targets ==")
    for t in out.get("targets", []):
        print(f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {t['value']:.2f} (goal {t['goal']})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--sizes", type=ints, default=[500, 2000, 5000], help="N of the generated datasets")
    ap.add_argument("--actors", type=ints, default=[1, 2])
    ap.add_argument("--image-size", type=int, default=192, help="px (make-dataset; 128-256 in issue 14)")
    ap.add_argument("--ray-cpus", type=int, default=0, help="logical CPUs of the local Ray (0: the cores)")
    ap.add_argument("--select-d", type=ints, default=[70, 384])
    ap.add_argument("--select-rows", type=ints, default=[COCO_ROWS, 6_000_000, 20_000_000, OPEN_IMAGES_ROWS])
    ap.add_argument("--select-classes", type=int, default=80, help="COCO: 80")
    ap.add_argument("--select-max-gb", type=float, default=20.0)
    ap.add_argument("--disk-reserve-gb", type=float, default=10.0, help="free space the tables must leave")
    ap.add_argument("--chunk-rows", type=int, default=65536, help="select.chunk_rows")
    ap.add_argument("--eq-fg", type=int, default=1_000_000)
    ap.add_argument("--eq-bg", type=int, default=200_000)
    ap.add_argument("--eq-d", type=ints, default=[70, 384])
    ap.add_argument("--train-n", type=int, default=500)
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--unit-size", type=int, default=512, help="px of the per-image cost row (~427x640 photos)")
    ap.add_argument("--unit-images", type=int, default=8)
    ap.add_argument("--work", help="working folder (default: a new temporary folder, removed at the end)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke-test", action="store_true", help="every row at minute size (N=20, tiny tables)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="combine the JSON of separate runs (e.g. --rows throughput,train,rss then --rows "
                         "select,eq13,unit) instead of measuring: print the table, write --json")
    if ap.parse_known_args(argv)[0].smoke_test:  # smaller defaults; explicit flags still win
        ap.set_defaults(sizes=[20, 200], image_size=64, select_d=[16, 384], select_rows=[2_000, 20_000],
                        select_classes=5, eq_fg=10_000, eq_bg=2_000, eq_d=[16], train_n=20, train_epochs=2,
                        unit_size=96, unit_images=2)
    args = ap.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    return args


_ROW_IDS = {"select": ("d", "rows"), "eq13": ("d",)}  # rows of these lists are combined across runs


def merge_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs' JSON: each measured key (throughput, ratios, train, ...) from
    the last run that has it; ``select`` and ``eq13`` rows combined by their (d, rows) / d, a later
    run's row replacing an earlier one's; ``machine`` from the first run, every run's machine, args
    and wall time under ``runs``; targets recomputed from the merged rows."""
    skip = {"machine", "args", "wall_s", "targets", "targets_goal", "runs"}
    # a merged result's own runs stay listed (merging it again with a new run keeps the history)
    listed = [x for r in runs for x in (r["runs"] if "runs" in r else [{k: r.get(k) for k in ("machine", "args", "wall_s")}])]
    out: dict[str, Any] = {"machine": runs[0]["machine"], "targets_goal": TARGETS, "runs": listed}
    for r in runs:
        for k, v in r.items():
            if k in skip:
                continue
            if k in _ROW_IDS:
                rows = {tuple(x[i] for i in _ROW_IDS[k]): x for x in out.get(k, [])}
                rows.update({tuple(x[i] for i in _ROW_IDS[k]): x for x in v})
                out[k] = sorted(rows.values(), key=lambda x: tuple(x[i] for i in _ROW_IDS[k]))
            else:
                out[k] = v
    out["wall_s"] = sum(r.get("wall_s", 0.0) for r in runs)
    out["targets"] = targets(out, None)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        out = merge_results([json.loads(Path(p).read_text()) for p in args.merge])
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=float) + "\n")
        print_table(out)
        return 0
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mars_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    import ray
    import torch

    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg(),
                                       "python": platform.python_version(), "ray": ray.__version__,
                                       "torch": torch.__version__},
                           "args": {k: v for k, v in vars(args).items()}, "targets_goal": TARGETS}
    t0 = _now()
    try:
        root = work / "data"
        if {"throughput", "rss", "train"} & set(args.rows):
            sizes = sorted(set(args.sizes) | ({args.train_n} if "train" in args.rows else set()))
            args.sizes = sizes
            print(f"dataset: {max(sizes)} images at {args.image_size} px in {root}", flush=True)
            out["dataset"] = make_data(root, sizes, args.image_size)
        if {"throughput", "rss", "train"} & set(args.rows):
            print("throughput (bare loops first, then Ray):", flush=True)
            throughput(args, root, work, out)
            out["ratios"] = throughput_ratios(out)
        if "train" in args.rows:
            print("train:", flush=True)
            train_rows(args, root, work, out)
        if "rss" in args.rows:
            out["rss"] = rss_rows(out, args.sizes)
        if "select" in args.rows:
            print("select at scale:", flush=True)
            select_scale(args, work, out)
        if "eq13" in args.rows:
            print("Eq 1-3 in memory:", flush=True)
            eq13(args, out)
        if "unit" in args.rows:
            print("per-image costs:", flush=True)
            unit_costs(args, work, out)
    finally:
        out["wall_s"] = _now() - t0
        out["machine"]["load_avg_end"] = os.getloadavg()
        out["targets"] = targets(out, args)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=float) + "\n")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(out)
    if args.json:
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
