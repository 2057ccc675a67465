"""Per-region K-means of pixel embeddings (MARS Sec. 3.2, the input of Eq. 1-3).

For every image, the pixels of each region of the pseudo label Y^b (each present foreground class,
and the background) are clustered in the USS embedding space; the cluster centroids are the rows of
the dataset-wide centroid table that ``centroids.py`` selects from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mars_ray.labels import BACKGROUND, MAX_CLASSES

logger = logging.getLogger(__name__)

_EPS = 1e-12


def _sq_dists(x: np.ndarray, c: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[n, k]`` between rows of x ``[n, d]`` and c ``[k, d]``."""
    d2 = x_sq[:, None] - 2.0 * (x @ c.T) + np.einsum("kd,kd->k", c, c)[None, :]
    return np.maximum(d2, 0.0)


def _kmeans_pp(x: np.ndarray, k: int, x_sq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: first centre uniform, then each next one with probability ∝ D(x)^2."""
    n = x.shape[0]
    idx = [int(rng.integers(n))]
    closest = _sq_dists(x, x[idx], x_sq)[:, 0].astype(np.float64)
    for _ in range(1, k):
        total = closest.sum()
        if total > 0:
            nxt = int(rng.choice(n, p=closest / total))
        else:  # every point coincides with a chosen centre: pick an unused index uniformly
            unused = np.setdiff1d(np.arange(n), idx)
            nxt = int(rng.choice(unused))
        idx.append(nxt)
        closest = np.minimum(closest, _sq_dists(x, x[nxt : nxt + 1], x_sq)[:, 0])
    return x[idx].copy()


def _update(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """Lloyd update: means of the assigned points; an empty cluster is re-seeded at the farthest point."""
    k = centroids.shape[0]
    counts = np.bincount(labels, minlength=k)
    one_hot = np.zeros((x.shape[0], k), dtype=np.float32)
    one_hot[np.arange(x.shape[0]), labels] = 1.0
    new = (one_hot.T @ x) / np.maximum(counts, 1)[:, None].astype(np.float32)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        own = _sq_dists(x, centroids, x_sq)[np.arange(x.shape[0]), labels]
        for j, far in zip(empty, np.argsort(-own, kind="stable")):
            logger.debug("kmeans: cluster %d empty, re-seeded at point %d", j, far)
            new[j] = x[far]
    return new


def kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """K-means with k-means++ seeding and Lloyd iterations (deterministic for a given seed).

    Args:
        x: points ``[n, d]`` (cast to float32).
        k: number of clusters, ``1 <= k <= n``.
        iters: at most this many Lloyd updates; stops earlier once assignments stop changing.
        seed: seed of ``np.random.default_rng`` for the k-means++ seeding.

    Returns:
        ``(centroids [k, d] float32, labels [n] int64)``; ``labels`` are the nearest centroids
        (ties to the lower index). An empty cluster is re-seeded from the point farthest from its centroid.

    Raises:
        ValueError: x is not 2-D, k < 1 or k > n, or iters < 0.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects x of shape [n, d], got {x.shape}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= n, got k={k}, n={n}")
    if iters < 0:
        raise ValueError(f"kmeans needs iters >= 0, got {iters}")
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
