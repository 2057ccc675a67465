"""Stage ``train`` on a local Ray: 2-worker CPU TorchTrainer, checkpoint + resume, baseline, input checks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mars_ray import config as C
from mars_ray.data.label_io import read_label
from mars_ray.data.voc import VOCDataset
from mars_ray.engine import SegAugment
from mars_ray.models.deeplab import load_segmenter_checkpoint, save_segmenter_checkpoint
from mars_ray.models.registry import SEGMENTERS
from mars_ray.stages import train
from mars_ray.stages.train_loop import _augmented_batches

from tests.conftest import copy_run

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _cfg(data: Path, **over) -> C.Config:
    return C.build(overrides={
        "data.root": str(data), "data.pseudo_labels": str(data / "pseudo_labels"), "debias.crf": False,
        "train.epochs": 1, "train.batch_size": 4, "train.num_workers": 2, "train.cpus_per_worker": 0.5,
        "train.crop_size": 32, "train.crf_iters": 2, **over,
    })


@pytest.fixture(scope="module")
def run(debiased_run: Path, tmp_path_factory) -> Path:
    """This module's copy of the session's features → select → debias run."""
    return copy_run(debiased_run, tmp_path_factory)


def _history(folder: Path) -> list[dict[str, str]]:
    with open(folder / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_workers_checkpoint_then_resume(run: Path, tiny_data: Path):
    ds = VOCDataset(tiny_data)
    out = train.run(_cfg(tiny_data), run)
    assert out == run / "train"
    (first,) = _history(out)
    steps = int(first["step"])
    assert steps == 4  # 16 images over 2 workers → 8 rows each, 2 per step (global batch 4)
    assert first["wce"] and not first["ce"] and first["val_miou"]
    model, extra = load_segmenter_checkpoint(out / "model.pt", expect_name="deeplab_tiny", expect_num_classes=5)
    assert extra["classes"] == ds.classes and (extra["epoch"], extra["step"]) == (1, steps)
    assert (out / "curves.png").stat().st_size > 1000
    assert len(list((run / "complement").glob("*.png"))) == len(ds.ids("train"))
    image_labels = json.loads((tiny_data / "image_labels.json").read_text())
    for i in ds.ids("train"):  # the fill takes background or one of the image's classes, nothing else
        y_db, y_co = read_label(run / "debias" / f"{i}.png"), read_label(run / "complement" / f"{i}.png")
        assert set(np.unique(y_co[y_db == 254]).tolist()) <= {0, *image_labels[i]}, i
    assert len(list((run / "predict" / "val").glob("*.png"))) == len(ds.ids("val"))
    assert list((out / "ray" / "mars").glob("checkpoint_*"))

    # same run name + storage, more epochs: Ray Train restores the checkpoint and the step counter continues
    # (the teacher's CRF fill now in 2 processes per worker: an execution setting, same stage key)
    out = train.run(_cfg(tiny_data, **{"train.epochs": 2, "train.crf_workers": 2}), run)
    rows = _history(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert rows[0]["step"] == first["step"] and rows[0]["loss"] == first["loss"]  # epoch 1 is not retrained
    assert int(rows[1]["step"]) == 2 * steps
    _, extra = load_segmenter_checkpoint(out / "model.pt")
    assert (extra["epoch"], extra["step"]) == (2, 2 * steps)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["outputs"]["epochs"] == 2

    # up to date: skipped
    mtime = (out / "model.pt").stat().st_mtime_ns
    train.run(_cfg(tiny_data, **{"train.epochs": 2}), run)
    assert (out / "model.pt").stat().st_mtime_ns == mtime


def test_training_rows_carry_the_image_classes(run: Path, tiny_data: Path):
    """MARS rows and batches carry class_mask [C+1] (background + the image-level labels); the
    baseline's do not; train.wce reaches the worker's loop settings."""
    import torch

    cfg = _cfg(tiny_data)
    ds = VOCDataset(tiny_data)
    source = train.class_source(cfg, run, ds, run / "debias")
    assert source["kind"] == "image_labels"
    ids = ds.ids("train")[:5]
    rows = train._LoadPair(ds.spec(), str(run / "debias"), source)({"image_id": np.array(ids)})
    labels = json.loads((tiny_data / "image_labels.json").read_text())
    want = np.zeros((5, 5), bool)
    want[:, 0] = True
    for r, i in enumerate(ids):
        want[r, labels[i]] = True
    assert rows["class_mask"].dtype == bool and np.array_equal(rows["class_mask"], want)

    class Shard:
        def iter_batches(self, **_):
            yield rows  # lists of arrays, as Ray Data hands variable-size images over

    (batch,) = list(_augmented_batches(Shard(), SegAugment(32, (1.0, 1.0), flip=False, seed=0), 5, seed=0))
    assert batch["class_mask"].dtype == torch.bool and torch.equal(batch["class_mask"], torch.from_numpy(want))
    assert train.class_source(_cfg(tiny_data, **{"train.baseline": True}), run, ds, run / "debias") is None
    base = train._LoadPair(ds.spec(), str(tiny_data / "pseudo_labels"))({"image_id": np.array(ids)})
    assert "class_mask" not in base
    assert train.loop_settings(cfg, ds).wce and not train.loop_settings(_cfg(tiny_data, **{"train.wce": False}), ds).wce


def test_baseline_trains_on_pseudo_labels(run: Path, tiny_data: Path):
    cfg = _cfg(tiny_data, **{"train.baseline": True, "train.num_workers": 1, "train.cpus_per_worker": 1.0})
    assert train.labels_dir(cfg, run) == tiny_data / "pseudo_labels"
    out = train.run(cfg, run)
    assert out == run / "train_baseline"
    (row,) = _history(out)
    assert row["ce"] and not row["wce"] and not row["mean_w"]  # plain CE, no teacher terms
    _, extra = load_segmenter_checkpoint(out / "model.pt", expect_num_classes=5)
    assert extra["baseline"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["inputs"]["labels"].startswith("debias:")
    assert len(list((run / "predict_baseline" / "val").glob("*.png"))) == 6


def _raises_before_training(cfg: C.Config, run: Path, match: str) -> None:
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match=match):
        train.run(cfg, run)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written or cleared


@pytest.mark.parametrize(
    "over, match",
    [
        ({"train.batch_size": 3}, r"train\.batch_size=3 is not divisible by train\.num_workers=2"),
        ({"train.crop_size": 200}, r"train\.crop_size=200 is larger than every training image"),
        ({"train.epochs": 0}, r"train\.epochs must be >= 1"),
    ],
)
def test_bad_config_fails_before_training(run: Path, tiny_data: Path, tmp_path: Path, over, match):
    other = tmp_path / "run"
    shutil.copytree(run / "debias", other / "debias")
    # merged without validation: the stage's own call of config.validate must stop it (C.build would, earlier)
    _raises_before_training(C.merge(_cfg(tiny_data, **{"train.batch_size": 4}), over), other, match)


def test_missing_label_ids_are_named(run: Path, tiny_data: Path, tmp_path: Path):
    labels = tmp_path / "labels"
    shutil.copytree(run / "debias", labels)
    ids = VOCDataset(tiny_data).ids("train")
    for i in ids[3:5]:
        (labels / f"{i}.png").unlink()
    other = tmp_path / "run"
    other.mkdir()
    _raises_before_training(_cfg(tiny_data, **{"train.labels": str(labels)}), other,
                            rf"{labels}: 2 of 16 .*first: {ids[3]}\.png, {ids[4]}\.png")


def test_checkpoint_of_another_class_count_is_named(run: Path, tiny_data: Path, tmp_path: Path):
    ckpt = tmp_path / "other.pt"
    save_segmenter_checkpoint(ckpt, SEGMENTERS.get("deeplab_tiny", num_classes=3), "deeplab_tiny", {"num_classes": 3})
    other = tmp_path / "run"
    shutil.copytree(run / "debias", other / "debias")
    _raises_before_training(_cfg(tiny_data, **{"train.init_checkpoint": str(ckpt)}), other,
                            rf"{ckpt}: trained for num_classes=3 .* expected 5")


def test_complement_scales_are_part_of_the_train_key(run: Path, tiny_data: Path):
    """RUN/complement is written with train.complement_scales / complement_flip: changing them redoes the stage."""
    base = train.stage_dir(_cfg(tiny_data), run).key
    assert train.stage_dir(_cfg(tiny_data, **{"train.complement_scales": [1.0]}), run).key != base
    assert train.stage_dir(_cfg(tiny_data, **{"train.complement_flip": False}), run).key != base
    assert C.build().train.complement_scales == (1.0, 1.5, 2.0) and C.build().train.complement_flip
