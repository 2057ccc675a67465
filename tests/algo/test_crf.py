import numpy as np
import pytest

from mars_ray.algo.crf import VOC_SIDE, dense_crf, kernels_for, scale_kernels


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


def test_scale_kernels_follows_the_image_size():
    crf = {"iters": 10, "gauss_sxy": 3.0, "bilateral_sxy": 50.0, "bilateral_srgb": 13.0}
    voc = scale_kernels(crf, (375, 500), VOC_SIDE)
    assert voc["bilateral_sxy"] == pytest.approx(50.0, rel=1e-3)  # the scale DeepLab chose it at
    small = scale_kernels(crf, (64, 64), VOC_SIDE)
    assert small["bilateral_sxy"] == pytest.approx(50.0 * 64 / VOC_SIDE)
    assert small["gauss_sxy"] == 3.0 and small["bilateral_srgb"] == 13.0  # only the long-range width scales
    wide = scale_kernels(crf, (56, 88), VOC_SIDE)
    assert wide["bilateral_sxy"] == pytest.approx(50.0 * np.sqrt(56 * 88) / VOC_SIDE)
    assert scale_kernels(crf, (64, 64), 0.0) == crf  # 0: pixels as given
    assert crf["bilateral_sxy"] == 50.0  # the input is not changed


def test_kernels_for_takes_the_reference_side_out_of_a_crf_spec():
    """A config section's CRF spec may carry ``reference_side``: ``kernels_for`` removes it (``dense_crf``
    does not take it) and scales the bilateral width to the image, as ``scale_kernels`` does."""
    spec = {"iters": 10, "bilateral_sxy": 50.0, "reference_side": VOC_SIDE}
    k = kernels_for(spec, (64, 64))
    assert "reference_side" not in k and "reference_side" in spec
    assert k["bilateral_sxy"] == pytest.approx(50.0 * 64 / VOC_SIDE)
    assert kernels_for({**spec, "reference_side": 0.0}, (64, 64)) == {"iters": 10, "bilateral_sxy": 50.0}
    assert kernels_for({"iters": 10, "bilateral_sxy": 50.0}, (64, 64))["bilateral_sxy"] == 50.0  # no spec: as given
    img = np.zeros((8, 8, 3), np.uint8)
    probs = np.full((2, 8, 8), 0.5, np.float32)
    dense_crf(img, probs, **k)  # what kernels_for returns is exactly dense_crf's keywords
