"""Debiased centroid selection (MARS Eq. 1-3).

Eq. 1 scores each foreground centroid f by its mean cosine distance to ALL background centroids b_j
of the dataset, D(f) = mean_j (1 - cos(f, b_j)) / 2. Since mean_j cos(f, b_j) = f̂ · mean_j b̂_j, one
pass over the background rows (``BackgroundMean``) reduces it to O(N·d): the N_fg x N_bg matrix is
never built. Eq. 2-3 keep, per class, the ⌈α·N_c⌉ centroids farthest from the background and average
them into the debiased centroid V^c.

Streaming use (a reduction actor over the centroid table, in chunks) gives the in-memory result:
  pass 1  ``BackgroundMean.add`` on each chunk's background rows (``merge`` combines partials);
  pass 2  ``bias_distance`` on each chunk's foreground rows, concatenated (N floats);
          ``top_alpha_mask`` on all distances at once;
  pass 3  ``class_sums`` on each chunk with its slice of the mask, summed; ``means_from_sums``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

logger = logging.getLogger(__name__)

_EPS = 1e-12
_CHUNK_ROWS = 4096  # float64 work blocks small enough to stay in cache


def _check_2d(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [n, d], got {x.shape}")
    return x


def _normalise64(x: np.ndarray) -> np.ndarray:
    """Rows of x as float64 unit vectors (a zero row stays zero)."""
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def _blocks64(x: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, float64 copy of rows start:start+_CHUNK_ROWS)`` over ``x [n, d]``, in ONE reused
    buffer: a fresh float64 array per block cost page faults that took as long as the arithmetic."""
    buf = np.empty((min(_CHUNK_ROWS, x.shape[0]), x.shape[1]), dtype=np.float64)
    for s in range(0, x.shape[0], _CHUNK_ROWS):
        block = buf[: min(_CHUNK_ROWS, x.shape[0] - s)]
        np.copyto(block, x[s : s + _CHUNK_ROWS])
        yield s, block


def _inv_norms(x64: np.ndarray) -> np.ndarray:
    """1 / ||row|| of a float64 ``[n, d]`` block (0 rows give 1/eps, harmless: their dot is 0)."""
    return 1.0 / np.maximum(np.sqrt(np.einsum("nd,nd->n", x64, x64)), _EPS)


class BackgroundMean:
    """Streaming mean of L2-normalised background centroids (the b̄ of Eq. 1's O(N·d) form).

    ``add(bg [M, d])`` accumulates, ``merge(other)`` combines partial accumulators, ``mean() -> [d]``
    float64 (not renormalised). Raises ValueError on a dimension mismatch and from ``mean`` when
    nothing was added.
    """

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self.count: int = 0

    def _check_dim(self, d: int) -> None:
        if self._sum is None:
            self._sum = np.zeros(d, dtype=np.float64)
        elif self._sum.shape[0] != d:
            raise ValueError(f"background centroid dimension {d} != {self._sum.shape[0]} seen before")

    def add(self, bg: np.ndarray) -> None:
        """Accumulate background centroids ``[M, d]`` (M may be 0)."""
        bg = _check_2d("bg", bg)
        self._check_dim(bg.shape[1])
        for _, x in _blocks64(bg):
            self._sum += _inv_norms(x) @ x
        self.count += int(bg.shape[0])

    def merge(self, other: "BackgroundMean") -> "BackgroundMean":
        """Add another accumulator's centroids into this one; returns self."""
        if other._sum is not None:
            self._check_dim(other._sum.shape[0])
            self._sum += other._sum
            self.count += other.count
        return self

    def mean(self) -> np.ndarray:
        """Mean of the normalised background centroids ``[d]`` float64."""
        if self.count == 0 or self._sum is None:
            raise ValueError("no background centroids: the centroid table has no background rows")
        return self._sum / self.count


def bias_distance(fg: np.ndarray, bg_mean: np.ndarray) -> np.ndarray:
    """Eq. 1 in O(N·d): mean cosine distance of each foreground centroid to all background centroids.

    D_i = (1 - f̂_i · b̄) / 2 with b̄ = ``BackgroundMean.mean()`` (mean of the normalised background
    centroids, not renormalised), which equals mean_j (1 - cos(f_i, b_j)) / 2 exactly.

    Args:
        fg: foreground centroids ``[N, d]``.
        bg_mean: ``[d]``.

    Returns:
        D ``[N]`` float64 in [0, 1].

    Raises:
        ValueError: shapes do not agree.
    """
    fg = _check_2d("fg", fg)
    bg_mean = np.asarray(bg_mean, dtype=np.float64)
    if bg_mean.shape != (fg.shape[1],):
        raise ValueError(f"bg_mean must have shape [{fg.shape[1]}], got {bg_mean.shape}")
    out = np.empty(fg.shape[0], dtype=np.float64)
    for s, x in _blocks64(fg):  # float64 in small blocks: bounded memory, cache-friendly
        out[s : s + x.shape[0]] = (1.0 - (x @ bg_mean) * _inv_norms(x)) / 2.0
    return out


def bias_distance_naive(fg: np.ndarray, bg: np.ndarray, *, max_block: int = 4_000_000) -> np.ndarray:
    """Eq. 1 in its explicit pairwise form, D_i = mean_j (1 - cos(f_i, b_j)) / 2 (tests, benchmark).

    Costs O(N·M·d); blocks of at most ``max_block`` pairs keep memory bounded.
    fg ``[N, d]``, bg ``[M, d]`` → D ``[N]`` float64. Raises ValueError on shape mismatch or M = 0.
    """
    fg, bg = _check_2d("fg", fg), _check_2d("bg", bg)
    if fg.shape[1] != bg.shape[1]:
        raise ValueError(f"fg and bg dimensions differ: {fg.shape[1]} vs {bg.shape[1]}")
    if bg.shape[0] == 0:
        raise ValueError("no background centroids: bg is empty")
    bg_hat = _normalise64(bg)
    rows = max(1, max_block // bg.shape[0])
    out = np.empty(fg.shape[0], dtype=np.float64)
    for s in range(0, fg.shape[0], rows):
        cos = _normalise64(fg[s : s + rows]) @ bg_hat.T  # [rows, M]
        out[s : s + rows] = ((1.0 - cos) / 2.0).mean(axis=1)
    return out


def top_alpha_mask(distances: np.ndarray, class_ids: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 2-3 selection: per class c, the ⌈α·N_c⌉ centroids with the largest bias distance.

    Ties are broken by the lower index first (deterministic). ⌈·⌉ tolerates float error
    (α·N_c = 7.000000000000001 counts as 7).

    Args:
        distances: D ``[N]``; class_ids: ``[N]`` integer class of each centroid.

    Returns:
        bool ``[N]``, True for the chosen centroids.

    Raises:
        ValueError: alpha not in (0, 1], shapes differ, or non-finite distances.
    """
    distances = np.asarray(distances, dtype=np.float64)
    class_ids = np.asarray(class_ids)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if distances.ndim != 1 or distances.shape != class_ids.shape:
        raise ValueError(f"distances and class_ids must be [N], got {distances.shape} and {class_ids.shape}")
    if not np.all(np.isfinite(distances)):
        raise ValueError("distances contain NaN or inf")
    n = distances.shape[0]
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    # O(N): group by class (a stable radix sort of small integer keys keeps each class's indices in
    # ascending order), then per class the quota-th largest distance by ``np.partition``: everything
    # above it is chosen, and of the rows equal to it the lowest indices fill the quota, which is
    # exactly the order of a stable sort by descending distance (a full sort took ~4x longer).
    order = np.argsort(_sort_keys(class_ids), kind="stable")
    sorted_cls = class_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_cls[1:] != sorted_cls[:-1]])
    ends = np.r_[starts[1:], n]
    by_class = distances[order]
    for s, e in zip(starts.tolist(), ends.tolist()):
        quota = max(1, math.ceil(alpha * (e - s) - 1e-9))
        rows = order[s:e]
        if quota >= e - s:
            mask[rows] = True
            continue
        seg = by_class[s:e]
        cut = -np.partition(-seg, quota - 1)[quota - 1]  # the quota-th largest distance
        pick = seg > cut
        short = quota - int(np.count_nonzero(pick))
        if short > 0:
            pick[np.flatnonzero(seg == cut)[:short]] = True
        mask[rows[pick]] = True
    return mask


def _sort_keys(class_ids: np.ndarray) -> np.ndarray:
    """Class ids as 16-bit integers where they fit: numpy's stable sort of them is a radix sort."""
    if class_ids.size and class_ids.min() >= np.iinfo(np.int16).min and class_ids.max() <= np.iinfo(np.int16).max:
        return class_ids.astype(np.int16, copy=False)
    return class_ids


def class_sums(
    vectors: np.ndarray, class_ids: np.ndarray, mask: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums of the masked vectors (the numerator of Eq. 3), for chunked accumulation.

    vectors ``[N, d]``, class_ids ``[N]`` in 1..num_classes, mask bool ``[N]`` →
    ``(sums [num_classes + 1, d] float64, counts [num_classes + 1] int64)``; row 0 (background) stays 0.
    Raises ValueError on shape mismatch or a class id outside 1..num_classes.
    """
    vectors = _check_2d("vectors", vectors)
    class_ids = np.asarray(class_ids)
    mask = np.asarray(mask, dtype=bool)
    if class_ids.shape != (vectors.shape[0],) or mask.shape != class_ids.shape:
        raise ValueError(f"vectors {vectors.shape}, class_ids {class_ids.shape}, mask {mask.shape} disagree")
    if class_ids.size and (class_ids.min() < 1 or class_ids.max() > num_classes):
        raise ValueError(f"class ids must be in 1..{num_classes}, got {class_ids.min()}..{class_ids.max()}")
    rows = np.flatnonzero(mask)
    keys = _sort_keys(class_ids[rows])
    counts = np.bincount(keys.astype(np.int64), minlength=num_classes + 1).astype(np.int64)
    d = vectors.shape[1]
    sums = np.zeros((num_classes + 1, d), dtype=np.float64)
    # one sequential pass over the chosen rows in table order, a block at a time: the block's rows
    # grouped by class (stable radix sort), gathered into reused buffers (float32, then float64)
    # and summed per class with one ``reduceat``. A gather per class instead swept the whole table
    # once per class (C passes of cache misses).
    n = min(_CHUNK_ROWS, rows.shape[0])
    buf32, buf64 = np.empty((n, d), dtype=vectors.dtype), np.empty((n, d), dtype=np.float64)
    for s in range(0, rows.shape[0], _CHUNK_ROWS):
        k = keys[s : s + _CHUNK_ROWS]
        order = np.argsort(k, kind="stable")
        k = k[order]
        m = k.shape[0]
        np.take(vectors, rows[s : s + _CHUNK_ROWS][order], axis=0, out=buf32[:m])
        np.copyto(buf64[:m], buf32[:m])
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        sums[k[starts].astype(np.int64)] += np.add.reduceat(buf64[:m], starts, axis=0)
    return sums, counts


def means_from_sums(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 3 from accumulated ``class_sums``: ``(V [C+1, d] float32, present [C+1] bool)``; absent rows are 0."""
    present = np.asarray(counts) > 0
    means = np.zeros_like(sums, dtype=np.float32)
    means[present] = sums[present] / counts[present, None]
    present[0] = False
    means[0] = 0.0
    return means, present


def class_means(
    vectors: np.ndarray, class_ids: np.ndarray, mask: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 3: V^c = mean of the chosen centroids of class c.

    vectors ``[N, d]``, class_ids ``[N]`` in 1..num_classes, mask bool ``[N]`` →
    ``(V [num_classes + 1, d] float32, present [num_classes + 1] bool)``; row 0 (background) and classes
    without a chosen centroid are zeros with present False. Raises ValueError like ``class_sums``.
    """
    return means_from_sums(*class_sums(vectors, class_ids, mask, num_classes))


@dataclass
class Selection:
    """Result of Eq. 1-3: ``centroids [C+1, d]`` float32, ``present [C+1]`` bool,
    ``distances [N]`` float64 (Eq. 1), ``chosen [N]`` bool (Eq. 2)."""

    centroids: np.ndarray
    present: np.ndarray
    distances: np.ndarray
    chosen: np.ndarray


def select_debiased_centroids(
    fg: np.ndarray, fg_class: np.ndarray, bg: np.ndarray, *, alpha: float = 0.40, num_classes: int
) -> Selection:
    """Eq. 1-3 in memory: bias distances of fg ``[N, d]`` to bg ``[M, d]``, top-α per class, class means.

    Raises ValueError for an empty bg, an invalid alpha, or inconsistent shapes / class ids.
    """
    acc = BackgroundMean()
    acc.add(bg)
    distances = bias_distance(fg, acc.mean())
    chosen = top_alpha_mask(distances, fg_class, alpha)
    centroids, present = class_means(fg, fg_class, chosen, num_classes)
    logger.debug("selected %d of %d foreground centroids (alpha=%s)", int(chosen.sum()), chosen.size, alpha)
    return Selection(centroids=centroids, present=present, distances=distances, chosen=chosen)
