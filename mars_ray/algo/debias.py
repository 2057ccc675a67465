"""Biased-object removal (MARS Eq. 4-5): activation of the debiased centroids, then relabelling."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from mars_ray.labels import BIASED, MAX_CLASSES

logger = logging.getLogger(__name__)


def activation_map(features: np.ndarray | torch.Tensor, centroids: np.ndarray) -> np.ndarray:
    """Eq. 4: M(p) = ReLU(max_k cos(F(p), V_k)).

    Args:
        features: pixel embeddings F ``[d, h, w]`` (numpy or torch; computed on the tensor's device).
        centroids: the debiased centroids V^c of the classes present in the image ``[K, d]``.

    Returns:
        M ``[h, w]`` float32 in [0, 1]; all zeros when K = 0.

    Raises:
        ValueError: features not 3-D, or centroid dimension != d.
    """
    feats = torch.as_tensor(features).detach()
    if feats.ndim != 3:
        raise ValueError(f"features must be [d, h, w], got {tuple(feats.shape)}")
    d, h, w = feats.shape
    cents = np.asarray(centroids, dtype=np.float32)
    if cents.size == 0:
        return np.zeros((h, w), dtype=np.float32)
    if cents.ndim != 2 or cents.shape[1] != d:
        raise ValueError(f"centroids must be [K, {d}], got {cents.shape}")
    f_hat = F.normalize(feats.reshape(d, -1).float(), dim=0)  # [d, hw]
    v_hat = F.normalize(torch.from_numpy(cents).to(feats.device), dim=1)  # [K, d]
    m = (v_hat @ f_hat).amax(dim=0).clamp_min(0.0)
    return m.reshape(h, w).cpu().numpy().astype(np.float32)


def binarize_activation(
    activation: np.ndarray,
    *,
    threshold: float = 0.5,
    image: np.ndarray | None = None,
    crf: dict | None = None,
) -> np.ndarray:
    """Binarise M into the keep mask of Eq. 5 (M^db), optionally after dense-CRF refinement.

    The paper says only that M is refined ("refinement (e.g. CRF)") before Eq. 5; how it becomes a
    binary mask is our choice, documented here: a constant background score ``threshold`` (0.5 by
    default, the midpoint of M's [0, 1] range, not tuned) against which M competes.

    Without CRF (``crf`` None): keep = M > threshold. With CRF (``image`` uint8 ``[h, w, 3]`` and
    ``crf`` a dict of ``dense_crf`` keyword arguments, ``{}`` for its defaults): a two-label problem
    with P_fg ∝ M and P_bg ∝ threshold (the constant background score), normalised per pixel — so
    with no pairwise term the decision is exactly M > threshold — refined by ``dense_crf``;
    keep = (argmax == fg), ties to not-keep. The sensitivity to both choices is measured by
    ``benchmarks/debias_sensitivity.py`` (threshold 0.3-0.7 × CRF on/off on make-dataset variants).

    Args:
        activation: M ``[h, w]``.

    Returns:
        keep ``[h, w]`` bool.

    Raises:
        ValueError: activation not 2-D, or ``crf`` given without ``image`` (or mismatching shapes).
    """
    m = np.asarray(activation, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"activation must be [h, w], got {m.shape}")
    if crf is None:
        return m > threshold
    if image is None:
        raise ValueError("binarize_activation: crf options given but no image to refine with")
    from mars_ray.algo.crf import dense_crf

    t = np.full_like(m, threshold)
    probs = np.stack([t, m]) / np.maximum(t + m, 1e-8)[None]
    q = dense_crf(image, probs, **crf)
    return q[1] > q[0]


def debias_label(pseudo: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Eq. 5: Y^db = BIASED (254) where Y^b is a foreground class (1..253) and keep is False.

    Args:
        pseudo: pseudo label Y^b ``[h, w]`` integer (uint8).
        keep: bool ``[h, w]``.

    Returns:
        new uint8 ``[h, w]``; 0, 254, 255 and kept foreground pixels are unchanged.

    Raises:
        ValueError: shapes differ, or pseudo is not an integer map with values in 0..255.
    """
    pseudo = np.asarray(pseudo)
    keep = np.asarray(keep, dtype=bool)
    if pseudo.ndim != 2 or pseudo.shape != keep.shape:
        raise ValueError(f"pseudo and keep must both be [h, w], got {pseudo.shape} and {keep.shape}")
    if not np.issubdtype(pseudo.dtype, np.integer) or (pseudo.size and (pseudo.min() < 0 or pseudo.max() > 255)):
        raise ValueError(f"pseudo must be an integer label map with values 0..255, got dtype {pseudo.dtype}")
    out = pseudo.astype(np.uint8, copy=True)
    out[(out >= 1) & (out <= MAX_CLASSES) & ~keep] = BIASED
    return out
