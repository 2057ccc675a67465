import math

import numpy as np
import pytest

from mars_ray.algo.centroids import (
    BackgroundMean,
    bias_distance,
    bias_distance_naive,
    class_means,
    class_sums,
    means_from_sums,
    select_debiased_centroids,
    top_alpha_mask,
)


def _data(n=300, m=120, d=16, c=5, seed=0):
    rng = np.random.default_rng(seed)
    fg = rng.normal(size=(n, d)).astype(np.float32)
    bg = rng.normal(size=(m, d)).astype(np.float32) * rng.uniform(0.1, 3, size=(m, 1)).astype(np.float32)
    cls = rng.integers(1, c + 1, size=n)
    return fg, cls, bg


def test_eq1_fast_equals_naive_and_loop():
    fg, _, bg = _data()
    acc = BackgroundMean()
    acc.add(bg)
    fast = bias_distance(fg, acc.mean())
    naive = bias_distance_naive(fg, bg, max_block=1000)  # several blocks
    np.testing.assert_allclose(fast, naive, atol=1e-6)
    # independent double loop on a few rows
    for i in (0, 17, 299):
        cos = [float(fg[i] @ b) / (np.linalg.norm(fg[i]) * np.linalg.norm(b)) for b in bg]
        assert fast[i] == pytest.approx(sum((1 - s) / 2 for s in cos) / len(bg), abs=1e-6)
    assert fast.dtype == np.float64


def test_background_mean_merge_and_errors():
    _, _, bg = _data()
    whole, a, b = BackgroundMean(), BackgroundMean(), BackgroundMean()
    whole.add(bg)
    a.add(bg[:50])
    b.add(bg[50:])
    b.add(bg[:0])
    assert a.merge(b).count == whole.count == len(bg)
    np.testing.assert_allclose(a.mean(), whole.mean(), atol=1e-12)
    with pytest.raises(ValueError, match="no background centroids"):
        BackgroundMean().mean()
    with pytest.raises(ValueError):
        whole.add(np.zeros((2, 3)))


def test_top_alpha_counts_and_ties():
    d = np.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.7])
    cls = np.array([1, 1, 1, 1, 1, 2, 2])
    m = top_alpha_mask(d, cls, 0.4)  # ceil(0.4*5)=2 of class 1, ceil(0.4*2)=1 of class 2
    assert m.tolist() == [False, True, False, True, False, True, False]  # tie 0.7: lower index
    assert top_alpha_mask(d, cls, 1.0).all()
    assert top_alpha_mask(np.full(10, 0.5), np.ones(10, int), 0.7).sum() == 7  # 0.7*10 is 7.000…1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            top_alpha_mask(d, cls, bad)


@pytest.mark.parametrize("alpha", [0.1, 0.4, 0.75, 1.0])
def test_top_alpha_matches_loop(alpha):
    rng = np.random.default_rng(1)
    d = rng.integers(0, 5, size=60) / 4.0  # many ties
    cls = rng.integers(1, 4, size=60)
    got = top_alpha_mask(d, cls, alpha)
    for c in np.unique(cls):
        idx = [i for i in range(60) if cls[i] == c]
        ranked = sorted(idx, key=lambda i: (-d[i], i))
        want = set(ranked[: math.ceil(alpha * len(idx) - 1e-9)])
        assert set(np.flatnonzero(got & (cls == c)).tolist()) == want


def test_class_means_by_hand():
    v = np.array([[1, 0], [3, 0], [0, 2], [5, 5]], dtype=np.float32)
    cls = np.array([1, 1, 3, 3])
    mask = np.array([True, True, True, False])
    means, present = class_means(v, cls, mask, num_classes=4)
    assert means.shape == (5, 2) and means.dtype == np.float32
    np.testing.assert_allclose(means, [[0, 0], [2, 0], [0, 0], [0, 2], [0, 0]])
    assert present.tolist() == [False, True, False, True, False]
    with pytest.raises(ValueError):
        class_means(v, np.array([0, 1, 1, 1]), mask, num_classes=4)


def test_chunked_selection_equals_in_memory():
    fg, cls, bg = _data(n=500, m=200)
    alpha, num_classes = 0.4, 5
    ref = select_debiased_centroids(fg, cls, bg, alpha=alpha, num_classes=num_classes)
    # a table in chunks, fg and bg rows interleaved, streamed three times as the reduction actor does
    chunks = [(fg[s : s + 64], cls[s : s + 64], bg[(s * 2) // 5 : ((s + 64) * 2) // 5]) for s in range(0, 500, 64)]
    acc = BackgroundMean()
    for _, _, b in chunks:
        part = BackgroundMean()
        part.add(b)
        acc.merge(part)
    dist = np.concatenate([bias_distance(f, acc.mean()) for f, _, _ in chunks])
    chosen = top_alpha_mask(dist, cls, alpha)
    sums, counts, off = np.zeros((num_classes + 1, fg.shape[1])), np.zeros(num_classes + 1, np.int64), 0
    for f, c, _ in chunks:
        s, n = class_sums(f, c, chosen[off : off + len(f)], num_classes)
        sums, counts, off = sums + s, counts + n, off + len(f)
    means, present = means_from_sums(sums, counts)
    np.testing.assert_allclose(dist, ref.distances, atol=1e-12)
    np.testing.assert_array_equal(chosen, ref.chosen)
    np.testing.assert_allclose(means, ref.centroids, atol=1e-6)
    np.testing.assert_array_equal(present, ref.present)
    # Eq. 3 independently: the mean of the chosen rows of each class
    for c in range(1, num_classes + 1):
        rows = [fg[i] for i in range(len(fg)) if cls[i] == c and ref.chosen[i]]
        np.testing.assert_allclose(ref.centroids[c], np.mean(rows, axis=0), atol=1e-6)
        assert ref.chosen[cls == c].sum() == math.ceil(0.4 * (cls == c).sum() - 1e-9)


def test_selection_prefers_centroids_far_from_background():
    bg = np.array([[1.0, 0.0], [0.9, 0.1]], dtype=np.float32)
    fg = np.array([[1.0, 0.05], [0.0, 1.0], [-1.0, 0.0], [0.2, 1.0]], dtype=np.float32)
    sel = select_debiased_centroids(fg, np.array([1, 1, 1, 1]), bg, alpha=0.5, num_classes=1)
    assert sel.chosen.tolist() == [False, True, True, False]  # the two farthest from the bg direction
    with pytest.raises(ValueError, match="no background"):
        select_debiased_centroids(fg, np.ones(4, int), bg[:0], num_classes=1)


@pytest.mark.parametrize("n_classes", [1, 7, 300])
def test_top_alpha_and_class_sums_match_sort_reference(n_classes):
    """The O(N) per-class partition equals a stable sort by (class, -distance, index) on larger
    inputs with many ties; the one-pass class sums equal a per-class float64 sum."""
    rng = np.random.default_rng(n_classes)
    n = 20_000
    d = rng.integers(0, 50, size=n) / 49.0  # heavy ties
    cls = rng.integers(1, n_classes + 1, size=n)
    for alpha in (0.05, 0.4, 0.99):
        order = np.lexsort((np.arange(n), -d, cls))
        want = np.zeros(n, dtype=bool)
        starts = np.flatnonzero(np.r_[True, cls[order][1:] != cls[order][:-1]])
        for s, e in zip(starts, np.r_[starts[1:], n]):
            want[order[s : s + math.ceil(alpha * (e - s) - 1e-9)]] = True
        got = top_alpha_mask(d, cls, alpha)
        np.testing.assert_array_equal(got, want)
        vectors = rng.standard_normal((n, 5)).astype(np.float32)
        sums, counts = class_sums(vectors, cls, got, n_classes)
        for c in range(1, n_classes + 1):
            rows = vectors[got & (cls == c)].astype(np.float64)
            assert counts[c] == rows.shape[0]
            np.testing.assert_allclose(sums[c], rows.sum(axis=0), rtol=1e-12, atol=1e-12)
