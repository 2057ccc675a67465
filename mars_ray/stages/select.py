"""Stage ``select``: a reduction actor streams the centroid table → debiased centroids V^c (Eq 1–3).

The actor never holds the vectors of the whole table: four streamed passes over the Parquet
dataset (column-projected, ``select.chunk_rows`` rows at a time) keep O(N) scalars + O(C·d):

1. mean of the L2-normalised background centroids (Eq 1 in O(N·d));
2. bias distance D of every foreground centroid; then the top ⌈α·N_c⌉ per class (Eq 2);
3. per-class sums of the chosen vectors → V^c (Eq 3), and the chosen rows for the report;
4. per class, the separation score (``algo.separation``, no ground truth): the share of the chosen
   and of the other centroids' pixels that V^c activates above Eq 4's ``debias.threshold``.
   ``report.json`` holds it per class (``separation``) and lists ``classes_not_separating``; each
   such class gets one warning line in the log ("the USS features do not separate objects from
   their contexts for class X; debiasing may remove targets", and what to try).

Outputs in ``RUN/select/``: ``centroids.npy`` ``[C+1, d]`` float32 (row c = V^c; row 0 and classes
without centroids are zero), ``present.npy`` ``[C+1]`` bool, ``report.json`` (per class: centroid
count, chosen count, distance summary, and where ground truth exists two target measures of the
chosen centroids: the paper's ``paper_target_ratio`` — Fig 8 and its appendix: share with IoU > 0.3
with the class's ground truth, ``paper_biased_ratio`` the share with IoU < 0.1 — and our pixel-share
``target_ratio``: share whose pixels are mostly the target object), ``chosen.parquet`` (one row a
chosen centroid: image_id, class_id, k, count, distance, gt_match, gt_iou). A centroid table without
the ``gt_iou`` column (written before it existed) still selects; its paper ratios are ``null``. ``RUN`` and the table may be local or
on an object store (``mars_ray.storage``); the table is found through ``features.table_path``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from mars_ray import config as C
from mars_ray import faults, storage
from mars_ray.algo.centroids import BackgroundMean, bias_distance, class_sums, means_from_sums, top_alpha_mask
from mars_ray.algo.metrics import target_centroid_ratio
from mars_ray.algo.separation import SEPARATION_THRESHOLD, SeparationCounter, separation_warnings
from mars_ray.artifacts import StageDir, atomic_save_npy, atomic_write_json, require_complete
from mars_ray.data.voc import VOCDataset
from mars_ray.stages import features as features_stage
from mars_ray.stages import inputs
from mars_ray.stages.runtime import ensure_ray
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

TARGET_MATCH = 0.5  # a centroid "is the target object" when most of its pixels are GT of its class
_EXECUTION_KEYS = {"chunk_rows"}  # rows per streamed batch: how the table is read, not what is chosen
HIST_BINS = 20  # bins of the per-class bias-distance histograms in report.json (our choice: readable at C ≤ 80)
READAHEAD_BATCHES = 2  # batches pyarrow decodes ahead of the one being reduced


def _vectors(batch: pa.RecordBatch) -> np.ndarray:
    col = batch.column("vector")
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


class CentroidSelector:
    """The reduction: Eq 1–3 over a centroid table, streamed in chunks (pure pyarrow + numpy)."""

    def __init__(self, table: str, *, num_classes: int, alpha: float, chunk_rows: int,
                 threshold: float = 0.5) -> None:
        self.table = table
        self.data = features_stage.open_table(upath(table))
        self.num_classes = num_classes
        self.alpha = alpha
        self.chunk_rows = chunk_rows
        self.threshold = threshold  # Eq 4's debias threshold, which the separation score applies

    def _batches(self, columns: list[str], bg: bool) -> Iterator[pa.RecordBatch]:
        """The background (or foreground) rows, ``chunk_rows`` at a time. Row groups whose ``is_bg``
        statistics exclude them are skipped (``features`` writes background rows first); readahead
        is kept to two batches of one file, so memory stays O(chunk_rows · d) (pyarrow's defaults,
        16 batches × 4 files, held gigabytes at d = 384)."""
        flt = pc.field("is_bg") if bg else ~pc.field("is_bg")
        yield from self.data.to_batches(columns=columns, filter=flt, batch_size=self.chunk_rows,
                                        batch_readahead=READAHEAD_BATCHES, fragment_readahead=1)

    def run(self, chosen_path: str) -> dict[str, Any]:
        """Eq 1–3 over the table; the chosen rows go to ``chosen_path`` (atomically, local or URI)."""
        with storage.atomic_open(upath(chosen_path)) as sink:
            return self._run(sink)

    def _run(self, sink: Any) -> dict[str, Any]:
        seconds = [time.perf_counter()]
        # pass 1: Eq 1's background mean direction
        acc = BackgroundMean()
        for b in self._batches(["vector"], bg=True):
            if b.num_rows:
                acc.add(_vectors(b))
        if acc.count == 0:
            raise ValueError(f"{self.table}: no background centroids")
        bg_mean = acc.mean()
        seconds.append(time.perf_counter())
        # pass 2: distances of every foreground centroid (O(N) scalars: 8 + 2 + 4 + 4 bytes a row)
        has_iou = "gt_iou" in self.data.schema.names  # tables from before the column: NaN
        dists, classes, matches, ious = [], [], [], []
        for b in self._batches(["class_id", "gt_match", "vector"] + (["gt_iou"] if has_iou else []), bg=False):
            if b.num_rows:
                dists.append(bias_distance(_vectors(b), bg_mean))
                classes.append(b.column("class_id").to_numpy(zero_copy_only=False))
                matches.append(b.column("gt_match").to_numpy(zero_copy_only=False))
                ious.append(b.column("gt_iou").to_numpy(zero_copy_only=False) if has_iou
                            else np.full(b.num_rows, np.nan, np.float32))
        if not dists:
            raise ValueError(f"{self.table}: centroid table has no foreground centroids")
        distances = np.concatenate(dists)
        class_ids = np.concatenate(classes)  # int16, as stored
        gt_match = np.concatenate(matches)  # float32, as stored
        gt_iou = np.concatenate(ious)  # float32, as stored
        del dists, classes, matches, ious
        bad = class_ids[(class_ids < 1) | (class_ids > self.num_classes)]
        if bad.size:
            raise ValueError(f"{self.table}: class ids {sorted(set(bad.tolist()))[:10]} outside 1..{self.num_classes}")
        chosen = top_alpha_mask(distances, class_ids, self.alpha)
        seconds.append(time.perf_counter())
        # pass 3: Eq 3 sums + the chosen rows
        sums = counts = None
        start = 0
        writer = None
        for b in self._batches(["image_id", "class_id", "k", "count", "vector"], bg=False):
            n = b.num_rows
            if not n:
                continue
            sl = slice(start, start + n)
            s, c = class_sums(_vectors(b), class_ids[sl], chosen[sl], self.num_classes)
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
            idx = np.flatnonzero(chosen[sl])
            part = pa.table(
                {
                    "image_id": b.column("image_id").take(idx),
                    "class_id": b.column("class_id").take(idx),
                    "k": b.column("k").take(idx),
                    "count": b.column("count").take(idx),
                    "distance": pa.array(distances[sl][idx]),
                    "gt_match": pa.array(gt_match[sl][idx].astype(np.float32, copy=False)),
                    "gt_iou": pa.array(gt_iou[sl][idx].astype(np.float32, copy=False)),
                }
            )
            writer = writer or pq.ParquetWriter(sink, part.schema)
            writer.write_table(part)
            start += n
        if writer is not None:
            writer.close()
        seconds.append(time.perf_counter())
        centroids, present = means_from_sums(sums, counts)
        # pass 4: does each class's V^c keep its chosen centroids and drop the others? (no ground truth)
        sep = SeparationCounter(centroids, counts, threshold=self.threshold)
        start = 0
        for b in self._batches(["class_id", "count", "vector"], bg=False):
            n = b.num_rows
            if n:
                sl = slice(start, start + n)
                sep.add(_vectors(b), class_ids[sl], chosen[sl], b.column("count").to_numpy(zero_copy_only=False))
                start += n
        seconds.append(time.perf_counter())
        report = self._report(distances, class_ids, chosen, gt_match, gt_iou, acc.count)
        for c, score in sep.scores().items():
            report["per_class"][c]["separation"] = score
        seconds.append(time.perf_counter())
        names = ("pass1_background", "pass2_distances", "pass3_sums", "pass4_separation", "report")
        return {"centroids": centroids, "present": present, "report": report,
                "seconds": {k: round(b - a, 3) for k, a, b in zip(names, seconds, seconds[1:])}}

    def _report(
        self, distances: np.ndarray, class_ids: np.ndarray, chosen: np.ndarray, gt_match: np.ndarray,
        gt_iou: np.ndarray, n_bg: int,
    ) -> dict[str, Any]:
        """Selection summary; per class also ``histogram``: counts of chosen / not-chosen bias
        distances on ``HIST_BINS`` shared bins over the class's distance range (O(C·bins)). Where
        ground truth exists: the paper's target / biased ratios (``gt_iou``) beside our pixel-share
        ``target_ratio`` (``gt_match``)."""
        has_gt = bool(np.isfinite(gt_match).any())
        has_iou = bool(np.isfinite(gt_iou).any())
        per_class: dict[int, dict[str, Any]] = {}
        # the rows of each class from one stable sort (in table order within a class): O(N) for all
        # classes, where a mask per class cost O(N·C)
        order = np.argsort(class_ids, kind="stable")
        sorted_cls = class_ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_cls[1:] != sorted_cls[:-1]]) if order.size else order
        for s, e in zip(starts.tolist(), np.r_[starts[1:], order.size].tolist()):
            c, rows = int(sorted_cls[s]), order[s:e]
            sel = chosen[rows]
            d_all = distances[rows]
            d_sel, d_not = d_all[sel], d_all[~sel]
            g_all = gt_match[rows]
            entry: dict[str, Any] = {
                "n_centroids": int(rows.size),
                "n_chosen": int(sel.sum()),
                "distance_mean": float(d_all.mean()),
                "distance_min": float(d_all.min()),
                "distance_max": float(d_all.max()),
                "chosen_distance_min": float(d_sel.min()),
                "chosen_distance_mean": float(d_sel.mean()),
            }
            # bias-distance histograms of chosen / not-chosen centroids on shared edges (the report's plot)
            edges = np.linspace(d_all.min(), d_all.max(), HIST_BINS + 1) if d_all.max() > d_all.min() \
                else np.array([d_all.min() - 0.5 / HIST_BINS, d_all.min() + 0.5 / HIST_BINS])
            entry["histogram"] = {
                "edges": edges.tolist(),
                "chosen": np.histogram(d_sel, edges)[0].tolist(),
                "not_chosen": np.histogram(d_not, edges)[0].tolist(),
            }
            if has_gt:
                entry["target_ratio"] = _ratio(g_all[sel])
                entry["target_ratio_not_chosen"] = _ratio(g_all[~sel])
            if has_iou:
                entry.update(_paper_ratios(gt_iou[rows][sel]))
            per_class[c] = entry
        report: dict[str, Any] = {
            "alpha": self.alpha,
            "n_background_centroids": int(n_bg),
            "n_foreground_centroids": int(class_ids.size),
            "n_chosen": int(chosen.sum()),
            "per_class": per_class,
        }
        if has_gt:
            report["target_ratio"] = _ratio(gt_match[chosen])
            report["target_ratio_not_chosen"] = _ratio(gt_match[~chosen])
            report["target_ratio_all"] = _ratio(gt_match)
        if has_iou:
            report.update(_paper_ratios(gt_iou[chosen]))
            report.update({f"{k}_all": v for k, v in _paper_ratios(gt_iou).items()})
        return report


def _ratio(match: np.ndarray) -> float | None:
    """Our pixel-share measure: the share of centroids whose pixels are mostly (>= 50 %) the target."""
    match = match[np.isfinite(match)]
    return float((match >= TARGET_MATCH).mean()) if match.size else None


def _paper_ratios(iou: np.ndarray) -> dict[str, float | None]:
    """The paper's measure (Fig 8, appendix): shares of centroids with IoU > 0.3 (target) and < 0.1 (biased)."""
    r = target_centroid_ratio(iou)
    return {"paper_target_ratio": r["target_ratio"], "paper_biased_ratio": r["biased_ratio"]}


def _extractor(cfg: C.Config) -> str:
    """The USS the features came from, as the separation warning names it."""
    return "external" if cfg.data.features_dir else cfg.features.extractor


def separation_warnings_of(report_path: AnyPath, extractor: str | None = None) -> list[str]:
    """The separation warnings of a written ``report.json`` (per class ``separation``; none in older reports)."""
    import json

    if not report_path.is_file():
        return []
    report = json.loads(report_path.read_text())
    per = report.get("per_class") or {}
    scores = {e["class_id"]: e["separation"] for e in per.values() if "separation" in e}
    names = ["background"] * (max(scores, default=0) + 1)
    for name, e in per.items():
        names[e["class_id"]] = name
    return separation_warnings(scores, names, extractor=extractor)


def stage_dir(cfg: C.Config, run_dir: AnyPath) -> StageDir:
    upstream = require_complete(run_dir / "features", "features")
    slice_ = {"select": {"alpha": cfg.select.alpha}, "data": inputs.dataset_key(cfg, []),  # classes, report names
              "separation_threshold": cfg.debias.threshold,  # the report's separation score applies Eq 4's threshold
              "uss": _extractor(cfg)}  # named in the report's separation messages
    fingerprints = {"features": upstream["key"]}
    return StageDir(run_dir / "select", "select", C.slice_hash(slice_, fingerprints), slice_, fingerprints)


def run(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Select V^c from ``RUN/features``; returns ``RUN/select`` (skipped when already complete)."""
    sd = stage_dir(cfg, run_dir)
    uss = _extractor(cfg)  # the USS the separation messages do not suggest
    if sd.is_complete():
        logger.info("select: up to date in %s, skipping", sd.path)
        for line in separation_warnings_of(sd.path / "report.json", uss):  # every run's log says it, not only the first
            logger.warning("select: %s", line)
        return sd.root
    dataset = inputs.open_dataset(cfg)
    with sd.guard():
        ensure_ray(cfg.ray)
        actor = ray.remote(num_cpus=1)(CentroidSelector).remote(
            storage.absolute(features_stage.table_path(run_dir)), num_classes=dataset.num_classes, alpha=cfg.select.alpha,
            chunk_rows=cfg.select.chunk_rows, threshold=cfg.debias.threshold,
        )
        try:
            result = ray.get(actor.run.remote(storage.absolute(sd.path / "chosen.parquet")))
        finally:
            ray.kill(actor)
        faults.point("select.chosen")
        report = result["report"]
        report["per_class"] = {dataset.classes[c]: {"class_id": c, **e} for c, e in report["per_class"].items()}
        scores = {e["class_id"]: e["separation"] for e in report["per_class"].values() if "separation" in e}
        warnings = separation_warnings(scores, list(dataset.classes), extractor=uss)
        for e in report["per_class"].values():  # the run report shows the flag and the line
            if "separation" in e:
                score = e["separation"]["score"]
                e["separation"]["separates"] = None if not np.isfinite(score) else bool(score >= SEPARATION_THRESHOLD)
                line = separation_warnings({e["class_id"]: e["separation"]}, list(dataset.classes), extractor=uss)
                if line:
                    e["separation"]["message"] = line[0]
        report["separation_threshold"] = SEPARATION_THRESHOLD
        report["classes_not_separating"] = [dataset.classes[c] for c in sorted(scores)
                                            if np.isfinite(scores[c]["score"]) and scores[c]["score"] < SEPARATION_THRESHOLD]
        report["classes_without_centroids"] = [
            dataset.classes[c] for c in range(1, dataset.num_classes + 1) if not result["present"][c]
        ]
        atomic_save_npy(sd.path / "centroids.npy", result["centroids"])
        atomic_save_npy(sd.path / "present.npy", result["present"])
        atomic_write_json(sd.path / "report.json", report)
        sd.finish({"centroids": "centroids.npy", "present": "present.npy", "report": "report.json",
                   "n_chosen": report["n_chosen"], "target_ratio": report.get("target_ratio"),
                   "paper_target_ratio": report.get("paper_target_ratio"), "seconds": result["seconds"]})
    for line in warnings:
        logger.warning("select: %s", line)
    ratio, paper = report.get("target_ratio"), report.get("paper_target_ratio")
    logger.info(
        "select: chose %d of %d foreground centroids (alpha=%.2f)%s%s",
        report["n_chosen"], report["n_foreground_centroids"], cfg.select.alpha,
        "" if paper is None else f", target-centroid ratio (paper: IoU > 0.3) {paper:.1%}",
        "" if ratio is None or math.isnan(ratio) else f", pixel-share target ratio {ratio:.1%}",
    )
    return sd.root
