"""Fully connected CRF refinement (Krähenbühl & Koltun 2011) via ``pydensecrf``.

MARS refines the activation map (before Eq. 5) and the teacher's predictions (Y^co, Eq. 6) with it.
``pydensecrf`` (installed by the ``pydensecrf2`` package) is imported lazily, so the rest of
``mars_ray.algo`` imports without it.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


#: sqrt(500 · 375): the geometric-mean side of a PASCAL VOC image, the scale DeepLab chose its CRF kernels at
VOC_SIDE = 433.0


def scale_kernels(crf: dict, hw: tuple[int, int], reference_side: float) -> dict:
    """``crf`` (``dense_crf`` kwargs) with ``bilateral_sxy`` scaled to an image of ``hw`` = (H, W).

    The bilateral kernel's width (DeepLab's 50 px) is a distance *relative to the objects*, chosen
    for images whose geometric-mean side is ``reference_side`` (``VOC_SIDE``); on a 64 px image 50 px
    spans the whole image and the CRF floods objects with their context's label. Scaled by
    ``sqrt(H·W) / reference_side`` it covers the same share of every image. The 3 px Gaussian
    (pixel-level smoothness) is not scaled. ``reference_side`` <= 0 → ``crf`` unchanged.
    """
    if reference_side <= 0 or "bilateral_sxy" not in crf:
        return dict(crf)
    h, w = hw
    return {**crf, "bilateral_sxy": float(crf["bilateral_sxy"]) * float(np.sqrt(float(h) * float(w))) / float(reference_side)}


def kernels_for(crf: dict, hw: tuple[float, float]) -> dict:
    """``dense_crf`` kwargs for one image from a CRF spec: ``crf`` may carry ``"reference_side"`` (the
    ``crf_reference_side`` of a config section), which is removed and, when > 0, scales
    ``bilateral_sxy`` to an image of ``hw`` = (H, W) (``scale_kernels``). ``hw`` is the size the
    image has *as a whole*: for a training crop, the rescaled image it was cut from.
    """
    rest = {k: v for k, v in crf.items() if k != "reference_side"}
    return scale_kernels(rest, hw, float(crf.get("reference_side", 0.0)))  # type: ignore[arg-type]


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    iters: int = 10,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bilateral_sxy: float = 50,
    bilateral_srgb: float = 13,
    bilateral_compat: float = 10,
) -> np.ndarray:
    """Dense-CRF mean-field refinement of per-pixel class probabilities.

    Unaries are -log p (as ``pydensecrf.utils.unary_from_softmax``) after clipping p to 1e-8 and
    renormalising over labels; pairwise terms are a Gaussian smoothness kernel and an appearance
    (bilateral) kernel on the RGB image, both Potts. With both compat weights 0 the output is p.

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        probs: ``[n, H, W]`` probabilities (n >= 1 labels).
        iters: mean-field iterations.

    Returns:
        refined probabilities ``[n, H, W]`` float32.

    Raises:
        ValueError: wrong dtype or shapes, or iters < 0.
    """
    import pydensecrf.densecrf as dcrf

    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2] or probs.shape[0] < 1:
        raise ValueError(f"probs must be [n, H, W] matching image {image.shape[:2]}, got {probs.shape}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    n, h, w = probs.shape
    p = np.clip(probs, 1e-8, None)
    p = p / p.sum(axis=0, keepdims=True)
    crf = dcrf.DenseCRF2D(w, h, n)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(p).reshape(n, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image), compat=bilateral_compat
    )
    q = np.asarray(crf.inference(iters), dtype=np.float32)
    return q.reshape(n, h, w)
