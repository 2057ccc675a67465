"""Stage ``debias``: debiased labels Y^db (Eq 4–5) as PNGs, one per image id.

Ray Data shards the ids over an actor pool; each actor loads V^c and its feature source once. Per
image: M = ReLU(max over the image's classes C_I of cos(F, V^c)) (Eq 4; C_I from the image-level
labels when the dataset has them, else the classes present in Y^b — the log says which), dense-CRF
refinement (its bilateral width scaled to the image's size: ``debias.crf_reference_side``) and
binarisation (our choice, ``debias.threshold`` and the CRF's unary ``debias.crf_unary``: the paper
says only "refinement (e.g. CRF)"), then foreground pixels of Y^b with M^db = 0 become BIASED (254) (Eq 5). Images whose Y^b has a
class their image-level labels lack are counted (one warning, ``stats.json``), not refused. PNGs are written
by the actors themselves with deterministic names (temp + rename locally, one upload on an object
store), so a retried task overwrites cleanly and a resumed run skips the ids already written (each
actor lists the folder once). Output: ``RUN/debias/{id}.png`` and ``RUN/debias/stats.json``
(foreground / biased pixel counts, in total and per class, and the images with the largest share
of biased pixels). ``RUN``, the dataset and the pseudo labels may be local or object-store URIs
(``mars_ray.storage``).
"""

from __future__ import annotations

import heapq
import logging
from typing import Any, Sequence

import numpy as np
import torch

from mars_ray import config as C
from mars_ray import storage
from mars_ray.algo.crf import scale_kernels
from mars_ray.algo.debias import activation_map, binarize_activation, debias_label
from mars_ray.artifacts import StageDir, atomic_write_json, current, fingerprint_path, load_npy, require_complete
from mars_ray.data.label_io import read_image, read_label, write_label
from mars_ray.data.validate import check_label
from mars_ray.data.voc import VOCDataset
from mars_ray.features import FeatureSource, find_feature_file
from mars_ray.labels import BIASED, MAX_CLASSES
from mars_ray.stages import inputs
from mars_ray.stages.plan import feature_gpus
from mars_ray.stages.runtime import ensure_ray, map_images
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

_EXECUTION_KEYS = {"num_actors", "cpus_per_actor", "gpus_per_actor", "batch_size"}  # how the labels are computed, not what
MOST_BIASED = 16  # images with the largest share of biased pixels kept in stats.json, for the report
DISAGREE_EXAMPLES = 10  # images whose Y^b and image-level labels disagree, named in stats.json


def pseudo_classes(pseudo: np.ndarray) -> list[int]:
    """Foreground class ids present in a pseudo label ``[H, W]`` (1..253; 254/255 are not classes)."""
    return [int(c) for c in np.unique(pseudo) if 1 <= c <= MAX_CLASSES]


def debias_one(
    image: np.ndarray,
    pseudo: np.ndarray,
    feats: np.ndarray,
    centroids: np.ndarray,
    present: np.ndarray,
    *,
    threshold: float,
    crf: dict[str, float] | None,
    image_classes: Sequence[int] | None = None,
    crf_reference_side: float = 0.0,
    crf_unary: str = "symmetric",
) -> np.ndarray:
    """Y^b ``[H, W]`` uint8 + F ``[d, H, W]`` + V ``[C+1, d]`` → Y^db ``[H, W]`` uint8 (Eq 4–5).

    Eq 4's max runs over the image's classes C_I: ``image_classes`` (its image-level labels) when
    given, else the classes present in Y^b. A class of Y^b that the image-level labels lack takes no
    part in Eq 4: its pixels are removed unless another class's centroid activates them. A class of
    C_I without a debiased centroid (never seen in the split the centroids came from) cannot be
    judged and its pixels are kept as they are. ``crf_reference_side`` > 0: the CRF's bilateral width
    is scaled to this image's size (``algo.crf.scale_kernels``).
    """
    in_pseudo = pseudo_classes(pseudo)
    classes = in_pseudo if image_classes is None else sorted({int(c) for c in image_classes})
    known = [c for c in classes if c < len(present) and present[c]]
    activation = activation_map(feats, centroids[known])
    if crf is not None:
        crf = scale_kernels(crf, image.shape[:2], crf_reference_side)
    keep = binarize_activation(activation, threshold=threshold, image=image, crf=crf, unary=crf_unary)
    unknown = [c for c in classes if c not in known and c in in_pseudo]
    if unknown:
        keep |= np.isin(pseudo, unknown)
    return debias_label(pseudo, keep)


class DebiasImages:
    """Ray Data callable: a batch of image ids → Y^db PNGs written; returns per-image pixel counts."""

    def __init__(
        self,
        *,
        dataset: dict[str, Any],
        pseudo_dir: str,
        out_dir: str,
        select_dir: str,
        source_kwargs: dict[str, Any],
        threshold: float,
        crf: dict[str, float] | None,
        skip_existing: bool,
        image_labels: bool = False,
        threads: int = 1,
        crf_reference_side: float = 0.0,
        crf_unary: str = "symmetric",
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.dataset = VOCDataset(**dataset)
        # C_I of Eq 4: the image-level labels (the driver has checked them for the split), else Y^b's classes
        self.image_labels = self.dataset.image_label_table() if image_labels else None
        self.pseudo_dir = upath(pseudo_dir)
        self.out_dir = upath(out_dir)
        select = upath(select_dir)
        self.centroids = load_npy(select / "centroids.npy")
        self.present = load_npy(select / "present.npy")
        self.source = FeatureSource(**source_kwargs)
        self.threshold = threshold
        self.crf = crf
        self.crf_reference_side = crf_reference_side
        self.crf_unary = crf_unary
        self.skip_existing = skip_existing
        # resuming: the labels written before this run, from one listing (not a request per id)
        self.written: frozenset[str] = frozenset(storage.list_files(self.out_dir)) if skip_existing else frozenset()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ids → ``n_fg``/``n_biased``/``n_pixels`` ``[B]``; ``fg_per_class``/``biased_per_class`` ``[B, C+1]``;
        ``disagree`` ``[B]`` str: the classes of Y^b the image-level labels lack ("3,5"; "" when none)."""
        ids = [str(i) for i in batch["image_id"]]
        n = self.dataset.num_classes + 1
        counts = [self._one(i) for i in ids]
        fg = np.stack([c[0] for c in counts]) if ids else np.zeros((0, n), np.int64)
        biased = np.stack([c[1] for c in counts]) if ids else np.zeros((0, n), np.int64)
        return {"image_id": np.array(ids), "n_fg": fg.sum(axis=1), "n_biased": biased.sum(axis=1),
                "n_pixels": np.array([c[2] for c in counts], np.int64), "fg_per_class": fg, "biased_per_class": biased,
                "disagree": np.array([c[3] for c in counts], dtype=str)}

    def _one(self, image_id: str) -> tuple[np.ndarray, np.ndarray, int, str]:
        """Per-class foreground and biased pixel counts ``[C+1]`` of one image, its pixel count, and
        the classes of its Y^b that its image-level labels lack (comma-separated, "" for none)."""
        out = self.out_dir / f"{image_id}.png"
        label_path = self.pseudo_dir / f"{image_id}.png"
        pseudo = read_label(label_path)
        image_classes = None if self.image_labels is None else self.image_labels.get(image_id)
        disagree = "" if image_classes is None else ",".join(
            str(c) for c in pseudo_classes(pseudo) if c not in image_classes)
        if self.skip_existing and out.name in self.written:
            debiased = read_label(out)
        else:
            image = read_image(self.dataset.image_path(image_id))
            check_label(pseudo, num_classes=self.dataset.num_classes, image_hw=image.shape[:2], path=label_path)
            feats = self.source(image_id, image)
            if feats.shape[0] != self.centroids.shape[1]:
                where = (str(find_feature_file(self.source.features_dir, image_id)) if self.source.features_dir
                         else f"features of {image_id}")
                raise ValueError(
                    f"{where}: feature dimension {feats.shape[0]}, but the selected centroids have d={self.centroids.shape[1]}"
                )
            debiased = debias_one(image, pseudo, feats, self.centroids, self.present, threshold=self.threshold,
                                  crf=self.crf, image_classes=image_classes,
                                  crf_reference_side=self.crf_reference_side, crf_unary=self.crf_unary)
            write_label(out, debiased)
        is_fg = (pseudo >= 1) & (pseudo <= MAX_CLASSES)
        n = self.dataset.num_classes + 1  # check_label (or the earlier run) bounds the pseudo classes by C
        return (np.bincount(pseudo[is_fg], minlength=n)[:n].astype(np.int64),
                np.bincount(pseudo[is_fg & (debiased == BIASED)], minlength=n)[:n].astype(np.int64), int(pseudo.size),
                disagree)


def check_feature_source(cfg: C.Config, run_dir: AnyPath) -> None:
    """F must be what the ``features`` stage clustered: with external features (``data.features_dir``)
    the folder's fingerprint must equal the one in the features manifest; with fitted adaptive statistics
    the file's digest (``check_adaptive_stats``). ``ValueError`` naming the folder or file otherwise."""
    if cfg.data.features_dir:
        folder = inputs.config_path(cfg.data.features_dir)
        recorded = (require_complete(run_dir / "features", "features").get("inputs") or {}).get("features_dir")
        now = inputs.feature_source_fingerprint({"features_dir": cfg.data.features_dir})["features_dir"]
        if recorded is not None and now != recorded:
            raise ValueError(f"{folder}: external features changed since the features stage clustered them "
                             "(files added, removed or rewritten); rerun `mars features`")
        return
    check_adaptive_stats(cfg, run_dir)


def check_adaptive_stats(cfg: C.Config, run_dir: AnyPath) -> None:
    """With statistics the ``features`` stage fitted, the file debias loads must hold exactly what the
    features were clustered with (its digest is in the features manifest): both stages then compute
    the same F. ``ValueError`` naming the file otherwise (replaced or corrupt after the stage ran)."""
    if not inputs.fits_adaptive_stats(cfg):
        return
    from mars_ray.models.adaptive import AdaptiveStats

    path = inputs.adaptive_stats_path(run_dir)
    recorded = ((require_complete(run_dir / "features", "features").get("outputs") or {}).get("uss_stats_digest"))
    digest = AdaptiveStats.load(path).digest
    if digest != recorded:
        raise ValueError(f"{path}: adaptive statistics (digest {digest[:12]}) are not the ones the features stage "
                         f"clustered with ({str(recorded)[:12]}); rerun `mars features`")


def class_source(cfg: C.Config, run_dir: AnyPath, *, check: bool = False) -> dict[str, str]:
    """Where Eq 4 takes each image's classes C_I from (``inputs.image_class_source``)."""
    return inputs.image_class_source(cfg, run_dir, inputs.open_dataset(cfg), check=check)


def debias_kwargs(cfg: C.Config, run_dir: AnyPath, dataset: VOCDataset, *, out_dir: AnyPath, select_dir: AnyPath,
                  skip_existing: bool, image_labels: bool) -> dict[str, Any]:
    """The keyword arguments of :class:`DebiasImages` for this run (absolute paths, plain values);
    ``image_labels``: C_I from the dataset's image-level labels (``class_source``'s kind)."""
    d = cfg.debias
    return dict(
        dataset=dataset.spec(),
        pseudo_dir=storage.absolute(inputs.pseudo_label_dir(cfg, run_dir)),
        out_dir=storage.absolute(out_dir),
        select_dir=storage.absolute(select_dir),
        source_kwargs=inputs.actor_source_kwargs(cfg, run_dir, d.gpus_per_actor),
        threshold=d.threshold,
        crf=d.crf_kwargs(),
        crf_reference_side=d.crf_reference_side,
        crf_unary=d.crf_unary,
        skip_existing=skip_existing,
        image_labels=image_labels,
        threads=max(1, int(d.cpus_per_actor)),
    )


def stage_dir(cfg: C.Config, run_dir: AnyPath) -> StageDir:
    """``RUN/debias`` and its key: the debias slice, where C_I comes from, and the keys of the finished
    select and features artifacts (the features key already fingerprints Y^b, F and the dataset,
    image-level labels included when the features were computed; the labels' own fingerprint is here
    too, as they may change later)."""
    upstream = require_complete(run_dir / "select", "select")
    feats = require_complete(run_dir / "features", "features")
    d = cfg.debias
    source = class_source(cfg, run_dir)
    source_kwargs = inputs.feature_source_kwargs(cfg, run_dir, absolute=True)
    if inputs.fits_adaptive_stats(cfg):  # the features artifact's own stats file: its digest is in the features key
        source_kwargs = {"extractor": source_kwargs["extractor"], "extractor_kwargs": {}}
    slice_ = {  # F is recomputed here: its source is part of the key, as are Y^b's folder and the dataset
        "debias": {k: v for k, v in C.to_dict(d).items() if k not in _EXECUTION_KEYS},
        "data": inputs.dataset_key(cfg, [cfg.data.split]),
        "pseudo_labels": storage.absolute(inputs.pseudo_label_dir(cfg, run_dir)),
        "source": source_kwargs,
        "image_classes": source["kind"],
    }
    fingerprints = {"select": upstream["key"], "features": feats["key"]}
    if source["kind"] == "image_labels":  # they may change after the features were computed
        fingerprints["image_labels"] = fingerprint_path(upath(source["path"]))
        slice_["image_labels_difficult"] = cfg.data.image_labels_difficult
    return StageDir(run_dir / "debias", "debias", C.slice_hash(slice_, fingerprints), slice_, fingerprints)


def run(cfg: C.Config, run_dir: AnyPath) -> AnyPath:
    """Write ``RUN/debias/{id}.png`` for every id of the split; returns the folder.

    Needs finished ``features`` and ``select`` artifacts (``FileNotFoundError`` naming the stage to
    run); their inputs are not checked again: each label is checked as its actor reads it.
    """
    sd = stage_dir(cfg, run_dir)
    dataset = inputs.open_dataset(cfg)
    if sd.is_complete():
        logger.info("debias: up to date in %s, skipping", sd.path)
        return sd.root
    check_feature_source(cfg, run_dir)
    source = class_source(cfg, run_dir, check=True)  # bad image-level labels: named before any output changes
    logger.info("debias: each image's classes C_I (Eq 4) from %s", inputs.describe_class_source(source))
    with sd.guard() as resuming:
        ensure_ray(cfg.ray)
        ids = dataset.ids(cfg.data.split)
        d = cfg.debias
        ds = map_images(
            ids,
            DebiasImages,
            debias_kwargs(cfg, run_dir, dataset, out_dir=sd.path, select_dir=current(run_dir / "select"),
                          skip_existing=resuming, image_labels=source["kind"] == "image_labels"),
            num_actors=d.num_actors,
            cpus_per_actor=d.cpus_per_actor,
            gpus_per_actor=feature_gpus(cfg, d.gpus_per_actor),
            batch_size=d.batch_size,
        )
        n_images = n_fg = n_biased = 0
        fg_c = biased_c = np.zeros(dataset.num_classes + 1, np.int64)
        top: list[tuple[float, str, int]] = []  # (biased share of the image, id, biased pixels), a min-heap
        n_disagree, disagree_examples = 0, []  # images whose Y^b has a class their image-level labels lack
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            for i, missing in zip(batch["image_id"], batch["disagree"]):
                if missing:
                    n_disagree += 1
                    if len(disagree_examples) < DISAGREE_EXAMPLES:
                        disagree_examples.append({"image_id": str(i), "classes": [int(c) for c in str(missing).split(",")]})
            n_images += len(batch["image_id"])
            n_fg += int(batch["n_fg"].sum())
            n_biased += int(batch["n_biased"].sum())
            fg_c = fg_c + batch["fg_per_class"].sum(axis=0)
            biased_c = biased_c + batch["biased_per_class"].sum(axis=0)
            for i, b, p in zip(batch["image_id"], batch["n_biased"], batch["n_pixels"]):
                if b:
                    heapq.heappush(top, (int(b) / int(p), str(i), int(b)))
                    if len(top) > MOST_BIASED:
                        heapq.heappop(top)
        stats = {
            "images": n_images,
            "foreground_pixels": n_fg,
            "biased_pixels": n_biased,
            "biased_fraction": n_biased / n_fg if n_fg else 0.0,
            "resumed": resuming,
            "image_classes": source["kind"],  # where Eq 4's C_I came from (the log names the file)
            "image_label_disagreements": {"images": n_disagree, "examples": disagree_examples},
            "per_class": {  # classes present in the pseudo labels: the share of their pixels removed
                dataset.classes[c]: {"class_id": c, "foreground_pixels": int(fg_c[c]),
                                     "biased_pixels": int(biased_c[c]), "biased_fraction": float(biased_c[c] / fg_c[c])}
                for c in range(1, dataset.num_classes + 1) if fg_c[c]
            },
            "most_biased": [{"image_id": i, "biased_pixels": b, "biased_share": share}  # the report's image grid
                            for share, i, b in sorted(top, reverse=True)],
        }
        atomic_write_json(sd.path / "stats.json", stats)
        sd.finish(stats)
    if n_disagree:
        logger.warning(
            "debias: %d of %d images have a pseudo-label class their image-level labels lack (e.g. %s: classes %s); "
            "Eq 4 ignores those classes, so their pixels were removed unless another class's centroid kept them "
            "(all counted in %s)", n_disagree, n_images, disagree_examples[0]["image_id"],
            disagree_examples[0]["classes"], sd.path / "stats.json")
    logger.info("debias: %d images, %.1f%% of pseudo-label foreground marked biased", n_images, 100 * stats["biased_fraction"])
    return sd.root
