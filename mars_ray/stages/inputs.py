"""Where a run's inputs come from: pseudo labels Y^b, the feature source F, paths named in the config.

Config values are plain strings (they travel through YAML and ``--set``); ``config_path`` turns one
into a path object, once, and every stage takes its inputs from here:

* Y^b: ``data.pseudo_labels``, else the built-in CAM baseline's ``RUN/wsss``;
* F: the external folder ``data.features_dir``, else the registry extractor ``features.extractor``
  (the learned one reads ``features.checkpoint``, else ``RUN/uss/checkpoint.pt``);
* C_{I_i}, each image's foreground classes (Eq 4 in ``debias``, Eq 6 and the fill in ``train``): the
  dataset's image-level labels when it has them (``data.image_labels`` or ``ROOT/image_labels.json``),
  else the classes present in Y^b (``image_class_source``; :class:`ImageClasses` reads them per image).

``validate_inputs`` checks Y^b (and an external F) before the ``features`` stage touches any output;
stages after it trust the ``features`` artifact, whose key fingerprints these inputs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mars_ray import config as C
from mars_ray import storage
from mars_ray.algo.complement import image_class_mask
from mars_ray.artifacts import current, fingerprint_files, fingerprint_path
from mars_ray.data.label_io import read_label
from mars_ray.data.validate import label_folder_sizes
from mars_ray.data.voc import VOCDataset
from mars_ray.features import check_feature_folder
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

USS_DIR = "uss"
USS_CHECKPOINT = "checkpoint.pt"  # the ``uss`` stage's output, what the learned extractor loads
ADAPTIVE = "adaptive"  # the extractor whose statistics the ``features`` stage fits on the split
USS_STATS = "uss_stats.npz"  # … stored in the features artifact: RUN/features/uss_stats.npz


def config_path(value: str) -> AnyPath | None:
    """A path named in the config (a folder, file or URI) as a path object; ``None`` for ``""`` (not set)."""
    return storage.upath(value) if value else None


def open_dataset(cfg: C.Config) -> VOCDataset:
    """The dataset the config names: ``data.root`` with ``data.gt_dir``, ``data.split_file`` and
    ``data.image_labels`` (Ray actors get ``dataset.spec()`` and rebuild it)."""
    return VOCDataset(cfg.data.root, **cfg.data.dataset_kwargs())


def dataset_key(cfg: C.Config, splits: "list[str] | tuple[str, ...]") -> dict[str, Any]:
    """The dataset as a stage key names it: every ``data.*`` setting ``open_dataset`` reads, and the splits.

    Every stage key holds it (each stage opens the dataset), so no stage is "up to date" for
    another ground-truth folder, list file or image-label source (``tests/test_stage_keys.py``).
    """
    d = cfg.data
    return {"root": storage.absolute(d.root), "gt_dir": d.gt_dir,
            "split_file": storage.absolute(d.split_file) if d.split_file else "",
            "image_labels": storage.absolute(d.image_labels) if d.image_labels else "",
            "image_labels_difficult": d.image_labels_difficult, "splits": list(splits)}


def pseudo_label_dir(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Y^b folder: ``--pseudo-labels`` or the built-in CAM baseline's ``RUN/wsss`` (local or URI)."""
    return config_path(cfg.data.pseudo_labels) or current(run_dir / "wsss")


def uss_checkpoint(run_dir: AnyPath) -> AnyPath:
    """``RUN/uss/checkpoint.pt``: the learned extractor's weights when ``features.checkpoint`` is empty."""
    return current(run_dir / USS_DIR) / USS_CHECKPOINT


def fits_adaptive_stats(cfg: C.Config) -> bool:
    """F comes from the ``adaptive`` extractor with statistics the ``features`` stage fits on the split
    (no ``data.features_dir``, no ``features.checkpoint``)."""
    return not cfg.data.features_dir and cfg.features.extractor == ADAPTIVE and not cfg.features.checkpoint


def codebook_copies_key(cfg: C.Config) -> dict[str, int]:
    """``{"codebook_copies": n}`` for the keys of whatever an adaptive fit produces (the fit itself, the
    ``features`` artifact, the ``uss`` stage's adaptive backbone); empty at 1, so that artifacts made
    before the setting existed (one copy) keep their keys."""
    n = cfg.features.codebook_copies
    return {} if n == 1 else {"codebook_copies": n}


def adaptive_stats_path(run_dir: AnyPath) -> AnyPath:
    """``RUN/features/uss_stats.npz`` (through a features-cache link when there is one)."""
    from mars_ray.stages import cache

    return cache.resolve(run_dir) / USS_STATS


def feature_source_kwargs(cfg: C.Config, run_dir: AnyPath, *, absolute: bool = False) -> dict[str, Any]:
    """How to build the ``FeatureSource`` for this run (``features`` and ``debias``).

    As written, the dict is part of the ``features`` key (paths as the config names them). With
    ``absolute`` every path in it is absolute: what Ray actors get, whatever their working directory.
    The ``adaptive`` extractor reads ``features.checkpoint``, else the statistics the ``features``
    stage fitted (``adaptive_stats_path``); the learned ``stego`` one ``features.checkpoint``, else
    ``RUN/uss/checkpoint.pt``.
    """
    def where(p: "str | AnyPath") -> str:
        return storage.absolute(p) if absolute else str(p)

    if cfg.data.features_dir:
        return {"features_dir": where(cfg.data.features_dir)}
    kwargs: dict[str, Any] = {}
    checkpoint: "str | AnyPath" = cfg.features.checkpoint
    if not checkpoint and cfg.features.extractor == "stego":
        checkpoint = uss_checkpoint(run_dir)
    if not checkpoint and cfg.features.extractor == ADAPTIVE:
        checkpoint = adaptive_stats_path(run_dir)
    if checkpoint:
        kwargs["checkpoint"] = where(checkpoint)
    return {"extractor": cfg.features.extractor, "extractor_kwargs": kwargs}


def actor_source_kwargs(cfg: C.Config, run_dir: AnyPath, gpus_per_actor: float) -> dict[str, Any]:
    """``feature_source_kwargs`` for a Ray actor (absolute paths), on CUDA when the actor holds a
    GPU share and F comes from an extractor (``plan.feature_gpus``); not part of any stage key."""
    from mars_ray.stages.plan import feature_gpus

    kwargs = feature_source_kwargs(cfg, run_dir, absolute=True)
    if feature_gpus(cfg, gpus_per_actor) > 0:
        kwargs["device"] = "cuda"
    return kwargs


def feature_source_fingerprint(source_kwargs: dict[str, Any]) -> dict[str, str]:
    """Input fingerprints of the feature source (external folder or extractor checkpoint)."""
    if "features_dir" in source_kwargs:
        folder = config_path(source_kwargs["features_dir"])
        if storage.is_uri(folder):  # one listing, not a request a file: the readable files lie directly in it
            names = sorted(n for n in storage.list_files(folder) if not n.startswith("."))
            return {"features_dir": fingerprint_files(folder / n for n in names)}
        return {"features_dir": fingerprint_path(folder)}
    ckpt = config_path(source_kwargs.get("extractor_kwargs", {}).get("checkpoint", ""))
    return {"extractor": source_kwargs["extractor"], "checkpoint": fingerprint_path(ckpt)}


def validate_inputs(cfg: C.Config, run_dir: AnyPath) -> VOCDataset:
    """Y^b (every id present, sizes matching the images) and external F (every id, ``.npy`` headers),
    checked before any output is touched; ``ValueError``/``FileNotFoundError`` naming the file."""
    dataset = open_dataset(cfg)
    folder = pseudo_label_dir(cfg, run_dir)
    sizes = label_folder_sizes(dataset, cfg.data.split, folder, name="pseudo label")
    smallest = min(sizes, key=lambda i: sizes[i][0] * sizes[i][1])
    pixels = sizes[smallest][0] * sizes[smallest][1]
    for key in ("k_fg", "k_bg"):
        k = getattr(cfg.features, key)
        if k > pixels:
            raise ValueError(f"{folder / f'{smallest}.png'}: features.{key}={k} exceeds the {pixels} pixels of "
                             "this image, the split's smallest (a region smaller than K gets fewer clusters)")
    features_dir = config_path(cfg.data.features_dir)
    if features_dir is not None:
        check_feature_folder(features_dir, dataset.ids(cfg.data.split))
    return dataset


def image_class_source(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset, *,
                       fallback: AnyPath | None = None, check: bool = False) -> dict[str, str]:
    """Where each image's class set C_{I_i} comes from: ``{"kind", "path"}`` (absolute path; part of
    the stage keys of ``debias`` and ``train``).

    ``kind`` is ``"image_labels"`` when the dataset has image-level labels (``path``: the file or
    folder), else ``"pseudo_labels"`` (the classes present in Y^b). Ground truth is never used: it is
    not an input of WSSS. ``fallback`` (the ``train`` stage's label folder) is used, as
    ``"training_labels"``, only when there is no Y^b folder (``train.labels`` without pseudo labels).

    Reading the image labels raises ``ValueError`` naming the file and the id or class for an id in
    no split or a class id outside 1..C; ``check`` also requires an entry for every id of
    ``data.split`` (``VOCDataset.check_image_labels``, which logs the format it read).
    """
    if dataset.image_label_table() is not None:
        if check:
            dataset.check_image_labels(cfg.data.split)
        return {"kind": "image_labels", "path": storage.absolute(dataset.image_labels_path)}
    pseudo = pseudo_label_dir(cfg, run_dir)
    if fallback is not None and not pseudo.is_dir():
        return {"kind": "training_labels", "path": storage.absolute(fallback)}
    return {"kind": "pseudo_labels", "path": storage.absolute(pseudo)}


def describe_class_source(source: dict[str, str]) -> str:
    """One log phrase for :func:`image_class_source`'s answer."""
    if source["kind"] == "image_labels":
        return f"the image-level labels {source['path']}"
    what = "pseudo labels Y^b" if source["kind"] == "pseudo_labels" else "training labels (no Y^b folder)"
    return f"the classes present in the {what} {source['path']} (no image-level labels given)"


class ImageClasses:
    """C_{I_i} of one image id → sorted foreground class ids, from an :func:`image_class_source`
    (built once per Ray actor from ``VOCDataset.spec()``; a label folder is read a PNG an id)."""

    def __init__(self, dataset: VOCDataset, source: dict[str, str]) -> None:
        self.kind = source["kind"]
        self.num_classes = dataset.num_classes
        self.table = dataset.image_label_table() if self.kind == "image_labels" else None
        self.folder = None if self.table is not None else storage.upath(source["path"])

    def __call__(self, image_id: str) -> tuple[int, ...]:
        if self.table is not None:
            return tuple(self.table.get(image_id))
        values = np.unique(read_label(self.folder / f"{image_id}.png"))
        return tuple(int(c) for c in values if 1 <= c <= self.num_classes)

    def mask(self, image_id: str) -> np.ndarray:
        """``[C+1]`` bool: background (always) plus the image's classes (``algo.complement.image_class_mask``)."""
        return image_class_mask([self(image_id)], self.num_classes + 1)[0].numpy()


__all__ = ["ADAPTIVE", "USS_CHECKPOINT", "USS_STATS", "ImageClasses", "actor_source_kwargs", "adaptive_stats_path",
           "codebook_copies_key", "config_path", "dataset_key", "describe_class_source", "feature_source_fingerprint",
           "feature_source_kwargs", "fits_adaptive_stats", "image_class_source", "open_dataset",
           "pseudo_label_dir", "uss_checkpoint", "validate_inputs"]
