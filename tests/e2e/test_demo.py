"""`mars demo`: the debiased labels beat the biased pseudo labels on the built-in dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mars_ray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_demo_removes_bias(ray_local, tmp_path: Path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--n-train", "24", "--n-val", "6", "--size", "64",
               "--set", "train.epochs=2", "train.checkpoint_every=2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "pseudo labels (Y^b)" in out and "debiased (Y^db)" in out
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    pseudo, debiased = summary["rows"]["pseudo labels (Y^b)"], summary["rows"]["debiased (Y^db)"]
    assert debiased["fp"] < pseudo["fp"] - 0.2
    assert debiased["miou"] > pseudo["miou"] + 0.1
    assert summary["target_ratio"] >= 0.85  # our pixel-share measure: chosen centroids mostly on the target
    assert summary["paper_target_ratio"] >= 0.85  # the paper's measure (IoU > 0.3 with the class's GT)
    assert summary["paper_biased_ratio"] <= 0.1 and "target-centroid ratio (paper: IoU > 0.3)" in out
    # the table goes on to complementing and the baseline-vs-MARS comparison (2 epochs: no quality claim)
    assert "complemented (Y^co)" in summary["rows"]
    assert set(summary["val"]) == {"baseline", "mars"}
    assert all(0 <= v["miou"] <= 1 for v in summary["val"].values())
    assert "baseline (Y^b)" in out and "vs MARS" in out
    # the run report, written at the end; its label table (in-process) agrees with the demo's (Ray)
    index = tmp_path / "demo" / "run" / "report" / "index.html"
    assert f"report: {index}" in out and index.is_file()
    saved = json.loads((tmp_path / "demo" / "run" / "evaluate_labels" / "debias.json").read_text())
    assert saved["miou"] == pytest.approx(debiased["miou"], abs=1e-12)
