import numpy as np
import pytest

from mars_ray.algo.clustering import RegionClusters, cluster_regions, kmeans


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0]], dtype=np.float32)
    truth = np.repeat(np.arange(3), 50)
    return centres[truth] + rng.normal(scale=0.3, size=(150, 3)).astype(np.float32), truth


def test_kmeans_recovers_separated_blobs():
    x, truth = _blobs()
    centroids, labels = kmeans(x, 3, seed=1)
    assert centroids.shape == (3, 3) and centroids.dtype == np.float32 and labels.dtype == np.int64
    # a perfect partition: each true blob maps to exactly one cluster
    pairs = {(int(t), int(l)) for t, l in zip(truth, labels)}
    assert len(pairs) == 3 and len({l for _, l in pairs}) == 3
    for j in range(3):
        np.testing.assert_allclose(centroids[j], x[labels == j].mean(axis=0), atol=1e-5)


def test_kmeans_deterministic_and_seeded():
    x = np.random.default_rng(3).normal(size=(500, 8)).astype(np.float32)
    a, b = kmeans(x, 4, seed=7), kmeans(x, 4, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_kmeans_k_equals_n_and_duplicates():
    x = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    _, labels = kmeans(x, 3)
    assert sorted(labels.tolist()) == [0, 1, 2]
    dup = np.ones((4, 2), dtype=np.float32)  # all points equal: must not crash
    c, labels = kmeans(dup, 2)
    assert c.shape == (2, 2) and labels.shape == (4,)


def test_kmeans_n_init_keeps_the_lowest_inertia_start():
    from sklearn.cluster import KMeans

    x = np.random.default_rng(5).normal(size=(400, 6)).astype(np.float32)
    inertia = lambda c, l: float(((x - c[l]) ** 2).sum())  # noqa: E731
    best = inertia(*kmeans(x, 5, seed=2, n_init=8))
    ref = KMeans(n_clusters=5, init="k-means++", n_init=8, max_iter=20, tol=0.0, algorithm="lloyd", random_state=2).fit(x)
    assert best == pytest.approx(float(ref.inertia_), rel=1e-4)
    singles = [inertia(*kmeans(x, 5, seed=s)) for s in range(8)]
    assert best <= max(singles) and best < np.mean(singles)
    with pytest.raises(ValueError, match="n_init >= 1"):
        kmeans(x, 5, n_init=0)


@pytest.mark.parametrize("k", [0, 4])
def test_kmeans_bad_k(k):
    with pytest.raises(ValueError, match=r"k=.*n=3"):
        kmeans(np.zeros((3, 2), np.float32), k)
    with pytest.raises(ValueError, match="iters >= 1"):
        kmeans(np.zeros((3, 2), np.float32), 2, iters=0)


@pytest.mark.parametrize("k", [3, 4])
def test_kmeans_seeding_rarely_merges_separated_clusters(k):
    """k unit-normalised Gaussian clusters in d = 19 (as cluster_regions sees them): the seeding must
    find all k for nearly every seed (scikit-learn 1.9: 60/60 and 59/60). The hand-written
    single-candidate k-means++ this replaced found them for 56/60 (k=3) and 50/60 (k=4) seeds
    (``handwritten_kmeans`` in benchmarks/kmeans_bench.py)."""
    rng = np.random.default_rng(k)
    centres = rng.normal(size=(k, 19)) * 4 / np.sqrt(2)
    truth = rng.integers(k, size=400)
    x = (centres[truth] + rng.normal(size=(400, 19))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    found = sum(len({(int(t), int(a)) for t, a in zip(truth, kmeans(x, k, seed=s)[1])}) == k for s in range(60))
    assert found >= 58, found


def _image() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    label = np.zeros((12, 10), dtype=np.uint8)
    label[2:6, 2:8] = 3
    label[8:11, 1:4] = 7
    label[0, :] = 255
    label[11, 5:9] = 254
    label[9, 9] = 5  # a single-pixel region
    return rng.normal(size=(6, 12, 10)).astype(np.float32), label


def test_cluster_regions_counts_and_exclusions():
    features, label = _image()
    rc = cluster_regions(features, label, k_fg=2, k_bg=3)
    assert isinstance(rc, RegionClusters)
    assert set(rc.class_id.tolist()) == {0, 3, 5, 7}  # 254 and 255 excluded
    for c in (0, 3, 5, 7):
        assert rc.count[rc.class_id == c].sum() == (label == c).sum()
    assert (rc.class_id == 5).sum() == 1  # never more clusters than pixels
    assert (rc.class_id == 0).sum() <= 3 and (rc.class_id == 3).sum() <= 2
    np.testing.assert_array_equal(rc.is_bg, rc.class_id == 0)
    assert rc.vector.shape == (len(rc), 6) and rc.vector.dtype == np.float32
    assert np.all(np.linalg.norm(rc.vector, axis=1) <= 1 + 1e-5)  # means of unit vectors
    single = rc.vector[rc.class_id == 5][0]
    f = features[:, 9, 9]
    np.testing.assert_allclose(single, f / np.linalg.norm(f), atol=1e-6)
    for c in (0, 3, 7):
        assert rc.k[rc.class_id == c].tolist() == list(range((rc.class_id == c).sum()))


def test_cluster_regions_subsample_assigns_all_pixels():
    features, label = _image()
    rc = cluster_regions(features, label, k_fg=2, k_bg=2, max_pixels=5)
    assert rc.count[rc.class_id == 0].sum() == (label == 0).sum()
    again = cluster_regions(features, label, k_fg=2, k_bg=2, max_pixels=5)
    np.testing.assert_array_equal(rc.vector, again.vector)


def test_cluster_regions_errors():
    features, label = _image()
    with pytest.raises(ValueError):
        cluster_regions(features[:, :5], label)
    with pytest.raises(ValueError):
        cluster_regions(features, label, k_fg=0)
    with pytest.raises(ValueError):
        cluster_regions(features, label, k_bg=0)
    empty = cluster_regions(features, np.full((12, 10), 255, np.uint8))
    assert len(empty) == 0 and empty.vector.shape == (0, 6)


def test_cluster_regions_assignment_maps_pixels_to_rows():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(4, 6, 7)).astype(np.float32)
    label = np.zeros((6, 7), np.uint8)
    label[:3] = 2
    label[0, 0] = 255
    label[5, 6] = 254
    rc = cluster_regions(feats, label, k_fg=2, k_bg=2)
    a = rc.assignment
    assert a.shape == label.shape
    assert a[0, 0] == -1 and a[5, 6] == -1
    valid = a >= 0
    # each pixel's row has the pixel's class, and counts agree with the map
    assert np.all(rc.class_id[a[valid]] == label[valid])
    assert np.array_equal(np.bincount(a[valid], minlength=len(rc)), rc.count)
