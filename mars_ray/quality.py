"""MARS in one process (no Ray) and the label-quality measures of a debiasing, for research and tests.

``debias_in_process`` runs the chain the ``features → select → debias`` stages run, with the same
``algo`` functions and defaults, over one split of a VOC-style dataset: F for every image (any
``FeatureSource``-like callable), per-image per-class K-means (K_fg, K_bg), Eq 1-3 (top α), Eq 4
activation + dense CRF + threshold, Eq 5 relabelling. F is computed twice (once to cluster, once to
debias), as the stages do, so memory stays at one image's F plus the centroid table.

``LabelQuality`` accumulates, against ground truth, what a debiasing did to a pseudo label:

* removal recall: of the pseudo-label foreground pixels whose ground truth is background (the
  bias), the share marked BIASED (254);
* retention: of the pseudo-label foreground pixels whose ground truth is their class (the
  target), the share left as they were;
* mIoU / FP / FN of the pseudo and the debiased labels (``algo.metrics``; BIASED counted as
  background, as ``mars evaluate-labels`` does by default).

The target-centroid ratio (share of chosen centroids whose pixels are mostly their class's
ground truth, as ``select/report.json``) and the per-class separation score
(``algo.separation.separation_scores``) come with the result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from mars_ray.algo.centroids import select_debiased_centroids
from mars_ray.algo.clustering import cluster_regions
from mars_ray.algo.crf import scale_kernels
from mars_ray.algo.debias import activation_map, binarize_activation, debias_label
from mars_ray.algo.metrics import ConfusionMatrix, map_biased
from mars_ray.algo.separation import separation_scores
from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.voc import VOCDataset
from mars_ray.labels import BIASED, MAX_CLASSES

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Source = Callable[[str, np.ndarray], np.ndarray]
"""``(image_id, image uint8 [H, W, 3]) -> F float32 [d, H, W]`` (``mars_ray.features.FeatureSource``)."""

TARGET_MATCH = 0.5  # a centroid "is the target" when most of its pixels are GT of its class (as select)


class LabelQuality:
    """Accumulates removal recall, retention and the confusion matrices of pseudo vs debiased labels.

    ``update(pseudo, debiased, gt)`` with uint8 ``[H, W]`` maps (254 = biased, 255 = ignore in GT);
    ``compute()`` → ``{"removal_recall", "retention", "pseudo": {miou, fp, fn}, "debiased": {…}}``.
    """

    def __init__(self, num_classes: int) -> None:
        self.cm_pseudo = ConfusionMatrix(num_classes + 1)
        self.cm_debiased = ConfusionMatrix(num_classes + 1)
        self.bias = self.removed = self.target = self.kept = 0

    def update(self, pseudo: np.ndarray, debiased: np.ndarray, gt: np.ndarray) -> None:
        if not pseudo.shape == debiased.shape == gt.shape:
            raise ValueError(f"pseudo {pseudo.shape}, debiased {debiased.shape} and gt {gt.shape} differ")
        fg = (pseudo >= 1) & (pseudo <= MAX_CLASSES)
        on_bg, on_target = fg & (gt == 0), fg & (gt == pseudo)
        self.bias += int(on_bg.sum())
        self.removed += int((on_bg & (debiased == BIASED)).sum())
        self.target += int(on_target.sum())
        self.kept += int((on_target & (debiased == pseudo)).sum())
        self.cm_pseudo.update(pseudo, gt)
        self.cm_debiased.update(map_biased(debiased, "background"), gt)

    def compute(self) -> dict[str, Any]:
        def short(cm: ConfusionMatrix) -> dict[str, float]:
            m = cm.compute()
            return {"miou": m["miou"], "fp": m["fp"], "fn": m["fn"], "iou": m["iou"]}

        return {
            "removal_recall": self.removed / self.bias if self.bias else float("nan"),
            "retention": self.kept / self.target if self.target else float("nan"),
            "pseudo": short(self.cm_pseudo),
            "debiased": short(self.cm_debiased),
        }


@dataclass
class InProcessResult:
    """What ``debias_in_process`` measured; ``quality`` is ``LabelQuality.compute()``."""

    quality: dict[str, Any]
    target_ratio: float
    separation: dict[int, dict[str, float]]
    n_fg_centroids: int
    n_bg_centroids: int
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, float]:
        """The flat numbers of a results table."""
        q = self.quality
        sep = [v["score"] for v in self.separation.values() if np.isfinite(v["score"])]
        return {
            "pseudo_miou": q["pseudo"]["miou"], "debiased_miou": q["debiased"]["miou"],
            "pseudo_fp": q["pseudo"]["fp"], "debiased_fp": q["debiased"]["fp"],
            "pseudo_fn": q["pseudo"]["fn"], "debiased_fn": q["debiased"]["fn"],
            "removal_recall": q["removal_recall"], "retention": q["retention"],
            "target_ratio": self.target_ratio, "separation_min": min(sep) if sep else float("nan"),
        }


def debias_in_process(
    root: PathLike,
    source: Source,
    *,
    pseudo_dir: Optional[PathLike] = None,
    split: str = "train",
    k_fg: int = 2,
    k_bg: int = 2,
    alpha: float = 0.40,
    threshold: float = 0.5,
    crf: Optional[dict[str, float]] = None,
    max_pixels: int = 20000,
    iters: int = 20,
    seed: int = 0,
    write_dir: Optional[PathLike] = None,
    crf_reference_side: float = 433.0,
    crf_unary: str = "symmetric",
) -> InProcessResult:
    """features → select → debias over ``split`` of ``root`` in this process; measured against its GT.

    Args:
        root: VOC-style dataset with ground truth for ``split``.
        source: F of one image (``Source``); the same callable is used to cluster and to debias.
        pseudo_dir: Y^b folder (default ``root/pseudo_labels``).
        crf: ``algo.crf.dense_crf`` kwargs for Eq 4's refinement (``DebiasConfig().crf_kwargs()`` is
            the pipeline's default); None = plain threshold.
        write_dir: if given, the debiased labels are written there as ``{id}.png``.
        crf_reference_side: the CRF's bilateral width is scaled per image by sqrt(H·W) / this
            (``algo.crf.scale_kernels``; 433 = ``DebiasConfig``'s default; 0 = not scaled).
        crf_unary: the CRF's unary from M (``algo.debias.unary_probs``; ``DebiasConfig``'s default).

    Raises:
        FileNotFoundError / ValueError: missing files, or no background / foreground centroids.
    """
    from mars_ray.data.label_io import write_label

    ds = VOCDataset(root)
    pdir = Path(root) / "pseudo_labels" if pseudo_dir is None else Path(pseudo_dir)
    ids = ds.ids(split)
    fg, fg_cls, fg_match, fg_count, bg = [], [], [], [], []
    for i in ids:
        image, pseudo = read_image(ds.image_path(i)), read_label(pdir / f"{i}.png")
        gt = read_label(ds.gt_path(i))  # type: ignore[arg-type]
        rc = cluster_regions(source(i, image), pseudo, k_fg=k_fg, k_bg=k_bg, max_pixels=max_pixels,
                             iters=iters, seed=seed)
        for r in range(len(rc)):
            if rc.is_bg[r]:
                bg.append(rc.vector[r])
            else:
                fg.append(rc.vector[r])
                fg_cls.append(int(rc.class_id[r]))
                fg_count.append(int(rc.count[r]))
                fg_match.append(float((gt[rc.assignment == r] == rc.class_id[r]).mean()))
    if not bg or not fg:
        raise ValueError(f"{root}: split {split!r} gives {len(fg)} foreground and {len(bg)} background centroids")
    fg_a, cls_a, bg_a = np.stack(fg), np.asarray(fg_cls), np.stack(bg)
    sel = select_debiased_centroids(fg_a, cls_a, bg_a, alpha=alpha, num_classes=ds.num_classes)
    match = np.asarray(fg_match)
    quality = LabelQuality(ds.num_classes)
    for i in ids:
        image, pseudo = read_image(ds.image_path(i)), read_label(pdir / f"{i}.png")
        gt = read_label(ds.gt_path(i))  # type: ignore[arg-type]
        classes = [int(c) for c in np.unique(pseudo) if 1 <= c <= MAX_CLASSES]
        known = [c for c in classes if sel.present[c]]
        img_crf = None if crf is None else scale_kernels(crf, image.shape[:2], crf_reference_side)
        keep = binarize_activation(activation_map(source(i, image), sel.centroids[known]), threshold=threshold,
                                   image=image if crf is not None else None, crf=img_crf, unary=crf_unary)
        keep |= np.isin(pseudo, [c for c in classes if c not in known])
        debiased = debias_label(pseudo, keep)
        quality.update(pseudo, debiased, gt)
        if write_dir is not None:
            write_label(os.path.join(write_dir, f"{i}.png"), debiased)
    return InProcessResult(
        quality=quality.compute(),
        target_ratio=float((match[sel.chosen] >= TARGET_MATCH).mean()),
        separation=separation_scores(fg_a, cls_a, sel.chosen, sel.centroids, counts=np.asarray(fg_count),
                                     threshold=threshold),
        n_fg_centroids=len(fg),
        n_bg_centroids=len(bg),
    )


__all__ = ["InProcessResult", "LabelQuality", "Source", "debias_in_process"]
