"""Segmentation metrics: confusion matrix, mIoU, per-class IoU, FP and FN (as RS+EPM and MARS report).

For class c with TP_c true positives, P_c predicted and T_c target pixels, U_c = P_c + T_c − TP_c:
IoU_c = TP_c / U_c, FP_c = (P_c − TP_c) / U_c, FN_c = (T_c − TP_c) / U_c (so IoU + FP + FN = 1).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from mars_ray.labels import BACKGROUND, BIASED, IGNORE

logger = logging.getLogger(__name__)


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Accumulated ``[n, n]`` int64 confusion matrix, rows = target, cols = prediction.

    ``num_classes`` counts the background (C + 1). Pixels with target 255 are ignored, and so are
    pixels with prediction 255 (a label map evaluated after ``map_biased(..., "ignore")``).
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.mat = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add integer maps of the same shape (any shape, e.g. ``[H, W]`` or ``[B, H, W]``).

        Raises:
            ValueError: shapes differ, non-integer input, or a pred/target value outside
                [0, num_classes) other than 255.
        """
        pred, target = _to_numpy(pred), _to_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape")
        for name, a in (("pred", pred), ("target", target)):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
                raise ValueError(f"{name} must be an integer label map, got dtype {a.dtype}")
        pred, target = pred.astype(np.int64).ravel(), target.astype(np.int64).ravel()
        n = self.num_classes
        valid = (target != IGNORE) & (pred != IGNORE)
        for name, a in (("pred", pred), ("target", target)):
            bad = valid & ((a < 0) | (a >= n))
            if bad.any():
                hint = " (map BIASED 254 with map_biased first)" if (a[bad] == BIASED).any() else ""
                raise ValueError(f"{name} value {int(a[bad][0])} outside [0, {n}){hint}")
        idx = target[valid] * n + pred[valid]
        self.mat += np.bincount(idx, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix (e.g. from another worker) into this one; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class into {self.num_classes}-class matrix")
        self.mat += other.mat
        return self

    def compute(self) -> dict[str, Any]:
        """Metrics: ``miou`` (mean IoU over classes with non-empty union, background included), ``iou``
        (per class, nan where union is 0), ``fp``/``fn`` (means over foreground classes with non-empty
        union), ``fp_per_class``/``fn_per_class`` (per class, background included), ``pixel_acc``.
        """
        mat = self.mat.astype(np.float64)
        tp = np.diag(mat)
        t = mat.sum(axis=1)
        p = mat.sum(axis=0)
        union = p + t - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            fp = np.where(union > 0, (p - tp) / union, np.nan)
            fn = np.where(union > 0, (t - tp) / union, np.nan)
        fg = union[1:] > 0

        def _mean(x: np.ndarray) -> float:
            return float(np.mean(x)) if x.size else math.nan

        return {
            "miou": _mean(iou[union > 0]),
            "iou": iou.tolist(),
            "fp": _mean(fp[1:][fg]),
            "fn": _mean(fn[1:][fg]),
            "fp_per_class": fp.tolist(),
            "fn_per_class": fn.tolist(),
            "pixel_acc": float(tp.sum() / mat.sum()) if mat.sum() > 0 else math.nan,
        }


def map_biased(label: np.ndarray, mode: str = "background") -> np.ndarray:
    """A copy of an integer label map with BIASED (254) pixels mapped for evaluation.

    ``mode="background"`` → 0, ``mode="ignore"`` → 255 (excluded by ``ConfusionMatrix``).
    Raises ValueError for another mode.
    """
    targets = {"background": BACKGROUND, "ignore": IGNORE}
    if mode not in targets:
        raise ValueError(f"map_biased mode must be one of {sorted(targets)}, got {mode!r}")
    out = np.array(label, copy=True)
    out[out == BIASED] = targets[mode]
    return out


TARGET_IOU = 0.3  # paper (Fig 8 / appendix): a centroid is a *target* centroid when IoU > 0.3 ...
BIASED_IOU = 0.1  # ... and a *biased* centroid when IoU < 0.1


def centroid_gt_iou(assignment: np.ndarray, class_ids: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of each centroid's pixels with its class's ground truth in the same image.

    ``assignment`` ``[h, w]`` centroid row index per pixel (-1 = no centroid), ``class_ids`` ``[m]``
    the class of each row, ``gt`` ``[h, w]`` ground truth (255 pixels are left out of both sets) →
    ``[m]`` float32: |A ∩ G| / |A ∪ G| with A = the row's pixels, G = pixels whose GT is its class
    (0 when the union is empty). The paper's target-centroid ratio counts IoU > ``TARGET_IOU``.
    Raises ValueError when the maps' shapes differ.
    """
    a, g = np.asarray(assignment), np.asarray(gt)
    if a.shape != g.shape:
        raise ValueError(f"assignment {a.shape} and gt {g.shape} must have the same shape")
    class_ids = np.asarray(class_ids, dtype=np.int64)
    m = class_ids.size
    valid = g.reshape(-1) != IGNORE
    a, g = a.reshape(-1)[valid], g.reshape(-1)[valid].astype(np.int64)
    assigned = a >= 0
    rows = a[assigned]
    size_a = np.bincount(rows, minlength=m)[:m]
    inter = np.bincount(rows, weights=g[assigned] == class_ids[rows], minlength=m)[:m]
    size_g = np.array([(g == c).sum() for c in class_ids], dtype=np.float64) if m else np.zeros(0)
    union = size_a + size_g - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)


def target_centroid_ratio(iou: np.ndarray) -> dict[str, float | int | None]:
    """The paper's target-centroid figures for a set of centroids (their ``centroid_gt_iou``).

    Returns ``{"target": n with IoU > 0.3, "biased": n with IoU < 0.1, "n": n with a finite IoU,
    "target_ratio": target / n, "biased_ratio": biased / n}`` (ratios None when n = 0); NaN entries
    (no ground truth) are left out.
    """
    iou = np.asarray(iou, dtype=np.float64)
    iou = iou[np.isfinite(iou)]
    n = int(iou.size)
    target, biased = int((iou > TARGET_IOU).sum()), int((iou < BIASED_IOU).sum())
    return {"target": target, "biased": biased, "n": n,
            "target_ratio": target / n if n else None, "biased_ratio": biased / n if n else None}


PRED_IGNORE_MODES = ("ignore", "background")


def map_pred_ignore(pred: np.ndarray, mode: str = "ignore") -> np.ndarray:
    """A prediction's 255 pixels mapped for evaluation (the target's 255 is always ignored).

    ``mode="ignore"`` leaves 255 as is, so ``ConfusionMatrix`` skips those pixels (our default);
    ``mode="background"`` counts them as background, as IRN's evaluation does. Other repositories'
    numbers for the same labels differ by this choice alone. Returns a copy for ``"background"``.
    Raises ValueError for another mode.
    """
    if mode not in PRED_IGNORE_MODES:
        raise ValueError(f"pred-ignore mode must be one of {list(PRED_IGNORE_MODES)}, got {mode!r}")
    if mode == "ignore":
        return np.asarray(pred)
    out = np.array(pred, copy=True)
    out[out == IGNORE] = BACKGROUND
    return out


def _none_if_nan(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def summarize(cm: ConfusionMatrix, class_names: list[str]) -> dict[str, Any]:
    """JSON-ready summary: miou, fp, fn, pixel_acc and per_class {name: {iou, fp, fn}}; nan → None.

    ``class_names`` lists all ``cm.num_classes`` names, background first. Raises ValueError otherwise.
    """
    if len(class_names) != cm.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {cm.num_classes}-class confusion matrix")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique, got {class_names}")
    m = cm.compute()
    return {
        "miou": _none_if_nan(m["miou"]),
        "fp": _none_if_nan(m["fp"]),
        "fn": _none_if_nan(m["fn"]),
        "pixel_acc": _none_if_nan(m["pixel_acc"]),
        "per_class": {
            name: {
                "iou": _none_if_nan(m["iou"][i]),
                "fp": _none_if_nan(m["fp_per_class"][i]),
                "fn": _none_if_nan(m["fn_per_class"][i]),
            }
            for i, name in enumerate(class_names)
        },
    }
