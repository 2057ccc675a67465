"""Frozen, typed run configuration: dataclass defaults → YAML file → ``--set a.b=c`` overrides.

Unknown keys and wrong types are errors (``ValueError`` naming the key). The resolved config is
written into the run folder (``RUN/config.yaml``); each stage hashes only its own *slice* so that a
change of ``select.alpha`` does not invalidate the ``features`` artifact.

At ~540 lines this is over the house's ~450: it is the whole config schema (one dataclass per
section, each key with its default and the reason for it) and ``validate``, which holds every
data-free check; users read one file to learn every key, and the checks sit beside the keys.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from mars_ray.storage import AnyPath, ObjectPath, upath


@dataclass(frozen=True)
class DataConfig:
    """Where the images, ground truth and inputs live (``mars run --data/--pseudo-labels``)."""

    root: str = ""
    split: str = "train"
    eval_split: str = "val"
    pseudo_labels: str = ""  # folder of Y^b PNGs from any WSSS method; "" → RUN/wsss (built-in CAM)
    features_dir: str = ""  # folder of external USS features {id}.npy|npz|pt; "" → features.extractor
    # image-level labels in any format of mars_ray.data.image_labels (IRN/AMN/ToCo/MCTformer .npy,
    # VOC Annotations/, image_labels.json); "" → ROOT/image_labels.json if present, else from GT
    image_labels: str = ""
    image_labels_difficult: bool = True  # VOC XML: count "difficult" objects (IRN's cls_labels.npy does)
    gt_dir: str = "SegmentationClass"  # GT folder under ROOT (or absolute): SegmentationClassAug for VOC-aug
    split_file: str = ""  # list file of data.split (plain ids or "/JPEGImages/x.jpg /SegClassAug/x.png")

    def dataset_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``mars_ray.data.voc.VOCDataset`` besides the root."""
        return {"gt_dir": self.gt_dir, "split_files": {self.split: self.split_file} if self.split_file else None,
                "image_labels": self.image_labels, "image_labels_difficult": self.image_labels_difficult}


@dataclass(frozen=True)
class FeaturesConfig:
    """Stage ``features``: USS embeddings F and per-image, per-class K-means (Sec 3.2)."""

    extractor: str = "adaptive"  # a name in mars_ray.models.registry.FEATURES; adaptive: fitted on the split
    checkpoint: str = ""  # stego: "" → RUN/uss/checkpoint.pt; adaptive: a uss_stats.npz, "" → fitted by the stage
    k_fg: int = 2
    k_bg: int = 2
    max_pixels: int = 20000  # K-means is fitted on at most this many pixels of a region
    kmeans_iters: int = 20
    seed: int = 0
    # our choice: the adaptive extractor fits each codebook size this many times (an ensemble; also the
    # adaptive backbone of `--uss`). 2 rather than 1: labels that move less between refits (mean range
    # 2.2 vs 3.7 points over 19 datasets x 3 seeds) and are as good or better on average (README,
    # "Debiasing quality"), for an F and a feature time nearly twice as large; other extractors ignore it
    codebook_copies: int = 2
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # a learned extractor on GPUs (fractions share one); ignored with data.features_dir
    batch_size: int = 8
    # content-addressed cache: "" = off; else the artifact lives in CACHE/features-<key>/ (computed
    # once under a file lock) and RUN/features links to it. `mars tune` sets RUN/cache.
    cache_dir: str = ""


@dataclass(frozen=True)
class SelectConfig:
    """Stage ``select``: Eq 1–3, top ⌈α·N_c⌉ farthest centroids per class → V^c."""

    alpha: float = 0.40
    chunk_rows: int = 65536  # rows of the centroid table per streamed batch


def _crf_kwargs(section: Any) -> dict[str, float]:
    """``algo.crf.dense_crf`` kwargs from a section's ``crf_*`` fields (debias, train, evaluate)."""
    names = ("iters", "gauss_sxy", "gauss_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat")
    return {n: getattr(section, f"crf_{n}") for n in names}


@dataclass(frozen=True)
class DebiasConfig:
    """Stage ``debias``: Eq 4–5 with dense-CRF refinement and binarisation.

    The paper says only that M is refined ("e.g. CRF") before Eq 5. How M^db is binarised is our
    choice: a two-label CRF whose background score is the constant ``threshold`` (without the CRF:
    keep = M > ``threshold``). 0.5 is the midpoint of M's [0, 1] range, not a tuned value;
    ``tune_spaces/debias.yaml`` sweeps threshold × CRF, ``benchmarks/debias_sensitivity.py`` measures it.
    """

    threshold: float = 0.5  # our choice (the paper states none): keep where M beats this constant
    crf: bool = True  # paper: "refinement (e.g. CRF)"
    # our choice: the CRF's two-label probabilities from M (algo.debias.unary_probs): "symmetric"
    # P_fg = M at threshold 0.5 (piecewise linear through (t, 1/2)); "ratio" P_fg ∝ M vs P_bg ∝ t,
    # the mapping before 2026-12 (at most 67 % sure of a target). benchmarks/unary_bench.py: 23 datasets
    crf_unary: str = "symmetric"
    crf_iters: int = 10
    crf_gauss_sxy: float = 3.0
    crf_gauss_compat: float = 3.0
    crf_bilateral_sxy: float = 50.0
    crf_bilateral_srgb: float = 13.0
    crf_bilateral_compat: float = 4.0  # DeepLab-v2 CRF weight; 10 over-smooths textured objects
    # our choice: crf_bilateral_sxy is in pixels of an image of this geometric-mean side (VOC's
    # sqrt(500·375) ≈ 433, where DeepLab chose 50 px) and scales with each image's sqrt(H·W)
    # (algo.crf.scale_kernels); 0 = pixels as given. Measured on every make-dataset variant
    # (benchmarks/quality_lab.py --crf-scaled, README "Debiasing quality").
    crf_reference_side: float = 433.0
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # F from a learned extractor on GPUs; the CRF stays on the actor's CPU
    batch_size: int = 8

    def crf_kwargs(self) -> dict[str, float] | None:
        """Keyword arguments for ``algo.crf.dense_crf``; ``None`` when the CRF is off (not scaled to an
        image: ``algo.crf.scale_kernels(kwargs, (H, W), crf_reference_side)`` does that per image)."""
        return _crf_kwargs(self) if self.crf else None

    def crf_kernels(self) -> dict[str, float]:
        """The ``crf_*`` kernels whether ``debias.crf`` is on or not (``wsss.crf`` borrows them)."""
        return _crf_kwargs(self)


@dataclass(frozen=True)
class WsssConfig:
    """Stage ``wsss`` (built-in CAM baseline, situation c): classifier on Ray Train → Y^b PNGs."""

    classifier: str = "cam_small"  # a name in CLASSIFIERS
    epochs: int = 50  # cam_small from scratch: an under-trained classifier spreads its CAMs everywhere
    batch_size: int = 16
    lr: float = 0.05  # SGD, momentum 0.9, poly schedule
    weight_decay: float = 1e-4
    crop_size: int = 96
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    cam_flip: bool = True
    bg_threshold: float = 0.3
    crf: bool = False
    cam_eval_split: bool = True  # also write CAM pseudo labels for data.eval_split (when it exists)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    num_actors: int = 1  # CAM inference: Ray Data actor pool
    cpus_per_actor: float = 1.0
    cam_batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class UssConfig:
    """Stage ``uss`` (learned USS, situation b): STEGO-style head on a frozen backbone, Ray Train."""

    backbone: str = "adaptive"  # a name in BACKBONES (adaptive: fitted on the split, no weights; vit_base_8, …, small_cnn)
    backbone_weights: str = ""  # local DINO checkpoint for ViT backbones; small_cnn without one trains self-supervised
    ssl_epochs: int = 20  # self-supervised pretraining of small_cnn on the dataset (0 = skip)
    epochs: int = 20
    # our choice: a small split runs more STEGO epochs, until at least this many optimiser steps (0: exactly
    # `epochs`); 20 epochs of 32 images are 40 steps; 300 steps: 12 classes 71.6 -> 81.0 mIoU, colour 71.6 -> 66.9
    # (README "Debiasing quality across datasets")
    min_steps: int = 300
    dim: int = 70
    batch_size: int = 16
    lr: float = 5e-4
    ssl_lr: float = 3e-3  # Adam, self-supervised small_cnn pretraining
    crop_size: int = 96
    # our choice: "native" crops the images at their own scale (the scale the features stage runs the backbone
    # at), min(crop_size, the split's median short side) px; "resize" (until 2026-12) resized each image's short
    # side to crop_size x U(1, 1.5) first, so the head learned on features of up-scaled images
    crop_scale: str = "native"
    knn: int = 7  # k-NN partners per image, from pooled backbone features over the whole split
    n_samples: int = 11  # STEGO samples an n x n grid of points per image for the correspondence loss
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Stage ``train`` (Sec 3.4 complementing): EMA teacher, CRF fill, certain mask, WCE on Ray Train.

    The paper states the segmenter (DeepLabV3+ ResNet-101) and the CRF; it does not state the EMA
    momentum, output stride, crop, batch, lr, weight decay or epochs. Every default here is our
    choice, CPU-sized for small data; ``jobs/voc.yaml`` holds our choices at VOC scale (OS 16, crop
    512, batch 16, wd 4e-5 after DeepLabV3+'s training setup; lr 1e-3; EMA 0.999, a common
    mean-teacher value). README "Stated vs chosen settings" lists them with the reasons.
    """

    model: str = "deeplab_tiny"  # a name in SEGMENTERS
    pretrained_backbone: str = ""  # local ImageNet weights for ResNet backbones
    output_stride: int = 8
    baseline: bool = False  # train on Y^b with plain CE (the paper's baseline) instead of MARS
    labels: str = ""  # training labels; "" → RUN/debias (MARS) or the pseudo labels (baseline)
    crop_size: int = 64
    scale_min: float = 0.5
    scale_max: float = 2.0
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 4e-5
    poly_power: float = 0.9
    epochs: int = 30
    ema_momentum: float = 0.9  # our choice (paper: none stated); CPU demo, ~240 steps: 0.99 stayed all-background
    wce: bool = True  # Eq 7 weighted CE (paper); false = plain CE on Y^co (the paper's Table 6 ablation)
    teacher_crf: bool = True
    # RUN/complement (Y^co of the train split, from the final teacher): its softmax averaged over these
    # input scales, and their flips with complement_flip (paper: multi-scale inference; these scales
    # are our choice). Up-scaling restores the boundary resolution the decoder's stride 4 loses on small
    # images: a single-scale fill bled objects 1-4 px into their removed context, 4.6 points below Y^db
    # on the built-in data (README "Debiasing quality across datasets"). The fill during training stays
    # single-scale: training with this fill lowered the demo's val mIoU by 5 points.
    complement_scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    complement_flip: bool = True
    # processes per Train worker for the teacher's CRF fill: pydensecrf holds the GIL, so only
    # processes run CRFs side by side (1: one after another in the worker, as before)
    crf_workers: int = 1
    crf_iters: int = 10  # dense CRF of the teacher's fill (Y^co); same kernels as debias.crf_*
    crf_gauss_sxy: float = 3.0
    crf_gauss_compat: float = 3.0
    crf_bilateral_sxy: float = 50.0
    crf_bilateral_srgb: float = 13.0
    crf_bilateral_compat: float = 4.0  # DeepLab-v2 CRF weight; 10 over-smooths textured objects
    # as debias.crf_reference_side, but off (0 = pixels as given) by default: > 0 scales
    # crf_bilateral_sxy with each image's sqrt(H·W) / this side (for a training crop, that of the
    # rescaled image it was cut from). Measured (README "Debiasing quality across datasets"): on
    # small images the scaled fill gave more false positives than DeepLab's 50 px, unlike debias.
    crf_reference_side: float = 0.0
    init_checkpoint: str = ""  # optional segmenter checkpoint (same model and classes) to start from
    val_every: int = 1  # epochs between val mIoU on data.eval_split (0 = never)
    amp: bool = True  # mixed precision where CUDA is available
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    checkpoint_every: int = 5  # epochs (and always after the last)
    seed: int = 0

    def crf_kwargs(self) -> dict[str, float] | None:
        """The teacher's fill CRF: ``algo.crf.dense_crf`` kwargs plus ``reference_side`` (the engine scales
        the bilateral width per image, ``algo.crf.kernels_for``); ``None`` when ``teacher_crf`` is off."""
        return {**_crf_kwargs(self), "reference_side": self.crf_reference_side} if self.teacher_crf else None


@dataclass(frozen=True)
class EvaluateConfig:
    """Stage ``evaluate``: predictions on a split (multi-scale + flip, optional CRF) → metrics."""

    checkpoint: str = ""  # "" → RUN/train/model.pt
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    # paper: "multi-scale inference and CRF with conventional settings" (jobs/voc.yaml turns both on);
    # conventional = DeepLab's CRF, as the authors' earlier code uses it: bilateral weight 4, sxy 67,
    # srgb 3; Gaussian weight 3, sxy 1; 10 mean-field iterations. Its own kernels, not debias.crf_*.
    crf: bool = False
    crf_iters: int = 10
    crf_gauss_sxy: float = 1.0
    crf_gauss_compat: float = 3.0
    crf_bilateral_sxy: float = 67.0
    crf_bilateral_srgb: float = 3.0
    crf_bilateral_compat: float = 4.0
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    use_gpu: bool = False  # one GPU per actor
    batch_size: int = 4

    def crf_kwargs(self) -> dict[str, float] | None:
        """``algo.crf.dense_crf`` kwargs of the evaluation CRF; ``None`` when ``crf`` is off."""
        return _crf_kwargs(self) if self.crf else None


@dataclass(frozen=True)
class RayConfig:
    """How to reach Ray: ``address`` "" starts a local instance (``auto`` joins a cluster)."""

    address: str = ""
    num_cpus: int = 0  # local only; 0 → all cores
    object_store_mb: int = 0  # local only; 0 → Ray's default


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    debias: DebiasConfig = field(default_factory=DebiasConfig)
    wsss: WsssConfig = field(default_factory=WsssConfig)
    uss: UssConfig = field(default_factory=UssConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(Config)}  # type: ignore[misc]


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def known_keys() -> list[str]:
    """Every dotted key a config accepts, e.g. ``select.alpha``."""
    out = []
    for name, cls in _section_types().items():
        out += [f"{name}.{f.name}" for f in fields(cls)]
    return out


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert one value to the field's type; ``ValueError`` naming the key otherwise."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ValueError(f"config key {key!r}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected a string, got {value!r}")
        return str(value)
    origin = typing.get_origin(typ)
    if origin is tuple:
        elem = typing.get_args(typ)[0]  # tuple[T, ...]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
            value = [yaml.safe_load(v) for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # a single scalar is a one-element list: --set evaluate.scales=1.0
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r}: expected a list, got {value!r}")
        return tuple(_coerce(key, v, elem) for v in value)
    raise TypeError(f"unsupported config type {typ!r} for {key}")  # programming error


def _apply(cfg: Config, key: str, value: Any) -> Config:
    parts = key.split(".")
    sections = _section_types()
    if len(parts) != 2 or parts[0] not in sections:
        raise ValueError(f"unknown config key {key!r}; sections: {', '.join(sections)}")
    section, name = parts
    cls = sections[section]
    hints = typing.get_type_hints(cls)
    if name not in hints:
        names = ", ".join(f"{section}.{f.name}" for f in fields(cls))
        raise ValueError(f"unknown config key {key!r}; {section} has: {names}")
    new_section = replace(getattr(cfg, section), **{name: _coerce(key, value, hints[name])})
    return replace(cfg, **{section: new_section})


def merge(cfg: Config, updates: Mapping[str, Any], *, source: str = "overrides") -> Config:
    """Apply a nested ``{section: {key: value}}`` or flat ``{"a.b": value}`` mapping."""
    for key, value in flatten(updates).items():
        try:
            cfg = _apply(cfg, key, value)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    return cfg


def flatten(updates: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; already-dotted keys pass through."""
    out: dict[str, Any] = {}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c.d=x"]`` → ``{"a.b": 1, "c.d": "x"}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def read_yaml_mapping(path: "str | Path | ObjectPath", what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping; ``FileNotFoundError``/``ValueError`` naming the file otherwise.

    ``path`` is a local file or an object-store URI (``s3://bucket/run/tune/best.yaml``).
    """
    path = upath(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


def load_yaml(path: "str | Path | ObjectPath") -> dict[str, Any]:
    """Read a config YAML of sections (a ``job:`` description block in jobs/*.yaml is dropped)."""
    data = read_yaml_mapping(path)
    data.pop("job", None)
    return data


def build(config_file: "str | Path | ObjectPath | None" = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults → YAML file → overrides, then validate."""
    cfg = Config()
    if config_file:
        cfg = merge(cfg, load_yaml(config_file), source=str(config_file))
    if overrides:
        cfg = merge(cfg, overrides, source="--set")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every check that needs no data, before Ray starts (``ValueError`` naming the key).

    Ranges of every section, combinations (``train.batch_size`` divisible by ``train.num_workers``,
    ``uss`` weights for ViT backbones) and registry names (``features.extractor``, ``train.model``,
    ``wsss.classifier``, ``uss.backbone``). ``build`` calls it; so do ``mars tune`` for every point
    of a search space (``tune.space.validate_space``) and the stages for a config made with ``merge``.
    """
    _validate_ranges(cfg)
    _validate_names(cfg)


def _at_least(section: str, obj: Any, keys: tuple[str, ...], low: float) -> None:
    for key in keys:
        if getattr(obj, key) < low:
            raise ValueError(f"{section}.{key} must be >= {low:g}, got {getattr(obj, key)}")


def _positive(section: str, obj: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        if not getattr(obj, key) > 0:
            raise ValueError(f"{section}.{key} must be > 0, got {getattr(obj, key)}")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{key} must be in [{low:g}, {high:g}], got {value}")


def _factors(key: str, values: tuple[float, ...]) -> None:
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{key} must be positive factors, got {list(values)}")


_CRF_KERNELS = ("crf_gauss_sxy", "crf_gauss_compat", "crf_bilateral_sxy", "crf_bilateral_srgb", "crf_bilateral_compat")


def _validate_ranges(cfg: Config) -> None:
    if not 0.0 < cfg.select.alpha <= 1.0:
        raise ValueError(f"select.alpha must be in (0, 1], got {cfg.select.alpha}")
    _at_least("select", cfg.select, ("chunk_rows",), 1)
    f = cfg.features
    _at_least("features", f, ("k_fg", "k_bg", "max_pixels", "kmeans_iters", "codebook_copies", "num_actors",
                              "batch_size"), 1)
    _positive("features", f, ("cpus_per_actor",))
    _at_least("features", f, ("gpus_per_actor",), 0)
    d = cfg.debias
    _at_least("debias", d, ("num_actors", "batch_size", "crf_iters"), 1)
    _positive("debias", d, ("cpus_per_actor", *_CRF_KERNELS))
    _at_least("debias", d, ("gpus_per_actor",), 0)
    if d.crf_unary not in ("symmetric", "ratio"):  # algo.debias.UNARIES (config imports no algo code)
        raise ValueError(f"debias.crf_unary must be 'symmetric' or 'ratio', got {d.crf_unary!r}")
    if not 0.0 < d.threshold < 1.0:  # M is in [0, 1]: 0 or 1 would keep everything or nothing
        raise ValueError(f"debias.threshold must be in (0, 1), got {d.threshold}")
    w = cfg.wsss
    _at_least("wsss", w, ("epochs", "batch_size", "crop_size", "num_workers", "num_actors", "cam_batch_size"), 1)
    _at_least("wsss", w, ("max_failures",), -1)
    _positive("wsss", w, ("lr", "cpus_per_worker", "cpus_per_actor"))
    _at_least("wsss", w, ("weight_decay",), 0)
    _factors("wsss.cam_scales", w.cam_scales)
    _in_range("wsss.bg_threshold", w.bg_threshold, 0.0, 1.0)
    u = cfg.uss
    _at_least("uss", u, ("epochs", "dim", "batch_size", "crop_size", "knn", "n_samples", "num_workers"), 1)
    _at_least("uss", u, ("ssl_epochs", "min_steps"), 0)
    _at_least("uss", u, ("max_failures",), -1)
    _positive("uss", u, ("lr", "ssl_lr", "cpus_per_worker"))
    if u.crop_scale not in ("native", "resize"):
        raise ValueError(f"uss.crop_scale must be 'native' or 'resize', got {u.crop_scale!r}")
    if not u.backbone_weights:
        if u.backbone.startswith("vit"):
            raise ValueError(
                f"uss.backbone={u.backbone} needs uss.backbone_weights: a DINO checkpoint file or URI "
                "(e.g. dino_vitbase8_pretrain.pth); weights are never downloaded"
            )
        if u.ssl_epochs < 1 and u.backbone != "adaptive":  # (adaptive has nothing to train: fitted statistics)
            raise ValueError("uss.ssl_epochs must be >= 1 without uss.backbone_weights (a random frozen backbone teaches nothing)")
    t = cfg.train
    _at_least("train", t, ("batch_size", "epochs", "num_workers", "crop_size", "checkpoint_every", "crf_iters",
                           "crf_workers"), 1)
    _at_least("train", t, ("val_every", "weight_decay", "poly_power", "crf_reference_side"), 0)
    _at_least("train", t, ("max_failures",), -1)
    _positive("train", t, ("lr", "cpus_per_worker", *_CRF_KERNELS))
    if t.batch_size % t.num_workers:
        raise ValueError(
            f"train.batch_size={t.batch_size} is not divisible by train.num_workers={t.num_workers}: "
            "every worker takes batch_size / num_workers images per step"
        )
    if not 0 < t.scale_min <= t.scale_max:
        raise ValueError(f"train.scale_min/scale_max must satisfy 0 < min <= max, got {t.scale_min}, {t.scale_max}")
    _in_range("train.ema_momentum", t.ema_momentum, 0.0, 1.0)
    _in_range("train.momentum", t.momentum, 0.0, 1.0)
    if t.output_stride not in (8, 16):
        raise ValueError(f"train.output_stride must be 8 or 16, got {t.output_stride}")
    _factors("train.complement_scales", t.complement_scales)
    e = cfg.evaluate
    _factors("evaluate.scales", e.scales)
    _at_least("evaluate", e, ("num_actors", "batch_size"), 1)
    _positive("evaluate", e, ("cpus_per_actor", "crf_gauss_sxy", "crf_bilateral_sxy", "crf_bilateral_srgb"))
    _at_least("evaluate", e, ("crf_iters",), 1)
    _at_least("evaluate", e, ("crf_gauss_compat", "crf_bilateral_compat"), 0)
    _at_least("ray", cfg.ray, ("num_cpus", "object_store_mb"), 0)


def _validate_names(cfg: Config) -> None:
    """Registry names; the model modules are imported on first use (they load torch)."""
    from mars_ray.models import load_all
    from mars_ray.models.registry import BACKBONES, CLASSIFIERS, FEATURES, SEGMENTERS

    load_all()
    for key, value, registry in (("features.extractor", cfg.features.extractor, FEATURES),
                                 ("train.model", cfg.train.model, SEGMENTERS),
                                 ("wsss.classifier", cfg.wsss.classifier, CLASSIFIERS),
                                 ("uss.backbone", cfg.uss.backbone, BACKBONES)):
        if value not in registry:
            raise ValueError(f"{key}={value!r} is not a {registry.kind}; known: {', '.join(registry.names())}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples → lists), ready for YAML/JSON."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]  # type: ignore[return-value]
    return cfg


def dump_yaml(cfg: Config, path: AnyPath) -> None:
    """Write ``cfg`` as YAML to a local file or an object-store URI (atomically, see ``artifacts``)."""
    from mars_ray.artifacts import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def slice_hash(*parts: Any) -> str:
    """Stable short hash of config slices / fingerprints (JSON of their plain-dict form)."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = [
    "Config",
    "DataConfig",
    "FeaturesConfig",
    "SelectConfig",
    "DebiasConfig",
    "WsssConfig",
    "UssConfig",
    "TrainConfig",
    "EvaluateConfig",
    "RayConfig",
    "build",
    "merge",
    "parse_set",
    "load_yaml",
    "validate",
    "to_dict",
    "dump_yaml",
    "slice_hash",
    "known_keys",
    "flatten",
]
