"""Stage keys are complete: every setting a stage reads is in its key, unless declared an execution knob.

The slow test derives the read settings from a real run of every stage (``full_run`` records the
reads, ``tests/stage_reads.py``), changes each one to another valid value, and asserts the stage's
key changes; a setting that only changes *how* a stage runs (actors, workers, batch sizes, Ray) is
declared per stage in ``EXECUTION`` — the stage modules' own ``_EXECUTION_KEYS``. The fast tests pin
the two keys issue 12 found incomplete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from mars_ray import config as C
from mars_ray import pipeline
from mars_ray.stages import debias, evaluate, features, inputs, select, train, uss, wsss

from tests.conftest import FULL_STAGES

EXECUTION: dict[str, set[str]] = {  # section.key that change how a stage runs, not what it computes
    "wsss": {f"wsss.{k}" for k in wsss._EXECUTION_KEYS},
    "uss": {f"uss.{k}" for k in uss._EXECUTION_KEYS},
    "features": {f"features.{k}" for k in features._EXECUTION_KEYS},
    "select": {f"select.{k}" for k in select._EXECUTION_KEYS},
    "debias": {f"debias.{k}" for k in debias._EXECUTION_KEYS},
    "train": {f"train.{k}" for k in train._EXECUTION_KEYS},
    "evaluate": {f"evaluate.{k}" for k in evaluate._EXECUTION_KEYS},
}


def key_of(stage: str, cfg: C.Config, run: Path) -> str:
    mod = pipeline.stage_module(stage)
    if stage == "evaluate":
        return mod.stage_dir(cfg, run, inputs.open_dataset(cfg), evaluate.default_checkpoint(cfg, run)).key
    return mod.stage_dir(cfg, run).key


# -- fast: the two gaps issue 12 found ------------------------------------------------------------


def _base(tiny_data: Path, **over: Any) -> C.Config:
    return C.build(overrides={"data.root": str(tiny_data), "data.pseudo_labels": str(tiny_data / "pseudo_labels"),
                              **over})


def test_wsss_key_covers_the_debias_crf_kernels_it_borrows(tiny_data: Path, tmp_path: Path):
    on = _base(tiny_data, **{"wsss.crf": True})
    kernel = {"debias.crf_bilateral_srgb": 20.0}
    assert key_of("wsss", C.merge(on, kernel), tmp_path) != key_of("wsss", on, tmp_path)
    off = _base(tiny_data)  # CRF off: the kernels are not read, and do not invalidate the CAM labels
    assert key_of("wsss", C.merge(off, kernel), tmp_path) == key_of("wsss", off, tmp_path)


def test_features_key_names_the_clustering_implementation(tiny_data: Path, tmp_path: Path, monkeypatch):
    cfg = _base(tiny_data)
    sd = features.stage_dir(cfg, tmp_path)
    assert sd.config["clustering"].startswith("sklearn.KMeans/")
    monkeypatch.setattr(features, "CLUSTERING", "hand-written numpy k-means")  # what made older artifacts
    assert features.stage_dir(cfg, tmp_path).key != sd.key


# -- slow: derived from what a real run reads -------------------------------------------------------


def _copy(src: Path, dst: Path) -> str:
    """A copy with the same names, sizes and mtimes: only the setting itself can change a key."""
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return str(dst)


def _alternatives(run: Path, tmp: Path, tiny_data: Path) -> dict[str, Callable[[Any], Any]]:
    """Another valid value for settings whose type does not say how to change them (paths, names)."""
    ids = [i for s in ("train", "val") for i in
           (tiny_data / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split()]

    def features_dir(_: Any) -> str:
        folder = tmp / "feats"
        folder.mkdir()
        for i in ids:
            np.save(folder / f"{i}.npy", np.zeros((3, 4, 4), np.float32))
        return str(folder)

    def split_file(_: Any) -> str:
        path = tmp / "lists" / "train.txt"
        path.parent.mkdir()
        path.write_text((tiny_data / "ImageSets" / "Segmentation" / "train.txt").read_text())
        return str(path)

    def baseline(value: bool) -> bool:  # evaluate then scores RUN/train_baseline/model.pt
        _copy(run / "train" / "model.pt", run / "train_baseline" / "model.pt")
        return not value

    return {
        "data.root": lambda _: _copy(tiny_data, tmp / "root2"),
        "data.split": lambda _: "val",
        "data.eval_split": lambda _: "train",
        "data.pseudo_labels": lambda _: _copy(tiny_data / "pseudo_labels", tmp / "pseudo2"),
        "data.features_dir": features_dir,
        "data.image_labels": lambda _: _copy(tiny_data / "image_labels.json", tmp / "labels2.json"),
        "data.gt_dir": lambda _: _copy(tiny_data / "SegmentationClass", tmp / "gt2"),
        "data.split_file": split_file,
        "features.extractor": lambda _: "stego",  # RUN/uss/checkpoint.pt exists: full_run trained it
        "features.checkpoint": lambda _: str(run / "uss" / "checkpoint.pt"),
        "train.model": lambda _: "deeplabv3plus_resnet50",
        "train.output_stride": lambda v: 16 if v == 8 else 8,
        "train.pretrained_backbone": lambda _: str(tmp / "resnet50.pth"),
        "train.labels": lambda _: _copy(tiny_data / "pseudo_labels", tmp / "labels3"),
        "train.init_checkpoint": lambda _: _copy(run / "train" / "model.pt", tmp / "init.pt"),
        "train.baseline": baseline,
        "evaluate.checkpoint": lambda _: _copy(run / "train" / "model.pt", tmp / "other.pt"),
        "wsss.classifier": lambda _: "cam",
        "debias.crf_unary": lambda v: "ratio" if v == "symmetric" else "symmetric",
        "uss.backbone": lambda _: "vit_tiny_test",
        "uss.backbone_weights": lambda _: _copy(run / "uss" / "checkpoint.pt", tmp / "weights.pth"),
        "uss.crop_scale": lambda v: "resize" if v == "native" else "native",
    }


def _alternative(key: str, value: Any, special: dict[str, Callable[[Any], Any]]) -> Any:
    if key in special:
        return special[key](value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, tuple):
        return (*value, 2.0 * value[-1])
    raise AssertionError(f"{key}: no alternative value for {value!r}; add one to _alternatives")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("stage", FULL_STAGES)
def test_every_setting_a_stage_reads_is_in_its_key(stage: str, full_run: dict, tiny_data: Path, tmp_path: Path,
                                                    tmp_path_factory):
    from tests.conftest import copy_run

    run = copy_run(full_run["run"], tmp_path_factory)
    cfg = C.build(full_run["config"])
    reads = full_run["reads"][stage]
    checked = sorted(k for k in reads if k not in EXECUTION[stage] and not k.startswith("ray."))
    assert checked, f"{stage}: no settings recorded"
    special = _alternatives(run, tmp_path, tiny_data)
    before = key_of(stage, cfg, run)
    missing = []
    for key in checked:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        changed = C.merge(cfg, {key: C.to_dict(_alternative(key, value, special))})
        if key_of(stage, changed, run) == before:
            missing.append(key)
    assert not missing, f"{stage} reads {missing} but its key does not change with them"
    (tmp_path / "checked.json").write_text(json.dumps(checked))  # for the record: what was covered
