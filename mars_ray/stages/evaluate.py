"""Stage ``evaluate``: a trained segmenter's predictions on a split → mIoU, per-class IoU, FP, FN.

Ray Data shards the split's ids over an actor pool (``ActorPoolStrategy(size=evaluate.num_actors)``);
each actor loads the checkpoint once and, per image, averages the softmax over ``evaluate.scales``
(and horizontal flips with ``evaluate.flip``), optionally refines it with a dense CRF (``evaluate.crf``,
the paper's "CRF with conventional settings": DeepLab's kernels in ``evaluate.crf_*``), writes the
argmax as ``pred/{id}.png`` (temp + rename) and returns the batch's confusion matrix; the driver
sums them. Metrics use the definitions of ``mars evaluate-labels`` (``algo.metrics.summarize``), so
``evaluate_labels.evaluate`` on ``pred/`` gives the same numbers.

Outputs: ``RUN/evaluate/metrics.json``, ``RUN/evaluate/table.txt``, ``RUN/evaluate/pred/{id}.png``
(``RUN/evaluate_baseline/`` for the baseline model, ``train.baseline=true``). Without ground truth
for the split only the predictions are written and the metrics are ``null``. ``RUN``, ``data.root`` and
the checkpoint may be object-store URIs (``mars_ray.storage``); actors get them as plain strings.

:class:`PredictImages` also serves the ``train`` stage: predictions for the eval split, and the
complemented labels Y^co (BIASED pixels of Y^db replaced by the CRF-refined prediction).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from mars_ray import config as C
from mars_ray import storage
from mars_ray.algo.complement import complement_labels
from mars_ray.algo.metrics import ConfusionMatrix, summarize
from mars_ray.artifacts import StageDir, atomic_write_json, atomic_write_text, current, fingerprint_path
from mars_ray.data.label_io import read_image, read_label, write_label
from mars_ray.data.voc import VOCDataset
from mars_ray.engine import predict_labels
from mars_ray.models.deeplab import load_segmenter_checkpoint
from mars_ray.stages.evaluate_labels import format_table
from mars_ray.stages.inputs import config_path
from mars_ray.stages import inputs
from mars_ray.stages.runtime import ensure_ray, map_images
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

PRED = "pred"
_EXECUTION_KEYS = {"num_actors", "cpus_per_actor", "use_gpu", "batch_size"}  # how, not what, is predicted


class PredictImages:
    """Ray Data callable: a batch of ids → prediction PNGs written; returns the batch's confusion matrix.

    ``fill_dir`` switches to complementing: the written label is ``fill_dir/{id}.png`` (Y^db) with its
    BIASED pixels replaced by the prediction (Y^co); with ``class_source`` (``inputs.image_class_source``)
    that prediction is restricted to background + the image's classes, as in training. With
    ``with_gt`` the written labels are scored against the ground truth (``mat`` ``[1, K, K]`` per
    batch, zeros otherwise).
    """

    def __init__(
        self,
        *,
        checkpoint: str,
        dataset: dict[str, Any],
        out_dir: str,
        num_classes: int,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        crf: dict[str, float] | None = None,
        fill_dir: str | None = None,
        class_source: dict[str, str] | None = None,
        with_gt: bool = True,
        use_gpu: bool = False,
        threads: int = 1,
        skip_existing: bool = False,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model, _ = load_segmenter_checkpoint(checkpoint, expect_num_classes=num_classes, map_location=self.device)
        self.dataset = VOCDataset(**dataset)
        self.out_dir = upath(out_dir)
        self.num_classes = num_classes
        self.kw = dict(scales=tuple(scales), flip=flip, crf=crf)
        self.fill_dir = upath(fill_dir) if fill_dir else None
        self.classes = inputs.ImageClasses(self.dataset, class_source) if class_source and fill_dir else None
        self.with_gt = with_gt
        # a resumed run reads back the predictions written before it stopped: one listing, not a request per id
        self.written: frozenset[str] = frozenset(storage.list_files(self.out_dir)) if skip_existing \
            and self.out_dir.is_dir() else frozenset()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cm = ConfusionMatrix(self.num_classes)
        ids = [str(i) for i in batch["image_id"]]
        for image_id in ids:
            label = self._one(image_id)
            if self.with_gt:
                gt_path = self.dataset.gt_path(image_id)
                if gt_path is None:
                    raise FileNotFoundError(f"{self.dataset.gt_dir}: no ground truth {image_id}.png")
                cm.update(label, read_label(gt_path))
        return {"mat": cm.mat[None], "n": np.array([len(ids)], np.int64)}

    def _one(self, image_id: str) -> np.ndarray:
        if f"{image_id}.png" in self.written:
            return read_label(self.out_dir / f"{image_id}.png")
        image = read_image(self.dataset.image_path(image_id))
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0)
        batch = {"id": [image_id], "image": x, "image_uint8": torch.from_numpy(image)[None]}
        if self.classes is not None:
            batch["class_mask"] = torch.from_numpy(self.classes.mask(image_id))[None]
        _, pred = next(predict_labels(self.model, [batch], **self.kw))
        if self.fill_dir is not None:
            y_db = torch.from_numpy(read_label(self.fill_dir / f"{image_id}.png").astype(np.int64))
            pred = complement_labels(y_db, torch.from_numpy(pred).long()).to(torch.uint8).numpy()
        write_label(self.out_dir / f"{image_id}.png", pred)
        return pred


def predict_split(
    *,
    checkpoint: AnyPath,
    dataset: VOCDataset,
    split: str,
    out_dir: AnyPath,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: dict[str, float] | None = None,
    fill_dir: AnyPath | None = None,
    class_source: dict[str, str] | None = None,
    with_gt: bool = False,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    use_gpu: bool = False,
    batch_size: int = 4,
    skip_existing: bool = False,
) -> ConfusionMatrix:
    """Write ``out_dir/{id}.png`` for every id of ``split`` on a Ray Data actor pool; the summed confusion matrix.

    ``skip_existing`` (a resumed stage): predictions already in ``out_dir`` are read back, not recomputed.
    """
    ids = dataset.ids(split)
    num_classes = dataset.num_classes + 1
    ds = map_images(
        ids,
        PredictImages,
        dict(
            checkpoint=storage.absolute(checkpoint), dataset=dataset.spec(),
            out_dir=storage.absolute(out_dir), num_classes=num_classes, scales=tuple(scales), flip=flip, crf=crf,
            fill_dir=storage.absolute(fill_dir) if fill_dir else None, class_source=class_source,
            with_gt=with_gt, use_gpu=use_gpu, threads=max(1, int(cpus_per_actor)), skip_existing=skip_existing,
        ),
        num_actors=num_actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=1 if use_gpu else 0,
        batch_size=batch_size,
        progress=f"{split} predictions",
    )
    total = ConfusionMatrix(num_classes)
    n = 0
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        total.mat += out["mat"].sum(axis=0)
        n += int(out["n"].sum())
    if n != len(ids):
        raise RuntimeError(f"predicted {n} of {len(ids)} images of split {split!r}")  # a Ray Data bug, not user input
    return total


def default_checkpoint(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """``evaluate.checkpoint`` or the ``train`` stage's ``model.pt`` (``train_baseline`` with ``train.baseline``)."""
    given = config_path(cfg.evaluate.checkpoint)
    return given or current(run_dir / ("train_baseline" if cfg.train.baseline else "train")) / "model.pt"


def out_name(cfg: C.Config) -> str:
    return "evaluate_baseline" if cfg.train.baseline else "evaluate"


def crf_kwargs(cfg: C.Config) -> dict[str, float] | None:
    """The evaluation CRF (``evaluate.crf_*``: DeepLab's conventional settings by default), or ``None``."""
    return cfg.evaluate.crf_kwargs()


def validate_inputs(cfg: C.Config, run_dir: AnyPath) -> tuple[VOCDataset, AnyPath, dict[str, Any]]:
    """Dataset, checkpoint path and its ``extra``; ``ValueError``/``FileNotFoundError`` naming the file."""
    C.validate(cfg)  # evaluate.scales, num_actors, batch_size, …
    dataset = inputs.open_dataset(cfg)
    dataset.ids(cfg.data.eval_split)  # names the split file when it is missing
    ckpt = default_checkpoint(cfg, run_dir)
    if not ckpt.is_file():
        hint = "" if cfg.evaluate.checkpoint else " (run `mars train` first or pass --checkpoint)"
        raise FileNotFoundError(f"{ckpt}: no segmenter checkpoint{hint}")
    _, extra = load_segmenter_checkpoint(ckpt, expect_num_classes=dataset.num_classes + 1)
    classes = extra.get("classes")
    if classes is not None and list(classes) != dataset.classes:
        raise ValueError(f"{ckpt}: trained for classes {list(classes)}, the dataset has {dataset.classes}")
    return dataset, ckpt, extra


def stage_dir(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset, ckpt: AnyPath) -> StageDir:
    e = cfg.evaluate
    slice_ = {"evaluate": {"scales": list(e.scales), "flip": e.flip, "crf": crf_kwargs(cfg)},
              "data": inputs.dataset_key(cfg, [cfg.data.eval_split]), "checkpoint": storage.absolute(ckpt)}
    fingerprints = {"checkpoint": fingerprint_path(ckpt), "dataset": dataset.fingerprint(cfg.data.eval_split)}
    return StageDir(run_dir / out_name(cfg), "evaluate", C.slice_hash(slice_, fingerprints), slice_, fingerprints)


def run(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Predict ``data.eval_split`` with the checkpoint and score it; returns ``RUN/evaluate`` (skipped when complete)."""
    dataset, ckpt, _ = validate_inputs(cfg, run_dir)
    sd = stage_dir(cfg, run_dir, dataset, ckpt)
    if sd.is_complete():
        logger.info("evaluate: up to date in %s, skipping", sd.path)
        return sd.root
    with sd.guard() as resuming:
        metrics = _predict_and_score(cfg, sd, dataset, ckpt, resuming=resuming)
        sd.finish({k: metrics[k] for k in ("miou", "fp", "fn", "images")})
    if metrics["miou"] is not None:
        logger.info("evaluate: %s mIoU %.1f FP %.1f FN %.1f", cfg.data.eval_split, 100 * metrics["miou"],
                    100 * metrics["fp"], 100 * metrics["fn"])
    return sd.root


def _predict_and_score(cfg: C.Config, sd: StageDir, dataset: VOCDataset, ckpt: AnyPath, *,
                       resuming: bool = False) -> dict[str, Any]:
    ensure_ray(cfg.ray)
    e = cfg.evaluate
    split = cfg.data.eval_split
    has_gt = dataset.has_gt(split)
    cm = predict_split(
        checkpoint=ckpt, dataset=dataset, split=split, out_dir=sd.path / PRED, scales=e.scales, flip=e.flip,
        crf=crf_kwargs(cfg), with_gt=has_gt, num_actors=e.num_actors, cpus_per_actor=e.cpus_per_actor,
        use_gpu=e.use_gpu, batch_size=e.batch_size, skip_existing=resuming,
    )
    if has_gt:
        metrics = summarize(cm, dataset.classes)
        table = format_table(metrics)
    else:
        logger.warning("evaluate: split %r has no ground truth; wrote predictions only", split)
        metrics = {"miou": None, "fp": None, "fn": None, "pixel_acc": None, "per_class": {}}
        table = f"no ground truth for split {split!r}: predictions only"
    metrics.update({"checkpoint": str(ckpt), "split": split, "scales": list(e.scales), "flip": e.flip,
                    "crf": e.crf, "crf_kwargs": crf_kwargs(cfg), "pixels": int(cm.mat.sum()),
                    "images": len(dataset.ids(split))})
    atomic_write_json(sd.path / "metrics.json", metrics)
    atomic_write_text(sd.path / "table.txt", table + "\n")
    return metrics
