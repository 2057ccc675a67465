"""The cluster plan: each stage's Ray resource requests from the config, and their packing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mars_ray import config as C
from mars_ray.stages import plan

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _coco(**over) -> C.Config:
    return C.build(JOBS / "coco.yaml", {"data.pseudo_labels": "/x", **over})


def test_requests_follow_the_config_and_the_feature_source():
    reqs = {(r.stage, r.what): r for r in plan.stage_requests(_coco())}
    feats = next(r for (s, _), r in reqs.items() if s == "features")
    assert feats.count == 56 and feats.resources == {"CPU": 1.0, "GPU": 0.125} and feats.strategy == "SPREAD"
    train = next(r for (s, w), r in reqs.items() if s == "train" and "Train" in w)
    assert train.count == 8 and train.resources == {"CPU": 6.0, "GPU": 1.0} and train.strategy == "PACK"
    # F from files needs no GPU, whatever the preset says
    files = plan.stage_requests(_coco(**{"data.features_dir": "/feats"}), ["features", "debias"])
    assert all(r.resources["GPU"] == 0 for r in files)
    # no pseudo labels: the built-in WSSS stage is planned first
    assert plan.stage_requests(C.build(JOBS / "coco.yaml"))[0].stage == "wsss"


def test_coco_preset_fits_8_gpus_64_cpus_and_leaves_cpus_for_ray_data():
    placements = plan.place(plan.stage_requests(_coco()), plan.parse_cluster("2x32cpu4gpu"))
    assert all(p.ok for p in placements), [p.problems for p in placements]
    by = {p.stage: p for p in placements}
    assert sorted(set(by["train"].nodes[0])) == [0, 1]  # 4 GPU workers on each node
    assert all(sum(f["CPU"] for f in p.spare) >= 1 for p in placements)


def test_place_names_what_does_not_fit():
    small = plan.place(plan.stage_requests(_coco()), plan.parse_cluster("16cpu2gpu"))
    problems = [q for p in small for q in p.problems]
    assert any("train" in q and "8 x" in q and "only 2 fit" in q for q in problems)
    assert any("features" in q and "only 16 fit" in q for q in problems)
    # an actor pool that takes every CPU leaves nothing for Ray Data's tasks
    full = plan.place(plan.stage_requests(_coco(**{"features.num_actors": 64, "features.gpus_per_actor": 0}),
                                          ["features"]), plan.parse_cluster("2x32cpu"))
    assert "read/write tasks" in full[0].problems[0]


@pytest.mark.parametrize("bad", ["", "2x", "32gpu", "x32cpu"])
def test_parse_cluster_errors(bad):
    with pytest.raises(ValueError, match="cluster"):
        plan.parse_cluster(bad)
    assert plan.parse_cluster("2x8cpu1gpu,4cpu") == [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}, {"CPU": 4}]


def test_mars_plan_cli_exit_status():
    base = [sys.executable, "-m", "mars_ray", "plan", "--config", str(JOBS / "coco.yaml"), "--set", "data.pseudo_labels=/x"]
    ok = subprocess.run(base + ["--cluster", "2x32cpu4gpu"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "Ray Train workers" in ok.stdout, ok.stderr[-1000:]
    short = subprocess.run(base + ["--cluster", "8cpu"], capture_output=True, text=True, timeout=120)
    assert short.returncode == 1 and "PROBLEM" in short.stdout


def test_plan_imports_no_ray():
    code = "import sys, mars_ray.stages.plan; assert 'ray' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
