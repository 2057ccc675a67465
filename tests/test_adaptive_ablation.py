"""benchmarks/adaptive_ablation.py: the codebook-ensemble ablation builds what it says, and the seed-spread table."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mars_ray.data.label_io import read_image
from mars_ray.data.synthetic import make_biased_dataset
from mars_ray.data.voc import VOCDataset
from mars_ray.models import adaptive

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import adaptive_ablation as AA  # noqa: E402


def _row(ablation: str, dataset: str, seed: int, miou: float) -> dict:
    return {"ablation": ablation if seed == 0 else f"{ablation} (seed {seed})", "dataset": dataset, "seed": seed,
            "debiased_miou": miou / 100}


def test_seed_spread_reports_range_and_worst_seed() -> None:
    rows = [_row("shipped", "a", s, v) for s, v in enumerate((90.0, 80.0, 85.0))]
    rows += [_row("shipped", "b", s, v) for s, v in enumerate((70.0, 72.0, 71.0))]
    rows += [_row("codebooks-x2", "a", s, v) for s, v in enumerate((88.0, 87.0, 89.0))]
    rows += [_row("codebooks-x2", "b", s, v) for s, v in enumerate((71.0, 71.0, 71.0))]
    rows += [_row("no-linear", "a", 0, 50.0)]  # one seed only: no spread to report
    lines = AA.seed_spread(rows).splitlines()
    assert len(lines) == 4 and "no-linear" not in "\n".join(lines)
    shipped = [c.strip() for c in lines[2].strip("|").split("|")]
    assert shipped == ["shipped", "0,1,2", "2", f"{np.mean([90, 80, 85, 70, 72, 71]):.1f}", "6.0", "10.0 (a)",
                       f"{(80 + 70) / 2:.1f}"]
    ens = [c.strip() for c in lines[3].strip("|").split("|")]
    assert ens[4:] == ["1.0", "2.0 (a)", f"{(87 + 71) / 2:.1f}"]
    assert AA.seed_spread([_row("shipped", "a", 0, 90.0)]) == ""


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    root = make_biased_dataset(tmp_path_factory.mktemp("ds"), n_train=8, n_val=1, size=48, seed=1)
    ds = VOCDataset(root)
    return [read_image(ds.image_path(i)) for i in ds.ids("train")]


def test_copy_ablations_fit_what_their_settings_ship(images: list[np.ndarray]) -> None:
    """``codebooks-x2`` is ``features.codebook_copies=2`` (the shipped default), ``one-copy`` the design
    before it (the stored results' ``shipped``); ``feature_parts`` names the second copies."""
    shipped = adaptive.fit_adaptive_stats(images)
    with AA.ABLATIONS["codebooks-x2"]():
        ens = adaptive.fit_adaptive_stats(images)
    with AA.ABLATIONS["one-copy"]():
        one = adaptive.fit_adaptive_stats(images)
    assert ens.digest == shipped.digest == adaptive.fit_adaptive_stats(images, copies=2).digest
    assert one.digest == adaptive.fit_adaptive_stats(images, copies=1).digest != shipped.digest
    assert list(AA.feature_parts(one))[1:] == ["c16", "c32", "c64"]
    parts = AA.feature_parts(ens)
    assert list(parts)[1:] == ["c16", "c32", "c64", "c16#2", "c32#2", "c64#2"]
    assert sum(s.stop - s.start for s in parts.values()) == ens.dim
    # leaving the ablation restores the shipped fit
    assert adaptive.fit_adaptive_stats(images).digest == shipped.digest
