"""Per-region K-means (MARS Sec 3.2): our hand-written NumPy K-means vs scikit-learn's ``KMeans``.

Both run k-means++ seeding, one initialisation and at most ``--iters`` Lloyd iterations, stopping
when the assignments stop changing (scikit-learn: ``n_init=1, max_iter=iters, tol=0``), on
L2-normalised float32 pixel features as ``cluster_regions`` feeds them. Three measures:

1. **speed** per region, single-threaded (``threadpool_limits(1)``: a features actor runs with
   ``OMP_NUM_THREADS`` = its CPUs, 1 by default), best of ``--repeats``; ratio = sklearn / ours;
2. **the centroids** on the same region: inertia ratio sklearn / ours (< 1: sklearn's clustering is
   tighter) and the distance between matched centroids (Hungarian matching; cosine distance);
3. **downstream**: the built-in dataset through features → per-image clustering → Eq 1-3 selection
   → Eq 4-5 (no CRF), once with each K-means; how many chosen centroids are the same (matched per
   image and class), the cosine between the two V^c, and the debiased mIoU / FP / FN of each.

Regions: every (image, class) region of the built-in dataset at ``--size`` px with the texture
extractor (d = 19), and synthetic regions of n ∈ {100, 1000, 5000, 20000} pixels, d ∈ {19, 70, 384},
k ∈ {2, 3, 4} from four distributions: ``blobs`` (k well-separated Gaussians), ``overlap`` (two
Gaussians one σ apart), ``single`` (one isotropic Gaussian: no structure), ``lowrank`` (rank-8
signal + noise, ViT-like anisotropy).

``library`` is whatever ``mars_ray.algo.clustering.kmeans`` is now (scikit-learn Lloyd since this
benchmark's first run); ``results_kmeans_bench.json`` holds the summaries of that run (library still
ours) and of one after the switch with ``--faiss`` (faiss-cpu installed beside the environment).

    python benchmarks/kmeans_bench.py [--size 128 --n-train 24] [--smoke-test] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
import warnings
from typing import Any, Callable, Iterator

import numpy as np
from scipy.optimize import linear_sum_assignment
from threadpoolctl import threadpool_limits

KMeansFn = Callable[..., tuple[np.ndarray, np.ndarray]]


# -- the hand-written K-means (mars_ray/algo/clustering.py up to commit a356e37), kept as the reference


def _sq_dists(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    d2 = x_sq[:, None] - 2.0 * (x @ c.T) + np.einsum("kd,kd->k", c, c)[None, :]
    return np.maximum(d2, 0.0)


def _kmeans_pp(x: np.ndarray, k: int, x_sq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = x.shape[0]
    idx = [int(rng.integers(n))]
    closest = _sq_dists(x, x[idx], x_sq)[:, 0].astype(np.float64)
    for _ in range(1, k):
        total = closest.sum()
        if total > 0:
            nxt = int(rng.choice(n, p=closest / total))
        else:
            nxt = int(rng.choice(np.setdiff1d(np.arange(n), idx)))
        idx.append(nxt)
        closest = np.minimum(closest, _sq_dists(x, x[nxt : nxt + 1], x_sq)[:, 0])
    return x[idx].copy()


def _update(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    k = centroids.shape[0]
    counts = np.bincount(labels, minlength=k)
    one_hot = np.zeros((x.shape[0], k), dtype=np.float32)
    one_hot[np.arange(x.shape[0]), labels] = 1.0
    new = (one_hot.T @ x) / np.maximum(counts, 1)[:, None].astype(np.float32)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        own = _sq_dists(x, centroids, x_sq)[np.arange(x.shape[0]), labels]
        for j, far in zip(empty, np.argsort(-own, kind="stable")):
            new[j] = x[far]
    return new


def handwritten_kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The hand-written K-means: k-means++ (one candidate per step), Lloyd until assignments settle."""
    x = np.asarray(x, dtype=np.float32)
    x_sq = np.einsum("nd,nd->n", x, x)
    centroids = _kmeans_pp(x, k, x_sq, np.random.default_rng(seed))
    labels = np.argmin(_sq_dists(x, centroids, x_sq), axis=1)
    for _ in range(iters):
        centroids = _update(x, labels, centroids, x_sq)
        new = np.argmin(_sq_dists(x, centroids, x_sq), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
    return centroids, labels.astype(np.int64)


def sklearn_kmeans(algorithm: str) -> KMeansFn:
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    def fit(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=iters, tol=0.0, algorithm=algorithm,
                    random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate points: fewer distinct clusters
            labels = km.fit_predict(np.asarray(x, dtype=np.float32))
        return km.cluster_centers_.astype(np.float32), labels.astype(np.int64)

    return fit


def faiss_kmeans() -> KMeansFn:
    """faiss-cpu's ``Kmeans`` (optional; random initialisation, a fixed ``niter``, no subsampling)."""
    import faiss

    def fit(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, nredo=1, min_points_per_centroid=1,
                          max_points_per_centroid=max(1, x.shape[0]), verbose=False)
        km.train(x)
        return km.centroids.copy(), km.index.search(x, 1)[1][:, 0].astype(np.int64)

    return fit


def library_kmeans() -> KMeansFn:
    from mars_ray.algo.clustering import kmeans

    return kmeans


# -- regions ----------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def synthetic_region(kind: str, n: int, d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, d]`` float32 unit rows (cluster_regions normalises pixels first)."""
    if kind == "blobs":
        centres = rng.normal(size=(k, d)) * 4.0 / math.sqrt(2)  # pairwise ≈ 4σ apart per dimension set
        x = centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    elif kind == "overlap":
        shift = np.zeros(d)
        shift[0] = 1.0
        x = rng.normal(size=(n, d)) + np.outer(rng.integers(2, size=n), shift) + 3.0
    elif kind == "single":
        x = rng.normal(size=(n, d)) + 3.0
    elif kind == "lowrank":
        basis = rng.normal(size=(8, d))
        x = rng.normal(size=(n, 8)) @ basis + 0.3 * rng.normal(size=(n, d))
    else:
        raise ValueError(f"unknown distribution {kind!r}")
    return _unit(x)


def dataset_regions(size: int, n_train: int, seed: int) -> tuple[list[dict[str, Any]], Any]:
    """The built-in dataset's images with texture features (d = 19), pseudo labels and GT."""
    import tempfile
    from pathlib import Path

    import torch

    from mars_ray.data.label_io import read_image, read_label
    from mars_ray.data.synthetic import PSEUDO_DIR, make_biased_dataset
    from mars_ray.data.voc import VOCDataset
    from mars_ray.models.handcrafted import build_texture_extractor

    root = make_biased_dataset(Path(tempfile.mkdtemp(prefix="kmeans-bench-")) / "d", n_train=n_train, n_val=2,
                               size=size, seed=seed)
    ds, ext = VOCDataset(root), build_texture_extractor()
    samples = []
    t_feat = 0.0
    for i in ds.ids("train"):
        img = read_image(ds.image_path(i))
        t0 = time.perf_counter()
        with torch.no_grad():
            f = ext(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0].numpy()
        t_feat += time.perf_counter() - t0
        samples.append({"id": i, "image": img, "features": f, "pseudo": read_label(root / PSEUDO_DIR / f"{i}.png"),
                        "gt": read_label(ds.gt_path(i))})
    return samples, {"classes": ds.num_classes, "feature_s_per_image": t_feat / len(samples)}


def image_region_pixels(sample: dict[str, Any]) -> Iterator[tuple[int, np.ndarray]]:
    f, label = sample["features"], sample["pseudo"]
    pix = f.reshape(f.shape[0], -1).T
    for c in np.unique(label):
        if c <= 253:
            yield int(c), _unit(pix[label.reshape(-1) == c])


# -- measures ---------------------------------------------------------------------------------------


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def inertia(x: np.ndarray, c: np.ndarray) -> float:
    return float(_sq_dists(x, c, np.einsum("nd,nd->n", x, x)).min(axis=1).sum())


def matched_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine distance between centroids of ``a`` and ``b`` after the best one-to-one matching."""
    cos = _unit(a) @ _unit(b).T
    r, c = linear_sum_assignment(-cos)
    return float((1.0 - cos[r, c]).mean())


def compare_region(x: np.ndarray, k: int, methods: dict[str, KMeansFn], *, iters: int, seeds: int,
                   repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fn in methods.items():
        out[f"t_{name}"] = best_time(lambda: fn(x, k, iters=iters, seed=0), repeats)
    ratios, dists = {m: [] for m in methods if m != "ours"}, {m: [] for m in methods if m != "ours"}
    for seed in range(seeds):
        c_ours, _ = methods["ours"](x, k, iters=iters, seed=seed)
        i_ours = inertia(x, c_ours)
        for m in ratios:
            c, _ = methods[m](x, k, iters=iters, seed=seed)
            ratios[m].append(inertia(x, c) / max(i_ours, 1e-12))
            dists[m].append(matched_distance(c_ours, c))
    for m in ratios:
        out[f"inertia_{m}"] = float(np.mean(ratios[m]))
        out[f"cdist_{m}"] = float(np.mean(dists[m]))
    return out


@contextlib.contextmanager
def patched_kmeans(fn: KMeansFn) -> Iterator[None]:
    """``cluster_regions`` with another K-means (it calls the module's ``kmeans``)."""
    from mars_ray.algo import clustering

    saved = clustering.kmeans
    clustering.kmeans = fn
    try:
        yield
    finally:
        clustering.kmeans = saved


def downstream(samples: list[dict[str, Any]], num_classes: int, fn: KMeansFn, *, k_bg: int = 2,
               alpha: float = 0.4) -> dict[str, Any]:
    """Sec 3.2 clustering with ``fn`` → Eq 1-3 → Eq 4-5 (no CRF): chosen centroids, V^c, label metrics."""
    from mars_ray.algo.centroids import select_debiased_centroids
    from mars_ray.algo.clustering import cluster_regions
    from mars_ray.algo.debias import activation_map, binarize_activation, debias_label
    from mars_ray.algo.metrics import ConfusionMatrix, map_biased

    fg, fg_key, bg = [], [], []
    t = 0.0
    with patched_kmeans(fn):
        for s in samples:
            t0 = time.perf_counter()
            rc = cluster_regions(s["features"], s["pseudo"], k_fg=2, k_bg=k_bg, seed=0)
            t += time.perf_counter() - t0
            for r in range(len(rc)):
                if rc.is_bg[r]:
                    bg.append(rc.vector[r])
                else:
                    fg.append(rc.vector[r])
                    fg_key.append((s["id"], int(rc.class_id[r])))
    cls = np.array([c for _, c in fg_key])
    sel = select_debiased_centroids(np.array(fg), cls, np.array(bg), alpha=alpha, num_classes=num_classes)
    cm = ConfusionMatrix(num_classes + 1)
    for s in samples:
        classes = sorted(set(np.unique(s["pseudo"]).tolist()) & set(range(1, num_classes + 1)))
        keep = binarize_activation(activation_map(s["features"], sel.centroids[classes]), threshold=0.5)
        cm.update(map_biased(debias_label(s["pseudo"], keep), "background"), s["gt"])
    m = cm.compute()
    return {"fg": np.array(fg), "key": fg_key, "chosen": sel.chosen, "centroids": sel.centroids,
            "present": sel.present, "cluster_s_per_image": t / len(samples), "miou": m["miou"], "fp": m["fp"],
            "fn": m["fn"]}


def same_chosen(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Share of A's chosen centroids whose matched centroid in B (same image and class) is chosen too."""
    groups: dict[tuple, tuple[list[int], list[int]]] = {}
    for i, key in enumerate(a["key"]):
        groups.setdefault(key, ([], []))[0].append(i)
    for j, key in enumerate(b["key"]):
        groups.setdefault(key, ([], []))[1].append(j)
    same = total = 0
    for ia, ib in groups.values():
        if not ia or not ib:
            continue
        cos = _unit(a["fg"][ia]) @ _unit(b["fg"][ib]).T
        r, c = linear_sum_assignment(-cos)
        for x, y in zip(r, c):
            if a["chosen"][ia[x]]:
                total += 1
                same += bool(b["chosen"][ib[y]])
    return same / max(total, 1)


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="built-in dataset image size (128 px: regions up to ~12k px)")
    p.add_argument("--n-train", type=int, default=24)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--faiss", action="store_true", help="also time faiss-cpu's Kmeans (when importable)")
    args = p.parse_args()
    if args.smoke_test:
        args.size, args.n_train, args.repeats, args.seeds = 48, 4, 1, 1
    methods = {"ours": handwritten_kmeans, "lloyd": sklearn_kmeans("lloyd"), "elkan": sklearn_kmeans("elkan")}
    if args.faiss:
        try:
            methods["faiss"] = faiss_kmeans()
        except ImportError as e:
            print(f"faiss not measured: {e}")
    lib = library_kmeans()
    results: dict[str, Any] = {"args": vars(args), "synthetic": [], "dataset": {}}
    with threadpool_limits(args.threads):
        # 1-2: synthetic regions
        ns = [100, 1000] if args.smoke_test else [100, 1000, 5000, 20000]
        ds_ = [19, 70] if args.smoke_test else [19, 70, 384]
        ks = [2, 4] if args.smoke_test else [2, 3, 4]
        rng = np.random.default_rng(0)
        print(f"{'dist':>8} {'n':>6} {'d':>4} {'k':>2} {'ours ms':>8} {'lloyd ms':>9} {'elkan ms':>9} "
              f"{'lloyd/ours':>10} {'inertia l/o':>11} {'cdist l':>8}")
        for kind in ("blobs", "overlap", "single", "lowrank"):
            for n in ns:
                for d in ds_:
                    for k in ks:
                        x = synthetic_region(kind, n, d, k, rng)
                        r = {"dist": kind, "n": n, "d": d, "k": k,
                             **compare_region(x, k, methods, iters=args.iters, seeds=args.seeds, repeats=args.repeats)}
                        results["synthetic"].append(r)
                        print(f"{kind:>8} {n:>6} {d:>4} {k:>2} {1e3 * r['t_ours']:8.2f} {1e3 * r['t_lloyd']:9.2f} "
                              f"{1e3 * r['t_elkan']:9.2f} {r['t_lloyd'] / r['t_ours']:10.2f} "
                              f"{r['inertia_lloyd']:11.4f} {r['cdist_lloyd']:8.4f}")
        # 2: the dataset's own regions
        samples, info = dataset_regions(args.size, args.n_train, seed=0)
        real = []
        for s in samples:
            for c, x in image_region_pixels(s):
                for k in (2, 4):
                    if x.shape[0] >= k:
                        real.append({"n": x.shape[0], "k": k, "bg": c == 0,
                                     **compare_region(x, k, methods, iters=args.iters, seeds=args.seeds,
                                                      repeats=args.repeats)})
        results["dataset_regions"] = real
        # 3: downstream selection and labels
        down = {name: downstream(samples, info["classes"], fn) for name, fn in
                (("ours", handwritten_kmeans), ("lloyd", methods["lloyd"]), ("library", lib))}
    summary = _summarise(results, real, down, info)
    results["summary"] = summary
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)


def _geo(v: list[float]) -> float:
    return float(np.exp(np.mean(np.log(v))))


def _summarise(results: dict[str, Any], real: list[dict[str, Any]], down: dict[str, dict[str, Any]],
               info: dict[str, Any]) -> dict[str, Any]:
    syn = results["synthetic"]
    out: dict[str, Any] = {"feature_ms_per_image (texture, d=19)": 1e3 * info["feature_s_per_image"]}
    for n in sorted({r["n"] for r in syn}):
        rows = [r for r in syn if r["n"] == n]
        out[f"synthetic n={n}: time lloyd/ours (geo-mean)"] = _geo([r["t_lloyd"] / r["t_ours"] for r in rows])
        out[f"synthetic n={n}: time elkan/ours (geo-mean)"] = _geo([r["t_elkan"] / r["t_ours"] for r in rows])
        if "t_faiss" in rows[0]:
            out[f"synthetic n={n}: time faiss/ours (geo-mean)"] = _geo([r["t_faiss"] / r["t_ours"] for r in rows])
            out[f"synthetic n={n}: inertia faiss/ours (mean)"] = float(np.mean([r["inertia_faiss"] for r in rows]))
    for kind in sorted({r["dist"] for r in syn}):
        rows = [r for r in syn if r["dist"] == kind]
        out[f"synthetic {kind}: inertia lloyd/ours (mean)"] = float(np.mean([r["inertia_lloyd"] for r in rows]))
        out[f"synthetic {kind}: matched centroid cos-distance (mean)"] = float(np.mean([r["cdist_lloyd"] for r in rows]))
    out["dataset regions"] = len(real)
    out["dataset regions: time lloyd/ours (geo-mean)"] = _geo([r["t_lloyd"] / r["t_ours"] for r in real])
    out["dataset regions: total ms ours / lloyd / elkan"] = [1e3 * sum(r[f"t_{m}"] for r in real)
                                                             for m in ("ours", "lloyd", "elkan")]
    out["dataset regions: inertia lloyd/ours (mean)"] = float(np.mean([r["inertia_lloyd"] for r in real]))
    out["dataset regions: inertia lloyd/ours (worst)"] = float(np.max([r["inertia_lloyd"] for r in real]))
    out["dataset regions: matched centroid cos-distance (mean)"] = float(np.mean([r["cdist_lloyd"] for r in real]))
    for name, d in down.items():
        out[f"downstream {name}: cluster ms/image, debiased mIoU/FP/FN"] = [
            1e3 * d["cluster_s_per_image"], d["miou"], d["fp"], d["fn"]]
    for name in ("lloyd", "library"):
        out[f"downstream: chosen centroids shared ours→{name}"] = same_chosen(down["ours"], down[name])
        present = down["ours"]["present"] & down[name]["present"]
        a, b = down["ours"]["centroids"][present], down[name]["centroids"][present]
        out[f"downstream: cos(V^c ours, V^c {name}) min"] = float(np.min(np.sum(_unit(a) * _unit(b), axis=1)))
    return out


if __name__ == "__main__":
    main()
