"""The ``train`` stage's Ray Train worker: one explicit loop per worker, settings in a frozen dataclass.

The driver side (``stages/train.py``) builds a :class:`TrainLoop` and runs :func:`train_worker` on a
``TorchTrainer``. Each worker: builds the student (DDP via ``prepare_model``) and its EMA teacher,
SGD with the poly schedule, restores the last checkpoint when there is one, then per epoch streams
its shard of the (image, label) rows through ``SegAugment`` into ``engine.train_one_epoch`` (the
MARS complementing step, or plain CE for the baseline), averages the terms over the workers,
scores val mIoU on rank 0 and reports (rank 0 with a checkpoint every ``checkpoint_every`` epochs
and after the last).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from mars_ray.algo.complement import ema_update
from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.voc import VOCDataset
from mars_ray.engine import SegAugment, baseline_step, build_sgd, complement_step, evaluate, make_ema_teacher
from mars_ray.engine import poly_lr_lambda, train_one_epoch
from mars_ray.models.deeplab import load_segmenter_checkpoint
from mars_ray.models.registry import SEGMENTERS
from mars_ray.stages.runtime import report_epoch, restored_state, worker_seed

logger = logging.getLogger(__name__)


def _augmented_batches(shard: Any, augment: SegAugment, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's shard for one epoch: shuffled, augmented, stacked → engine training batches."""
    for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                local_shuffle_buffer_size=max(64, 4 * batch_size), local_shuffle_seed=seed):
        pairs = [augment.numpy(np.asarray(img), np.asarray(lab)) for img, lab in zip(b["image"], b["label"])]
        img = torch.from_numpy(np.stack([p["image_uint8"] for p in pairs]))
        out = {"image": img.permute(0, 3, 1, 2).float().div_(255.0), "image_uint8": img,
               "label": torch.from_numpy(np.stack([p["label"] for p in pairs])).long(),
               "image_side": torch.tensor([float(p["image_side"]) for p in pairs])}
        if "class_mask" in b:  # MARS rows: the image's classes C_I, unchanged by the crop
            out["class_mask"] = torch.from_numpy(np.asarray(b["class_mask"], dtype=bool))
        yield out


def _val_miou(model: torch.nn.Module, spec: dict[str, Any], ids: list[str], num_classes: int) -> float:
    """Single-scale mIoU of ``model`` on ``ids`` (``VOCDataset(**spec)``, local or URI; rank 0 only)."""
    dataset = VOCDataset(**spec)
    device = next(model.parameters()).device

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for i in ids:
            image = torch.from_numpy(read_image(dataset.image_path(i))).permute(2, 0, 1)[None].float().div_(255.0)
            yield {"image": image.to(device), "label": torch.from_numpy(read_label(dataset.gt_path(i)).copy())[None]}

    return float(evaluate(model, batches(), num_classes).compute()["miou"])


def _reduce_mean(stats: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over DDP workers (identity on one worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    keys = sorted(k for k in stats if k != "images_per_s")
    t = torch.tensor([stats[k] for k in keys] + [stats.get("images_per_s", 0.0)], dtype=torch.float64)
    dist.all_reduce(t)
    out = {k: float(v) / dist.get_world_size() for k, v in zip(keys, t[:-1])}
    out["images_per_s"] = float(t[-1])  # summed: images per second of the whole group
    return out


@dataclass(frozen=True)
class TrainLoop:
    """What a Ray Train worker of the ``train`` stage needs (plain and picklable; :func:`loop_settings`).

    ``batch_size`` is global (each of the ``world`` workers takes ``batch_size / world``); ``n_train``
    is the number of training rows (each worker gets ``n_train // world``). Paths are absolute.
    """

    model_name: str
    model_kwargs: dict[str, Any]
    num_classes: int  # background included
    baseline: bool  # plain CE on Y^b, the student is the model; else MARS, the EMA teacher is
    init_checkpoint: str  # "" = the registry's initialisation
    crop_size: int
    scale_range: tuple[float, float]
    batch_size: int
    n_train: int
    lr: float
    momentum: float
    weight_decay: float
    poly_power: float
    epochs: int
    ema_momentum: float
    crf: dict[str, float] | None
    wce: bool  # Eq 7 weighted CE (paper); False = plain CE on Y^co (Table 6 ablation)
    amp: bool
    checkpoint_every: int
    val_every: int
    dataset: dict[str, Any]  # VOCDataset.spec()
    val_ids: tuple[str, ...]  # eval-split ids with ground truth (empty: no per-epoch val mIoU)
    seed: int
    threads: int
    crf_workers: int = 1  # processes for the teacher's CRF fill (1: in the worker itself)


@dataclass
class _Nets:
    """One worker's training objects: ``student`` (DDP-wrapped), ``core`` (unwrapped), the EMA teacher."""

    student: torch.nn.Module
    core: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # torch.amp.GradScaler with AMP on CUDA, else None

    def state(self, epoch: int, step: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint: weights, optimiser, schedule, scaler, counters and history."""
        return {"student": self.core.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": epoch, "step": step, "history": history}

    def load(self, state: dict[str, Any]) -> tuple[int, int, list[dict[str, Any]]]:
        """Continue from a checkpoint of :meth:`state` → (epochs done, global step, history)."""
        self.core.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return int(state["epoch"]), int(state["step"]), list(state["history"])


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: unpack the loop settings and run :func:`fit`."""
    fit(config["settings"])


def fit(s: TrainLoop) -> None:
    """The training loop on one Ray Train worker: nets, resume, then per epoch train → val → report."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, s.threads))
    device = ray.train.torch.get_device()
    nets = _build_nets(s, world, device)
    start, step, history = 0, 0, []
    restored = restored_state(map_location=device, weights_only=False)
    if restored is not None:
        start, step, history = nets.load(restored)
        if rank == 0:
            logger.info("resuming from epoch %d, step %d", start, step)
    shard = ray.train.get_dataset_shard("train")
    with _crf_pool(s) as crf_map:
        for epoch in range(start, s.epochs):
            step = _run_epoch(s, nets, shard, epoch, rank, world, step, history, crf_map)


@contextlib.contextmanager
def _crf_pool(s: TrainLoop) -> Iterator[Any]:
    """The ``map`` of a pool of ``s.crf_workers`` processes for the teacher's CRF fill, or ``None``
    (CRF off, or one worker: it runs in this process). pydensecrf holds the GIL: threads would
    not run two CRFs at once. ``spawn``: CUDA is live in this process."""
    if not s.crf or s.crf_workers <= 1:
        yield None
        return
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(s.crf_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool.map
    finally:
        pool.shutdown(cancel_futures=True)


def _run_epoch(s: TrainLoop, nets: "_Nets", shard: Any, epoch: int, rank: int, world: int, step: int,
               history: list[dict[str, Any]], crf_map: Any) -> int:
    """One epoch: train, val mIoU on rank 0 when due, report (with a checkpoint when due) → global step."""
    t0 = time.perf_counter()
    terms, steps = _train_epoch(s, nets, shard, epoch, rank, world, crf_map)
    step += steps
    row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": nets.optimizer.param_groups[0]["lr"], **terms}
    last = epoch + 1 == s.epochs
    if rank == 0 and s.val_ids and s.val_every and ((epoch + 1) % s.val_every == 0 or last):
        row["val_miou"] = _val_miou(nets.core if s.baseline else nets.teacher, s.dataset, s.val_ids, s.num_classes)
    row["time"] = time.perf_counter() - t0
    history.append(row)
    due = rank == 0 and ((epoch + 1) % s.checkpoint_every == 0 or last)
    report_epoch(row, nets.state(epoch + 1, step, history) if due else None, epochs=s.epochs)
    return step


def _build_nets(s: TrainLoop, world: int, device: torch.device) -> _Nets:
    """Student (same initial weights on every worker: one seed, and DDP broadcasts them), teacher,
    SGD with the poly schedule over the whole run, and a grad scaler when AMP runs on CUDA."""
    import ray.train.torch

    torch.manual_seed(s.seed)
    student = SEGMENTERS.get(s.model_name, **s.model_kwargs)
    if s.init_checkpoint:
        init, _ = load_segmenter_checkpoint(s.init_checkpoint, expect_name=s.model_name,
                                            expect_num_classes=s.num_classes)
        student.load_state_dict(init.state_dict())
    teacher = make_ema_teacher(student).to(device)
    student = ray.train.torch.prepare_model(student)
    core = getattr(student, "module", student)
    steps_per_epoch = math.ceil((s.n_train // world) / (s.batch_size // world))
    optimizer = build_sgd(core.param_groups(s.lr), s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(s.epochs * steps_per_epoch, s.poly_power))
    scaler = torch.amp.GradScaler("cuda", enabled=True) if s.amp and device.type == "cuda" else None
    return _Nets(student, core, teacher, optimizer, scheduler, scaler)


def _train_epoch(s: TrainLoop, nets: _Nets, shard: Any, epoch: int, rank: int, world: int,
                 crf_map: Any = None) -> tuple[dict[str, float], int]:
    """One pass over this worker's shard → (loss terms and metrics averaged over the workers, the
    steps this worker took); the EMA teacher follows the student after every step."""
    nets.student.train()
    if s.baseline:
        def step_fn(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
            return baseline_step(nets.student, batch)
    else:
        def step_fn(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
            return complement_step(nets.student, nets.teacher, batch, num_classes=s.num_classes, crf=s.crf,
                                   use_wce=s.wce, crf_map=crf_map)

    augment = SegAugment(s.crop_size, s.scale_range, flip=True, seed=worker_seed(s.seed, rank, epoch, stream="augment"))
    batches = _augmented_batches(shard, augment, s.batch_size // world,
                                 seed=worker_seed(s.seed, rank, epoch, stream="shuffle"))
    stats = train_one_epoch(step_fn, batches, nets.optimizer, scheduler=nets.scheduler, scaler=nets.scaler,
                            after_step=lambda _: ema_update(nets.teacher, nets.core, s.ema_momentum), log_every=0)
    terms = {k: v for k, v in _reduce_mean(stats).items() if k != "steps"}
    return terms, int(stats["steps"])


__all__ = ["TrainLoop", "fit", "train_worker"]
