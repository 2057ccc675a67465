"""Stage ``uss`` (situation b): a STEGO-style USS model trained on the dataset, with no labels at all.

A frozen backbone (``uss.backbone`` in BACKBONES) gives features; a 70-dim :class:`SegHead` learns to
reproduce their correspondences (STEGO: pairs of an image with itself, with one of its k nearest
images, and with a random image of the batch). The backbone is either

* a ViT with the official DINO weights from a file or URI (``uss.backbone=vit_base_8
  uss.backbone_weights=/path/dino_vitbase8_pretrain.pth``; keys/shapes are checked before anything
  is written or trained), or
* ``small_cnn`` (the default), first trained self-supervised on the split itself for
  ``uss.ssl_epochs`` epochs (dense two-view InfoNCE, ``models.small_cnn.ssl_loss``), then frozen.

k-NN pairs: after the backbone is final (and frozen) its mean-pooled features of every image of the
split are computed once (sharded over the workers, gathered), and each image's ``uss.knn`` nearest
images by cosine similarity form the table a training crop draws its partner from (as STEGO does).
That is O(N·D) memory for N images; the table is part of the checkpoint, so a resumed run reuses it.

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
import os
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from mars_ray import config as C
from mars_ray import storage as _storage
from mars_ray.artifacts import StageDir, atomic_write_json, fingerprint_path
from mars_ray.data.label_io import read_image
from mars_ray.data.voc import VOCDataset
from mars_ray.engine import train_one_epoch
from mars_ray.stages.runtime import STATE_FILE, ensure_ray, fit_torch, report_epoch, restored_state
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
STATE = STATE_FILE
RAY_NAME = "uss"
# how the training is executed, not what it computes: left out of the stage key
_EXECUTION_KEYS = {"num_workers", "use_gpu", "cpus_per_worker", "max_failures"}


# ------------------------------------------------------------------------------------------ data


def fit_crop(image: np.ndarray, size: int, rng: np.random.Generator, scale: tuple[float, float] = (1.0, 1.5),
             flip: bool = True) -> Tensor:
    """uint8 ``[H, W, 3]`` → float ``[3, size, size]`` in [0, 1]: short side resized to ``size·s``
    (s uniform in ``scale``), a random ``size²`` crop, a random horizontal flip.

    Whole-image context survives (unlike a fixed-scale crop of a large image).
    """
    h, w = image.shape[:2]
    s = size / min(h, w) * float(rng.uniform(*scale))
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    y = int(rng.integers(0, nh - size + 1))
    x = int(rng.integers(0, nw - size + 1))
    out = image[y : y + size, x : x + size]
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).float().div_(255.0)


class _Crops(torch.utils.data.Dataset):
    """Item i → ``{"image": 3 x S x S}`` (and with a k-NN table ``"knn"``: a crop of one of its neighbours)."""

    def __init__(self, paths: list[str], size: int, seed: int, knn: Optional[Tensor] = None) -> None:
        self.paths, self.size, self.knn = paths, size, knn
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        out = {"image": fit_crop(read_image(self.paths[i]), self.size, self.rng)}
        if self.knn is not None:
            j = int(self.knn[i, int(self.rng.integers(0, self.knn.shape[1]))])
            out["knn"] = fit_crop(read_image(self.paths[j]), self.size, self.rng)
        return out


def _loader(dataset: torch.utils.data.Dataset, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """This worker's shard (``DistributedSampler`` with the Ray Train rank), shuffled per epoch."""
    import ray.train

    ctx = ray.train.get_context()
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=ctx.get_world_size(), rank=ctx.get_world_rank(), shuffle=True, seed=seed,
        drop_last=len(dataset) >= 2 * ctx.get_world_size(),
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False)


# ------------------------------------------------------------------------------------------ models


def load_backbone(name: str, weights: str = "") -> nn.Module:
    """``BACKBONES[name]``; with ``weights`` the file (local or URI) is loaded strictly (DINO format or a plain
    state dict). Raises ``ValueError`` naming missing/unexpected keys or shape mismatches."""
    from mars_ray.models import load_all
    from mars_ray.models.registry import BACKBONES
    from mars_ray.models.vit import load_dino_checkpoint

    load_all()
    backbone = BACKBONES.get(name)
    if weights:
        load_dino_checkpoint(backbone, weights)
    return backbone


class _StegoObjective(nn.Module):
    """``forward(images, knn_images)`` → STEGO loss terms, so that DDP sees one forward per step."""

    def __init__(self, model: nn.Module, n_samples: int) -> None:
        super().__init__()
        self.model, self.n_samples = model, n_samples

    def forward(self, images: Tensor, knn_images: Tensor) -> dict[str, Tensor]:
        from mars_ray.models.stego import stego_step

        return stego_step(self.model, images, knn_images, n_samples=self.n_samples)


class _SslObjective(nn.Module):
    """``forward(images)`` → ``ssl_loss`` of the wrapped backbone (DDP wraps this module)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        from mars_ray.models.small_cnn import ssl_loss

        return ssl_loss(self.backbone, images)


@torch.no_grad()
def _knn_table(backbone: nn.Module, paths: list[str], size: int, k: int, device: torch.device) -> Tensor:
    """Pooled features of every image (this rank's share, gathered) → N x k nearest-image indices."""
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
        batch = torch.stack([fit_crop(read_image(paths[i]), size, rng, scale=(1.0, 1.0), flip=False) for i in idx])
        for i, f in zip(idx, global_features(backbone, batch.to(device)).cpu()):
            feats[i] = f
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, feats)
        feats = {i: f for part in parts for i, f in part.items()}
    return knn_table(torch.stack([feats[i] for i in range(len(paths))]), k=k)


# ------------------------------------------------------------------------------------------ Ray Train


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: unpack the loop config and run :func:`train_loop`."""
    train_loop(**config)


def train_loop(
    *,
    paths: list[str],
    backbone: str,
    backbone_weights: str,
    ssl_epochs: int,
    epochs: int,
    dim: int,
    batch_size: int,
    lr: float,
    ssl_lr: float,
    crop_size: int,
    knn: int,
    n_samples: int,
    seed: int,
) -> None:
    """SSL (small_cnn without weights) → frozen backbone → k-NN table → STEGO head; one report per epoch.

    Resumes from ``ray.train.get_checkpoint()``: the phase epochs, global step, history, weights,
    optimiser state and k-NN table continue where the last report left them.
    """
    import ray.train
    import ray.train.torch

    from mars_ray.models.stego import SegHead, StegoModel

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(seed + rank)
    net = load_backbone(backbone, backbone_weights)
    head = SegHead(int(net.dim), dim)
    state: dict[str, Any] = {"ssl_epochs_done": 0, "epochs_done": 0, "step": 0, "history": [], "knn": None}
    restored = restored_state()
    if restored is not None:
        state = restored
        if state["backbone"] is not None:
            net.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        logger.info("uss: resuming after %d SSL + %d STEGO epochs (step %d)",
                    state["ssl_epochs_done"], state["epochs_done"], state["step"])
    state["resumed_at_step"] = state["step"] if restored is not None else None
    reported = False

    def report(phase: str, epoch: int, stats: dict[str, float], opt: torch.optim.Optimizer) -> None:
        nonlocal reported
        state["step"] += int(stats["steps"])
        entry = {"phase": phase, "epoch": epoch, "step": state["step"], **stats}
        state["history"].append(entry)
        # the backbone goes into the state only when trained here (given weights are reloaded from their file)
        state.update(backbone=None if backbone_weights else net.state_dict(), head=head.state_dict(),
                     opt_phase=phase, opt=opt.state_dict())
        report_epoch(entry, state if rank == 0 else None)
        reported = True

    # 1. self-supervised backbone (only without given weights)
    if not backbone_weights and state["ssl_epochs_done"] < ssl_epochs:
        objective = ray.train.torch.prepare_model(_SslObjective(net))
        opt = torch.optim.Adam(net.parameters(), lr=ssl_lr)
        if restored is not None and state.get("opt_phase") == "ssl":
            opt.load_state_dict(state["opt"])
        loader = _loader(_Crops(paths, crop_size, seed + 1000 * rank), batch_size, seed)
        for epoch in range(state["ssl_epochs_done"], ssl_epochs):
            loader.sampler.set_epoch(epoch)
            batches = ({"image": b["image"].to(device)} for b in loader)
            stats = train_one_epoch(lambda b: objective(b["image"]), batches, opt, log_every=0)
            state["ssl_epochs_done"] = epoch + 1
            report("ssl", epoch + 1, stats, opt)
            logger.info("uss ssl epoch %d/%d: dense_nce %.4f", epoch + 1, ssl_epochs, stats["loss"])

    # 2. frozen backbone → k-NN table (once) → STEGO head
    model = StegoModel(net, head).to(device)
    if state["knn"] is None:
        state["knn"] = _knn_table(model.backbone, paths, crop_size, knn, device)
    objective = ray.train.torch.prepare_model(_StegoObjective(model, n_samples))
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    if restored is not None and state.get("opt_phase") == "stego":
        opt.load_state_dict(state["opt"])
    loader = _loader(_Crops(paths, crop_size, seed + 2000 * rank, knn=state["knn"]), batch_size, seed)
    for epoch in range(state["epochs_done"], epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
        stats = train_one_epoch(lambda b: objective(b["image"], b["knn"]), batches, opt, log_every=0)
        state["epochs_done"] = epoch + 1
        report("stego", epoch + 1, stats, opt)
        logger.info("uss stego epoch %d/%d: loss %.4f", epoch + 1, epochs, stats["loss"])
    if not reported:  # nothing left to train (resumed after the last epoch): hand the state back
        report("stego", state["epochs_done"], {"steps": 0.0}, opt)


def loop_config(cfg: C.Config, dataset: VOCDataset) -> dict[str, Any]:
    """The keyword arguments of :func:`train_loop` for this config (plain, picklable)."""
    u = cfg.uss
    return {
        "paths": [_storage.absolute(dataset.image_path(i)) for i in dataset.ids(cfg.data.split)],
        "backbone": u.backbone,
        "backbone_weights": _storage.absolute(u.backbone_weights) if u.backbone_weights else "",
        "ssl_epochs": u.ssl_epochs,
        "epochs": u.epochs,
        "dim": u.dim,
        "batch_size": u.batch_size,
        "lr": u.lr,
        "ssl_lr": u.ssl_lr,
        "crop_size": u.crop_size,
        "knn": u.knn,
        "n_samples": u.n_samples,
        "seed": u.seed,
    }


def fit(cfg: C.Config, dataset: VOCDataset, storage: "str | AnyPath", name: str = RAY_NAME) -> dict[str, Any]:
    """Train on Ray Train (resuming ``storage/name`` when it holds a checkpoint) → the final state dict."""
    u = cfg.uss
    result = fit_torch(
        _train_worker, loop_config(cfg, dataset), name=name, storage=storage, num_workers=u.num_workers,
        use_gpu=u.use_gpu, cpus_per_worker=u.cpus_per_worker, max_failures=u.max_failures,
    )
    if result.checkpoint is None:
        raise RuntimeError(f"uss: Ray Train run {upath(storage) / name} reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)


def build_model(cfg: C.UssConfig, state: dict[str, Any]) -> nn.Module:
    """The trained :class:`StegoModel` from a training state (CPU, eval mode)."""
    from mars_ray.models.stego import SegHead, StegoModel

    backbone = load_backbone(cfg.backbone, cfg.backbone_weights)
    if state["backbone"] is not None:
        backbone.load_state_dict(state["backbone"])
    head = SegHead(int(backbone.dim), cfg.dim)
    head.load_state_dict(state["head"])
    return StegoModel(backbone, head).eval()


# ------------------------------------------------------------------------------------------ stage


def check_config(u: C.UssConfig) -> None:
    """Range and combination checks of ``uss.*`` (``ValueError`` naming the key)."""
    for key in ("epochs", "dim", "batch_size", "crop_size", "knn", "n_samples", "num_workers"):
        if getattr(u, key) < 1:
            raise ValueError(f"uss.{key} must be >= 1, got {getattr(u, key)}")
    if u.ssl_epochs < 0:
        raise ValueError(f"uss.ssl_epochs must be >= 0, got {u.ssl_epochs}")
    for key in ("lr", "ssl_lr", "cpus_per_worker"):
        if getattr(u, key) <= 0:
            raise ValueError(f"uss.{key} must be > 0, got {getattr(u, key)}")
    if not u.backbone_weights:
        if u.backbone.startswith("vit"):
            raise ValueError(
                f"uss.backbone={u.backbone} needs uss.backbone_weights: a DINO checkpoint file or URI "
                "(e.g. dino_vitbase8_pretrain.pth); weights are never downloaded"
            )
        if u.ssl_epochs < 1:
            raise ValueError("uss.ssl_epochs must be >= 1 without uss.backbone_weights (a random frozen backbone teaches nothing)")


def validate_inputs(cfg: C.Config) -> VOCDataset:
    """Config, dataset, images and backbone weights, checked before any output is touched."""
    check_config(cfg.uss)
    dataset = VOCDataset(cfg.data.root)
    ids = dataset.ids(cfg.data.split)
    if len(ids) < 2:
        raise ValueError(f"uss needs at least 2 images in split {cfg.data.split!r} (k-NN and random pairs), got {len(ids)}")
    for i in ids:
        dataset.image_path(i)
    if cfg.uss.backbone_weights and not upath(cfg.uss.backbone_weights).is_file():
        raise FileNotFoundError(f"{cfg.uss.backbone_weights}: uss.backbone_weights does not exist")
    load_backbone(cfg.uss.backbone, cfg.uss.backbone_weights)  # unknown name / wrong keys or shapes → ValueError
    return dataset


def stage_dir(cfg: C.Config, run_dir: "str | AnyPath", dataset: VOCDataset | None = None) -> StageDir:
    """``RUN/uss`` and its key: uss config slice + dataset fingerprint + backbone weights fingerprint."""
    dataset = dataset or VOCDataset(cfg.data.root)
    slice_ = {
        "data": {"root": _storage.absolute(cfg.data.root), "split": cfg.data.split},
        "uss": {k: v for k, v in C.to_dict(cfg.uss).items() if k not in _EXECUTION_KEYS},
    }
    inputs = {
        "dataset": dataset.fingerprint(cfg.data.split),
        "backbone_weights": fingerprint_path(cfg.uss.backbone_weights),
    }
    return StageDir(upath(run_dir) / "uss", "uss", C.slice_hash(slice_, inputs), slice_, inputs)


def checkpoint_path(run_dir: "str | AnyPath") -> AnyPath:
    return upath(run_dir) / "uss" / CHECKPOINT


def run(cfg: C.Config, run_dir: "str | AnyPath") -> AnyPath:
    """Train the USS model; returns ``RUN/uss`` (skipped when already complete)."""
    from mars_ray.models.stego import save_stego_checkpoint

    run_dir = upath(run_dir)
    dataset = validate_inputs(cfg)
    sd = stage_dir(cfg, run_dir, dataset)
    if sd.is_complete():
        logger.info("uss: up to date in %s, skipping", sd.path)
        return sd.path
    with sd.guard() as resuming:
        if resuming:
            logger.info("uss: resuming the interrupted run in %s", sd.path)
        ensure_ray(cfg.ray)
        state = fit(cfg, dataset, sd.path / "ray")
        model = build_model(cfg.uss, state)
        save_stego_checkpoint(model, sd.path / CHECKPOINT, cfg.uss.backbone,
                              backbone_weights=cfg.uss.backbone_weights or None)
        atomic_write_json(sd.path / "history.json", state["history"])
        _storage.rmtree(sd.path / "ray")  # per-epoch checkpoints: only needed to resume
        last = state["history"][-1] if state["history"] else {}
        sd.finish({"checkpoint": CHECKPOINT, "history": "history.json", "dim": cfg.uss.dim,
                   "backbone": cfg.uss.backbone, "steps": state["step"], "final_loss": last.get("loss")})
    logger.info("uss: %s + %d-dim head after %d steps → %s", cfg.uss.backbone, cfg.uss.dim, state["step"],
                sd.path / CHECKPOINT)
    return sd.path
