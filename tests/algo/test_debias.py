import numpy as np
import pytest
import torch

from mars_ray.algo.debias import activation_map, binarize_activation, debias_label


def test_eq4_matches_per_pixel_loop():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 4, 6)).astype(np.float32)
    cents = rng.normal(size=(3, 5)).astype(np.float32)
    got = activation_map(feats, cents)
    assert got.shape == (4, 6) and got.dtype == np.float32
    for y in range(4):
        for x in range(6):
            f = feats[:, y, x]
            best = max(float(f @ v) / (np.linalg.norm(f) * np.linalg.norm(v)) for v in cents)
            assert got[y, x] == pytest.approx(max(best, 0.0), abs=1e-5)
    np.testing.assert_allclose(activation_map(torch.from_numpy(feats), cents), got, atol=1e-6)


def test_eq4_relu_and_empty():
    feats = np.zeros((2, 1, 2), dtype=np.float32)
    feats[:, 0, 0] = [1, 0]
    feats[:, 0, 1] = [-1, 0]
    assert activation_map(feats, np.array([[2.0, 0.0]])).tolist() == [[1.0, 0.0]]  # cos -1 → 0
    assert activation_map(feats, np.zeros((0, 2))).tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError):
        activation_map(feats, np.ones((1, 3)))


def test_binarize_without_crf():
    m = np.array([[0.2, 0.5, 0.9]], dtype=np.float32)
    assert binarize_activation(m).tolist() == [[False, False, True]]
    assert binarize_activation(m, threshold=0.1).tolist() == [[True, True, True]]
    with pytest.raises(ValueError):
        binarize_activation(m, crf={})


def test_binarize_crf_without_pairwise_equals_threshold():
    rng = np.random.default_rng(0)
    m = rng.uniform(size=(8, 9)).astype(np.float32)
    img = rng.integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    keep = binarize_activation(m, image=img, crf={"gauss_compat": 0, "bilateral_compat": 0, "iters": 3})
    np.testing.assert_array_equal(keep, m > 0.5)


def test_eq5_hand_cases():
    pseudo = np.array([[0, 1, 2, 254, 255], [3, 3, 0, 255, 1]], dtype=np.uint8)
    keep = np.array([[False, False, True, False, False], [True, False, True, True, True]])
    out = debias_label(pseudo, keep)
    assert out.tolist() == [[0, 254, 2, 254, 255], [3, 254, 0, 255, 1]]
    assert out.dtype == np.uint8 and out is not pseudo
    assert pseudo[0, 1] == 1  # input untouched
    with pytest.raises(ValueError):
        debias_label(pseudo, keep[:, :2])
