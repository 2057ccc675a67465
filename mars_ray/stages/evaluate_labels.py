"""``mars evaluate-labels``: mIoU, per-class IoU, FP and FN of any label folder against ground truth.

Ray Data tasks each build the confusion matrix of a batch of ids; the driver streams and adds
them (``evaluate``). ``confusions_local`` does the same in-process for several folders at once,
reading each ground-truth PNG once (the run report; no Ray). BIASED (254) pixels count as
background by default (``biased_as="ignore"`` drops them), as the paper evaluates debiased labels.
255 in the *evaluated* labels is ignored by default (``pred_ignore="ignore"``) or counted as
background (``"background"``, IRN's convention): other repositories' numbers for the same labels
differ by this choice alone, so the metrics record it. The ground truth's 255 is always ignored.
The dataset and the label folders may be local or object-store URIs (``mars_ray.storage``).

Where results go: ``RUN/evaluate_labels/<folder name>.json`` (``metrics_path``) with the
fingerprint of what was evaluated, so the report reuses it while it is current; never into the
evaluated folder or the dataset (``check_not_inside``). ``pseudo_label_reference`` is a sweep's
reference point: the pseudo labels' own score.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Union

import numpy as np

from mars_ray import storage
from mars_ray.algo.metrics import PRED_IGNORE_MODES, ConfusionMatrix, map_biased, map_pred_ignore, summarize
from mars_ray.artifacts import atomic_write_json, current, fingerprint_files
from mars_ray.config import Config, RayConfig
from mars_ray.data.label_io import read_label
from mars_ray.data.validate import check_label, check_label_folder
from mars_ray.data.voc import VOCDataset
from mars_ray.stages import inputs
from mars_ray.stages.runtime import ensure_ray, map_images

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]", storage.ObjectPath]


class _BatchConfusion:
    def __init__(self, dataset: dict[str, Any], labels: str, biased_as: str, pred_ignore: str) -> None:
        self.dataset = VOCDataset(**dataset)
        self.labels = storage.upath(labels)
        self.biased_as = biased_as
        self.pred_ignore = pred_ignore

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cm = ConfusionMatrix(self.dataset.num_classes + 1)
        for image_id in batch["image_id"]:
            gt = read_label(self.dataset.gt_path(str(image_id)))
            add_label(cm, self.labels / f"{image_id}.png", gt, biased_as=self.biased_as, pred_ignore=self.pred_ignore)
        return {"mat": cm.mat[None]}


def add_label(cm: ConfusionMatrix, path: storage.AnyPath, gt: np.ndarray, *, biased_as: str,
              pred_ignore: str = "ignore") -> np.ndarray:
    """Read the label PNG at ``path``, check it against ``gt`` ``[H, W]`` and add it to ``cm``; returns it.

    The label's own 255 pixels are mapped first (``map_pred_ignore``), then its BIASED ones
    (``map_biased``), so ``biased_as="ignore"`` never turns into background. Raises ``ValueError``
    naming the file for a wrong size or a value outside 0..C, 254, 255.
    """
    pred = read_label(path)
    check_label(pred, num_classes=cm.num_classes - 1, image_hw=gt.shape, path=path)
    cm.update(map_biased(map_pred_ignore(pred, pred_ignore), biased_as), gt)
    return pred


def _check_split(dataset: VOCDataset, split: str, biased_as: str, pred_ignore: str = "ignore") -> list[str]:
    if biased_as not in ("background", "ignore"):
        raise ValueError(f"--biased-as must be 'background' or 'ignore', got {biased_as!r}")
    if pred_ignore not in PRED_IGNORE_MODES:
        raise ValueError(f"--pred-ignore must be one of {', '.join(PRED_IGNORE_MODES)}, got {pred_ignore!r}")
    ids = dataset.ids(split)
    missing_gt = [i for i in ids if dataset.gt_path(i) is None]
    if missing_gt:
        raise FileNotFoundError(
            f"{dataset.gt_dir}: no ground truth for {len(missing_gt)} ids of split {split!r} (first: {missing_gt[0]}.png)"
        )
    return ids


def confusion(
    root: PathLike, labels: PathLike, split: str, *, biased_as: str = "background", pred_ignore: str = "ignore",
    ray_cfg: RayConfig | None = None,
) -> ConfusionMatrix:
    """The confusion matrix of ``labels/{id}.png`` vs ground truth over ``split`` (Ray Data tasks)."""
    labels = current(storage.upath(labels))  # RUN/debias on an object store: its current prefix
    dataset = VOCDataset(root)
    ids = _check_split(dataset, split, biased_as, pred_ignore)
    check_label_folder(dataset, split, labels, name="label")
    ensure_ray(ray_cfg or RayConfig())
    ds = map_images(ids, _BatchConfusion, dict(dataset=dataset.spec(), labels=storage.absolute(labels),
                                                biased_as=biased_as, pred_ignore=pred_ignore),
                    batch_size=64, progress=labels.name or "labels")
    total = ConfusionMatrix(dataset.num_classes + 1)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        total.mat += batch["mat"].sum(axis=0)
    return total


def evaluate(
    root: PathLike, labels: PathLike, split: str, *, biased_as: str = "background", pred_ignore: str = "ignore",
    ray_cfg: RayConfig | None = None,
) -> dict[str, Any]:
    """JSON-ready metrics (``algo.metrics.summarize``) plus what was evaluated (and how: ``biased_as``,
    ``pred_ignore``)."""
    cm = confusion(root, labels, split, biased_as=biased_as, pred_ignore=pred_ignore, ray_cfg=ray_cfg)
    return describe(cm, VOCDataset(root), labels, split, biased_as, pred_ignore)


def format_table(metrics: dict[str, Any]) -> str:
    """A per-class text table (IoU, FP, FN in %) with the mean row last."""
    def pct(v: Any) -> str:
        return "   -" if v is None else f"{100 * v:5.1f}"

    lines = [f"{'class':<16} {'IoU':>6} {'FP':>6} {'FN':>6}"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<16} {pct(m['iou']):>6} {pct(m['fp']):>6} {pct(m['fn']):>6}")
    lines.append(f"{'mean':<16} {pct(metrics['miou']):>6} {pct(metrics['fp']):>6} {pct(metrics['fn']):>6}")
    return "\n".join(lines)


def confusions_local(
    dataset: VOCDataset, folders: Mapping[str, PathLike], split: str, *, biased_as: str = "background",
    pred_ignore: str = "ignore",
) -> dict[str, ConfusionMatrix]:
    """In-process confusion matrices of several label folders over ``split``, each GT read once.

    No Ray: for the run report and small splits (a 1,464-image VOC split reads 4 PNGs an image).
    ``folders`` maps a name to a folder of ``{id}.png``. Raises what ``evaluate`` raises.
    """
    ids = _check_split(dataset, split, biased_as, pred_ignore)
    roots = {name: current(storage.upath(f)) for name, f in folders.items()}
    for name, f in roots.items():
        check_label_folder(dataset, split, f, name=name)
    cms = {name: ConfusionMatrix(dataset.num_classes + 1) for name in roots}

    def one(image_id: str) -> None:
        gt = read_label(dataset.gt_path(image_id))
        for name, f in roots.items():
            add_label(cms[name], f / f"{image_id}.png", gt, biased_as=biased_as, pred_ignore=pred_ignore)

    remote = any(storage.is_uri(f) for f in roots.values()) or storage.is_uri(dataset.root)
    for _ in storage.map_reads(one, ids, remote=remote):
        pass
    return cms


def labels_fingerprint(dataset: VOCDataset, labels: PathLike, split: str, *, dataset_print: str | None = None) -> str:
    """Sizes and mtimes of the split's label files, images and GT (no pixels): what saved metrics are valid for.

    ``dataset_print``: ``dataset.fingerprint(split)`` when the caller already has it.
    """
    root = current(storage.upath(labels))
    files = fingerprint_files([root / f"{i}.png" for i in dataset.ids(split)])
    return f"{dataset_print or dataset.fingerprint(split)}/{files}"


def metrics_path(run_dir: PathLike, labels: PathLike) -> storage.AnyPath:
    """Where a run keeps the metrics of a label folder: ``RUN/evaluate_labels/<folder name>.json``.

    Functions here take a label folder as named (``RUN/debias``) and read its files through
    ``artifacts.current`` (on an object store, the current prefix), so the name stays the stage's."""
    return storage.upath(run_dir) / "evaluate_labels" / f"{storage.upath(labels).name}.json"


def check_not_inside(out: PathLike, inputs: Mapping[str, PathLike]) -> None:
    """Refuse an output path inside an input folder (often someone else's dataset, or read-only).

    Raises ``ValueError`` naming both paths.
    """
    target = storage.absolute(out).rstrip("/")
    for what, folder in inputs.items():
        base = storage.absolute(folder).rstrip("/")
        if target == base or target.startswith(base + "/"):
            raise ValueError(f"{out}: would be written inside the {what} folder {folder}, an input; "
                             "pass --out elsewhere or --run RUN")


def evaluate_cached(
    dataset: VOCDataset, folders: Mapping[str, PathLike], split: str, run_dir: PathLike, *,
    biased_as: str = "background", pred_ignore: str = "ignore",
) -> dict[str, dict[str, Any]]:
    """Metrics of each folder: ``RUN/evaluate_labels/<name>.json`` when it matches the folder's
    current fingerprint and conventions, else computed in-process (``confusions_local``) and saved
    there (a file without ``pred_ignore`` predates the option and used ``"ignore"``)."""
    out: dict[str, dict[str, Any]] = {}
    todo: dict[str, PathLike] = {}
    base = dataset.fingerprint(split)
    prints = {name: labels_fingerprint(dataset, f, split, dataset_print=base) for name, f in folders.items()}
    for name, f in folders.items():
        path = metrics_path(run_dir, f)
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved and (saved.get("fingerprint"), saved.get("split"), saved.get("biased_as"),
                      saved.get("pred_ignore", "ignore"), saved.get("labels")) == (
                prints[name], split, biased_as, pred_ignore, storage.absolute(f)):
            out[name] = saved
        else:
            todo[name] = f
    if todo:
        for name, cm in confusions_local(dataset, todo, split, biased_as=biased_as, pred_ignore=pred_ignore).items():
            m = describe(cm, dataset, todo[name], split, biased_as, pred_ignore)
            m["fingerprint"] = prints[name]
            atomic_write_json(metrics_path(run_dir, todo[name]), m)
            out[name] = m
    return {name: out[name] for name in folders}


def describe(cm: ConfusionMatrix, dataset: VOCDataset, labels: PathLike, split: str, biased_as: str,
             pred_ignore: str = "ignore") -> dict[str, Any]:
    """``summarize`` plus what was evaluated (absolute labels path, split, biased_as, pred_ignore, pixels)."""
    out = summarize(cm, dataset.classes)
    out.update({"labels": storage.absolute(labels), "split": split, "biased_as": biased_as,
                "pred_ignore": pred_ignore, "pixels": int(cm.mat.sum())})
    return out


REFERENCE_OF = {"debiased_miou": "miou", "debiased_fp": "fp", "debiased_fn": "fn"}
"""Sweep objective → the pseudo-label figure it is compared with (same split, same definition)."""


def pseudo_label_reference(cfg: Config, metric: str) -> dict[str, Any] | None:
    """The pseudo labels' own score: the reference point of a sweep over debiasing settings.

    Evaluates ``cfg.data.pseudo_labels`` on ``cfg.data.split`` once (``evaluate``, on Ray). Returns
    ``{"labels", "split", "miou", "fp", "fn", "metric", "value"}`` where ``value`` is the figure
    comparable with ``metric`` (``debiased_miou`` ↔ the pseudo labels' mIoU, …) or ``None`` for an
    objective the pseudo labels have no counterpart of (``val_miou`` needs a baseline training run);
    ``None`` when the split has no ground truth. Raises ``ValueError`` without pseudo labels.
    """
    if not cfg.data.pseudo_labels:
        raise ValueError("pseudo_label_reference needs data.pseudo_labels (run wsss first)")
    if not inputs.open_dataset(cfg).has_gt(cfg.data.split):
        return None
    m = evaluate(cfg.data.root, cfg.data.pseudo_labels, cfg.data.split, ray_cfg=cfg.ray)
    key = REFERENCE_OF.get(metric)
    return {"labels": str(cfg.data.pseudo_labels), "split": cfg.data.split, "miou": m["miou"], "fp": m["fp"],
            "fn": m["fn"], "metric": metric, "value": m[key] if key else None}


def reference_note(reference: Mapping[str, Any] | None, best: float, mode: str) -> str:
    """One line for a sweep's log and table: the best trial against the pseudo labels' own score."""
    if not reference or reference.get("value") is None:
        return ""
    ref = reference["value"]
    better = best > ref if mode == "max" else best < ref
    return (f"pseudo labels (reference): {reference['metric']} {100 * ref:.1f}; best trial {100 * best:.1f} "
            f"({100 * (best - ref):+.1f}, {'beats' if better else 'does not beat'} the pseudo labels)")
