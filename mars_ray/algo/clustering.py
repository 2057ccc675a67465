"""Per-region K-means of pixel embeddings (MARS Sec. 3.2, the input of Eq. 1-3).

For every image, the pixels of each region of the pseudo label Y^b (each present foreground class,
and the background) are clustered in the USS embedding space; the cluster centroids are the rows of
the dataset-wide centroid table that ``centroids.py`` selects from.

The K-means itself is scikit-learn's ``KMeans`` (greedy k-means++ seeding, one initialisation,
Lloyd iterations until the assignments settle). It replaced a hand-written NumPy K-means after
``benchmarks/kmeans_bench.py`` (one thread, as in a features actor; regions of 100-20,000 pixels,
d = 19-384, k = 2-4): scikit-learn is slower on small regions by a fixed ~1 ms a call (time ratio
sklearn/ours 4.7 at 100 pixels, 1.75 at 1,000, 1.1 at 5,000) and faster on large ones (0.87 at
20,000; 0.5-0.7 where many iterations are needed); on the built-in dataset's 104 regions at 128 px
clustering took 1.17-1.20x as long in total (8.3-8.9 vs 5.0-5.7 ms an image, beside 8-13 ms of
texture features and far more for a learned USS). Its seeding finds equal or tighter clusters (inertia ratio 0.985 on the
dataset's regions, 0.94 on separated blobs where the single-candidate k-means++ merged two blobs),
and downstream the debiased labels were as good or slightly better (mIoU 83.6 vs 83.1, 92% of the
chosen centroids the same, V^c cosine >= 0.99). Nothing measurably better remained in our own.
faiss-cpu (random initialisation) was faster on small regions but slower at 20,000 pixels (1.5x)
and looser (inertia 1.03-1.12x); not used. Figures: ``benchmarks/results_kmeans_bench.json``.
Threads: scikit-learn's OpenMP loop honours ``OMP_NUM_THREADS`` (Ray sets it to an actor's CPUs)
and ``threadpoolctl`` limits; results are deterministic for a seed and a thread count.
"""

from __future__ import annotations

import logging
import warnings
from importlib import metadata
from dataclasses import dataclass

import numpy as np

from mars_ray.labels import BACKGROUND, MAX_CLASSES

logger = logging.getLogger(__name__)


def _sklearn_minor() -> str:
    """scikit-learn's ``major.minor`` from the installed distribution's metadata, without importing
    it (``mars_ray.algo`` must import on a GPU box with torch alone); ``"absent"`` when not installed."""
    try:
        return ".".join(metadata.version("scikit-learn").split(".")[:2])
    except metadata.PackageNotFoundError:
        return "absent"


#: which K-means produces the centroids; part of the ``features`` stage key, so an artifact made by
#: another implementation (the hand-written one before, or another scikit-learn) is recomputed
IMPLEMENTATION = f"sklearn.KMeans/{_sklearn_minor()}/k-means++,n_init=1"


_EPS = 1e-12


def _sq_dists(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[n, k]`` between rows of x ``[n, d]`` and c ``[k, d]``."""
    d2 = x_sq[:, None] - 2.0 * (x @ c.T) + np.einsum("kd,kd->k", c, c)[None, :]
    return np.maximum(d2, 0.0)


def kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0, n_init: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """K-means (scikit-learn ``KMeans``: k-means++ seeding, Lloyd), deterministic by seed.

    Args:
        x: points ``[n, d]`` (cast to float32).
        k: number of clusters, ``1 <= k <= n``.
        iters: at most this many Lloyd iterations; stops earlier once assignments stop changing.
        seed: ``random_state`` of the seeding.
        n_init: initialisations, the lowest-inertia one kept (1 everywhere in the pipeline;
            ``benchmarks/adaptive_ablation.py`` measures 10).

    Returns:
        ``(centroids [k, d] float32, labels [n] int64)``; ``labels`` are the nearest centroids. With
        fewer distinct points than k, some centroids coincide (scikit-learn's warning is logged at
        debug level).

    Raises:
        ValueError: x is not 2-D, k < 1 or k > n, or iters < 1 or n_init < 1.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects x of shape [n, d], got {x.shape}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= n, got k={k}, n={n}")
    if iters < 1:
        raise ValueError(f"kmeans needs iters >= 1, got {iters}")
    if n_init < 1:
        raise ValueError(f"kmeans needs n_init >= 1, got {n_init}")
    # imported here: ``mars_ray.algo`` (hence ``engine``) must import on a GPU box with torch alone
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=iters, tol=0.0, algorithm="lloyd",
                random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        labels = km.fit_predict(x)
    for w in caught:  # "fewer distinct clusters than k" is expected on flat regions; anything else goes on
        if issubclass(w.category, ConvergenceWarning):
            logger.debug("kmeans: %s", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return km.cluster_centers_.astype(np.float32, copy=False), labels.astype(np.int64)


@dataclass(frozen=True)
class RegionClusters:
    """The clusters of one image: m rows, one per non-empty cluster of a region.

    ``class_id [m] int32`` (0 = background), ``is_bg [m] bool``, ``k [m] int32`` (index of the cluster
    within its region, 0..), ``count [m] int64`` (region pixels assigned to it), ``vector [m, d] float32``
    (mean of the L2-normalised pixel features of the cluster), ``assignment [h, w] int32`` (the row
    each pixel was assigned to; -1 for excluded pixels: 254/255).
    """

    class_id: np.ndarray
    is_bg: np.ndarray
    k: np.ndarray
    count: np.ndarray
    vector: np.ndarray
    assignment: np.ndarray

    def __len__(self) -> int:
        return int(self.class_id.shape[0])


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def cluster_regions(
    features: np.ndarray,
    label: np.ndarray,
    *,
    k_fg: int = 2,
    k_bg: int = 2,
    max_pixels: int = 20000,
    iters: int = 20,
    seed: int = 0,
) -> RegionClusters:
    """Per-region K-means of one image's pixel features (MARS Sec. 3.2).

    Each present foreground class c in 1..253 of ``label`` gets ``min(k_fg, n_c)`` clusters and the
    background (0) ``min(k_bg, n_0)``, where n is the region's pixel count; pixels labelled 254
    (biased) or 255 (ignore) are excluded. Features are L2-normalised per pixel first (cosine
    geometry), so centroids are means of unit vectors. A region larger than ``max_pixels`` is fitted on
    a seeded random subset of ``max_pixels`` pixels, then all its pixels are assigned to the nearest
    centroid to get ``count``; clusters with count 0 are dropped.

    Args:
        features: ``[d, h, w]`` pixel embeddings.
        label: ``[h, w]`` integer (uint8) pseudo label.

    Returns:
        RegionClusters with rows sorted by class id (background first), then cluster index.

    Raises:
        ValueError: shape mismatch, non-integer label, k_fg < 1, k_bg < 1, or max_pixels < max(k_fg, k_bg).
    """
    features = np.asarray(features)
    label = np.asarray(label)
    if features.ndim != 3 or label.ndim != 2 or features.shape[1:] != label.shape:
        raise ValueError(f"features [d, h, w] and label [h, w] must agree, got {features.shape} and {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an integer (uint8) map, got dtype {label.dtype}")
    if k_fg < 1 or k_bg < 1:
        raise ValueError(f"k_fg and k_bg must be >= 1, got k_fg={k_fg}, k_bg={k_bg}")
    if max_pixels < max(k_fg, k_bg):
        raise ValueError(f"max_pixels={max_pixels} must be >= max(k_fg, k_bg)={max(k_fg, k_bg)}")

    d = features.shape[0]
    pix = features.reshape(d, -1).T  # [h*w, d]
    flat = label.reshape(-1)
    rows: list[tuple[int, int, int, np.ndarray]] = []
    assignment = np.full(flat.shape, -1, dtype=np.int32)
    for c in np.unique(flat):
        c = int(c)
        if not (c == BACKGROUND or 1 <= c <= MAX_CLASSES):
            continue  # 254 biased, 255 ignore
        where = np.flatnonzero(flat == c)
        x = _l2_normalise(pix[where].astype(np.float32))
        k = min(k_bg if c == BACKGROUND else k_fg, x.shape[0])
        if x.shape[0] > max_pixels:
            sub = np.random.default_rng((seed, c)).choice(x.shape[0], max_pixels, replace=False)
            logger.debug("cluster_regions: class %d has %d pixels, fitting on %d", c, x.shape[0], max_pixels)
            centroids, _ = kmeans(x[np.sort(sub)], k, iters=iters, seed=seed)
            assign = np.argmin(_sq_dists(x, centroids, np.einsum("nd,nd->n", x, x)), axis=1)
        else:
            centroids, assign = kmeans(x, k, iters=iters, seed=seed)
        counts = np.bincount(assign, minlength=k)
        row_of = np.full(k, -1, dtype=np.int32)
        for j in np.flatnonzero(counts):
            row_of[j] = len(rows)
            rows.append((c, int(j), int(counts[j]), centroids[j]))
        assignment[where] = row_of[assign]

    m = len(rows)
    # renumber k densely within each region after dropping empty clusters
    dense_k = [sum(1 for r in rows[:i] if r[0] == rows[i][0]) for i in range(m)]
    class_id = np.array([r[0] for r in rows], dtype=np.int32)
    return RegionClusters(
        class_id=class_id,
        is_bg=class_id == BACKGROUND,
        k=np.array(dense_k, dtype=np.int32),
        count=np.array([r[2] for r in rows], dtype=np.int64),
        vector=np.stack([r[3] for r in rows]).astype(np.float32) if m else np.zeros((0, d), np.float32),
        assignment=assignment.reshape(label.shape),
    )
