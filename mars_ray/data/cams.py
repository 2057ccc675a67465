"""CAM files of the WSSS repositories → pseudo-label maps (0 background, 1..C, 255 ignore band).

Pure functions (numpy/torch, no Ray); ``mars_ray.stages.convert_cams`` runs them over a folder.

Formats (one ``{id}.npy`` per image, ``np.save`` of a dict; read with :mod:`mars_ray.safe_pickle`):

* ``irn``: ``{"keys": valid_cat, "cam": strided_cam, "high_res": highres_cam}`` (IRN
  ``step/make_cam.py``): ``keys`` the 0-based foreground class indices (a torch tensor from
  ``torch.nonzero(label)[:, 0]``), ``high_res`` ``float32 [K, H, W]`` at image size, each map divided
  by its max. ``cam`` is the stride-4 map (unused here, as in IRN's ``eval_cam.py``).
* ``amn``: the same keys, but ``high_res`` is ``[1 + K, H, W]`` with the background channel first
  (AMN ``step/make_amn_cam.py`` indexes the softmax with ``keys = pad(valid_cat + 1, (1, 0))``;
  ``eval_amn_cam.py`` drops it with ``high_res[1:]``). AMN's COCO CAMs of an image without classes
  hold only ``{"keys": []}`` (``step/make_cam_coco.py``).
* ``psa`` (PSA ``infer_cls.py``, MCTformer ``engine.py`` ``generate_attention_maps_ms``):
  ``{class_idx: [H, W]}`` with 0-based foreground class indices.
* ``toco``: ``{"keys": ndarray, "high_res": [K, H, W]}`` (ToCo ``tools/infer_seg_as_cam.py``; softmax
  scores of the labelled classes).

Label rule (IRN ``eval_cam.py`` / ``cam_to_ir_label.py``, AMN, ToCo ``infer_cam_crf_label.py``): a
constant background score ``t`` is prepended to the maps and each pixel takes the argmax (ties go to
background). With a foreground threshold ``t_fg > t`` the IRN band is kept: labels from ``t_fg``
(confident foreground) and from ``t`` (confident background) are combined, pixels that are
foreground only under ``t`` become 255.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from mars_ray.labels import IGNORE, MAX_CLASSES

CAM_FORMATS: tuple[str, ...] = ("irn", "amn", "psa", "toco")

#: Published thresholds. ``bg_threshold``: the constant background score; ``fg_threshold``: IRN's band.
PRESETS: dict[str, dict[str, Any]] = {
    # IRN run_sample.py: cam_eval_thres 0.15; conf_fg_thres 0.30 / conf_bg_thres 0.05 (cam_to_ir_label, CRF)
    "irn": {"fmt": "irn", "bg_threshold": 0.15},
    "irn-band": {"fmt": "irn", "bg_threshold": 0.05, "fg_threshold": 0.30, "crf": True},
    # AMN run_sample.py: cam_eval_thres 0.25; conf_fg_thres 0.45 / conf_bg_thres 0.15
    "amn": {"fmt": "amn", "bg_threshold": 0.25},
    "amn-band": {"fmt": "amn", "bg_threshold": 0.15, "fg_threshold": 0.45, "crf": True},
    # ToCo tools/infer_cam_crf_label.py: bkg_thre_l 0.25 / bkg_thre_h 0.7, CRF on softmax scores
    "toco-band": {"fmt": "toco", "bg_threshold": 0.25, "fg_threshold": 0.70, "crf": True},
}

#: IRN misc/imutils.py crf_inference_label: unary_from_labels(gt_prob=0.7), 10 iterations.
IRN_LABEL_CRF: dict[str, float] = {"iters": 10, "gauss_sxy": 3, "gauss_compat": 3, "bilateral_sxy": 50,
                                   "bilateral_srgb": 5, "bilateral_compat": 10}
IRN_GT_PROB = 0.7
#: ToCo tools/infer_cam_crf_label.py DenseCRF(iter_max=10, pos_xy_std=3, pos_w=3, bi_xy_std=36, bi_rgb_std=3, bi_w=4)
TOCO_SCORE_CRF: dict[str, float] = {"iters": 10, "gauss_sxy": 3, "gauss_compat": 3, "bilateral_sxy": 36,
                                    "bilateral_srgb": 3, "bilateral_compat": 4}
#: which CRF the format's repository applies to its CAM labels (PSA/MCTformer: IRN's, our choice)
CRF_KIND: dict[str, str] = {"irn": "labels", "amn": "labels", "psa": "labels", "toco": "scores"}


@dataclass(frozen=True)
class Cams:
    """CAMs of one image: ``classes`` (1-based ids, one per map) and ``scores`` ``float32 [K, H, W]``.

    ``scores`` is ``None`` only for a file that holds no map because the image has no class (K = 0).
    """

    classes: tuple[int, ...]
    scores: Optional[np.ndarray]


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors (IRN/AMN keys and cam)
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _keys(obj: Mapping[str, Any], path: str) -> list[int]:
    keys = _array(obj["keys"]).reshape(-1)
    if keys.size and not np.issubdtype(keys.dtype, np.integer):
        if not np.all(np.equal(np.mod(keys, 1), 0)):
            raise ValueError(f"{path}: 'keys' must be integer class indices, got {keys.dtype} {keys[:5]}")
    return [int(k) for k in keys]


def parse_cams(obj: Any, fmt: str, path: str = "<cams>") -> Cams:
    """A loaded CAM object (the dict of the module docstring) → :class:`Cams`.

    Raises ``ValueError`` naming ``path`` for a wrong format (with a hint at the right one), maps
    whose count disagrees with the keys, negative class indices, or non-finite scores.
    """
    if fmt not in CAM_FORMATS:
        raise ValueError(f"unknown CAM format {fmt!r}; known: {', '.join(CAM_FORMATS)}")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict saved with np.save, got {type(obj).__name__}")
    if fmt == "psa":
        if "keys" in obj or "high_res" in obj:
            raise ValueError(f"{path}: holds 'keys'/'high_res', an IRN/AMN/ToCo file; use --format irn, amn or toco")
        bad = [k for k in obj if not isinstance(k, (int, np.integer)) or isinstance(k, bool)]
        if bad:
            raise ValueError(f"{path}: PSA/MCTformer CAM dicts are keyed by int class index, got keys {bad[:5]}")
        idx = sorted(int(k) for k in obj)
        maps = [_array(obj[k]) for k in sorted(obj, key=int)]
        if any(m.ndim != 2 for m in maps) or len({m.shape for m in maps}) > 1:
            raise ValueError(f"{path}: PSA/MCTformer maps must all be [H, W] of one size, got {[m.shape for m in maps]}")
        scores = np.stack(maps).astype(np.float32) if maps else None
    else:
        if "keys" not in obj:
            hint = "; a {class_idx: map} dict is --format psa" if obj and all(
                isinstance(k, (int, np.integer)) for k in obj) else ""
            raise ValueError(f"{path}: no 'keys' entry (keys: {sorted(map(str, obj))[:6]}){hint}")
        idx = _keys(obj, path)
        if "high_res" not in obj:
            if idx:
                raise ValueError(f"{path}: no 'high_res' maps for classes {idx}")
            scores = None
        else:
            scores = _array(obj["high_res"]).astype(np.float32)
            if scores.ndim != 3:
                raise ValueError(f"{path}: 'high_res' must be [K, H, W], got shape {scores.shape}")
            k = scores.shape[0]
            if fmt == "amn":
                if k != len(idx) + 1:
                    hint = " (no background channel: --format irn?)" if k == len(idx) else ""
                    raise ValueError(f"{path}: AMN 'high_res' needs 1 + {len(idx)} maps (background first), "
                                     f"got {k}{hint}")
                scores = scores[1:]
            elif k != len(idx):
                hint = " (a background channel first: --format amn?)" if k == len(idx) + 1 else ""
                raise ValueError(f"{path}: 'high_res' has {k} maps for {len(idx)} keys{hint}")
    if any(i < 0 for i in idx) or any(i + 1 > MAX_CLASSES for i in idx):
        raise ValueError(f"{path}: class indices must be 0-based foreground indices, got {idx}")
    if len(set(idx)) != len(idx):
        raise ValueError(f"{path}: class indices repeat: {idx}")
    if scores is not None and not np.isfinite(scores).all():
        raise ValueError(f"{path}: CAM scores contain NaN or inf")
    return Cams(tuple(i + 1 for i in idx), scores)


def _label_crf(image: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """IRN ``crf_inference_label``: labels ``[H, W]`` in 0..n-1 → CRF-refined labels."""
    from mars_ray.algo.crf import dense_crf

    probs = np.full((n,) + labels.shape, (1.0 - IRN_GT_PROB) / (n - 1), np.float32)
    np.put_along_axis(probs, labels[None].astype(np.int64), IRN_GT_PROB, axis=0)
    return dense_crf(image, probs, **IRN_LABEL_CRF).argmax(0)


def _score_crf(image: np.ndarray, padded: np.ndarray) -> np.ndarray:
    """ToCo: softmax over [background score, maps], dense CRF on the probabilities, argmax."""
    from mars_ray.algo.crf import dense_crf

    e = np.exp(padded - padded.max(0, keepdims=True))
    return dense_crf(image, e / e.sum(0, keepdims=True), **TOCO_SCORE_CRF).argmax(0)


def _decide(scores: np.ndarray, threshold: float, crf: Optional[str], image: Optional[np.ndarray]) -> np.ndarray:
    """Index 0 (background) or 1..K per pixel for background score ``threshold``."""
    padded = np.concatenate([np.full((1,) + scores.shape[1:], threshold, np.float32), scores])
    if crf == "scores":
        return _score_crf(image, padded)  # type: ignore[arg-type]
    index = padded.argmax(0)
    if crf == "labels":
        index = _label_crf(image, index, padded.shape[0])  # type: ignore[arg-type]
    return index


def cams_to_label(
    cams: Cams,
    *,
    bg_threshold: float,
    fg_threshold: Optional[float] = None,
    crf: Optional[str] = None,
    image: Optional[np.ndarray] = None,
    size: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Pseudo label ``uint8 [H, W]`` of {0} ∪ classes (∪ {255} with a band) from :class:`Cams`.

    Args:
        bg_threshold: the constant background score (IRN ``cam_eval_thres``; the band's low threshold).
        fg_threshold: with a value > ``bg_threshold``, IRN's band: foreground where the label under
            ``fg_threshold`` is foreground, background where the label under ``bg_threshold`` is
            background too, 255 elsewhere.
        crf: ``None``, ``"labels"`` (IRN ``crf_inference_label`` on each argmax) or ``"scores"``
            (ToCo: CRF on softmax([t, maps])); needs ``image`` (``uint8 [H, W, 3]``).
        size: ``(H, W)`` for a file without maps (K = 0); else taken from the maps.

    Raises:
        ValueError: thresholds out of order, an unknown CRF kind, a missing/mismatched image, or no size.
    """
    if fg_threshold is not None and not fg_threshold > bg_threshold:
        raise ValueError(f"fg_threshold {fg_threshold} must be above bg_threshold {bg_threshold}")
    if crf not in (None, "labels", "scores"):
        raise ValueError(f"crf must be None, 'labels' or 'scores', got {crf!r}")
    if cams.scores is None:
        shape = tuple(size) if size is not None else (image.shape[:2] if image is not None else None)
        if shape is None:
            raise ValueError("a CAM file without maps (no class) needs the image size")
        return np.zeros(shape, np.uint8)
    hw = cams.scores.shape[1:]
    if crf is not None and (image is None or image.shape[:2] != hw or image.dtype != np.uint8):
        got = None if image is None else (image.dtype, image.shape)
        raise ValueError(f"the CRF needs the uint8 image of the CAMs' size {hw}, got {got}")
    if not cams.classes:
        return np.zeros(hw, np.uint8)
    lut = np.asarray([0, *cams.classes], np.uint8)
    low = lut[_decide(cams.scores, bg_threshold, crf, image)]
    if fg_threshold is None:
        return low
    high = lut[_decide(cams.scores, fg_threshold, crf, image)]
    label = high.copy()
    label[high == 0] = IGNORE
    label[(high == 0) & (low == 0)] = 0
    return label


__all__ = ["CAM_FORMATS", "CRF_KIND", "Cams", "PRESETS", "cams_to_label", "parse_cams"]
