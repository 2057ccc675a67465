"""``mars dump-features``: USS features F of a split → ``OUT/{id}.npz`` (float16), for sharing features.

Each file holds one array named ``features``, ``float16 [d, h, w]`` at the extractor's own resolution
(not upsampled), the layout ``--features-dir`` reads (``mars_ray.features.load_feature_file``), so a
run pointed at the folder gets the same F as the extractor, within float16 rounding. A Ray Data actor
pool (``runtime.map_images``) builds the extractor once per actor; files are written to a temporary
name and renamed, and a rerun skips the ids already written. ``OUT/features.json`` records the
extractor, checkpoint, dtype, dimension and split.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch

from mars_ray import config as C
from mars_ray import storage
from mars_ray.artifacts import atomic_write_json
from mars_ray.data.label_io import read_image
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource
from mars_ray.stages.runtime import ensure_ray, map_images
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

INFO = "features.json"
FP16_MAX = float(np.finfo(np.float16).max)


def to_fp16(features: np.ndarray, where: str) -> np.ndarray:
    """float32 ``[d, h, w]`` → float16; ``ValueError`` naming ``where`` when a value overflows float16."""
    peak = float(np.abs(features).max()) if features.size else 0.0
    if not np.isfinite(peak) or peak > FP16_MAX:
        raise ValueError(f"{where}: features reach {peak:g}, beyond float16's {FP16_MAX:g}; they cannot be dumped as float16")
    return features.astype(np.float16)


class DumpFeatures:
    """Ray Data callable: a batch of image ids → ``{id}.npz`` written; returns each id's ``[d, h, w]``."""

    def __init__(self, *, dataset: dict[str, Any], out_dir: str, source_kwargs: dict[str, Any], skip_existing: bool,
                 threads: int = 1) -> None:
        torch.set_num_threads(max(1, threads))
        self.dataset = VOCDataset(**dataset)
        self.out_dir = upath(out_dir)
        self.source = FeatureSource(**source_kwargs)
        self.existing = set(storage.list_files(self.out_dir)) if skip_existing else set()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        shapes = np.array([self._one(i) for i in ids], np.int64).reshape(-1, 3)
        return {"image_id": np.array(ids), "dim": shapes[:, 0], "h": shapes[:, 1], "w": shapes[:, 2]}

    def _one(self, image_id: str) -> tuple[int, int, int]:
        name = f"{image_id}.npz"
        if name in self.existing:
            return (-1, -1, -1)
        feats = to_fp16(self.source.native(image_id, read_image(self.dataset.image_path(image_id))),
                        f"features of {image_id!r}")
        buf = io.BytesIO()
        np.savez(buf, features=feats)
        with storage.atomic_open(self.out_dir / name) as f:
            f.write(buf.getvalue())
        return tuple(int(v) for v in feats.shape)  # type: ignore[return-value]


def source_kwargs(cfg: C.Config) -> dict[str, Any]:
    """The extractor to dump: ``features.extractor`` (+ ``features.checkpoint``; ``stego`` needs one)."""
    if cfg.data.features_dir:
        raise ValueError("dump-features computes features with features.extractor; "
                         f"data.features_dir ({cfg.data.features_dir}) already holds dumped ones")
    kwargs: dict[str, Any] = {}
    if cfg.features.checkpoint:
        kwargs["checkpoint"] = cfg.features.checkpoint
    elif cfg.features.extractor == "stego":
        raise ValueError("features.extractor=stego needs features.checkpoint "
                         "(RUN/uss/checkpoint.pt, or a file from `mars import-uss`)")
    elif cfg.features.extractor == "adaptive":
        raise ValueError("features.extractor=adaptive needs features.checkpoint: the statistics a features stage "
                         "fitted (RUN/features/uss_stats.npz), or features.extractor=texture")
    return {"extractor": cfg.features.extractor, "extractor_kwargs": kwargs}


def dump_features(cfg: C.Config, out: "str | AnyPath", *, overwrite: bool = False) -> dict[str, Any]:
    """Write the features of ``cfg.data.split`` into ``out``; returns the ``features.json`` content.

    Raises ``ValueError`` / ``FileNotFoundError`` for a missing dataset, split or checkpoint before
    any actor starts; an extractor whose values overflow float16 fails naming the image.
    """
    if not cfg.data.root:
        raise ValueError("no dataset: pass --data ROOT")
    skw = source_kwargs(cfg)
    FeatureSource(**skw)  # builds the extractor once here: an unknown name or a bad checkpoint fails now
    ds = VOCDataset(cfg.data.root, **cfg.data.dataset_kwargs())
    ids = ds.ids(cfg.data.split)
    for i in ids:
        ds.image_path(i)
    folder = upath(out)
    folder.mkdir(parents=True, exist_ok=True)
    ensure_ray(cfg.ray)
    f = cfg.features
    result = map_images(
        ids, DumpFeatures,
        dict(dataset=ds.spec(), out_dir=storage.absolute(folder), source_kwargs=skw,
             skip_existing=not overwrite, threads=max(1, int(f.cpus_per_actor))),
        num_actors=f.num_actors, cpus_per_actor=f.cpus_per_actor, batch_size=f.batch_size)
    written, dims = 0, set()
    for batch in result.iter_batches(batch_size=1024, batch_format="numpy"):
        done = batch["dim"] >= 0
        written += int(done.sum())
        dims.update(int(d) for d in batch["dim"][done])
    if len(dims) > 1:
        raise ValueError(f"{folder}: the extractor gave features of several dimensions {sorted(dims)}")
    info = {"extractor": skw["extractor"], "checkpoint": skw["extractor_kwargs"].get("checkpoint"),
            "dtype": "float16", "array": "features", "layout": "[d, h, w]", "dim": dims.pop() if dims else None,
            "data": storage.absolute(cfg.data.root), "split": cfg.data.split, "images": len(ids),
            "written": written, "skipped": len(ids) - written}
    previous = folder / INFO
    if info["dim"] is None and previous.is_file():  # a rerun that skipped everything keeps the known dim
        import json

        info["dim"] = json.loads(previous.read_text()).get("dim")
    atomic_write_json(folder / INFO, info)
    logger.info("dump-features: %d of %d images of split %r written (%d already there) → %s", written, len(ids),
                cfg.data.split, len(ids) - written, folder)
    return info


__all__ = ["DumpFeatures", "dump_features", "source_kwargs", "to_fp16"]
