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


UNARIES = ("symmetric", "ratio")
"""How ``binarize_activation`` turns M and the threshold into the CRF's two-label probabilities."""


def unary_probs(m: np.ndarray, threshold: float | np.ndarray, unary: str = "symmetric") -> np.ndarray:
    """``[2, h, w]`` float32 (P_bg, P_fg) of the debias CRF from M ``[h, w]`` (``binarize_activation``).

    Raises ValueError for an unknown ``unary`` or a threshold outside (0, 1).
    """
    m = np.clip(np.asarray(m, dtype=np.float32), 0.0, 1.0)
    t = np.asarray(threshold, dtype=np.float32)
    if not (np.all(t > 0) and np.all(t < 1)):
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if unary == "symmetric":
        p = np.where(m <= t, m / (2 * t), 1 - (1 - m) / (2 * (1 - t))).astype(np.float32)
        return np.stack([1 - p, p])
    if unary == "ratio":
        tt = np.broadcast_to(t, m.shape).astype(np.float32)
        return np.stack([tt, m]) / np.maximum(tt + m, 1e-8)[None]
    raise ValueError(f"unary must be one of {', '.join(UNARIES)}, got {unary!r}")


def binarize_activation(
    activation: np.ndarray,
    *,
    threshold: float = 0.5,
    image: np.ndarray | None = None,
    crf: dict | None = None,
    unary: str = "symmetric",
) -> np.ndarray:
    """Binarise M into the keep mask of Eq. 5 (M^db), optionally after dense-CRF refinement.

    The paper says only that M is refined ("refinement (e.g. CRF)") before Eq. 5; how it becomes a
    binary mask is our choice, documented here: a constant background score ``threshold`` (0.5 by
    default, the midpoint of M's [0, 1] range, not tuned) against which M competes.

    Without CRF (``crf`` None): keep = M > threshold. With CRF (``image`` uint8 ``[h, w, 3]`` and
    ``crf`` a dict of ``dense_crf`` keyword arguments, ``{}`` for its defaults): a two-label problem
    whose unary is refined by ``dense_crf``; keep = (argmax == fg), ties to not-keep. With no
    pairwise term the decision is exactly M > threshold for either ``unary``:

    * ``"symmetric"`` (default): P_fg = piecewise-linear in M through (0, 0), (t, ½) and
      (1, 1), P_bg = 1 − P_fg; at t = 0.5, P_fg = M. A perfect match is as certain a target as
      M = 0 is certain background.
    * ``"ratio"`` (before 2026-12): P_fg ∝ M, P_bg ∝ t. It can never be more than 1/(1+t) sure of a
      target (0.67 at M = 1) while M = 0 is certain background; the CRF's pairwise terms then
      removed targets whose colours the context shares (``benchmarks/unary_bench.py``; README
      "Debiasing quality across datasets").

    The sensitivity to these choices is measured by ``benchmarks/debias_sensitivity.py``.

    Args:
        activation: M ``[h, w]``.

    Returns:
        keep ``[h, w]`` bool.

    Raises:
        ValueError: activation not 2-D, or ``crf`` given without ``image`` (or mismatching shapes).
    """
    if unary not in UNARIES:
        raise ValueError(f"unary must be one of {', '.join(UNARIES)}, got {unary!r}")
    m = np.asarray(activation, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"activation must be [h, w], got {m.shape}")
    if crf is None:
        return m > threshold
    if image is None:
        raise ValueError("binarize_activation: crf options given but no image to refine with")
    from mars_ray.algo.crf import dense_crf

    probs = unary_probs(m, threshold, unary)
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
