import numpy as np
import pytest
import torch

from mars_ray.algo.debias import activation_map, binarize_activation, debias_label, unary_probs


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


def test_symmetric_unary_is_m_at_threshold_half_and_passes_through_the_threshold():
    m = np.array([[0.0, 0.25, 0.5, 0.75, 1.0]], np.float32)
    p = unary_probs(m, 0.5)
    assert np.allclose(p[1], m) and np.allclose(p.sum(0), 1.0)  # P_fg = M, P_bg = 1 - M
    q = unary_probs(m, 0.4)
    assert q[1, 0, 0] == 0.0 and q[1, 0, -1] == 1.0  # certain at both ends, whatever the threshold
    assert unary_probs(np.array([[0.4]], np.float32), 0.4)[1, 0, 0] == pytest.approx(0.5)
    assert np.all(np.diff(q[1, 0]) > 0)  # monotone in M
    r = unary_probs(m, 0.5, "ratio")  # the old mapping: never more than 1/(1+t) sure of a target
    assert r[1, 0, -1] == pytest.approx(1 / 1.5) and np.allclose(r.sum(0), 1.0)
    with pytest.raises(ValueError, match="unary"):
        unary_probs(m, 0.5, "softmax")
    with pytest.raises(ValueError, match="threshold"):
        unary_probs(m, 1.0)


@pytest.mark.parametrize("unary", ["symmetric", "ratio"])
def test_without_pairwise_terms_both_unaries_decide_m_above_threshold(unary):
    rng = np.random.default_rng(0)
    m = rng.uniform(0, 1, (6, 7)).astype(np.float32)
    img = rng.integers(0, 255, (6, 7, 3), dtype=np.uint8)
    for t in (0.3, 0.5, 0.7):
        keep = binarize_activation(m, threshold=t, image=img, crf={"gauss_compat": 0, "bilateral_compat": 0, "iters": 3},
                                   unary=unary)
        assert np.array_equal(keep, m > t)


def test_symmetric_unary_keeps_a_confident_target_that_shares_its_context_colour():
    """An object (M = 0.9) inside a larger context (M = 0.1) of the *same* colour, CRF kernels as the
    debias stage scales them to a 96 px image: the old ratio unary (at most 67 % sure of the object)
    lets the pairwise terms flood the object with the context's decision; the symmetric one keeps it."""
    h = w = 96
    img = np.full((h, w, 3), 120, np.uint8)  # one colour everywhere: only M tells object from context
    m = np.full((h, w), 0.1, np.float32)
    obj = np.zeros((h, w), bool)
    obj[30:66, 30:66] = True
    m[obj] = 0.9
    crf = {"iters": 10, "gauss_sxy": 3, "gauss_compat": 3, "bilateral_sxy": 11, "bilateral_srgb": 13,
           "bilateral_compat": 4}
    sym = binarize_activation(m, image=img, crf=crf)
    ratio = binarize_activation(m, image=img, crf=crf, unary="ratio")
    assert sym[obj].mean() > 0.9 and not sym[~obj].any()
    assert ratio[obj].mean() < 0.1 and not ratio[~obj].any()


def test_binarize_rejects_an_unknown_unary():
    with pytest.raises(ValueError, match="unary must be one of symmetric, ratio"):
        binarize_activation(np.zeros((2, 2), np.float32), unary="linear")
