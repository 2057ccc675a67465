"""Stage ``uss`` (situation b): a STEGO-style USS model trained on the dataset, with no labels at all.

A frozen backbone (``uss.backbone`` in BACKBONES) gives features; a 70-dim :class:`SegHead` learns to
reproduce their correspondences (STEGO: pairs of an image with itself, with one of its k nearest
images, and with a random image of the batch). The backbone is either

* a ViT with the official DINO weights from a file or URI (``uss.backbone=vit_base_8
  uss.backbone_weights=/path/dino_vitbase8_pretrain.pth``; keys/shapes are checked before anything
  is written or trained), or
* ``adaptive`` (the default; no weights): the weight-free extractor of ``models/adaptive.py``, its
  statistics fitted on the split first (``RUN/uss/uss_stats.npz``, as the ``features`` stage fits
  them), so the head is distilled from the adaptive features' correspondences, with every shift at
  the debias threshold (``models/stego_distill.py`` has the measurement); or
* ``small_cnn``, first trained self-supervised on the split itself for ``uss.ssl_epochs`` epochs
  (dense two-view InfoNCE, ``models.small_cnn.ssl_loss``), then frozen. On a few CPU minutes it
  learns little (issue 9 measured its codes collapsing); it needs a GPU-sized budget.

k-NN pairs: after the backbone is final (and frozen) its mean-pooled features of every image of the
split are computed once (sharded over the workers, gathered), and each image's ``uss.knn`` nearest
images by cosine similarity form the table a training crop draws its partner from (as STEGO does).
That is O(N·D) memory for N images; the table is part of the checkpoint, so a resumed run reuses it.

Crops (``uss.crop_scale``, our choice): ``native`` (default) cuts them at the images' own scale, at most
the split's median short side, because the features stage runs the frozen backbone at that scale and a
backbone's features change with it (``benchmarks/variation_bench.py``); ``resize`` (until 2026-12)
resized each image's short side to ``uss.crop_size`` × U(1, 1.5) first: on 64 px images a head distilled
from ``adaptive`` then learned on 1.5-2.25× up-scaled textures (README "Debiasing quality across datasets").

Ray Train: ``TorchTrainer`` over ``uss.num_workers`` (DDP via ``prepare_model``: over the backbone
during SSL, over the head afterwards; GPU with ``uss.use_gpu``). Each worker reads its shard of the
split's images from the dataset root (a shared file system on a cluster, as for every stage).
Rank 0 reports a checkpoint after every epoch (phase epochs, global step, history, weights,
optimiser, k-NN table); the run name is fixed (``uss``) under ``RUN/uss/ray``, so an interrupted
stage resumes from its last epoch via ``ray.train.get_checkpoint()``.

Outputs (``RUN/uss/``): ``checkpoint.pt`` (``save_stego_checkpoint``: the registry's ``stego``
extractor loads it by name, ``--set features.extractor=stego``), ``history.json`` (per epoch: phase,
epoch, global step, loss terms, images/s), ``manifest.json``. The key covers the ``uss`` config
(execution knobs excluded), the dataset's fingerprint and the backbone weights' fingerprint.
``RUN``, ``data.root`` and ``uss.backbone_weights`` may be object-store URIs (``mars_ray.storage``):
workers read them directly, Ray Train keeps its checkpoints under ``RUN/uss/ray`` there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from mars_ray import config as C
from mars_ray import faults
from mars_ray import storage as _storage
from mars_ray.artifacts import StageDir, atomic_write_json, fingerprint_path
from mars_ray.data.label_io import read_image
from mars_ray.data.voc import VOCDataset
from mars_ray.engine import fit_crop, sharded_loader, train_one_epoch
from mars_ray.stages import inputs
from mars_ray.stages.runtime import ensure_ray, final_state, fit_torch, report_epoch, restored_state, worker_seed
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

ADAPTIVE = "adaptive"  # the weight-free backbone whose head is distilled from its fitted features

CHECKPOINT = inputs.USS_CHECKPOINT
RAY_NAME = "uss"
# how the training is executed, not what it computes: left out of the stage key
_EXECUTION_KEYS = {"num_workers", "use_gpu", "cpus_per_worker", "max_failures"}


# ------------------------------------------------------------------------------------------ data


class _Crops(torch.utils.data.Dataset):
    """Item i → ``{"image": 3 x S x S}`` (and with a k-NN table ``"knn"``: a crop of one of its neighbours).

    ``native``: crops at the image's own scale (``fit_crop(scale=None)``), else resized by 1-1.5×."""

    def __init__(self, paths: "tuple[str, ...]", size: int, seed: int, knn: Optional[Tensor] = None,
                 native: bool = False) -> None:
        self.paths, self.size, self.knn = paths, size, knn
        self.scale = None if native else (1.0, 1.5)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        out = {"image": fit_crop(read_image(self.paths[i]), self.size, self.rng, scale=self.scale)}
        if self.knn is not None:
            j = int(self.knn[i, int(self.rng.integers(0, self.knn.shape[1]))])
            out["knn"] = fit_crop(read_image(self.paths[j]), self.size, self.rng, scale=self.scale)
        return out


# ------------------------------------------------------------------------------------------ models


def load_backbone(name: str, weights: str = "", stats: str = "") -> nn.Module:
    """``BACKBONES[name]``; with ``weights`` the file (local or URI) is loaded strictly (DINO format or a plain
    state dict). Raises ``ValueError`` naming missing/unexpected keys or shape mismatches. ``adaptive``: the
    extractor of the fitted statistics file ``stats`` (``RUN/uss/uss_stats.npz``)."""
    from mars_ray.models import load_all
    from mars_ray.models.registry import BACKBONES
    from mars_ray.models.vit import load_dino_checkpoint

    load_all()
    if name == ADAPTIVE:
        from mars_ray.models.adaptive import build_adaptive_extractor

        return build_adaptive_extractor(checkpoint=stats)
    backbone = BACKBONES.get(name)
    if weights:
        load_dino_checkpoint(backbone, weights)
    return backbone


class _StegoObjective(nn.Module):
    """``forward(images, knn_images)`` → STEGO loss terms, so that DDP sees one forward per step."""

    def __init__(self, model: nn.Module, n_samples: int, shifts: Optional[tuple[float, ...]] = None) -> None:
        super().__init__()
        self.model, self.n_samples, self.shifts = model, n_samples, shifts

    def forward(self, images: Tensor, knn_images: Tensor) -> dict[str, Tensor]:
        from mars_ray.models.stego import stego_step

        kw = {} if self.shifts is None else {"shifts": self.shifts}
        return stego_step(self.model, images, knn_images, n_samples=self.n_samples, **kw)


class _SslObjective(nn.Module):
    """``forward(images)`` → ``ssl_loss`` of the wrapped backbone (DDP wraps this module)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        from mars_ray.models.small_cnn import ssl_loss

        return ssl_loss(self.backbone, images)


@torch.no_grad()
def _knn_table(backbone: nn.Module, paths: list[str], size: int, k: int, device: torch.device,
               native: bool = False) -> Tensor:
    """Pooled features of every image (this rank's share, gathered) → N x k nearest-image indices.

    Each image is seen as one ``size²`` crop: the whole image resized, or with ``native`` a crop at its own scale."""
    import torch.distributed as dist

    from mars_ray.models.stego import global_features, knn_table

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = np.random.default_rng(0)
    mine = list(range(rank, len(paths), world))
    feats: dict[int, Tensor] = {}
    backbone.eval()
    for start in range(0, len(mine), 16):
        idx = mine[start : start + 16]
        batch = torch.stack([fit_crop(read_image(paths[i]), size, rng, scale=None if native else (1.0, 1.0),
                                      flip=False) for i in idx])
        for i, f in zip(idx, global_features(backbone, batch.to(device)).cpu()):
            feats[i] = f
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, feats)
        feats = {i: f for part in parts for i, f in part.items()}
    return knn_table(torch.stack([feats[i] for i in range(len(paths))]), k=k)


# ------------------------------------------------------------------------------------------ Ray Train


@dataclass(frozen=True)
class UssLoop:
    """What a Ray Train worker of the ``uss`` stage needs (plain and picklable; :func:`loop_settings`)."""

    paths: tuple[str, ...]  # absolute paths or URIs of the split's images
    backbone: str
    backbone_weights: str  # absolute path or URI of given weights; "" = self-supervised small_cnn
    ssl_epochs: int
    epochs: int
    dim: int
    batch_size: int
    lr: float
    ssl_lr: float
    crop_size: int  # the crop side the workers use (loop_settings: native crops never exceed the median short side)
    knn: int
    n_samples: int
    seed: int
    stats: str = ""  # adaptive backbone: absolute path or URI of its fitted statistics
    native: bool = True  # uss.crop_scale == "native": the STEGO phase crops the images at their own scale
    min_steps: int = 0  # uss.min_steps: the STEGO phase runs more epochs than ``epochs`` until this many steps


@dataclass(frozen=True)
class _Worker:
    rank: int
    world: int
    device: torch.device


_DONE = {"ssl": "ssl_epochs_done", "stego": "epochs_done"}  # state key counting each phase's epochs


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: unpack the loop settings and run :func:`train_loop`."""
    train_loop(config["settings"])


def train_loop(s: UssLoop) -> None:
    """SSL (small_cnn without weights) → frozen backbone → k-NN table → STEGO head; one report per epoch.

    Resumes from ``ray.train.get_checkpoint()``: the phase epochs, global step, history, weights,
    optimiser state and k-NN table continue where the last report left them.
    """
    import ray.train
    import ray.train.torch

    from mars_ray.models.stego import SegHead, StegoModel

    ctx = ray.train.get_context()
    w = _Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    torch.manual_seed(worker_seed(s.seed, w.rank, stream="init"))
    net = load_backbone(s.backbone, s.backbone_weights, s.stats)
    head = SegHead(int(net.dim), s.dim)
    restored = restored_state()
    state = _initial_state() if restored is None else _resume(restored, net, head)
    trains_backbone = not s.backbone_weights and s.backbone != ADAPTIVE and state["ssl_epochs_done"] < s.ssl_epochs
    if trains_backbone:  # 1. self-supervised backbone (only without given weights)
        state = _ssl_phase(s, w, net, head, state, restored)
    model = StegoModel(net, head).to(w.device)  # 2. frozen backbone → k-NN table (once) → STEGO head
    if state["knn"] is None:
        state = {**state, "knn": _knn_table(model.backbone, list(s.paths), s.crop_size, s.knn, w.device, s.native)}
    _stego_phase(s, w, model, state, restored, must_report=not trains_backbone)


def _initial_state() -> dict[str, Any]:
    return {"ssl_epochs_done": 0, "epochs_done": 0, "step": 0, "history": [], "knn": None, "resumed_at_step": None}


def _resume(state: dict[str, Any], net: nn.Module, head: nn.Module) -> dict[str, Any]:
    """Load a restored checkpoint's weights into ``net`` and ``head``; the state to continue from."""
    if state["backbone"] is not None:
        net.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    logger.info("uss: resuming after %d SSL + %d STEGO epochs (step %d)",
                state["ssl_epochs_done"], state["epochs_done"], state["step"])
    return {**state, "resumed_at_step": state["step"]}


def _optimizer(params: Any, lr: float, restored: dict[str, Any] | None, phase: str) -> torch.optim.Optimizer:
    """Adam over ``params``, with the restored optimiser state when the checkpoint was taken in ``phase``."""
    opt = torch.optim.Adam(params, lr=lr)
    if restored is not None and restored.get("opt_phase") == phase:
        opt.load_state_dict(restored["opt"])
    return opt


def _report(s: UssLoop, w: _Worker, state: dict[str, Any], phase: str, epoch: int, stats: dict[str, float],
            net: nn.Module, head: nn.Module, opt: torch.optim.Optimizer, epochs: int) -> dict[str, Any]:
    """Report epoch ``epoch`` of the ``epochs`` of ``phase`` (rank 0 with the new state as checkpoint);
    returns the new state.

    The backbone goes into the state only when trained here (given weights are reloaded from their file).
    """
    step = state["step"] + int(stats["steps"])
    entry = {"phase": phase, "epoch": epoch, "step": step, **stats}
    state = {**state, _DONE[phase]: epoch, "step": step, "history": [*state["history"], entry],
             "backbone": None if s.backbone_weights else net.state_dict(), "head": head.state_dict(),
             "opt_phase": phase, "opt": opt.state_dict()}
    report_epoch(entry, state if w.rank == 0 else None, epochs=epochs)
    return state


def _ssl_phase(s: UssLoop, w: _Worker, net: nn.Module, head: nn.Module, state: dict[str, Any],
               restored: dict[str, Any] | None) -> dict[str, Any]:
    """Dense two-view InfoNCE on the backbone itself, up to ``s.ssl_epochs``; returns the state."""
    import ray.train.torch

    objective = ray.train.torch.prepare_model(_SslObjective(net))
    opt = _optimizer(net.parameters(), s.ssl_lr, restored, "ssl")
    crops = _Crops(s.paths, s.crop_size, worker_seed(s.seed, w.rank, stream="crops"))
    loader = sharded_loader(crops, s.batch_size, rank=w.rank, world=w.world, seed=s.seed)
    for epoch in range(state["ssl_epochs_done"], s.ssl_epochs):
        loader.sampler.set_epoch(epoch)
        batches = ({"image": b["image"].to(w.device)} for b in loader)
        stats = train_one_epoch(lambda b: objective(b["image"]), batches, opt, log_every=0)
        state = _report(s, w, state, "ssl", epoch + 1, stats, net, head, opt, s.ssl_epochs)
        logger.info("uss ssl epoch %d/%d: dense_nce %.4f", epoch + 1, s.ssl_epochs, stats["loss"])
    return state


def _stego_phase(s: UssLoop, w: _Worker, model: nn.Module, state: dict[str, Any], restored: dict[str, Any] | None,
                 *, must_report: bool) -> None:
    """The STEGO head on the frozen backbone, up to ``stego_epochs`` epochs. ``must_report``: report the state
    even when no epoch is left (a run resumed after its last epoch hands its state back)."""
    import ray.train.torch

    objective = ray.train.torch.prepare_model(_StegoObjective(model, s.n_samples, _shifts(s.backbone)))
    opt = _optimizer(model.head.parameters(), s.lr, restored, "stego")
    crops = _Crops(s.paths, s.crop_size, worker_seed(s.seed, w.rank, stream="knn_crops"), knn=state["knn"],
                   native=s.native)
    loader = sharded_loader(crops, s.batch_size, rank=w.rank, world=w.world, seed=s.seed)
    epochs = stego_epochs(s, len(loader))
    for epoch in range(state["epochs_done"], epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        batches = ({k: v.to(w.device) for k, v in b.items()} for b in loader)
        stats = train_one_epoch(lambda b: objective(b["image"], b["knn"]), batches, opt, log_every=0)
        state = _report(s, w, state, "stego", epoch + 1, stats, model.backbone, model.head, opt, epochs)
        must_report = False
        logger.info("uss stego epoch %d/%d: loss %.4f", epoch + 1, epochs, stats["loss"])
    if must_report:
        _report(s, w, state, "stego", state["epochs_done"], {"steps": 0.0}, model.backbone, model.head, opt, epochs)


def stego_epochs(s: UssLoop, steps_per_epoch: int) -> int:
    """Epochs of the STEGO phase: ``s.epochs``, or more when that many epochs of ``steps_per_epoch`` steps
    (each worker's, DDP steps in lockstep) fall short of ``s.min_steps``."""
    return max(s.epochs, math.ceil(s.min_steps / max(1, steps_per_epoch)))


def _shifts(backbone: str) -> Optional[tuple[float, ...]]:
    """The correspondence-loss shifts: STEGO's own (tuned to DINO ViT correlations) for every backbone but
    ``adaptive``, whose head is distilled at the debias threshold (``stego_distill.DEFAULT_SHIFT``: the
    measurement is in that module's docstring)."""
    if backbone != ADAPTIVE:
        return None
    from mars_ray.models.stego_distill import DEFAULT_SHIFT

    return (DEFAULT_SHIFT,) * 3


def crop_side(cfg: C.Config, dataset: VOCDataset) -> int:
    """The crop side of the workers: ``uss.crop_size``, and with ``uss.crop_scale=native`` at most the median
    short side of (up to 256 sampled) images of the split (header reads), so that crops of small images are
    not up-scaled: a frozen backbone's features change with the input scale (``benchmarks/variation_bench.py``
    measured it for ``adaptive``) and the features stage runs it at the images' own scale."""
    from mars_ray.models.adaptive import fit_sample
    from mars_ray.stages.features import median_short_side

    u = cfg.uss
    if u.crop_scale != "native":
        return u.crop_size
    return max(1, min(u.crop_size, median_short_side(dataset, fit_sample(dataset.ids(cfg.data.split), seed=u.seed))))


def loop_settings(cfg: C.Config, dataset: VOCDataset, stats: str = "") -> UssLoop:
    """The :class:`UssLoop` of this config: paths made absolute for the workers (``stats``: the adaptive
    backbone's statistics file, absolute)."""
    u = cfg.uss
    return UssLoop(stats=stats,
        paths=tuple(_storage.absolute(dataset.image_path(i)) for i in dataset.ids(cfg.data.split)),
        backbone=u.backbone, backbone_weights=_storage.absolute(u.backbone_weights) if u.backbone_weights else "",
        ssl_epochs=u.ssl_epochs, epochs=u.epochs, dim=u.dim, batch_size=u.batch_size, lr=u.lr, ssl_lr=u.ssl_lr,
        crop_size=crop_side(cfg, dataset), knn=u.knn, n_samples=u.n_samples, seed=u.seed,
        native=u.crop_scale == "native", min_steps=u.min_steps,
    )


def fit(cfg: C.Config, dataset: VOCDataset, storage: AnyPath, name: str = RAY_NAME, stats: str = "") -> dict[str, Any]:
    """Train on Ray Train (resuming ``storage/name`` when it holds a checkpoint) → the final state dict."""
    u = cfg.uss
    result = fit_torch(
        _train_worker, {"settings": loop_settings(cfg, dataset, stats)}, name=name, storage=storage,
        num_workers=u.num_workers, use_gpu=u.use_gpu, cpus_per_worker=u.cpus_per_worker, max_failures=u.max_failures,
    )
    return final_state(result, storage / name)


def build_model(cfg: C.UssConfig, state: dict[str, Any], stats: str = "") -> nn.Module:
    """The trained :class:`StegoModel` from a training state (CPU, eval mode)."""
    from mars_ray.models.stego import SegHead, StegoModel

    backbone = load_backbone(cfg.backbone, cfg.backbone_weights, stats)
    if state["backbone"] is not None and cfg.backbone != ADAPTIVE:
        backbone.load_state_dict(state["backbone"])
    head = SegHead(int(backbone.dim), cfg.dim)
    head.load_state_dict(state["head"])
    return StegoModel(backbone, head).eval()


# ------------------------------------------------------------------------------------------ stage


def validate_inputs(cfg: C.Config) -> VOCDataset:
    """Config, dataset, images and backbone weights, checked before any output is touched."""
    C.validate(cfg)  # ranges, backbone name and the weights rule
    dataset = inputs.open_dataset(cfg)
    ids = dataset.ids(cfg.data.split)
    if len(ids) < 2:
        raise ValueError(f"uss needs at least 2 images in split {cfg.data.split!r} (k-NN and random pairs), got {len(ids)}")
    for i in ids:
        dataset.image_path(i)
    weights = inputs.config_path(cfg.uss.backbone_weights)
    if weights is not None and not weights.is_file():
        raise FileNotFoundError(f"{weights}: uss.backbone_weights does not exist")
    if cfg.uss.backbone != ADAPTIVE:  # (adaptive: fitted by the stage, nothing to load yet)
        load_backbone(cfg.uss.backbone, cfg.uss.backbone_weights)  # unknown name / wrong keys or shapes → ValueError
    return dataset


def stage_dir(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset | None = None) -> StageDir:
    """``RUN/uss`` and its key: uss config slice + dataset fingerprint + backbone weights fingerprint."""
    dataset = dataset or inputs.open_dataset(cfg)
    slice_ = {
        "data": inputs.dataset_key(cfg, [cfg.data.split]),
        "uss": {k: v for k, v in C.to_dict(cfg.uss).items() if k not in _EXECUTION_KEYS},
    }
    if cfg.uss.backbone == ADAPTIVE:  # the backbone's fit reads features.codebook_copies
        slice_.update(inputs.codebook_copies_key(cfg))
    fingerprints = {
        "dataset": dataset.fingerprint(cfg.data.split),
        "backbone_weights": fingerprint_path(inputs.config_path(cfg.uss.backbone_weights)),
    }
    return StageDir(run_dir / inputs.USS_DIR, "uss", C.slice_hash(slice_, fingerprints), slice_, fingerprints)


def _fit_stats(cfg: C.Config, dataset: VOCDataset, path: AnyPath) -> Any:
    """The adaptive backbone's statistics, fitted on the split as the ``features`` stage fits them (a
    one-thread Ray task, seed ``uss.seed``, ``features.codebook_copies``), reused from ``path`` when a
    resumed run already wrote them."""
    from mars_ray.models.adaptive import AdaptiveStats
    from mars_ray.stages.features import fit_split_stats_remote

    if path.is_file():
        try:
            return AdaptiveStats.load(path)
        except ValueError:
            pass  # a damaged file of an interrupted run: fit again
    stats = fit_split_stats_remote(dataset, dataset.ids(cfg.data.split), cfg.uss.seed, cfg.features.codebook_copies)
    stats.save(path)
    return stats


def checkpoint_path(run_dir: AnyPath) -> AnyPath:
    """``RUN/uss/checkpoint.pt`` (``stages.inputs.uss_checkpoint``: where the ``stego`` extractor looks)."""
    return inputs.uss_checkpoint(run_dir)


def run(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Train the USS model; returns ``RUN/uss`` (skipped when already complete)."""
    from mars_ray.models.stego import save_stego_checkpoint

    dataset = validate_inputs(cfg)
    sd = stage_dir(cfg, run_dir, dataset)
    if sd.is_complete():
        logger.info("uss: up to date in %s, skipping", sd.path)
        return sd.root
    with sd.guard() as resuming:
        if resuming:
            logger.info("uss: resuming the interrupted run in %s", sd.path)
        ensure_ray(cfg.ray)
        stats_path = ""
        extra: dict[str, Any] = {}
        if cfg.uss.backbone == ADAPTIVE:  # no pretrained weights: distil the head from the adaptive features
            stats = _fit_stats(cfg, dataset, sd.path / inputs.USS_STATS)
            stats_path = _storage.absolute(sd.path / inputs.USS_STATS)
            extra = {"uss_stats": inputs.USS_STATS, "uss_stats_digest": stats.digest}
        state = fit(cfg, dataset, sd.path / "ray", stats=stats_path)
        model = build_model(cfg.uss, state, stats_path)
        if cfg.uss.backbone == ADAPTIVE:
            from mars_ray.models.adaptive import backbone_kwargs

            save_stego_checkpoint(model, sd.path / CHECKPOINT, ADAPTIVE, backbone_kwargs=backbone_kwargs(stats))
        else:
            save_stego_checkpoint(model, sd.path / CHECKPOINT, cfg.uss.backbone,
                                  backbone_weights=cfg.uss.backbone_weights or None)
        atomic_write_json(sd.path / "history.json", state["history"])
        _storage.rmtree(sd.path / "ray")  # per-epoch checkpoints: only needed to resume
        faults.point("uss.checkpoint")
        last = state["history"][-1] if state["history"] else {}
        sd.finish({"checkpoint": CHECKPOINT, "history": "history.json", "dim": cfg.uss.dim,
                   "backbone": cfg.uss.backbone, "steps": state["step"], "final_loss": last.get("loss"), **extra})
    logger.info("uss: %s + %d-dim head after %d steps → %s", cfg.uss.backbone, cfg.uss.dim, state["step"],
                sd.path / CHECKPOINT)
    return sd.root
