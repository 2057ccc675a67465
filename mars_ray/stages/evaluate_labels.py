"""``mars evaluate-labels``: mIoU, per-class IoU, FP and FN of any label folder against ground truth.

Ray Data tasks each build the confusion matrix of a batch of ids; the driver streams and adds
them. BIASED (254) pixels count as background by default (``biased_as="ignore"`` drops them), as
the paper evaluates debiased labels. The dataset and the label folder may be local or object-store
URIs (``mars_ray.storage``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Union

import numpy as np

from mars_ray import storage
from mars_ray.algo.metrics import ConfusionMatrix, map_biased, summarize
from mars_ray.config import RayConfig
from mars_ray.data.label_io import read_label
from mars_ray.data.validate import check_label, check_label_folder
from mars_ray.data.voc import VOCDataset
from mars_ray.stages.runtime import ensure_ray, map_images
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]", storage.ObjectPath]  # the dataset root: VOCDataset converts it


class _BatchConfusion:
    def __init__(self, root: str, labels: str, biased_as: str) -> None:
        self.dataset = VOCDataset(root)
        self.labels = storage.upath(labels)
        self.biased_as = biased_as

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = self.dataset.num_classes + 1
        cm = ConfusionMatrix(n)
        for image_id in batch["image_id"]:
            path = self.labels / f"{image_id}.png"
            pred = read_label(path)
            gt_path = self.dataset.gt_path(str(image_id))
            gt = read_label(gt_path)
            check_label(pred, num_classes=self.dataset.num_classes, image_hw=gt.shape, path=path)
            cm.update(map_biased(pred, self.biased_as), gt)
        return {"mat": cm.mat[None]}


def confusion(
    root: "PathLike", labels: AnyPath, split: str, *, biased_as: str = "background", ray_cfg: RayConfig | None = None
) -> ConfusionMatrix:
    """The confusion matrix of ``labels/{id}.png`` vs ground truth over ``split``."""
    if biased_as not in ("background", "ignore"):
        raise ValueError(f"--biased-as must be 'background' or 'ignore', got {biased_as!r}")
    dataset = VOCDataset(root)
    ids = dataset.ids(split)
    missing_gt = [i for i in ids if dataset.gt_path(i) is None]
    if missing_gt:
        raise FileNotFoundError(
            f"{dataset.gt_dir}: no ground truth for {len(missing_gt)} ids of split {split!r} (first: {missing_gt[0]}.png)"
        )
    check_label_folder(dataset, split, labels, name="label")
    ensure_ray(ray_cfg or RayConfig())
    ds = map_images(ids, _BatchConfusion, dict(root=storage.absolute(dataset.root), labels=storage.absolute(labels),
                                                biased_as=biased_as),
                    batch_size=64)
    total = ConfusionMatrix(dataset.num_classes + 1)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        total.mat += batch["mat"].sum(axis=0)
    return total


def evaluate(
    root: "PathLike", labels: AnyPath, split: str, *, biased_as: str = "background", ray_cfg: RayConfig | None = None
) -> dict[str, Any]:
    """JSON-ready metrics (``algo.metrics.summarize``) plus what was evaluated."""
    cm = confusion(root, labels, split, biased_as=biased_as, ray_cfg=ray_cfg)
    out = summarize(cm, VOCDataset(root).classes)
    out.update({"labels": str(labels), "split": split, "biased_as": biased_as, "pixels": int(cm.mat.sum())})
    return out


def format_table(metrics: dict[str, Any]) -> str:
    """A per-class text table (IoU, FP, FN in %) with the mean row last."""
    def pct(v: Any) -> str:
        return "   -" if v is None else f"{100 * v:5.1f}"

    lines = [f"{'class':<16} {'IoU':>6} {'FP':>6} {'FN':>6}"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<16} {pct(m['iou']):>6} {pct(m['fp']):>6} {pct(m['fn']):>6}")
    lines.append(f"{'mean':<16} {pct(metrics['miou']):>6} {pct(metrics['fp']):>6} {pct(metrics['fn']):>6}")
    return "\n".join(lines)
