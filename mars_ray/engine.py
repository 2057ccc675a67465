"""Plain torch loops: training epoch, prediction, evaluation, and the MARS complementing step.

Also what feeds them: ``SegAugment`` (segmentation crops), ``fit_crop`` (whole-image crops for the
label-free CAM and USS models) and ``sharded_loader`` (a worker's shard). At ~500 lines this is over
the house's ~450: the loops and their batch makers are one torch-only unit that every Ray Train
worker imports, and splitting the ~80 lines of batch makers off would leave a module of three helpers.

No Ray here: a Ray Train worker (``stages/``) builds the model, optimiser and batches and calls
these functions. A *step function* maps one batch to a dict of named terms; keys starting with
``m_`` are detached metrics (floats or tensors) that are averaged and reported but never summed into
the loss; every other term is a scalar loss tensor, and their sum is back-propagated.

Batches are dicts. Training batches (from :class:`SegAugment` via Ray Data): ``"image"`` float
``[B,3,H,W]`` in [0,1], ``"image_uint8"`` uint8 ``[B,H,W,3]``, ``"label"`` long ``[B,H,W]``
(0 background, 1..C classes, 254 BIASED, 255 ignore), and for MARS ``"class_mask"`` bool
``[B,C+1]`` (background + each image's classes C_{I_i}, ``algo.complement.image_class_mask``).
Evaluation batches: ``"image"`` and ``"label"``, plus ``"id"`` (list of str) for
:func:`predict_labels` (and ``"class_mask"`` when the prediction fills Y^co).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mars_ray.algo.complement import certain_mask, complement_labels, restrict_probs, weighted_cross_entropy
from mars_ray.algo.crf import kernels_for
from mars_ray.algo.metrics import ConfusionMatrix
from mars_ray.labels import BIASED, IGNORE

logger = logging.getLogger(__name__)

__all__ = [
    "SegAugment",
    "baseline_step",
    "fit_crop",
    "sharded_loader",
    "build_sgd",
    "complement_step",
    "evaluate",
    "make_ema_teacher",
    "poly_lr_lambda",
    "predict_labels",
    "predict_probs",
    "train_one_epoch",
]

METRIC_PREFIX = "m_"
StepFn = Callable[[Any], Mapping[str, Any]]


# ------------------------------------------------------------------------------------------- training


def train_one_epoch(
    step_fn: StepFn,
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Optional[Any] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    amp_dtype: Optional[torch.dtype] = None,
    after_step: Optional[Callable[[int], None]] = None,
    max_steps: Optional[int] = None,
    log_every: int = 50,
) -> Dict[str, float]:
    """Run one pass over ``batches``: ``step_fn`` → sum of loss terms → backward → optimiser step.

    ``step_fn(batch)`` returns named terms: scalar loss tensors (summed into the total) and metrics
    whose key starts with ``m_`` (averaged only, reported without the prefix). With a ``scaler``
    (enabled ``torch.amp.GradScaler``) ``step_fn`` runs under ``torch.autocast`` on the scaler's
    device and the backward/step go through the scaler. ``amp_dtype`` (e.g. ``torch.bfloat16``,
    which needs no scaler) runs ``step_fn`` under ``torch.autocast`` with that dtype on the device of
    the optimiser's parameters, with or without a scaler. ``scheduler.step()`` runs after every
    iteration (poly LR is per iteration), then ``after_step(i)`` with the 0-based step index in this
    epoch (the EMA teacher update goes there). At most ``max_steps`` batches are consumed.

    Returns the mean of every term over the steps, ``loss`` (mean total), ``steps`` and
    ``images_per_s`` (leading size of the batch's first tensor / wall time, data loading included).
    Raises ``ValueError`` when a step returns no loss term or a metric name collides, and
    ``FloatingPointError`` when the total loss is not finite.
    """
    sums: Dict[str, float] = defaultdict(float)
    steps, images = 0, 0
    amp = scaler is not None and scaler.is_enabled()
    if amp_dtype is not None:
        device_type = _optimizer_device(optimizer).type
        autocast_args: Optional[Dict[str, Any]] = {"device_type": device_type, "dtype": amp_dtype}
    elif amp:
        autocast_args = {"device_type": getattr(scaler, "_device", "cuda")}
    else:
        autocast_args = None
    t0 = time.perf_counter()
    for batch in batches:
        if max_steps is not None and steps >= max_steps:
            break
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(**autocast_args) if autocast_args else contextlib.nullcontext()
        with autocast:
            terms = step_fn(batch)
        losses, metrics = _split_terms(terms)
        total = torch.stack([v.float() for v in losses.values()]).sum()
        if not bool(torch.isfinite(total)):
            shown = {k: float(v.detach()) for k, v in losses.items()}
            raise FloatingPointError(f"loss is not finite at step {steps}: {shown}")
        if amp:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        sums["loss"] += float(total.detach())
        for k, v in losses.items():
            sums[k] += float(v.detach())
        for k, v in metrics.items():
            sums[k] += float(v.detach()) if isinstance(v, Tensor) else float(v)
        images += _batch_size(batch)
        if after_step is not None:
            after_step(steps)
        steps += 1
        if log_every > 0 and steps % log_every == 0:
            lr = optimizer.param_groups[0]["lr"]
            shown = " ".join(f"{k}={v / steps:.4f}" for k, v in sums.items())
            logger.info("step %d lr=%.3g %s", steps, lr, shown)
    elapsed = max(time.perf_counter() - t0, 1e-9)
    out = {k: v / steps for k, v in sums.items()} if steps else {"loss": math.nan}
    out["steps"] = float(steps)
    out["images_per_s"] = images / elapsed if steps else 0.0
    return out


def _split_terms(terms: Mapping[str, Any]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    losses: Dict[str, Tensor] = {}
    metrics: Dict[str, Any] = {}
    for k, v in terms.items():
        if k.startswith(METRIC_PREFIX):
            metrics[k[len(METRIC_PREFIX) :]] = v
        elif isinstance(v, Tensor) and v.numel() == 1:
            losses[k] = v.reshape(())
        else:
            raise ValueError(f"step term {k!r} must be a scalar tensor (or use the {METRIC_PREFIX!r} prefix for metrics)")
    if not losses:
        raise ValueError(f"step_fn returned no loss term (keys: {sorted(terms)})")
    clash = set(metrics) & (set(losses) | {"loss", "steps", "images_per_s"})
    if clash:
        raise ValueError(f"metric names {sorted(clash)} collide with loss terms or reserved keys")
    return losses, metrics


def _optimizer_device(optimizer: torch.optim.Optimizer) -> torch.device:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")


def _batch_size(batch: Any) -> int:
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, (Tensor, np.ndarray)) and v.ndim > 0:
            return int(v.shape[0])
    return 0


def poly_lr_lambda(max_iters: int, power: float = 0.9) -> Callable[[int], float]:
    """Factor ``(1 - it / max_iters) ** power`` (0 from ``max_iters`` on) for ``LambdaLR``, stepped per iteration."""
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")

    def factor(it: int) -> float:
        return (1.0 - min(it, max_iters) / max_iters) ** power

    return factor


def build_sgd(
    param_groups: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 4e-5,
    *, fused: Optional[bool] = None,
) -> torch.optim.SGD:
    """SGD over ``param_groups`` (e.g. ``model.param_groups(lr)``; groups' own ``lr`` wins over ``lr``).

    ``fused=True`` takes torch's fused kernel (one launch for every parameter; CUDA, and CPU in
    recent torch); ``None`` leaves torch's choice (the ``foreach`` implementation on CUDA).
    """
    return torch.optim.SGD(list(param_groups), lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)


# ------------------------------------------------------------------------------------------- prediction


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def predict_probs(
    model: nn.Module, image: Tensor, *, scales: Sequence[float] = (1.0,), flip: bool = False
) -> Tensor:
    """Softmax ``[B,K,H,W]`` (float32) of ``model`` on ``image [B,3,H,W]``, averaged over scales and flips.

    Each scale resizes the input bilinearly and the logits back to ``H×W``; ``flip`` adds the
    horizontally flipped input (its output flipped back). The model's train/eval mode is left as is.
    """
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive factors, got {scales}")
    h, w = image.shape[-2:]
    parts: List[Tensor] = []
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = model(x.flip(-1) if flipped else x).float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            parts.append(logits.softmax(dim=1))
    return parts[0] if len(parts) == 1 else torch.stack(parts).mean(dim=0)


def _image_uint8(batch: Mapping[str, Any]) -> Tensor:
    """``[B,H,W,3]`` uint8 for the CRF: the batch's ``image_uint8`` or ``image`` ×255."""
    if "image_uint8" in batch:
        return torch.as_tensor(batch["image_uint8"])
    return (torch.as_tensor(batch["image"]).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


CrfMap = Callable[[Callable[[Any], np.ndarray], List[Any]], Iterable[np.ndarray]]


def _dense_crf_job(job: Tuple[np.ndarray, np.ndarray, Dict[str, Any]]) -> np.ndarray:
    """``dense_crf(image, probs, **kwargs)`` of one ``(image, probs, kwargs)``: module-level, so a
    process pool can run it."""
    from mars_ray.algo.crf import dense_crf

    image, probs, kwargs = job
    return dense_crf(image, probs, **kwargs)


def _image_sides(batch: Mapping[str, Any]) -> Optional[list[float]]:
    """Per image, the side (pixels) of the whole image a training crop was cut from (``SegAugment``'s
    ``image_side``), or ``None`` for batches of whole images."""
    if "image_side" not in batch:
        return None
    return [float(v) for v in torch.as_tensor(batch["image_side"]).flatten().tolist()]


def _crf_refine(probs: Tensor, images: Tensor, crf: Dict[str, Any], only: Optional[Tensor] = None,
                crf_map: Optional[CrfMap] = None, sides: Optional[Sequence[float]] = None) -> Tensor:
    """Dense-CRF each image's ``probs [B,K,H,W]`` with ``images [B,H,W,3]`` uint8; ``only[b]`` False skips one.

    ``crf``: ``dense_crf`` kwargs, optionally with ``reference_side`` (``algo.crf.kernels_for``): the
    bilateral width is then scaled to each image's size, ``sides[b]`` (a crop's whole-image side)
    when given, else the image's own H×W. ``crf_map`` (e.g. a ``ProcessPoolExecutor``'s ``map``) runs the per-image CRFs; pydensecrf holds
    the GIL, so only processes run them side by side. Without it they run here, one after another.
    """
    out = probs.clone()
    imgs = images.cpu().numpy()
    todo = [b for b in range(probs.shape[0]) if only is None or bool(only[b])]
    h, w = imgs.shape[1:3]
    jobs = [(imgs[b], probs[b].float().cpu().numpy(),
             kernels_for(crf, (h, w) if sides is None else (sides[b], sides[b]))) for b in todo]
    refined = (crf_map or map)(_dense_crf_job, jobs)
    for b, r in zip(todo, refined):
        out[b] = torch.from_numpy(r).to(out.device, out.dtype)
    return out


def _predict_batch(
    model: nn.Module,
    batch: Mapping[str, Any],
    num_classes: Optional[int],
    scales: Sequence[float],
    flip: bool,
    crf: Optional[Dict[str, Any]],
) -> Tensor:
    image = torch.as_tensor(batch["image"]).to(_model_device(model), torch.float32)
    probs = predict_probs(model, image, scales=scales, flip=flip)
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(f"model outputs {probs.shape[1]} classes but num_classes={num_classes} (incl. background)")
    class_mask = _class_mask(batch)
    if class_mask is not None:
        probs = restrict_probs(probs, class_mask)
    if crf is not None:
        probs = _crf_refine(probs, _image_uint8(batch), crf)
        if class_mask is not None:
            probs = restrict_probs(probs, class_mask)
    return probs


def _class_mask(batch: Mapping[str, Any]) -> Optional[Tensor]:
    """The batch's ``class_mask`` ``[B, C+1]`` as a bool tensor, or ``None`` when it has none."""
    if batch.get("class_mask") is None:
        return None
    return torch.as_tensor(batch["class_mask"]).bool()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    num_classes: int,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: Optional[Dict[str, Any]] = None,
) -> ConfusionMatrix:
    """Confusion matrix of ``model``'s argmax over ``batches`` (``image [B,3,H,W]``, ``label [B,H,W]``, 255 ignored).

    ``num_classes`` counts the background. ``crf`` (kwargs of ``algo.crf.dense_crf``) refines each
    image's averaged probabilities before the argmax. The model runs in eval mode; its mode is restored.
    """
    cm = ConfusionMatrix(num_classes)
    with _eval_mode(model):
        for batch in batches:
            probs = _predict_batch(model, batch, num_classes, scales, flip, crf)
            cm.update(probs.argmax(dim=1).cpu(), torch.as_tensor(batch["label"]).cpu())
    return cm


def predict_labels(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: Optional[Dict[str, Any]] = None,
) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield ``(id, pred uint8 [H,W])`` per image of ``batches`` (``"id"`` list of str, ``"image" [B,3,H,W]``)."""
    with _eval_mode(model):
        for batch in batches:
            ids = list(batch["id"])
            preds = _predict_batch(model, batch, None, scales, flip, crf).argmax(dim=1).to(torch.uint8).cpu().numpy()
            if len(ids) != preds.shape[0]:
                raise ValueError(f"batch has {len(ids)} ids for {preds.shape[0]} images")
            yield from zip(ids, preds)


# ------------------------------------------------------------------------------------------- MARS steps


def _move(batch: Mapping[str, Any], key: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    if key not in batch:
        raise ValueError(f"batch has no {key!r} (keys: {sorted(batch)})")
    return torch.as_tensor(batch[key]).to(device=device, dtype=dtype, non_blocking=True)


def make_ema_teacher(student: nn.Module) -> nn.Module:
    """Deep copy of ``student`` (a DDP wrapper is unwrapped) in eval mode with gradients off."""
    teacher = copy.deepcopy(getattr(student, "module", student))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def complement_step(
    student: nn.Module,
    teacher: nn.Module,
    batch: Mapping[str, Any],
    *,
    num_classes: int,
    crf: Optional[Dict[str, Any]],
    use_wce: bool = True,
    crf_map: Optional[CrfMap] = None,
) -> Dict[str, Any]:
    """MARS complementing (Sec. 3.4): teacher fills BIASED pixels, loss is Eq. 7's weighted CE.

    ``batch``: ``image [B,3,H,W]`` in [0,1], ``label [B,H,W]`` Y^db (254 biased, 255 ignore),
    ``image_uint8 [B,H,W,3]`` (for the CRF; derived from ``image`` if absent), ``class_mask
    [B,C+1]`` bool (background + the image's classes C_{I_i}; absent = every class allowed, the
    image's classes unknown). The teacher (kept in eval mode, no grad) predicts softmax probs.

    * Fill (Y^co): the probabilities restricted to background + C_{I_i} (``restrict_probs``), with
      ``crf`` (``dense_crf`` kwargs) CRF-refined per image with BIASED pixels and restricted again;
      their argmax fills the BIASED pixels, so it never picks a class the image lacks.
    * W (Eq. 6, ``certain_mask``): max over c ∈ C_{I_i} of the raw softmax *before* the CRF (CRF
      marginals are near-binary). Background is allowed in the fill but is not in C_{I_i} (the
      image-level label set; reasons in ``certain_mask``).

    ``use_wce=False`` trains plain CE on Y^co (the paper's Table 6 ablation). ``crf_map``: how the
    per-image CRFs run (a process pool's ``map``; see ``_crf_refine``).

    Returns ``{"wce" | "ce": loss, "m_biased_frac": share of labelled (non-255) pixels that are
    BIASED, "m_mean_w": mean W over labelled pixels}``.
    """
    device = _model_device(student)
    image = _move(batch, "image", device, torch.float32)
    y_db = _move(batch, "label", device, torch.long)
    teacher.eval()
    teacher_probs = predict_probs(teacher, image)  # [B, C+1, H, W]
    if teacher_probs.shape[1] != num_classes:
        raise ValueError(f"teacher outputs {teacher_probs.shape[1]} classes but num_classes={num_classes}")
    biased = y_db == BIASED
    class_mask = _class_mask(batch)
    fill_probs = teacher_probs if class_mask is None else restrict_probs(teacher_probs, class_mask)
    if crf is not None and bool(biased.any()):
        fill_probs = _crf_refine(fill_probs, _image_uint8(batch), crf, only=biased.flatten(1).any(dim=1),
                                 crf_map=crf_map, sides=_image_sides(batch))
        if class_mask is not None:  # the CRF's pairwise terms must not bring an absent class back
            fill_probs = restrict_probs(fill_probs, class_mask)
    y_co = complement_labels(y_db, fill_probs.argmax(dim=1))
    if use_wce:
        weight = certain_mask(y_db, teacher_probs, class_mask)
    else:
        weight = torch.ones_like(y_db, dtype=torch.float32)
    logits = student(image)
    loss = weighted_cross_entropy(logits, y_co, weight, ignore_index=IGNORE)
    labelled = y_db != IGNORE
    n_lab = labelled.sum().clamp(min=1)
    return {
        "wce" if use_wce else "ce": loss,
        "m_biased_frac": float(biased.sum() / n_lab),
        "m_mean_w": float((weight * labelled).sum() / n_lab),
    }


def baseline_step(model: nn.Module, batch: Mapping[str, Any]) -> Dict[str, Tensor]:
    """Plain CE on Y^b: ``{"ce": loss}``; 255 is ignored and so is 254 should it appear."""
    device = _model_device(model)
    image = _move(batch, "image", device, torch.float32)
    target = _move(batch, "label", device, torch.long)
    target = torch.where(target == BIASED, torch.full_like(target, IGNORE), target)
    logits = model(image)
    if not bool((target != IGNORE).any()):
        return {"ce": logits.sum() * 0.0}
    return {"ce": F.cross_entropy(logits, target, ignore_index=IGNORE)}


# ------------------------------------------------------------------------------------------- augmentation

_MEAN_RGB = (124, 116, 104)  # ImageNet mean ×255: padding becomes 0 after normalisation


class SegAugment:
    """Random scale → pad → random crop → horizontal flip on ``(image uint8 [H,W,3], label uint8 [H,W])``.

    The image is resized bilinearly and the label with nearest neighbour; padding fills the image
    with the ImageNet mean colour and the label with 255. ``__call__`` returns torch tensors
    ``{"image": float32 [3,h,w] in [0,1], "image_uint8": uint8 [h,w,3], "label": int64 [h,w]}``;
    :meth:`numpy` returns the same as numpy arrays (for Ray Data ``map``). ``seed`` seeds this
    instance's generator (each Ray Data actor should get its own seed).
    """

    def __init__(
        self,
        crop_size: int | Tuple[int, int],
        scale_range: Tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        seed: Optional[int] = None,
    ) -> None:
        ch, cw = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if ch <= 0 or cw <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.crop = (int(ch), int(cw))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip
        self.rng = np.random.default_rng(seed)

    def numpy(self, image: np.ndarray, label: np.ndarray) -> Dict[str, np.ndarray]:
        """Augment one pair → ``{"image_uint8": [h,w,3] uint8, "label": [h,w] uint8, "image_side": float32}``
        (numpy); ``image_side`` is sqrt(H·W) of the rescaled image the crop was cut from (the CRF's scale)."""
        image, label = np.asarray(image), np.asarray(label)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        if label.ndim != 2 or label.shape != image.shape[:2]:
            raise ValueError(f"label must be [H, W] matching image {image.shape[:2]}, got {label.shape}")
        h, w = label.shape
        s = self.rng.uniform(*self.scale_range)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        if (nh, nw) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
            label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((nw, nh), Image.Resampling.NEAREST))
        ch, cw = self.crop
        ph, pw = max(ch - nh, 0), max(cw - nw, 0)
        if ph or pw:
            padded = np.empty((nh + ph, nw + pw, 3), np.uint8)
            padded[:] = np.array(_MEAN_RGB, np.uint8)
            padded[:nh, :nw] = image
            plab = np.full((nh + ph, nw + pw), IGNORE, np.uint8)
            plab[:nh, :nw] = label
            image, label = padded, plab
        y = int(self.rng.integers(0, image.shape[0] - ch + 1))
        x = int(self.rng.integers(0, image.shape[1] - cw + 1))
        image, label = image[y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]
        if self.flip and self.rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return {"image_uint8": np.ascontiguousarray(image), "label": np.ascontiguousarray(label, dtype=np.uint8),
                "image_side": np.float32(np.sqrt(nh * nw))}

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Dict[str, Tensor]:
        out = self.numpy(image, label)
        img = torch.from_numpy(out["image_uint8"])
        return {
            "image": img.permute(2, 0, 1).float().div_(255.0),
            "image_uint8": img,
            "label": torch.from_numpy(out["label"]).long(),
            "image_side": torch.tensor(float(out["image_side"])),
        }


def fit_crop(image: np.ndarray, size: int, rng: np.random.Generator,
             scale: Optional[Tuple[float, float]] = (1.0, 1.5), flip: bool = True) -> Tensor:
    """uint8 ``[H, W, 3]`` → float ``[3, size, size]`` in [0, 1]: short side resized to ``size·s``
    (s uniform in ``scale``), a random ``size²`` crop, a random horizontal flip.

    Whole-image context survives (unlike a fixed-scale crop of a large image): the crops of the
    label-free models (the CAM classifier, the USS), which see images without per-pixel labels.
    ``scale=None``: the image keeps its own scale (resized only when its short side is below
    ``size``, up to ``size``), for a model whose input scale must match inference.
    """
    h, w = image.shape[:2]
    s = max(1.0, size / min(h, w)) if scale is None else size / min(h, w) * float(rng.uniform(*scale))
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    y = int(rng.integers(0, nh - size + 1))
    x = int(rng.integers(0, nw - size + 1))
    out = image[y : y + size, x : x + size]
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).float().div_(255.0)


def sharded_loader(dataset: torch.utils.data.Dataset, batch_size: int, *, rank: int, world: int,
                   seed: int) -> torch.utils.data.DataLoader:
    """Worker ``rank`` of ``world``'s shard of ``dataset`` (``DistributedSampler``), reshuffled each
    epoch by ``loader.sampler.set_epoch(epoch)``. The last incomplete round is dropped only when
    every worker still gets two items or more, so a tiny dataset is never emptied."""
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=len(dataset) >= 2 * world,
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False)
