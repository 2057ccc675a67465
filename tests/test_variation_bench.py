"""benchmarks/variation_bench.py's perturbations keep every image and its label maps aligned."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.synthetic import make_biased_dataset
from mars_ray.data.voc import VOCDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import variation_bench as VB  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_biased_dataset(tmp_path_factory.mktemp("base"), n_train=6, n_val=2, size=48, seed=3)


def _maps(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    ds = VOCDataset(root)
    return {i: (read_image(ds.image_path(i)), read_label(root / "SegmentationClass" / f"{i}.png"),
                read_label(root / "pseudo_labels" / f"{i}.png"))
            for s in ("train", "val") for i in ds.ids(s)}


@pytest.mark.parametrize("variation", ["scale", "aspect"])
def test_resizing_resizes_labels_with_their_image(base: Path, tmp_path: Path, variation: str) -> None:
    before, after = _maps(base), _maps(VB.perturb(base, tmp_path / variation, variation))
    sizes = set()
    for i, (img, gt, pseudo) in after.items():
        assert img.shape[:2] == gt.shape == pseudo.shape
        sizes.add(img.shape[:2])
        assert set(np.unique(gt)) <= set(np.unique(before[i][1]))  # nearest-neighbour: no new label values
    assert len(sizes) > 1  # the nuisance varies between images


def test_rot90_and_grey_are_exact(base: Path, tmp_path: Path) -> None:
    before = _maps(base)
    rot = _maps(VB.perturb(base, tmp_path / "rot", "rot90"))
    turned = [i for i in rot if rot[i][1].shape != before[i][1].shape or not np.array_equal(rot[i][1], before[i][1])]
    assert 0 < len(turned) < len(rot)
    for i in turned:
        for a, b in zip(rot[i], before[i]):
            assert np.array_equal(a, np.rot90(b))
    grey = _maps(VB.perturb(base, tmp_path / "grey", "grey"))
    ids = list(grey)  # split order, as perturb counts them
    assert np.ptp(grey[ids[0]][0].astype(int), axis=2).max() == 0  # the first image of every five is grey
    assert np.ptp(grey[ids[1]][0].astype(int), axis=2).max() > 0
    with pytest.raises(ValueError, match="unknown variation"):
        VB.perturb(base, tmp_path / "bad", "blur")


def test_retention_is_split_between_grey_and_colour_images(base: Path, tmp_path: Path) -> None:
    root = VB.perturb(base, tmp_path / "grey", "grey")
    ds = VOCDataset(root)
    debiased = tmp_path / "debiased"
    debiased.mkdir()
    grey = set()
    for i in ds.ids("train"):
        pseudo = read_label(root / "pseudo_labels" / f"{i}.png")
        if VB.is_greyscale(read_image(ds.image_path(i))):
            grey.add(i)
            pseudo = np.where((pseudo >= 1) & (pseudo <= 253), 254, pseudo).astype(np.uint8)  # all removed
        Image.fromarray(pseudo).save(debiased / f"{i}.png")
    assert grey and len(grey) < len(ds.ids("train"))
    assert VB.retention_grey_vs_colour(root, debiased) == {"retention_grey_images": 0.0,
                                                            "retention_colour_images": 1.0}


def test_mixed_sizes_draws_each_third_at_its_own_size(tmp_path: Path) -> None:
    root = VB.mixed_sizes("default", tmp_path / "sizes", 6)
    maps = _maps(root)
    sizes = {i: img.shape[:2] for i, (img, gt, pseudo) in maps.items()}
    for i, (img, gt, pseudo) in maps.items():
        assert img.shape[:2] == gt.shape == pseudo.shape
    assert {sizes[i] for i in maps if i.startswith("s0_")} == {(72, 72)}
    assert {sizes[i] for i in maps if i.startswith("s2_")} == {(144, 144)}
    assert len(VOCDataset(root).ids("train")) == 6 and not list(tmp_path.glob("sizes.part*"))
    with pytest.raises(ValueError, match="mixed_sizes"):
        VB.perturb(root, tmp_path / "bad", "sizes")
