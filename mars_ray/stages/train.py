"""Stage ``train``: MARS complementing (Sec 3.4) — or the paper's baseline — on Ray Train.

MARS (default): a segmenter (``train.model`` in SEGMENTERS) learns from the debiased labels Y^db
(``RUN/debias/{id}.png`` or ``train.labels``). An EMA teacher (mean teacher, updated after every
step) predicts on the same batch; its dense-CRF-refined argmax fills the BIASED (254) pixels → Y^co,
the certain mask W (Eq 6) weights those pixels by the teacher's foreground confidence, and the
student minimises the weighted CE (Eq 7; plain CE on Y^co with ``train.wce=false``, the paper's
Table 6 ablation) — ``engine.complement_step``. The final model is the teacher. Every training row
carries its image's classes C_I (``class_mask``: from the image-level labels when the dataset has
them, else the classes present in Y^b; the log says which): the fill and W use only those classes.

Baseline (``train.baseline=true``, ``mars train --baseline``): the same network, schedule and data
pipeline on the pseudo labels Y^b (``data.pseudo_labels`` / ``RUN/wsss`` or ``train.labels``) with
plain CE (``engine.baseline_step``); the final model is the student. It writes ``RUN/train_baseline/``
and ``RUN/predict_baseline/``, so both models live in one run folder and ``mars evaluate`` compares
them (``--set train.baseline=true`` evaluates the baseline).

Ray Train: ``TorchTrainer`` over ``train.num_workers`` (DDP via ``prepare_model``; GPU with
``train.use_gpu``, mixed precision with ``train.amp`` where CUDA is available). The (image, label)
rows are a Ray Data dataset, materialised before the trainer starts (RAY_NOTES: on small machines
a lazy read blocks behind the workers' CPUs); every worker streams its shard each epoch and runs
``SegAugment`` (scale, crop, flip) itself (the worker's loop: ``stages/train_loop.py``). Rank 0
reports a checkpoint (student, teacher, optimiser, scheduler, epoch, global step, history) every
``train.checkpoint_every`` epochs and after the last.

Resuming: Ray Train's run name is fixed per folder (``mars`` / ``baseline``) under ``RUN/train/ray``,
so a killed run resumes from its last checkpoint, and ``FailureConfig(train.max_failures)`` restarts
failed workers from it. ``train.epochs`` is not part of the stage key: raising it continues a
finished run from its last checkpoint (the step counter and the poly schedule continue; the schedule
is re-spread over the new total), lowering it retrains from scratch.

Outputs (``RUN/train/``): ``model.pt`` (final teacher, ``save_segmenter_checkpoint`` with extra
classes/epoch/step), ``history.csv`` (per epoch: step, loss terms, val mIoU on ``data.eval_split``,
images/s, seconds), ``curves.png``, ``ray/`` (Ray Train storage), ``manifest.json``; plus
``RUN/complement/{id}.png`` (Y^co of the train split from the final teacher; MARS only) and
``RUN/predict/{eval_split}/{id}.png`` (single-scale predictions).

``RUN``, ``data.root``, the label folder and ``train.init_checkpoint`` may be object-store URIs
(``s3://bucket/run``, see ``mars_ray.storage``): workers get them as plain strings, Ray Train keeps
its checkpoints under ``RUN/train/ray`` there, and every output is one atomic upload.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch

from mars_ray import config as C
from mars_ray import faults, storage
from mars_ray.artifacts import StageDir, atomic_write_bytes, atomic_write_json, atomic_write_text, fingerprint_files
from mars_ray.artifacts import current, fingerprint_path, read_manifest, require_complete
from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.validate import check_label, label_folder_sizes
from mars_ray.data.voc import VOCDataset
from mars_ray.models.deeplab import load_segmenter_checkpoint, save_segmenter_checkpoint
from mars_ray.models.registry import SEGMENTERS
from mars_ray.stages import evaluate as evaluate_stage
from mars_ray.stages import inputs
from mars_ray.stages.runtime import ensure_ray, final_state, fit_torch, map_images
from mars_ray.stages.train_loop import TrainLoop, train_worker
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "step", "loss", "ce", "wce", "biased_frac", "mean_w", "lr", "val_miou",
                  "images_per_s", "time")
# do not change the trained weights' meaning: left out of the stage key
_EXECUTION_KEYS = {"num_workers", "use_gpu", "cpus_per_worker", "max_failures", "checkpoint_every", "amp",
                   "val_every", "epochs", "crf_workers"}


# ------------------------------------------------------------------------------------------ folders


def out_names(cfg: C.Config) -> dict[str, str]:
    """Folder names under RUN for this variant (MARS or baseline)."""
    if cfg.train.baseline:
        return {"train": "train_baseline", "predict": "predict_baseline", "complement": ""}
    return {"train": "train", "predict": "predict", "complement": "complement"}


def labels_dir(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Training labels: ``train.labels``, else Y^b (baseline) or ``RUN/debias`` (MARS); local or URI."""
    given = inputs.config_path(cfg.train.labels)
    if given is not None:
        return given
    return inputs.pseudo_label_dir(cfg, run_dir) if cfg.train.baseline else current(run_dir / "debias")


def _model_kwargs(cfg: C.Config, num_classes: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_classes": num_classes, "output_stride": cfg.train.output_stride}
    if cfg.train.pretrained_backbone:
        kw["pretrained_backbone"] = cfg.train.pretrained_backbone
    return kw


# ------------------------------------------------------------------------------------------ validation


def validate_inputs(cfg: C.Config, run_dir: AnyPath) -> tuple[VOCDataset, AnyPath]:
    """Every check that needs no training, before any output is touched; returns (dataset, labels folder).

    Raises ``ValueError`` naming the key or file: batch not divisible across workers, a crop larger
    than every (scaled) image, a labels folder missing ids, an ``init_checkpoint`` of another
    model or class count, image-level labels (MARS) with a bad id or class or without an id;
    ``FileNotFoundError`` when the debias stage has not run.
    """
    t = cfg.train
    C.validate(cfg)  # ranges and names (``mars train`` built the config so; a merged one may not be)
    dataset = inputs.open_dataset(cfg)
    labels = labels_dir(cfg, run_dir)
    if not t.labels and not t.baseline:
        require_complete(labels, "debias")
    sizes = label_folder_sizes(dataset, cfg.data.split, labels, name="training label")
    ids = dataset.ids(cfg.data.split)
    if len(ids) < t.num_workers:
        raise ValueError(f"split {cfg.data.split!r} has {len(ids)} images, fewer than train.num_workers={t.num_workers}")
    largest = max(max(hw) for hw in sizes.values())
    if t.crop_size > largest * t.scale_max:
        raise ValueError(
            f"train.crop_size={t.crop_size} is larger than every training image even at train.scale_max="
            f"{t.scale_max} (largest side {largest} px → {largest * t.scale_max:g} px): crops would be mostly padding"
        )
    if t.init_checkpoint:
        load_segmenter_checkpoint(t.init_checkpoint, expect_name=t.model, expect_num_classes=dataset.num_classes + 1)
    class_source(cfg, run_dir, dataset, labels, check=True)  # bad image-level labels: named before training
    return dataset, labels


def stage_dir(cfg: C.Config, run_dir: AnyPath) -> StageDir:
    """``RUN/train`` (or ``RUN/train_baseline``) and its key: config slice minus execution knobs + inputs."""
    dataset = inputs.open_dataset(cfg)
    labels = labels_dir(cfg, run_dir)
    t = cfg.train
    slice_ = {
        "train": {k: v for k, v in C.to_dict(t).items() if k not in _EXECUTION_KEYS},
        "data": {**inputs.dataset_key(cfg, [cfg.data.split]), "eval_split": cfg.data.eval_split},
        "labels": storage.absolute(labels),
    }
    if not t.labels and not t.baseline:
        label_fp = "debias:" + str(require_complete(labels, "debias")["key"])
    else:
        label_fp = fingerprint_files(labels / f"{i}.png" for i in dataset.ids(cfg.data.split))
    fingerprints = {
        "labels": label_fp,
        "dataset": dataset.fingerprint(cfg.data.split),
        "init_checkpoint": fingerprint_path(inputs.config_path(t.init_checkpoint)),
    }
    classes = class_source(cfg, run_dir, dataset, labels)
    if classes is not None:  # MARS: where C_I comes from (the dataset fingerprint covers the file's content)
        slice_["image_classes"] = classes["kind"]
    return StageDir(run_dir / out_names(cfg)["train"], "train", C.slice_hash(slice_, fingerprints),
                    {**slice_, "epochs": t.epochs}, fingerprints)


# ------------------------------------------------------------------------------------------ Ray Data rows


class _LoadPair:
    """Ray Data callable: ids → (image uint8 [H,W,3], label uint8 [H,W]) rows, labels checked; with
    ``class_source`` (MARS) also ``class_mask`` bool [C+1]: background + the image's classes C_{I_i}."""

    def __init__(self, dataset: dict[str, Any], labels: str, class_source: dict[str, str] | None = None) -> None:
        self.dataset = VOCDataset(**dataset)
        self.labels = upath(labels)
        self.classes = inputs.ImageClasses(self.dataset, class_source) if class_source else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images, labels, masks = [], [], []
        for image_id in batch["image_id"]:
            image = read_image(self.dataset.image_path(str(image_id)))
            path = self.labels / f"{image_id}.png"
            label = read_label(path)
            check_label(label, num_classes=self.dataset.num_classes, image_hw=image.shape[:2], path=path)
            images.append(image)
            labels.append(label)
            if self.classes is not None:
                masks.append(self.classes.mask(str(image_id)))
        out = {"image_id": batch["image_id"], "image": images, "label": labels}
        if self.classes is not None:
            out["class_mask"] = np.stack(masks)
        return out


# ------------------------------------------------------------------------------------------ driver outputs


def write_history(history: list[dict[str, Any]], folder: AnyPath) -> None:
    """``history.csv`` (one row per epoch, empty where a term does not apply) and ``curves.png``
    (drawn on a ``matplotlib.figure.Figure``: no process-wide backend is chosen here)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in HISTORY_FIELDS})
    atomic_write_text(folder / "history.csv", buf.getvalue())

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [r["loss"] for r in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    val = [(r["epoch"], r["val_miou"]) for r in history if r.get("val_miou") is not None]
    if val:
        ax2.plot(*zip(*val), marker="o", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="val mIoU", title="val mIoU")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    atomic_write_bytes(folder / "curves.png", png.getvalue())


def _training_dataset(dataset: VOCDataset, split: str, labels: AnyPath, *, trainer_cpus: float,
                      class_source: dict[str, str] | None) -> "ray.data.Dataset":
    """(image, label[, class_mask]) rows of the split. Streamed where the cluster has CPUs to spare
    beside the trainer (memory stays flat as the dataset grows); materialised first on a small
    machine, where a lazy read would wait behind the trainer's CPUs forever (RAY_NOTES)."""
    ids = dataset.ids(split)
    materialize = ray.cluster_resources().get("CPU", 0.0) - trainer_cpus < 2
    ds = map_images(ids, _LoadPair, {"dataset": dataset.spec(), "labels": storage.absolute(labels),
                                     "class_source": class_source},
                    batch_size=16, progress="loading" if materialize else None)  # streamed: read once per epoch
    return ds.materialize() if materialize else ds


def _mark_extendable(sd: StageDir, epochs: int) -> None:
    """A finished run with fewer epochs and the same key is continued, not cleared: mark it running."""
    m = read_manifest(sd.path)
    if m and m.get("key") == sd.key and m.get("status") == "complete":
        done = int(m.get("outputs", {}).get("epochs", 0))
        if done < epochs:
            logger.info("train: extending the finished run in %s from %d to %d epochs", sd.path, done, epochs)
            atomic_write_json(sd.manifest_path, {**m, "status": "running"})


def is_complete(sd: StageDir, epochs: int) -> bool:
    m = sd.read_manifest()
    return sd.is_complete() and int((m or {}).get("outputs", {}).get("epochs", -1)) == epochs


def run(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Train on Ray Train and write the model, history, complemented labels and predictions; returns the folder."""
    dataset, labels = validate_inputs(cfg, run_dir)
    sd = stage_dir(cfg, run_dir)
    t = cfg.train
    if is_complete(sd, t.epochs):
        logger.info("train: up to date in %s, skipping", sd.path)
        return sd.root
    _mark_extendable(sd, t.epochs)
    with sd.guard():  # a failure brings back the previous finished model
        outputs = _train_and_write(cfg, run_dir, sd, dataset, labels)
        sd.finish(outputs)
    logger.info("train: %d epochs (%d steps) → %s; val mIoU %s", outputs["epochs"], outputs["step"],
                outputs["model"], "-" if outputs["val_miou"] is None else f"{100 * outputs['val_miou']:.1f}")
    return sd.root


def _train_and_write(cfg: C.Config, run_dir: AnyPath, sd: StageDir, dataset: VOCDataset, labels: AnyPath) -> dict[str, Any]:
    """Fit on Ray Train, then write model.pt, history, Y^co and the eval-split predictions; the manifest outputs."""
    t = cfg.train
    names = out_names(cfg)
    ensure_ray(cfg.ray)
    settings = loop_settings(cfg, dataset)
    classes = class_source(cfg, run_dir, dataset, labels)
    if classes is not None:
        logger.info("train: each image's classes C_I (Eq 6 and the fill) from %s", inputs.describe_class_source(classes))
    t0 = time.perf_counter()
    rows = _training_dataset(dataset, cfg.data.split, labels, trainer_cpus=t.num_workers * t.cpus_per_worker,
                             class_source=classes)
    result = fit_torch(
        train_worker, {"settings": settings}, name="baseline" if t.baseline else "mars", storage=sd.path / "ray",
        num_workers=t.num_workers, use_gpu=t.use_gpu, cpus_per_worker=t.cpus_per_worker,
        max_failures=t.max_failures, datasets={"train": rows},
    )
    state = final_state(result, sd.path / "ray", weights_only=False)
    model_kwargs = settings.model_kwargs
    model = SEGMENTERS.get(t.model, **model_kwargs)
    model.load_state_dict(state["student"] if t.baseline else state["teacher"])
    model_path = save_segmenter_checkpoint(
        sd.path / "model.pt", model, t.model, model_kwargs,
        extra={"classes": dataset.classes, "epoch": int(state["epoch"]), "step": int(state["step"]),
               "baseline": t.baseline},
    )
    history = state["history"]
    write_history(history, sd.path)
    faults.point("train.model")

    predict = dict(checkpoint=model_path, dataset=dataset, num_actors=1, cpus_per_actor=1.0, use_gpu=t.use_gpu)
    if names["complement"]:
        out = _fresh(run_dir / names["complement"])
        evaluate_stage.predict_split(split=cfg.data.split, out_dir=out, crf=t.crf_kwargs(), fill_dir=labels,
                                     class_source=classes, scales=t.complement_scales,
                                     flip=t.complement_flip, **predict)
    if _has_split(dataset, cfg.data.eval_split):
        out = _fresh(run_dir / names["predict"] / cfg.data.eval_split)
        evaluate_stage.predict_split(split=cfg.data.eval_split, out_dir=out, **predict)
    last = history[-1]
    outputs = {
        "model": str(model_path), "epochs": int(state["epoch"]), "step": int(state["step"]),
        "val_miou": last.get("val_miou"), "loss": last.get("loss"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return outputs


def class_source(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset, labels: AnyPath, *,
                 check: bool = False) -> dict[str, str] | None:
    """Where MARS takes each image's classes C_I from (``inputs.image_class_source``); ``None`` for the
    baseline (plain CE uses no class sets). ``ValueError`` naming the file and id for bad image labels."""
    if cfg.train.baseline:
        return None
    return inputs.image_class_source(cfg, run_dir, dataset, fallback=labels, check=check)


def loop_settings(cfg: C.Config, dataset: VOCDataset) -> TrainLoop:
    """The :class:`TrainLoop` of this config; paths made absolute for the workers."""
    t = cfg.train
    num_classes = dataset.num_classes + 1
    return TrainLoop(
        model_name=t.model, model_kwargs=_model_kwargs(cfg, num_classes), num_classes=num_classes,
        baseline=t.baseline, init_checkpoint=storage.absolute(t.init_checkpoint) if t.init_checkpoint else "",
        crop_size=t.crop_size, scale_range=(t.scale_min, t.scale_max), batch_size=t.batch_size,
        n_train=len(dataset.ids(cfg.data.split)), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
        poly_power=t.poly_power, epochs=t.epochs, ema_momentum=t.ema_momentum, crf=t.crf_kwargs(), wce=t.wce, amp=t.amp,
        checkpoint_every=t.checkpoint_every, val_every=t.val_every, dataset=dataset.spec(),
        val_ids=tuple(_val_ids(dataset, cfg.data.eval_split)), seed=t.seed, threads=max(1, int(t.cpus_per_worker)),
        crf_workers=t.crf_workers,
    )


def _fresh(folder: AnyPath) -> AnyPath:
    storage.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _has_split(dataset: VOCDataset, split: str) -> bool:
    try:
        dataset.ids(split)
    except FileNotFoundError:
        return False
    return True


def _val_ids(dataset: VOCDataset, split: str) -> list[str]:
    """Ids of the eval split when it exists and has ground truth (else no per-epoch val mIoU)."""
    if not _has_split(dataset, split) or not dataset.has_gt(split):
        logger.info("train: no ground truth for split %r, no per-epoch val mIoU", split)
        return []
    return dataset.ids(split)


def with_baseline(cfg: C.Config, baseline: bool = True) -> C.Config:
    """``cfg`` with ``train.baseline`` set (the demo and CLI use it)."""
    return replace(cfg, train=replace(cfg.train, baseline=baseline))
