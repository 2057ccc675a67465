"""Why the adaptive USS has the constants it has: each alternative on 19 datasets, in one process (no Ray).

The adaptive extractor's constants (``mars_ray/models/adaptive.py``) must not be tuned to one
dataset. This benchmark measures every alternative tried against the shipped design on the same
spread of data: the 8 quick ``benchmarks/quality_bench.py`` variants (32-48 images, 56-72 px) and
the 11 larger ``benchmarks/quality_lab.py`` sets (80-120 images, 64-128 px, the two independent
hold-out generators included). Per (ablation, dataset) it runs ``mars_ray.quality.debias_in_process``
(the pipeline's K-means, Eq 1-3, Eq 4 with the default CRF, Eq 5) and reports:

* pseudo / debiased mIoU, removal recall, retention and the target-centroid ratio (as quality_lab);
* ``eq1_auc_min``: with the object/context split of each pseudo-label region taken from ground
  truth (not K-means), the smallest per-class AUC of Eq 1's distance ranking objects above their
  contexts — 1.0 when the features let Eq 1 tell every object from its context, 0.5 when they
  carry no such signal. It separates a feature-space failure (Eq 1) from a clustering one (K_fg).
* ``eq1_auc_parts``: the same AUC for each part's term of Eq 1 (the linear part, each codebook):
  Eq 1's cosine to the background mean is a sum over F's parts, so this shows which part ranks a
  class's objects the wrong way (``OUT.md``'s second table, for each dataset's worst class).

F of one dataset is held in memory while it is measured (computed once per image; about 1 GB for
the largest set, hold-out B). One summary line per ablation (means and minima over the 19 datasets, targets met out of 57) goes
to ``OUT.md``; every row to ``OUT.json``.

Ablations (``ABLATIONS``), each a change of one thing against ``shipped``:
``colour-sigma-3``/``-5`` (colour smoothing σ in px), ``energy-pool-0.6``/``-1.0`` (Gabor energy
pooling σ per wavelength), ``codebooks-32-128``, ``codebooks-16-128``, ``codebooks-8-128`` (the
codebook pyramid), ``no-linear`` (codebook parts only, the whitened linear part dropped),
``linear-weight-0.7``/``-0.5`` (the linear part at 0.7 / 0.5 of its RMS norm, the codebooks unchanged),
``colour-only`` (diagnostic: the whitened colour group alone), ``kmeans-restarts-region``
(best of 10 K-means initialisations in the per-region clustering) and
``kmeans-restarts-codebook`` (best of 10 for the codebooks), ``codebooks-x2`` (each codebook fitted
twice from different K-means seeds, each copy at 1/sqrt(2) of its RMS norm: an ensemble of two
quantisations, the linear part's share of F unchanged; ``features.codebook_copies=2``, the shipped
design since 2026-12-08) and ``one-copy`` (``features.codebook_copies=1``, the design before).
The stored results written before 2026-12-08 (``benchmarks/results/adaptive_ablation*.json``) call
the one-copy design ``shipped``; their other ablations are changes against it.

``--seeds 0,1,2`` runs every (ablation, dataset) once per seed (the adaptive fit's and the K-means'
seed, as ``--seed``) and adds a third table to ``OUT.md``: per ablation, how far the debiased mIoU of
a dataset moves between seeds (mean and largest range over the datasets) and the mean of each
dataset's worst seed -- what a user who refits with another seed may get.

    python benchmarks/adaptive_ablation.py [--ablations a,b] [--datasets q:colour,l:holdout-A]
        [--work DIR] [--out benchmarks/results/adaptive_ablation] [--seed N | --seeds 0,1,2] [--smoke-test]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_bench as QB  # noqa: E402
import quality_lab as QL  # noqa: E402

import mars_ray.algo.clustering as clustering  # noqa: E402
import mars_ray.models.adaptive as adaptive  # noqa: E402
from mars_ray.algo.clustering import cluster_regions  # noqa: E402
from mars_ray.config import DebiasConfig  # noqa: E402
from mars_ray.data.label_io import read_image, read_label  # noqa: E402
from mars_ray.data.voc import VOCDataset  # noqa: E402
from mars_ray.quality import debias_in_process  # noqa: E402

DATASETS = [f"q:{n}" for n in QB.VARIANTS] + [f"l:{n}" for n in list(QL.VARIANTS) + list(QL.HOLDOUT)]


def _fitter_kwargs(**over: Any) -> contextlib.AbstractContextManager:
    """Every ``AdaptiveFitter`` built with these keyword arguments (the shipped code, other settings)."""
    init = adaptive.AdaptiveFitter.__init__

    def patched(self: Any, *a: Any, **kw: Any) -> None:
        init(self, *a, **{**kw, **over})
    return mock.patch.object(adaptive.AdaptiveFitter, "__init__", patched)


def _codebooks(sizes: tuple[int, ...]) -> contextlib.AbstractContextManager:
    return _fitter_kwargs(codebook_sizes=sizes)


def _finish_with(change: Callable[[adaptive.AdaptiveStats], adaptive.AdaptiveStats]) -> contextlib.AbstractContextManager:
    finish = adaptive.AdaptiveFitter.finish

    def patched(self: Any, **kw: Any) -> adaptive.AdaptiveStats:
        return change(finish(self, **kw))
    return mock.patch.object(adaptive.AdaptiveFitter, "finish", patched)


def _no_linear(s: adaptive.AdaptiveStats) -> adaptive.AdaptiveStats:
    scales = s.scales.copy()
    scales[0] = 1e9  # the linear part divided to ~0: F = the codebook parts
    return dataclasses.replace(s, scales=scales)


def _linear_weight(w: float) -> Callable[[adaptive.AdaptiveStats], adaptive.AdaptiveStats]:
    """The linear part at ``w`` times its shipped RMS norm (the codebook parts unchanged)."""
    def change(s: adaptive.AdaptiveStats) -> adaptive.AdaptiveStats:
        scales = s.scales.copy()
        scales[0] = scales[0] / w
        return dataclasses.replace(s, scales=scales)
    return change


def _colour_only() -> contextlib.AbstractContextManager:
    whiten = adaptive._block_whitening

    def patched(x: np.ndarray, groups: list) -> tuple[np.ndarray, np.ndarray]:
        mean, transform = whiten(x, groups)
        return mean, transform[:, : int((transform[:3] != 0).any(0).sum())]
    return mock.patch.object(adaptive, "_block_whitening", patched)


ABLATIONS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "shipped": contextlib.nullcontext,
    "colour-sigma-3": lambda: mock.patch.object(adaptive, "COLOUR_SIGMA", 3.0),
    "colour-sigma-5": lambda: mock.patch.object(adaptive, "COLOUR_SIGMA", 5.0),
    "energy-pool-0.6": lambda: mock.patch.object(adaptive, "ENERGY_POOL", (0.6, 1.0)),
    "energy-pool-1.0": lambda: mock.patch.object(adaptive, "ENERGY_POOL", (1.0, 1.0)),
    "codebooks-32-128": lambda: _codebooks((32, 64, 128)),
    "codebooks-16-128": lambda: _codebooks((16, 32, 64, 128)),
    "codebooks-8-128": lambda: _codebooks((8, 16, 32, 64, 128)),
    "no-linear": lambda: _finish_with(_no_linear),
    "linear-weight-0.7": lambda: _finish_with(_linear_weight(0.7)),
    "linear-weight-0.5": lambda: _finish_with(_linear_weight(0.5)),
    "colour-only": _colour_only,
    "kmeans-restarts-region": lambda: mock.patch.object(clustering, "kmeans", partial(clustering.kmeans, n_init=10)),
    "kmeans-restarts-codebook": lambda: mock.patch.object(adaptive, "kmeans", partial(clustering.kmeans, n_init=10)),
    "codebooks-x2": lambda: _fitter_kwargs(copies=2),  # features.codebook_copies=2: shipped since 2026-12-08
    "one-copy": lambda: _fitter_kwargs(copies=1),  # the design before (the stored results' "shipped")
}


def dataset_root(name: str, work: Path, smoke: bool) -> Path:
    kind, _, variant = name.partition(":")
    if kind == "q":
        return QB.make_variant(variant, work / "quick", True)
    if kind == "l":
        return QL.dataset(variant, work / ("lab-smoke" if smoke else "lab"), smoke)
    raise ValueError(f"dataset {name!r}: expected q:<quality_bench variant> or l:<quality_lab set>")


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def feature_parts(stats: adaptive.AdaptiveStats) -> dict[str, slice]:
    """The parts of the adaptive F: ``linear`` (the whitened cues), then ``c<K>`` per codebook (a second
    codebook of the same size ``c<K>#2``, …)."""
    parts, start = {"linear": slice(0, stats.transform.shape[1])}, stats.transform.shape[1]
    for p in stats.prototypes:
        name = f"c{p.shape[0]}"
        copy = sum(k == name or k.startswith(f"{name}#") for k in parts)
        parts[name if copy == 0 else f"{name}#{copy + 1}"] = slice(start, start + p.shape[0])
        start += p.shape[0]
    return parts


def eq1_auc(root: Path, source: Callable[[str, np.ndarray], np.ndarray], seed: int = 0,
            parts: dict[str, slice] | None = None) -> dict[int, dict[str, float]]:
    """Per class: AUC of Eq 1's distance ranking GT-object centroids above GT-context centroids of Y^b's regions.

    Returns ``{class: {"F": auc, **{part: auc}}}``. ``"F"`` ranks by Eq 1 on the whole feature. Eq 1 is
    ``(1 - v̂·m) / 2`` with m the mean of the unit background centroids, and ``v̂·m`` is the sum over the
    parts of F (``parts``: name → slice of channels) of ``v[part]·m[part] / |v|``: each part's term is
    ranked on its own too, which shows which part of F pulls Eq 1 the wrong way.
    """
    ds = VOCDataset(root)
    bg, regions = [], []
    for i in ds.ids("train"):
        image, pseudo = read_image(ds.image_path(i)), read_label(root / "pseudo_labels" / f"{i}.png")
        gt = read_label(ds.gt_path(i))  # type: ignore[arg-type]
        f = source(i, image)
        rc = cluster_regions(f, pseudo, k_fg=2, k_bg=2, max_pixels=20000, iters=20, seed=seed)
        bg += [rc.vector[r] for r in range(len(rc)) if rc.is_bg[r]]
        for c in np.unique(pseudo):
            if not 1 <= c < 255:
                continue
            for is_obj, m in ((True, (pseudo == c) & (gt == c)), (False, (pseudo == c) & (gt != c))):
                if m.sum() > 20:
                    x = f[:, m].T
                    regions.append((int(c), is_obj, (x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)).mean(0)))
    b = np.stack(bg)
    mean_bg = (b / np.linalg.norm(b, axis=1, keepdims=True)).mean(0)  # Eq 1 = (1 - v̂·mean_j b̂_j) / 2
    out: dict[int, dict[str, float]] = {}
    for c in sorted({c for c, _, _ in regions}):
        vs = {o: [v for cc, oo, v in regions if cc == c and oo == o] for o in (True, False)}
        if not (vs[True] and vs[False]):
            continue
        terms = {"F": slice(None), **(parts or {})}  # a term of the distance: -v[part]·m[part] / |v|
        out[c] = {name: _auc(*(np.array([-(v[sl] @ mean_bg[sl]) / np.linalg.norm(v) for v in vs[o]])
                               for o in (True, False)))
                  for name, sl in terms.items()}
    return out


def run_one(ablation: str, name: str, work: Path, smoke: bool, seed: int = 0) -> dict[str, Any]:
    root = dataset_root(name, work, smoke)
    t0 = time.perf_counter()
    fitted: list[adaptive.AdaptiveStats] = []
    fit = adaptive.fit_adaptive_stats

    def keep_stats(*args: Any, **kwargs: Any) -> adaptive.AdaptiveStats:
        fitted.append(fit(*args, **kwargs))
        return fitted[-1]

    with ABLATIONS[ablation](), mock.patch.object(adaptive, "fit_adaptive_stats", keep_stats):
        extract, info = QL.extractor("adaptive", root, seed, smoke)
        cache: dict[str, np.ndarray] = {}  # F of each image once: debias_in_process reads it twice, eq1_auc once more

        def source(image_id: str, image: np.ndarray) -> np.ndarray:
            if image_id not in cache:
                cache[image_id] = extract(image_id, image)
            return cache[image_id]

        res = debias_in_process(root, source, crf=DebiasConfig().crf_kwargs(), seed=seed)
        auc = eq1_auc(root, source, seed, parts=feature_parts(fitted[-1]))
    worst = min(auc, key=lambda c: auc[c]["F"]) if auc else None
    row = {"ablation": ablation if seed == 0 else f"{ablation} (seed {seed})", "dataset": name, "seed": seed,
           **res.row(), "dim": info.get("dim"),
           "eq1_auc": {str(c): round(v["F"], 3) for c, v in auc.items()},
           "eq1_auc_min": auc[worst]["F"] if auc else float("nan"),
           "eq1_auc_parts": {str(c): {k: round(x, 3) for k, x in v.items() if k != "F"} for c, v in auc.items()},
           "eq1_worst_class": worst,
           "seconds": round(time.perf_counter() - t0, 1)}
    row["gain"] = row["debiased_miou"] - row["pseudo_miou"]
    row["targets"] = QL.targets(row)
    return row


def summary(rows: list[dict[str, Any]]) -> str:
    out = ["| ablation | datasets | mean debiased mIoU | min gain | mean removal | min removal | mean retention | "
           "min retention | Eq-1 AUC, worst class (mean) | targets met | datasets all met |", "|" + "---|" * 11]
    for ab in dict.fromkeys(r["ablation"] for r in rows):
        rs = [r for r in rows if r["ablation"] == ab]
        v = lambda k: np.array([r[k] for r in rs], dtype=float)  # noqa: E731
        met = sum(t == "✓" for r in rs for t in r["targets"])
        out.append(
            f"| {ab} | {len(rs)} | {100 * v('debiased_miou').mean():.1f} | {100 * v('gain').min():+.1f} | "
            f"{v('removal_recall').mean():.3f} | {v('removal_recall').min():.2f} | {v('retention').mean():.3f} | "
            f"{v('retention').min():.2f} | {np.nanmean(v('eq1_auc_min')):.2f} | {met}/{3 * len(rs)} | "
            f"{sum(r['targets'] == '✓✓✓' for r in rs)}/{len(rs)} |")
    return "\n".join(out)


def seed_spread(rows: list[dict[str, Any]]) -> str:
    """Per ablation run at several seeds: how much a dataset's debiased mIoU moves between seeds.

    Columns: seeds, datasets, mean debiased mIoU over all rows, mean and largest (max - min over seeds)
    of a dataset, the dataset with that largest range, and the mean over datasets of the worst seed's
    mIoU. Ablations run at one seed only are left out ("" when none has several)."""
    groups: dict[str, dict[str, dict[int, float]]] = {}
    for r in rows:
        base = r["ablation"].split(" (seed ")[0]
        groups.setdefault(base, {}).setdefault(r["dataset"], {})[int(r.get("seed", 0))] = 100 * r["debiased_miou"]
    out = ["| ablation | seeds | datasets | mean debiased mIoU | mean range over seeds | largest range (dataset) | "
           "mean of the worst seed |", "|" + "---|" * 7]
    for ab, per in groups.items():
        seeds = sorted({s for v in per.values() for s in v})
        full = {d: v for d, v in per.items() if len(v) == len(seeds)}
        if len(seeds) < 2 or not full:
            continue
        ranges = {d: max(v.values()) - min(v.values()) for d, v in full.items()}
        worst = max(ranges, key=lambda d: ranges[d])
        out.append(f"| {ab} | {','.join(map(str, seeds))} | {len(full)} | "
                   f"{np.mean([x for v in full.values() for x in v.values()]):.1f} | {np.mean(list(ranges.values())):.1f} | "
                   f"{ranges[worst]:.1f} ({worst}) | {np.mean([min(v.values()) for v in full.values()]):.1f} |")
    return "\n".join(out) if len(out) > 2 else ""


def parts_table(rows: list[dict[str, Any]], below: float = 0.9) -> str:
    """Per row whose worst class has an Eq-1 AUC below ``below``: that class's AUC on F and on each part of F."""
    rs = [r for r in rows if r.get("eq1_worst_class") is not None and r["eq1_auc_min"] < below]
    names = list(dict.fromkeys(k for r in rs for k in r["eq1_auc_parts"][str(r["eq1_worst_class"])]))
    out = ["| ablation | dataset | worst class | F | " + " | ".join(names) + " |", "|" + "---|" * (4 + len(names))]
    for r in rs:
        c = str(r["eq1_worst_class"])
        p = r["eq1_auc_parts"][c]
        out.append(f"| {r['ablation']} | {r['dataset']} | {c} | {r['eq1_auc'][c]:.2f} | "
                   + " | ".join(f"{p[k]:.2f}" if k in p else "–" for k in names) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ablations", default=",".join(ABLATIONS))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mars_adaptive_ablation"))
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json (rows) and OUT.md (summary)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the adaptive fit and the K-means (features.seed / select.seed): how much a refit moves")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds, each run in turn (overrides --seed); "
                    "adds the seed-spread table")
    ap.add_argument("--smoke-test", action="store_true", help="one small dataset, two ablations")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ablations = ["shipped", "no-linear"] if a.smoke_test else [x for x in a.ablations.split(",") if x]
    datasets = ["l:colour"] if a.smoke_test else [x for x in a.datasets.split(",") if x]
    unknown = [x for x in ablations if x not in ABLATIONS]
    if unknown:
        ap.error(f"unknown ablation(s) {unknown}; choose from {', '.join(ABLATIONS)}")
    seeds = [int(x) for x in a.seeds.split(",") if x] if a.seeds else [a.seed]
    rows = []
    for seed in seeds:
        for ab in ablations:
            for name in datasets:
                row = run_one(ab, name, a.work, a.smoke_test, seed)
                rows.append(row)
                print(f"{row['ablation']:26s} {name:22s} pseudo {100 * row['pseudo_miou']:5.1f} "
                      f"debiased {100 * row['debiased_miou']:5.1f} removal {row['removal_recall']:.2f} "
                      f"retention {row['retention']:.2f} eq1-auc-min {row['eq1_auc_min']:.2f} {row['targets']}", flush=True)
                if a.out:
                    write(a.out, rows)
    print()
    print(report(rows))


def report(rows: list[dict[str, Any]]) -> str:
    """``OUT.md``'s tables: the summary, the seed spread (when several seeds ran), the Eq-1 AUC parts."""
    spread = seed_spread(rows)
    return ("One change against the shipped adaptive USS per line; 19 datasets (8 quick quality_bench variants, "
            "11 quality_lab sets incl. 2 hold-outs); targets: gain >= 8, removal >= 0.80, retention >= 0.90.\n\n"
            + summary(rows) + "\n\n"
            + (f"How far a dataset's debiased mIoU moves between seeds (refits):\n\n{spread}\n\n" if spread else "")
            + "Eq-1 AUC of each dataset's worst class, on F and on each part's term of Eq 1 (rows whose "
            "worst class is below 0.9):\n\n" + parts_table(rows) + "\n")


def write(out: Path, rows: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text("# adaptive_ablation\n\n" + report(rows))


if __name__ == "__main__":
    main()
