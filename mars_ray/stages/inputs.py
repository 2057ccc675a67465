"""Where a run's inputs come from: pseudo labels Y^b, the feature source F, paths named in the config.

Config values are plain strings (they travel through YAML and ``--set``); ``config_path`` turns one
into a path object, once, and every stage takes its inputs from here:

* Y^b: ``data.pseudo_labels``, else the built-in CAM baseline's ``RUN/wsss``;
* F: the external folder ``data.features_dir``, else the registry extractor ``features.extractor``
  (the learned one reads ``features.checkpoint``, else ``RUN/uss/checkpoint.pt``).

``validate_inputs`` checks Y^b (and an external F) before the ``features`` stage touches any output;
stages after it trust the ``features`` artifact, whose key fingerprints these inputs.
"""

from __future__ import annotations

from typing import Any

from mars_ray import config as C
from mars_ray import storage
from mars_ray.artifacts import fingerprint_files, fingerprint_path
from mars_ray.data.validate import check_label_folder
from mars_ray.data.voc import VOCDataset
from mars_ray.features import check_feature_folder
from mars_ray.storage import AnyPath

USS_DIR = "uss"
USS_CHECKPOINT = "checkpoint.pt"  # the ``uss`` stage's output, what the learned extractor loads


def config_path(value: str) -> AnyPath | None:
    """A path named in the config (a folder, file or URI) as a path object; ``None`` for ``""`` (not set)."""
    return storage.upath(value) if value else None


def open_dataset(cfg: C.Config) -> VOCDataset:
    """The dataset the config names: ``data.root`` with ``data.gt_dir``, ``data.split_file`` and
    ``data.image_labels`` (Ray actors get ``dataset.spec()`` and rebuild it)."""
    return VOCDataset(cfg.data.root, **cfg.data.dataset_kwargs())


def pseudo_label_dir(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Y^b folder: ``--pseudo-labels`` or the built-in CAM baseline's ``RUN/wsss`` (local or URI)."""
    return config_path(cfg.data.pseudo_labels) or run_dir / "wsss"


def uss_checkpoint(run_dir: AnyPath) -> AnyPath:
    """``RUN/uss/checkpoint.pt``: the learned extractor's weights when ``features.checkpoint`` is empty."""
    return run_dir / USS_DIR / USS_CHECKPOINT


def feature_source_kwargs(cfg: C.Config, run_dir: AnyPath, *, absolute: bool = False) -> dict[str, Any]:
    """How to build the ``FeatureSource`` for this run (``features`` and ``debias``).

    As written, the dict is part of the ``features`` key (paths as the config names them). With
    ``absolute`` every path in it is absolute: what Ray actors get, whatever their working directory.
    """
    def where(p: "str | AnyPath") -> str:
        return storage.absolute(p) if absolute else str(p)

    if cfg.data.features_dir:
        return {"features_dir": where(cfg.data.features_dir)}
    kwargs: dict[str, Any] = {}
    checkpoint: "str | AnyPath" = cfg.features.checkpoint
    if not checkpoint and cfg.features.extractor == "stego":
        checkpoint = uss_checkpoint(run_dir)
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
    check_label_folder(dataset, cfg.data.split, pseudo_label_dir(cfg, run_dir), name="pseudo label")
    features_dir = config_path(cfg.data.features_dir)
    if features_dir is not None:
        check_feature_folder(features_dir, dataset.ids(cfg.data.split))
    return dataset


__all__ = ["USS_CHECKPOINT", "actor_source_kwargs", "config_path", "open_dataset", "feature_source_fingerprint", "feature_source_kwargs",
           "pseudo_label_dir", "uss_checkpoint", "validate_inputs"]
