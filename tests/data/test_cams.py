"""CAM files of IRN/AMN/PSA/MCTformer/ToCo → pseudo labels, against the repositories' own label code.

Each file is written the way the repository writes it (np.save of the same dict, same dtypes, torch
tensors where it keeps them); the reference labels re-implement the repository's eval/label script.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from mars_ray import safe_pickle
from mars_ray.data.cams import PRESETS, Cams, cams_to_label, parse_cams

H, W = 12, 16


def _raw_cams(seed: int = 0, k: int = 20) -> torch.Tensor:
    """A model's summed multi-scale ReLU CAMs for all 20 classes: 20 x H x W."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, H, W, generator=g) ** 3 * 4


def _label(classes: list[int]) -> torch.Tensor:
    lab = torch.zeros(20)
    lab[[c - 1 for c in classes]] = 1
    return lab


def _roundtrip(d: dict) -> object:
    """np.save then read back the way convert-cams does (restricted unpickling)."""
    buf = io.BytesIO()
    np.save(buf, d)
    return safe_pickle.load_npy(buf.getvalue())


def _irn_file(classes: list[int], seed: int = 0) -> dict:
    """IRN step/make_cam.py: keys = torch.nonzero(label)[:, 0]; maps / (max + 1e-5); high_res as numpy."""
    label = _label(classes)
    highres = _raw_cams(seed)
    strided = highres[:, ::4, ::4].clone()
    valid_cat = torch.nonzero(label)[:, 0]
    strided = strided[valid_cat]
    strided /= torch.nn.functional.adaptive_max_pool2d(strided, (1, 1)) + 1e-5
    highres = highres[valid_cat]
    highres /= torch.nn.functional.adaptive_max_pool2d(highres, (1, 1)) + 1e-5
    return {"keys": valid_cat, "cam": strided.cpu(), "high_res": highres.cpu().numpy()}


def _amn_file(classes: list[int], seed: int = 0) -> dict:
    """AMN step/make_amn_cam.py: softmax over 21 channels, keys = pad(valid_cat + 1, (1, 0)), min-max norm."""
    label = _label(classes)
    logits = torch.cat([torch.zeros(1, H, W), _raw_cams(seed)])
    valid_cat = torch.nonzero(label)[:, 0]
    keys = np.pad(valid_cat + 1, (1, 0), mode="constant")
    highres = torch.softmax(logits, dim=0)[keys].numpy()
    lo, hi = highres.min((1, 2), keepdims=True), highres.max((1, 2), keepdims=True)
    highres = (highres - lo) / (hi - lo + 1e-5)
    return {"keys": valid_cat, "cam": torch.tensor(highres[:, ::4, ::4]), "high_res": highres}


def _psa_file(classes: list[int], seed: int = 0) -> dict:
    """PSA infer_cls.py / MCTformer engine.py: {i: norm_cam[i]} for the labelled classes."""
    label = _label(classes).numpy()
    cams = _raw_cams(seed).numpy()
    norm = cams / (np.max(cams, (1, 2), keepdims=True) + 1e-5)
    return {i: norm[i] for i in range(20) if label[i] > 1e-5}


def _toco_file(classes: list[int], seed: int = 0) -> dict:
    """ToCo tools/infer_seg_as_cam.py: softmax scores of the valid classes, keys as a numpy array."""
    label = _label(classes)
    seg = torch.softmax(torch.cat([torch.zeros(1, H, W), _raw_cams(seed)])[None], dim=1)
    cams = seg[:, 1:] * label.view(1, 20, 1, 1)
    valid = torch.nonzero(label)[:, 0]
    return {"keys": valid.cpu().numpy(), "high_res": cams[0, valid].cpu().numpy()}


def _irn_eval(d: dict, thres: float, amn: bool = False) -> np.ndarray:
    """IRN step/eval_cam.py (AMN eval_amn_cam.py drops channel 0 first)."""
    cams = d["high_res"][1:] if amn else d["high_res"]
    cams = np.pad(cams, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thres)
    keys = np.pad(np.asarray(d["keys"]) + 1, (1, 0), mode="constant")
    return keys[np.argmax(cams, axis=0)]


def _irn_band(d: dict, fg: float, bg: float) -> np.ndarray:
    """IRN step/cam_to_ir_label.py without the CRF: confident fg / bg, 255 between."""
    fg_conf = _irn_eval(d, fg)
    bg_conf = _irn_eval(d, bg)
    conf = fg_conf.copy()
    conf[fg_conf == 0] = 255
    conf[bg_conf + fg_conf == 0] = 0
    return conf


CLASSES = [3, 12, 15]


@pytest.mark.parametrize("thres", [0.15, 0.4])
def test_irn_matches_eval_cam(thres: float) -> None:
    d = _irn_file(CLASSES)
    got = cams_to_label(parse_cams(_roundtrip(d), "irn"), bg_threshold=thres)
    np.testing.assert_array_equal(got, _irn_eval(d, thres))
    assert set(np.unique(got)) <= {0, *CLASSES} and len(np.unique(got)) > 2


def test_amn_drops_its_background_channel() -> None:
    d = _amn_file(CLASSES)
    assert d["high_res"].shape[0] == len(CLASSES) + 1
    got = cams_to_label(parse_cams(_roundtrip(d), "amn"), bg_threshold=0.25)
    np.testing.assert_array_equal(got, _irn_eval(d, 0.25, amn=True))
    with pytest.raises(ValueError, match="--format amn"):
        parse_cams(_roundtrip(d), "irn", "x.npy")
    with pytest.raises(ValueError, match="--format irn"):
        parse_cams(_roundtrip(_irn_file(CLASSES)), "amn", "x.npy")


def test_psa_mctformer_dict_and_toco() -> None:
    d = _psa_file(CLASSES)
    got = cams_to_label(parse_cams(_roundtrip(d), "psa"), bg_threshold=0.2)
    # PSA infer_cls.py out_cam_pred: argmax([0.2 * ones, norm_cam]) over all 20 classes (others zeroed)
    cams = np.zeros((20, H, W), np.float32)
    for i, m in d.items():
        cams[i] = m
    ref = np.argmax(np.concatenate([np.full((1, H, W), 0.2, np.float32), cams]), 0)
    np.testing.assert_array_equal(got, ref)
    t = _toco_file(CLASSES)
    got = cams_to_label(parse_cams(_roundtrip(t), "toco"), bg_threshold=0.05)
    np.testing.assert_array_equal(got, _irn_eval(t, 0.05))
    with pytest.raises(ValueError, match="--format irn, amn or toco"):
        parse_cams(_roundtrip(t), "psa", "t.npy")
    with pytest.raises(ValueError, match="--format psa"):
        parse_cams(_roundtrip(d), "irn", "d.npy")


def test_irn_band() -> None:
    d = _irn_file(CLASSES, seed=2)
    got = cams_to_label(parse_cams(_roundtrip(d), "irn"), bg_threshold=0.05, fg_threshold=0.30)
    ref = _irn_band(d, 0.30, 0.05)
    np.testing.assert_array_equal(got, ref)
    assert {0, 255} <= set(np.unique(got).tolist())
    with pytest.raises(ValueError, match="above"):
        cams_to_label(parse_cams(_roundtrip(d), "irn"), bg_threshold=0.3, fg_threshold=0.3)


def test_label_crf_matches_irn_crf_inference_label() -> None:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    d = _irn_file(CLASSES, seed=1)

    def crf_inference_label(img, labels, t=10, n_labels=21, gt_prob=0.7):  # IRN misc/imutils.py
        h, w = img.shape[:2]
        c = dcrf.DenseCRF2D(w, h, n_labels)
        c.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False))
        c.addPairwiseGaussian(sxy=3, compat=3)
        c.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
        return np.argmax(np.array(c.inference(t)).reshape((n_labels, h, w)), axis=0)

    keys = np.pad(d["keys"].numpy() + 1, (1, 0), mode="constant")
    fg = keys[crf_inference_label(img, np.argmax(np.pad(d["high_res"], ((1, 0), (0, 0), (0, 0)),
                                                         constant_values=0.30), 0), n_labels=keys.shape[0])]
    bg = keys[crf_inference_label(img, np.argmax(np.pad(d["high_res"], ((1, 0), (0, 0), (0, 0)),
                                                         constant_values=0.05), 0), n_labels=keys.shape[0])]
    ref = fg.copy()
    ref[fg == 0] = 255
    ref[bg + fg == 0] = 0
    p = PRESETS["irn-band"]
    got = cams_to_label(parse_cams(_roundtrip(d), "irn"), bg_threshold=p["bg_threshold"],
                        fg_threshold=p["fg_threshold"], crf="labels", image=img)
    np.testing.assert_array_equal(got, ref)


def test_score_crf_matches_toco_infer_cam_crf_label() -> None:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    t = _toco_file(CLASSES, seed=3)

    def post(image, prob):  # DenseCRF(iter_max=10, pos_xy_std=3, pos_w=3, bi_xy_std=36, bi_rgb_std=3, bi_w=4)
        c, h, w = prob.shape
        d = dcrf.DenseCRF2D(w, h, c)
        d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=36, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
        return np.array(d.inference(10)).reshape((c, h, w))

    def pred(thre):
        logit = np.concatenate([np.full((1, H, W), thre, np.float32), t["high_res"]])
        prob = torch.softmax(torch.from_numpy(logit), dim=0).numpy()
        keys = np.zeros(t["keys"].shape[0] + 1)
        keys[1:] = t["keys"] + 1
        return keys[np.argmax(post(img, prob), axis=0)]

    pred_h, pred_l = pred(0.7), pred(0.25)
    ref = pred_h.copy()
    ref[pred_h == 0] = 255
    ref[(pred_h + pred_l) == 0] = 0
    got = cams_to_label(parse_cams(_roundtrip(t), "toco"), bg_threshold=0.25, fg_threshold=0.7, crf="scores", image=img)
    np.testing.assert_array_equal(got, ref.astype(np.uint8))


def test_amn_coco_file_without_classes_and_errors() -> None:
    # AMN step/make_cam_coco.py saves {"keys": valid_cat} alone when the image has no class
    empty = parse_cams(_roundtrip({"keys": torch.nonzero(torch.zeros(80))[:, 0]}), "irn")
    assert empty == Cams((), None)
    assert cams_to_label(empty, bg_threshold=0.15, size=(5, 7)).shape == (5, 7)
    with pytest.raises(ValueError, match="image size"):
        cams_to_label(empty, bg_threshold=0.15)
    d = _irn_file(CLASSES)
    d["high_res"] = d["high_res"][:2]
    with pytest.raises(ValueError, match=r"bad.npy: 'high_res' has 2 maps for 3 keys"):
        parse_cams(_roundtrip(d), "irn", "bad.npy")
    d = _irn_file(CLASSES)
    d["high_res"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        parse_cams(_roundtrip(d), "irn", "nan.npy")
    with pytest.raises(ValueError, match="CRF needs the uint8 image"):
        cams_to_label(parse_cams(_roundtrip(_irn_file(CLASSES)), "irn"), bg_threshold=0.1, crf="labels")
    with pytest.raises(ValueError, match="unknown CAM format"):
        parse_cams({}, "cam")
