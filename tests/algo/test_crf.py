import numpy as np
import pytest

from mars_ray.algo.crf import dense_crf


def _two_regions(h=20, w=20):
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, w // 2 :] = 255
    lab = (np.arange(w)[None, :] >= w // 2).repeat(h, 0).astype(int)
    return img, lab


def _probs(lab, conf):
    p = np.where(lab[None] == np.arange(2)[:, None, None], conf, 1 - conf).astype(np.float32)
    return p


def test_crf_keeps_clean_two_region_image():
    img, lab = _two_regions()
    q = dense_crf(img, _probs(lab, 0.8))
    assert q.shape == (2, 20, 20) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1, atol=1e-4)
    np.testing.assert_array_equal(q.argmax(0), lab)


def test_crf_smooths_a_noisy_pixel():
    img, lab = _two_regions()
    noisy = lab.copy()
    noisy[10, 3] = 1  # wrong label inside the black region, same colour as its neighbours
    p = _probs(noisy, 0.6)
    assert p.argmax(0)[10, 3] == 1
    q = dense_crf(img, p)
    assert q.argmax(0)[10, 3] == 0
    np.testing.assert_array_equal(q.argmax(0), lab)


def test_crf_no_pairwise_returns_normalised_probs():
    img, lab = _two_regions(6, 6)
    p = _probs(lab, 0.7) * 3  # unnormalised on purpose
    q = dense_crf(img, p, gauss_compat=0, bilateral_compat=0)
    np.testing.assert_allclose(q, p / p.sum(0), atol=1e-5)


def test_crf_errors():
    img, lab = _two_regions(6, 6)
    with pytest.raises(ValueError):
        dense_crf(img.astype(np.float32), _probs(lab, 0.7))
    with pytest.raises(ValueError):
        dense_crf(img, _probs(lab, 0.7)[:, :5])
