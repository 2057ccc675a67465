"""The three situations of README "Three situations", each through ``mars_ray.cli.main`` on a local Ray.

(a) pseudo labels + external USS features, (b) pseudo labels only → the learned USS is trained in the
run, (c) images + image-level labels only → CAM pseudo labels and the learned USS, then MARS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mars_ray import config as C
from mars_ray.cli import build_parser, config_from_args, main
from mars_ray.pipeline import plan_stages
from tests.stages.test_external_features import texture_features, write_features

pytestmark = [pytest.mark.timeout(400)]

FAST = ["debias.crf=false", "uss.ssl_epochs=1", "uss.epochs=1", "uss.min_steps=0", "uss.batch_size=8", "uss.crop_size=48",
        "uss.dim=16", "wsss.epochs=1", "wsss.batch_size=8", "wsss.crop_size=48", "wsss.cam_scales=[1.0]",
        "wsss.cam_flip=false", "wsss.cam_eval_split=false"]


def _plan(argv: list[str]) -> list[str]:
    args = build_parser().parse_args(["run", "--out", "unused", *argv])
    return plan_stages(config_from_args(args, build_missing=True), args.until)


def test_which_stages_mars_run_runs(tiny_data: Path, tmp_path: Path):
    d, p, f = ["--data", str(tiny_data)], ["--pseudo-labels", "P"], ["--features-dir", "F"]
    tail = ["features", "select", "debias"]
    assert _plan([*d, *p, *f, "--until", "debias"]) == tail  # (a)
    assert _plan([*d, *p, "--until", "debias"]) == tail  # built-in adaptive features: nothing to train
    assert _plan([*d, *p, "--uss", "--until", "debias"]) == ["uss", *tail]  # (b)
    assert _plan([*d, *p, "--set", "features.extractor=stego", "--until", "debias"]) == ["uss", *tail]
    assert _plan([*d, *p, "--uss", "--set", "features.checkpoint=ck.pt", "--until", "debias"]) == tail
    assert _plan([*d, "--until", "debias"]) == ["wsss", *tail]  # (c): CAM labels + adaptive features
    assert _plan([*d, "--uss", "--until", "debias"]) == ["wsss", "uss", *tail]  # (c) with the learned USS
    assert _plan([*d, *f, "--until", "debias"]) == ["wsss", *tail]
    assert _plan([*d, "--set", "features.extractor=texture", "--until", "debias"]) == ["wsss", *tail]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"features": {"extractor": "texture"}}))
    assert _plan([*d, "--config", str(cfg_file), "--until", "debias"]) == ["wsss", *tail]
    assert _plan([*d, "--until", "wsss"]) == ["wsss"]


def _debiased(run: Path, tiny_data: Path) -> int:
    ids = (tiny_data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert sorted(p.stem for p in (run / "debias").glob("*.png")) == sorted(ids)
    return json.loads((run / "debias" / "stats.json").read_text())["foreground_pixels"]


@pytest.mark.ray
def test_a_pseudo_labels_and_external_features(tiny_data: Path, ray_local, tmp_path: Path):
    feats = write_features(tmp_path / "feats", texture_features(tiny_data))
    run = tmp_path / "run"
    assert main(["run", "--data", str(tiny_data), "--pseudo-labels", str(tiny_data / "pseudo_labels"),
                 "--features-dir", str(feats), "--out", str(run), "--until", "debias", "--set", *FAST]) == 0
    assert not (run / "wsss").exists() and not (run / "uss").exists()
    m = json.loads((run / "features" / "manifest.json").read_text())
    assert m["config"]["source"] == {"features_dir": str(feats)}
    assert _debiased(run, tiny_data) > 0


@pytest.mark.ray
def test_b_pseudo_labels_and_uss_trained_in_the_run(tiny_data: Path, ray_local, tmp_path: Path):
    run = tmp_path / "run"
    assert main(["run", "--data", str(tiny_data), "--pseudo-labels", str(tiny_data / "pseudo_labels"),
                 "--uss", "--out", str(run), "--until", "debias", "--set", *FAST]) == 0
    assert not (run / "wsss").exists()
    assert (run / "uss" / "checkpoint.pt").is_file()
    m = json.loads((run / "features" / "manifest.json").read_text())
    assert m["config"]["source"]["extractor"] == "stego"
    assert m["inputs"]["checkpoint"] != "none"
    assert m["outputs"]["dim"] == 16  # the learned USS's codes, not texture features
    assert _debiased(run, tiny_data) > 0


@pytest.mark.ray
@pytest.mark.slow
def test_c_images_and_image_labels_only(tiny_data: Path, ray_local, tmp_path: Path):
    run = tmp_path / "run"
    assert main(["run", "--data", str(tiny_data), "--out", str(run), "--until", "debias", "--set", *FAST]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["features"]["extractor"] == "adaptive" and cfg["data"]["pseudo_labels"] == ""
    assert not (run / "uss").exists()
    for stage in ("wsss", "features", "select", "debias"):
        assert json.loads((run / stage / "manifest.json").read_text())["status"] == "complete", stage
    m = json.loads((run / "features" / "manifest.json").read_text())
    assert (run / "features" / m["outputs"]["uss_stats"]).is_file()  # fitted on the split, kept in the artifact
    assert m["inputs"]["uss_stats"] == m["outputs"]["uss_stats_digest"]
    assert _debiased(run, tiny_data) > 0  # the CAM pseudo labels were debiased
    # a second `mars run` finds every stage up to date (the stored fit is reused, not refitted)
    before = {s: (run / s / "manifest.json").stat().st_mtime_ns for s in ("wsss", "features")}
    before["stats"] = (run / "features" / "uss_stats.npz").stat().st_mtime_ns
    assert main(["run", "--data", str(tiny_data), "--out", str(run), "--until", "debias", "--set", *FAST]) == 0
    after = {s: (run / s / "manifest.json").stat().st_mtime_ns for s in ("wsss", "features")}
    after["stats"] = (run / "features" / "uss_stats.npz").stat().st_mtime_ns
    assert after == before


def test_uss_and_wsss_subcommands_exist():
    help_text = build_parser().format_help()
    assert " wsss " in help_text.replace("\n", " ") or "wsss" in help_text
    assert C.build(overrides={"uss.backbone": "vit_base_8", "uss.backbone_weights": "dino.pth"}).uss.backbone == "vit_base_8"
