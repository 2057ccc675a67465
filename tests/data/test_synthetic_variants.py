"""Variants of the built-in dataset (``make_biased_dataset``'s cue, size, format, classes, bias share).

The defaults must keep writing the original dataset byte for byte: the digests below were computed
with the generator as it was before the variants existed (commit a356e37).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.synthetic import MAX_SYNTHETIC_CLASSES, PSEUDO_DIR, SYNTHETIC_CLASSES, class_names, make_biased_dataset
from mars_ray.data.validate import check_label_folder
from mars_ray.data.voc import VOCDataset


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


# sha256 over (relative path, bytes) of every file, written by the pre-variant generator
_BEFORE = {
    "default": "9ebc1d5056fb5d448c7b05249cba2e96d4924b219dec8044a1db776c00fdd058",  # all defaults
    "small": "96af82fd3ae62a1dca6ffae3a23171dcf3b4931e865d2aad65accea8d8aa23d8",  # n 6/3, size 48, seed 1
    "ring": "eee00dce893783a6b8392d8d7b03ac98642724ef9871e0edc3005de0a9808ad8",  # n 5/2, 64, seed 7, bg 0.4, ring 1
}


def test_default_arguments_write_the_original_bytes(tmp_path: Path) -> None:
    assert _digest(make_biased_dataset(tmp_path / "default")) == _BEFORE["default"]
    assert _digest(make_biased_dataset(tmp_path / "small", n_train=6, n_val=3, size=48, seed=1)) == _BEFORE["small"]
    ring = make_biased_dataset(tmp_path / "ring", n_train=5, n_val=2, size=64, seed=7, n_background_only=0.4, boundary=1)
    assert _digest(ring) == _BEFORE["ring"]
    # the variant defaults spelled out are the same dataset
    explicit = make_biased_dataset(tmp_path / "explicit", n_train=6, n_val=3, size=48, seed=1, height=48, width=48,
                                   cue="texture", n_classes=4, biased_share=1.0, unbiased_classes=0,
                                   bias_kind="context", image_format="png")
    assert _digest(explicit) == _BEFORE["small"]


def _split_arrays(root: Path, split: str = "train") -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    ds = VOCDataset(root)
    return [(read_image(ds.image_path(i)), read_label(ds.gt_path(i)), read_label(root / PSEUDO_DIR / f"{i}.png"))  # type: ignore[arg-type]
            for i in ds.ids(split)]


@pytest.mark.parametrize("n_classes", [4, 8, 12])
def test_non_square_jpeg_many_classes(tmp_path: Path, n_classes: int) -> None:
    root = make_biased_dataset(tmp_path / "d", n_train=12, n_val=2, height=48, width=80, n_classes=n_classes,
                               image_format="jpg", cue="both", seed=2)
    ds = VOCDataset(root)
    assert ds.num_classes == n_classes and ds.classes == class_names(n_classes)
    assert ds.classes[: len(SYNTHETIC_CLASSES)] == SYNTHETIC_CLASSES and len(set(ds.classes)) == n_classes + 1
    assert sorted(p.suffix for p in (root / "JPEGImages").iterdir()) == [".jpg"] * 14
    assert (root / "JPEGImages" / "train_0000.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG magic
    for split in ("train", "val"):
        check_label_folder(ds, split, root / PSEUDO_DIR)
    seen = set()
    for img, gt, pseudo in _split_arrays(root):
        assert img.shape == (48, 80, 3) and gt.shape == pseudo.shape == (48, 80)
        assert gt.max() <= n_classes and pseudo.max() <= n_classes
        seen |= set(np.unique(gt).tolist())
    assert max(seen) > 4 or n_classes == 4


def _context_fp(root: Path) -> float:
    """Share of pseudo-label foreground pixels whose ground truth is background."""
    fg = fp = 0
    for _, gt, pseudo in _split_arrays(root):
        m = pseudo > 0
        fg += m.sum()
        fp += (m & (gt == 0)).sum()
    return fp / fg


def test_biased_share_and_unbiased_classes(tmp_path: Path) -> None:
    kw = dict(n_train=24, n_val=1, size=48, seed=4, n_background_only=0.0)
    full = _context_fp(make_biased_dataset(tmp_path / "full", **kw))
    half = _context_fp(make_biased_dataset(tmp_path / "half", biased_share=0.5, **kw))
    none = _context_fp(make_biased_dataset(tmp_path / "none", biased_share=0.0, **kw))
    assert full > 0.4 and none < 0.15 and none < half < full, (full, half, none)
    # the last two classes never sit on their context: their pseudo labels are the (noisy) object only
    root = make_biased_dataset(tmp_path / "unb", unbiased_classes=2, **kw)
    per_class = {c: [0, 0] for c in range(1, 5)}
    for _, gt, pseudo in _split_arrays(root):
        for c in range(1, 5):
            m = pseudo == c
            per_class[c][0] += m.sum()
            per_class[c][1] += (m & (gt == 0)).sum()
    fp = {c: b / max(a, 1) for c, (a, b) in per_class.items()}
    assert fp[3] < 0.2 and fp[4] < 0.2 and fp[1] > 0.35 and fp[2] > 0.35, fp


def test_same_layout_across_bias_settings(tmp_path: Path) -> None:
    """Variant draws have their own generator: the ground truth does not move when only the bias changes."""
    kw = dict(n_train=6, n_val=1, size=48, seed=3)
    a = _split_arrays(make_biased_dataset(tmp_path / "a", **kw))
    b = _split_arrays(make_biased_dataset(tmp_path / "b", bias_kind="mixed", biased_share=0.5, **kw))
    assert all(np.array_equal(ga, gb) for (_, ga, _), (_, gb, _) in zip(a, b))
    assert any(not np.array_equal(pa, pb) for (_, _, pa), (_, _, pb) in zip(a, b))


@pytest.mark.parametrize("kind", ["partial", "halo", "mixed"])
def test_bias_kinds_stay_biased(tmp_path: Path, kind: str) -> None:
    kw = dict(n_train=16, n_val=1, size=48, seed=5, n_background_only=0.0)
    fp = _context_fp(make_biased_dataset(tmp_path / kind, bias_kind=kind, **kw))
    assert 0.15 < fp < _context_fp(make_biased_dataset(tmp_path / "context", **kw)) + 0.05, fp


def _object_context_colour_gap(root: Path) -> float:
    """Mean |RGB| distance between an instance's GT object pixels and its swallowed context pixels."""
    gaps = []
    for img, gt, pseudo in _split_arrays(root):
        x = img.astype(np.float64) / 255
        for c in np.unique(gt[gt > 0]):
            obj, ctx = gt == c, (pseudo == c) & (gt == 0)
            if obj.sum() > 20 and ctx.sum() > 20:
                gaps.append(np.linalg.norm(x[obj].mean(0) - x[ctx].mean(0)))
    return float(np.mean(gaps))


def test_cue_decides_what_separates_object_and_context(tmp_path: Path) -> None:
    kw = dict(n_train=16, n_val=1, size=48, seed=6, n_background_only=0.0)
    texture = _object_context_colour_gap(make_biased_dataset(tmp_path / "t", **kw))
    colour = _object_context_colour_gap(make_biased_dataset(tmp_path / "c", cue="colour", **kw))
    both = _object_context_colour_gap(make_biased_dataset(tmp_path / "b", cue="both", **kw))
    # texture cue: only the per-instance jitter (std 0.07 a channel on each side, ~0.17 expected)
    assert texture < 0.25 and colour > texture + 0.15 and both > texture + 0.15, (texture, colour, both)


def test_seed_and_labels(tmp_path: Path) -> None:
    a = make_biased_dataset(tmp_path / "a", n_train=4, n_val=1, size=40, seed=1, cue="colour", n_classes=6)
    b = make_biased_dataset(tmp_path / "b", n_train=4, n_val=1, size=40, seed=2, cue="colour", n_classes=6)
    assert _digest(a) != _digest(b)
    labels = json.loads((a / "image_labels.json").read_text())
    ds = VOCDataset(a)
    for i in ds.ids("train"):
        assert labels[i] == sorted(set(np.unique(read_label(ds.gt_path(i))).tolist()) - {0})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(height=20), "size"),
        (dict(width=31), "size"),
        (dict(cue="shape"), "cue"),
        (dict(n_classes=3), "n_classes"),
        (dict(n_classes=MAX_SYNTHETIC_CLASSES + 1), "n_classes"),
        (dict(biased_share=1.5), "biased_share"),
        (dict(unbiased_classes=5), "unbiased_classes"),
        (dict(bias_kind="all"), "bias_kind"),
        (dict(image_format="gif"), "image_format"),
    ],
)
def test_bad_variant_arguments(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_biased_dataset(tmp_path / "x", n_train=1, n_val=1, **kw)
