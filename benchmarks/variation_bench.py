"""What a USS's debiasing loses when a class's appearance varies *between images* of one dataset.

Every generated dataset we benchmark on (``quality_bench``, ``quality_lab``, the two hold-outs)
draws all images at one size, in colour, with each class's textures at fixed wavelengths. Real
datasets are not like that: an object's apparent texture scale changes with its distance, some
images are greyscale, a texture's orientation is not fixed. Eq 3 averages each class's chosen
centroids into ONE V^c, and Eq 4 keeps a pixel only where cos(F, V^c) is high, so a USS whose
embedding of a class moves with such nuisances keeps the class's majority appearance and removes
the rest. This benchmark measures how much, per extractor, on copies of three base datasets in
which only one nuisance changes:

* ``none``: the base dataset as generated;
* ``scale``: each image (and its labels) resized by a factor drawn from {0.75, 1, 1.3, 1.6};
* ``aspect``: each image's width stretched by {0.7, 1, 1.4} (textures' orientations and periods
  change along one axis);
* ``grey``: every fifth image converted to greyscale (then stored as RGB again);
* ``rot90``: each image (and its labels) turned by 90° with probability ½ (lossless);
* ``sizes``: not a copy of the base but the base's generator drawing a third of the images at each
  of 0.75, 1 and 1.5 × its 96 px side (``mixed_sizes``): image sizes vary, texture periods stay
  in pixels and objects scale with the image — what a dataset of mixed resolutions drawn by one
  process looks like, unlike ``scale``, which resamples textures.

Base datasets: ``default`` (the built-in generator's texture cue, 4 classes, PNG), ``both-6-jpg``
(``make-dataset --cue both --n-classes 6 --image-format jpg``) and ``holdout-A``
(``benchmarks/holdout_data.py``, colour cue, generated independently of the project). Each has 60
training images. Extractors: ``adaptive`` (fitted on the perturbed split as the ``features``
stage fits it: median short side) and ``texture`` (fixed). Per row: pseudo and debiased mIoU,
removal recall, retention, target-centroid ratio, and how many classes the ground-truth-free
separation warning (``select/report.json``, ``algo.separation``) flags — the warning a user sees.

    python benchmarks/variation_bench.py [--bases default,both-6-jpg,holdout-A]
        [--variations none,scale,aspect,grey,rot90,sizes] [--extractors adaptive,texture]
        [--work DIR] [--out benchmarks/results/variation_bench] [--ablation NAME] [--smoke-test]

``--ablation NAME`` fits the adaptive extractor with one of ``benchmarks/adaptive_ablation.py``'s
changes (e.g. ``codebooks-x2``), so a candidate design is measured on these nuisances too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_lab as QL  # noqa: E402

from mars_ray.algo.separation import SEPARATION_THRESHOLD  # noqa: E402
from mars_ray.config import DebiasConfig  # noqa: E402
from mars_ray.data.label_io import read_image, read_label  # noqa: E402
from mars_ray.data.synthetic import make_biased_dataset  # noqa: E402
from mars_ray.stages.features import is_greyscale  # noqa: E402
from mars_ray.data.voc import VOCDataset  # noqa: E402
from mars_ray.quality import LabelQuality, debias_in_process  # noqa: E402

BASES: dict[str, Callable[[Path, int], Path]] = {
    "default": lambda root, n: make_biased_dataset(root, n_train=n, n_val=2, seed=31),
    "both-6-jpg": lambda root, n: make_biased_dataset(root, n_train=n, n_val=2, cue="both", n_classes=6,
                                                      image_format="jpg", seed=7),
    "holdout-A": lambda root, n: __import__("holdout_data").make_holdout(root, "A", n_train=n, n_val=2),
}
#: each base drawn by its own generator at a given image side (px) and seed: the ``sizes`` variation
BASES_AT: dict[str, Callable[[Path, int, int, int], Path]] = {
    "default": lambda root, n, side, k: make_biased_dataset(root, n_train=n, n_val=1, size=side, seed=31 + 100 * k),
    "both-6-jpg": lambda root, n, side, k: make_biased_dataset(root, n_train=n, n_val=1, size=side, cue="both",
                                                               n_classes=6, image_format="jpg", seed=7 + 100 * k),
    "holdout-A": lambda root, n, side, k: __import__("holdout_data").make_holdout(root, "A", n_train=n, n_val=1,
                                                                                  seed=k, size=(side, side)),
}
SIZE_FACTORS = (0.75, 1.0, 1.5)
VARIATIONS = ("none", "scale", "aspect", "grey", "rot90", "sizes")
LABEL_DIRS = ("SegmentationClass", "pseudo_labels")


def perturb(src: Path, dst: Path, variation: str, seed: int = 0) -> Path:
    """Copy dataset ``src`` to ``dst`` with ``variation`` applied to its images and their label maps."""
    if variation == "sizes":
        raise ValueError("variation 'sizes' draws new images rather than changing a copy: use mixed_sizes")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    if variation == "none":
        return dst
    ds = VOCDataset(dst)
    ids = [i for split in ("train", "val") for i in ds.ids(split)]
    for k, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, k])
        img_path = Path(ds.image_path(image_id))
        label_paths = [dst / d / f"{image_id}.png" for d in LABEL_DIRS]
        im = Image.open(img_path).convert("RGB")
        labels = [Image.open(p) for p in label_paths]
        w, h = im.size
        if variation in ("scale", "aspect"):
            f = float(rng.choice([0.75, 1.0, 1.3, 1.6])) if variation == "scale" else 1.0
            a = float(rng.choice([0.7, 1.0, 1.4])) if variation == "aspect" else 1.0
            size = (max(8, round(w * f * a)), max(8, round(h * f)))
            im = im.resize(size, Image.BILINEAR)
            labels = [lab.resize(size, Image.NEAREST) for lab in labels]
        elif variation == "grey":
            if k % 5 == 0:
                im = im.convert("L").convert("RGB")
        elif variation == "rot90":
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.ROTATE_90)
                labels = [lab.transpose(Image.Transpose.ROTATE_90) for lab in labels]
        else:
            raise ValueError(f"unknown variation {variation!r}; choose from {', '.join(VARIATIONS)}")
        im.save(img_path, **({"quality": 90} if img_path.suffix.lower() in (".jpg", ".jpeg") else {}))
        for lab, p in zip(labels, label_paths):
            lab.save(p)
    return dst


def mixed_sizes(base: str, dst: Path, n: int, seed: int = 0) -> Path:
    """Dataset ``dst``: a third of ``n`` images of ``base`` drawn at each of ``SIZE_FACTORS`` × its 96 px
    side by its own generator (not resampled: texture periods stay in pixels, objects scale with the
    image), ids prefixed ``s<k>_``, lists, image-level labels and classes merged."""
    if dst.exists():
        shutil.rmtree(dst)
    parts = []
    for k, f in enumerate(SIZE_FACTORS):
        part = dst.parent / f"{dst.name}.part{k}"
        if part.exists():
            shutil.rmtree(part)
        parts.append(BASES_AT[base](part, max(1, n // len(SIZE_FACTORS)), round(96 * f), seed * 10 + k))
    (dst / "ImageSets" / "Segmentation").mkdir(parents=True)
    shutil.copy(parts[0] / "classes.txt", dst / "classes.txt")
    labels: dict[str, Any] = {}
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for k, part in enumerate(parts):
        if (part / "classes.txt").read_text() != (dst / "classes.txt").read_text():
            raise ValueError(f"{part}: classes differ from {parts[0]}")
        for sub in ("JPEGImages", "SegmentationClass", "pseudo_labels"):
            (dst / sub).mkdir(exist_ok=True)
            for f in (part / sub).iterdir():
                shutil.copy(f, dst / sub / f"s{k}_{f.name}")
        for split in lists:
            lists[split] += [f"s{k}_{i}" for i in (part / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()]
        labels.update({f"s{k}_{i}": v for i, v in json.loads((part / "image_labels.json").read_text()).items()})
        shutil.rmtree(part)
    for split, ids in lists.items():
        (dst / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (dst / "image_labels.json").write_text(json.dumps(labels, sort_keys=True))
    return dst


def source(extractor: str, root: Path, seed: int) -> Callable[[str, np.ndarray], np.ndarray]:
    """The extractor as the pipeline builds it; ``adaptive`` fitted on the split at its median short side."""
    if extractor != "adaptive":
        return QL.extractor(extractor, root, seed, False)[0]
    from mars_ray.models.adaptive import AdaptiveExtractor, fit_adaptive_stats

    images = list(QL._images(root))
    short = int(np.median([min(im.shape[:2]) for im in images]))
    return QL._source(AdaptiveExtractor(fit_adaptive_stats(images, short_side=short, seed=seed)).eval())


def run_one(base: str, variation: str, extractor: str, work: Path, n: int, seed: int) -> dict[str, Any]:
    base_root = work / "base" / base
    if not (base_root / "classes.txt").is_file():
        BASES[base](base_root, n)
    root = work / "var" / f"{base}-{variation}"
    if not (root / "classes.txt").is_file():
        if variation == "sizes":
            mixed_sizes(base, root, n, seed)
        else:
            perturb(base_root, root, variation, seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as labels:
        res = debias_in_process(root, source(extractor, root, seed), crf=DebiasConfig().crf_kwargs(), seed=seed,
                                write_dir=labels)
        split = retention_grey_vs_colour(root, Path(labels)) if variation == "grey" else {}
    row = {"base": base, "variation": variation, "extractor": extractor, **res.row(), **split,
           "flagged": sum(1 for s in res.separation.values() if np.isfinite(s["score"])
                          and s["score"] < SEPARATION_THRESHOLD),
           "classes": len(res.separation), "seconds": round(time.perf_counter() - t0, 1)}
    row["gain"] = row["debiased_miou"] - row["pseudo_miou"]
    row["targets"] = QL.targets(row)
    return row


def retention_grey_vs_colour(root: Path, debiased: Path) -> dict[str, float]:
    """Retention (``mars_ray.quality.LabelQuality``'s) on the train split's grey images and on its colour
    ones, apart: ``retention_grey_images`` / ``retention_colour_images``."""
    ds = VOCDataset(root)
    quality = {kind: LabelQuality(ds.num_classes) for kind in ("grey", "colour")}
    for i in ds.ids("train"):
        kind = "grey" if is_greyscale(read_image(ds.image_path(i))) else "colour"
        quality[kind].update(read_label(root / "pseudo_labels" / f"{i}.png"), read_label(debiased / f"{i}.png"),
                             read_label(ds.gt_path(i)))
    return {f"retention_{kind}_images": q.compute()["retention"] for kind, q in quality.items()}


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| base | variation | extractor | pseudo | debiased | gain | removal | retention | target ratio | "
           "classes flagged | targets |", "|" + "---|" * 11]
    for r in rows:
        out.append(f"| {r['base']} | {r['variation']} | {r['extractor']} | {100 * r['pseudo_miou']:.1f} | "
                   f"{100 * r['debiased_miou']:.1f} | {100 * r['gain']:+.1f} | {r['removal_recall']:.2f} | "
                   f"{r['retention']:.2f} | {r['target_ratio']:.2f} | {r['flagged']}/{r['classes']} | {r['targets']} |")
    return "\n".join(out)


def grey_note(rows: list[dict[str, Any]]) -> str:
    """The 'grey' rows' retention on the grey images and on the colour ones, apart (markdown lines)."""
    lines = [f"* {r['base']}, {r['extractor']}: retention {r['retention_grey_images']:.2f} on the grey images, "
             f"{r['retention_colour_images']:.2f} on the colour ones" for r in rows if "retention_grey_images" in r]
    return ("\n'grey' rows, retention on the greyscale images and on the others:\n\n" + "\n".join(lines) + "\n"
            if lines else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", default=",".join(BASES))
    ap.add_argument("--variations", default=",".join(VARIATIONS))
    ap.add_argument("--extractors", default="adaptive,texture")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mars_variation_bench"))
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json (rows) and OUT.md (table)")
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ablation", default="shipped",
                    help="fit the adaptive extractor with this change of benchmarks/adaptive_ablation.py (default: as shipped)")
    ap.add_argument("--smoke-test", action="store_true", help="one 12-image base, two variations, adaptive only")
    a = ap.parse_args()
    import adaptive_ablation as AA  # noqa: PLC0415 - imported when run, not when a test imports this module

    bases = ["default"] if a.smoke_test else [b for b in a.bases.split(",") if b]
    variations = ["none", "scale"] if a.smoke_test else [v for v in a.variations.split(",") if v]
    extractors = ["adaptive"] if a.smoke_test else [e for e in a.extractors.split(",") if e]
    bad = [b for b in bases if b not in BASES] + [v for v in variations if v not in VARIATIONS]
    if bad:
        ap.error(f"unknown base(s)/variation(s) {bad}; bases: {', '.join(BASES)}; variations: {', '.join(VARIATIONS)}")
    if a.ablation not in AA.ABLATIONS:
        ap.error(f"unknown ablation {a.ablation!r}; choose from {', '.join(AA.ABLATIONS)}")
    torch.set_num_threads(a.threads)
    work = a.work / ("smoke" if a.smoke_test else "full")
    n = 12 if a.smoke_test else a.n_train
    fitted = "" if a.ablation == "shipped" else f"adaptive extractor fitted with the ablation `{a.ablation}`; "
    rows = []
    with AA.ABLATIONS[a.ablation]():
        for base in bases:
            for variation in variations:
                for ex in extractors:
                    rows.append(run_one(base, variation, ex, work, n, a.seed))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
                    if a.out:
                        a.out.parent.mkdir(parents=True, exist_ok=True)
                        a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
                        a.out.with_suffix(".md").write_text(
                            "# variation_bench\n\nOne nuisance varied between the images of a dataset (module "
                            f"docstring); {fitted}{n} training images per base; targets: gain >= 8, removal >= 0.80, "
                            "retention >= 0.90.\n\n" + table(rows) + "\n" + grey_note(rows))
    print()
    print(table(rows))
    print(grey_note(rows), end="")


if __name__ == "__main__":
    main()
