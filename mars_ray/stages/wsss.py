"""Stage ``wsss`` (situation c): the built-in CAM baseline → biased pseudo labels Y^b.

1. A multi-label classifier (``wsss.classifier`` in CLASSIFIERS) learns the image-level labels
   (``VOCDataset.image_labels``; a background-only image has an empty list = all-zero target) of
   ``data.split`` with the multi-label soft-margin loss, on Ray Train (``TorchTrainer`` over
   ``wsss.num_workers``, DDP via ``prepare_model``, GPU with ``wsss.use_gpu``). SGD with momentum
   and a poly schedule; each worker reads its shard of the images from the dataset root. Rank 0
   reports a checkpoint (weights, optimiser, schedule, epoch, global step, history) every epoch
   under ``RUN/wsss/ray`` (run name ``wsss``), so an interrupted stage resumes from its last epoch.
2. CAMs of every image's labelled classes (multi-scale + flip, ``models.cam.compute_cams``), a
   constant background score ``wsss.bg_threshold`` (optionally a dense CRF), argmax → PNGs, by a Ray
   Data ``map_batches`` actor pool that loads the classifier once per actor and writes
   ``RUN/wsss/{id}.png`` itself (temp + rename; a resumed run skips the ids already written).

Pseudo labels are written for ``data.split`` and — with ``wsss.cam_eval_split`` and when its split
file and image-level labels exist — for ``data.eval_split`` too (inference only, cheap). Values:
0 background, 1..C the image's labelled classes (never a class the image is not labelled with).

Outputs (``RUN/wsss/``): ``{id}.png``, ``classifier.pt`` (name, number of classes, weights),
``history.json`` (per epoch: step, loss, lr, images/s), ``stats.json``, ``manifest.json``. The key
covers the ``wsss`` config (execution knobs excluded) and the dataset's fingerprint. ``RUN`` and
``data.root`` may be object-store URIs (``mars_ray.storage``): workers and actors read and write them
directly, Ray Train keeps its checkpoints under ``RUN/wsss/ray`` there.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mars_ray import config as C
from mars_ray import faults, storage
from mars_ray.artifacts import StageDir, atomic_write_json
from mars_ray.checkpoints import load_torch_file, save_torch_file
from mars_ray.data.label_io import read_image, write_label
from mars_ray.data.voc import VOCDataset
from mars_ray.engine import build_sgd, fit_crop, poly_lr_lambda, sharded_loader, train_one_epoch
from mars_ray.stages import inputs
from mars_ray.stages.runtime import (ensure_ray, final_state, fit_torch, map_images, report_epoch, restored_state,
                                     worker_seed)
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

CLASSIFIER = "classifier.pt"
RAY_NAME = "wsss"
_EXECUTION_KEYS = {"num_workers", "use_gpu", "cpus_per_worker", "max_failures", "num_actors", "cpus_per_actor",
                   "cam_batch_size"}


# ------------------------------------------------------------------------------------------ training


class _Labelled(torch.utils.data.Dataset):
    """Item i → ``{"image": 3 x S x S in [0, 1], "target": C multi-hot}`` (random fit-crop + flip)."""

    def __init__(self, paths: list[str], targets: np.ndarray, size: int, seed: int) -> None:
        self.paths, self.targets, self.size = paths, torch.as_tensor(targets, dtype=torch.float32), size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image = fit_crop(read_image(self.paths[i]), self.size, self.rng, scale=(1.0, 1.3))
        return {"image": image, "target": self.targets[i]}


def multi_hot(labels: list[list[int]], num_classes: int) -> np.ndarray:
    """Image-level labels (1-based class ids; ``[]`` = background only) → N x C float32 multi-hot."""
    out = np.zeros((len(labels), num_classes), np.float32)
    for row, classes in enumerate(labels):
        out[row, [c - 1 for c in classes]] = 1.0
    return out


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: unpack the loop config and run :func:`train_loop`."""
    train_loop(**config)


def train_loop(
    *,
    paths: list[str],
    targets: np.ndarray,
    classifier: str,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    crop_size: int,
    seed: int,
) -> None:
    """Multi-label CAM classifier training; one report (with a checkpoint from rank 0) per epoch."""
    import ray.train
    import ray.train.torch

    from mars_ray.models import load_all
    from mars_ray.models.cam import cam_loss
    from mars_ray.models.registry import CLASSIFIERS

    load_all()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(worker_seed(seed, rank, stream="init"))
    net: nn.Module = CLASSIFIERS.get(classifier, num_classes=int(targets.shape[1]))
    data = _Labelled(paths, targets, crop_size, worker_seed(seed, rank, stream="crops"))
    loader = sharded_loader(data, batch_size, rank=rank, world=world, seed=seed)
    opt = build_sgd(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lr_lambda(max(1, epochs * len(loader))))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    restored = restored_state()
    if restored is not None:
        state = restored
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        logger.info("wsss: resuming after epoch %d (step %d)", state["epoch"], state["step"])
    model = ray.train.torch.prepare_model(net)
    start = state["epoch"]
    for epoch in range(start, epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
        stats = train_one_epoch(lambda b: cam_loss(model, b["image"], b["target"]), batches, opt,
                                scheduler=sched, log_every=0)
        state["step"] += int(stats["steps"])
        entry = {"epoch": epoch + 1, "step": state["step"], "lr": opt.param_groups[0]["lr"], **stats}
        state["history"].append(entry)
        state.update(epoch=epoch + 1, model=net.state_dict(), opt=opt.state_dict(), sched=sched.state_dict())
        logger.info("wsss epoch %d/%d: cls loss %.4f", epoch + 1, epochs, stats["loss"])
        report_epoch(entry, state if rank == 0 else None, epochs=epochs)
    if start >= epochs:  # resumed after the last epoch: hand the state back
        state.update(model=net.state_dict(), opt=opt.state_dict(), sched=sched.state_dict())
        report_epoch({"epoch": state["epoch"], "step": state["step"]}, state if rank == 0 else None)


def save_classifier(path: AnyPath, name: str, num_classes: int, state_dict: dict[str, Tensor]) -> AnyPath:
    """A self-describing classifier file (CLASSIFIERS name, C, weights), written atomically (local or URI)."""
    return save_torch_file({"classifier": name, "num_classes": num_classes, "state": state_dict}, path)


def load_classifier(path: "str | AnyPath", device: str = "cpu") -> nn.Module:
    """The classifier from :func:`save_classifier`'s file (eval mode); ``ValueError`` naming the file."""
    from mars_ray.models import load_all
    from mars_ray.models.registry import CLASSIFIERS

    load_all()
    ckpt = load_torch_file(path, "classifier checkpoint")
    try:
        model = CLASSIFIERS.get(ckpt["classifier"], num_classes=int(ckpt["num_classes"]))
        model.load_state_dict(ckpt["state"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: not a classifier checkpoint of this version ({type(e).__name__}: {e})") from None
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------ CAMs


class CamImages:
    """Ray Data callable: a batch of image ids → CAM pseudo-label PNGs written; returns per-image counts."""

    def __init__(
        self,
        *,
        dataset: dict[str, Any],
        checkpoint: str,
        out_dir: str,
        scales: tuple[float, ...],
        flip: bool,
        bg_threshold: float,
        crf: dict[str, float] | None,
        skip_existing: bool,
        device: str = "cpu",
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.dataset = VOCDataset(**dataset)
        self.device = torch.device(device)
        self.model = load_classifier(checkpoint, device)
        self.out_dir = upath(out_dir)
        self.kw = {"scales": tuple(scales), "flip": flip}
        self.bg_threshold, self.crf = bg_threshold, crf
        # a resumed run skips the labels already written: one listing, not a request per image
        self.existing = set(storage.list_files(self.out_dir)) if skip_existing else set()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        fg = [self._one(i) for i in ids]
        return {"image_id": np.array(ids), "n_fg": np.array(fg, np.int64)}

    def _one(self, image_id: str) -> int:
        from mars_ray.models.cam import cams_to_label, compute_cams

        out = self.out_dir / f"{image_id}.png"
        if out.name in self.existing:
            return -1
        classes = self.dataset.image_labels(image_id)
        image = read_image(self.dataset.image_path(image_id))
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0).to(self.device)
        cams = compute_cams(self.model, x, classes, **self.kw)
        label = cams_to_label(cams, classes, bg_threshold=self.bg_threshold, image=image, crf=self.crf)
        write_label(out, label)
        return int((label > 0).sum())


# ------------------------------------------------------------------------------------------ stage


def cam_splits(cfg: C.Config, dataset: VOCDataset) -> list[str]:
    """The splits that get pseudo labels: ``data.split``, plus ``data.eval_split`` when asked and usable."""
    splits = [cfg.data.split]
    ev = cfg.data.eval_split
    if cfg.wsss.cam_eval_split and ev and ev != cfg.data.split and dataset.split_path(ev).is_file():
        try:
            for i in dataset.ids(ev):
                dataset.image_labels(i)
                dataset.image_path(i)
            splits.append(ev)
        except (ValueError, FileNotFoundError) as e:
            logger.warning("wsss: no pseudo labels for eval split %r (%s)", ev, e)
    return splits


def validate_inputs(cfg: C.Config) -> tuple[VOCDataset, list[str]]:
    """Config, classifier name, images and image-level labels of the split (``ValueError`` naming the id)."""
    C.validate(cfg)  # ranges and names, wsss.classifier included
    dataset = inputs.open_dataset(cfg)
    ids = dataset.ids(cfg.data.split)
    dataset.check_image_labels(cfg.data.split)  # one line: which file/format, how many ids matched
    labels = [dataset.image_labels(i) for i in ids]  # raises naming the id without labels
    for i in ids:
        dataset.image_path(i)
    if not any(labels):
        raise ValueError(f"{dataset.root}: no image of split {cfg.data.split!r} has a foreground label; a CAM classifier cannot learn")
    return dataset, cam_splits(cfg, dataset)


def stage_dir(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset | None = None,
              splits: list[str] | None = None) -> StageDir:
    """``RUN/wsss`` and its key: wsss config slice + the dataset's fingerprint of every split written."""
    if dataset is None or splits is None:
        dataset, splits = validate_inputs(cfg)
    slice_ = {
        "data": inputs.dataset_key(cfg, splits),
        "wsss": {k: v for k, v in C.to_dict(cfg.wsss).items() if k not in _EXECUTION_KEYS},
        "crf": _crf_kwargs(cfg),  # the debias.crf_* kernels, when wsss.crf uses them
    }
    fingerprints = {f"dataset:{s}": dataset.fingerprint(s) for s in splits}
    return StageDir(run_dir / "wsss", "wsss", C.slice_hash(slice_, fingerprints), slice_, fingerprints)


def _crf_kwargs(cfg: C.Config) -> dict[str, float] | None:
    """The dense-CRF settings of ``debias`` reused for the CAM labels when ``wsss.crf`` is on."""
    if not cfg.wsss.crf:
        return None
    return cfg.debias.crf_kernels()


def run(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Train the classifier and write the CAM pseudo labels; returns ``RUN/wsss`` (skipped when complete)."""
    dataset, splits = validate_inputs(cfg)
    sd = stage_dir(cfg, run_dir, dataset, splits)
    if sd.is_complete():
        logger.info("wsss: up to date in %s, skipping", sd.path)
        return sd.root
    w = cfg.wsss
    with sd.guard() as resuming:
        ensure_ray(cfg.ray)
        ckpt = sd.path / CLASSIFIER
        if not (resuming and ckpt.is_file()):
            ids = dataset.ids(cfg.data.split)
            loop = {
                "paths": [storage.absolute(dataset.image_path(i)) for i in ids],
                "targets": multi_hot([dataset.image_labels(i) for i in ids], dataset.num_classes),
                "classifier": w.classifier, "epochs": w.epochs, "batch_size": w.batch_size, "lr": w.lr,
                "weight_decay": w.weight_decay, "crop_size": w.crop_size, "seed": w.seed,
            }
            result = fit_torch(_train_worker, loop, name=RAY_NAME, storage=sd.path / "ray",
                               num_workers=w.num_workers, use_gpu=w.use_gpu, cpus_per_worker=w.cpus_per_worker,
                               max_failures=w.max_failures)
            state = final_state(result, sd.path / "ray")
            save_classifier(ckpt, w.classifier, dataset.num_classes, state["model"])
            atomic_write_json(sd.path / "history.json", state["history"])
            storage.rmtree(sd.path / "ray")  # per-epoch checkpoints: only needed to resume
            faults.point("wsss.classifier")
        ids = [i for s in splits for i in dataset.ids(s)]
        ds = map_images(
            ids,
            CamImages,
            dict(
                dataset=dataset.spec(), checkpoint=storage.absolute(ckpt),
                out_dir=storage.absolute(sd.path), scales=tuple(w.cam_scales),
                flip=w.cam_flip, bg_threshold=w.bg_threshold, crf=_crf_kwargs(cfg), skip_existing=resuming,
                device="cuda" if w.use_gpu else "cpu", threads=max(1, int(w.cpus_per_actor)),
            ),
            num_actors=w.num_actors,
            cpus_per_actor=w.cpus_per_actor,
            gpus_per_actor=1 if w.use_gpu else 0,
            batch_size=w.cam_batch_size,
        )
        n_images = 0
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            n_images += len(batch["image_id"])
        stats = {"images": n_images, "splits": {s: len(dataset.ids(s)) for s in splits}, "resumed": resuming}
        atomic_write_json(sd.path / "stats.json", stats)
        sd.finish({"classifier": CLASSIFIER, "history": "history.json", **stats})
    logger.info("wsss: CAM pseudo labels for %d images (%s) → %s", n_images, ", ".join(splits), sd.path)
    return sd.root
