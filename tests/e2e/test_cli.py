"""The documented CLI end to end on the built-in dataset, on a local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mars_ray.cli import main

pytestmark = [pytest.mark.timeout(300)]


@pytest.mark.ray
def test_run_then_evaluate_labels(tiny_data: Path, ray_local, tmp_path: Path, capsys):
    run = tmp_path / "run"
    rc = main(["run", "--data", str(tiny_data), "--pseudo-labels", str(tiny_data / "pseudo_labels"),
               "--out", str(run), "--until", "debias", "--set", "debias.crf=false", "select.alpha=0.5"])
    assert rc == 0
    assert (run / "features" / "centroids.parquet").is_dir()
    assert (run / "select" / "centroids.npy").is_file() and (run / "select" / "report.json").is_file()
    assert len(list((run / "debias").glob("*.png"))) == 16
    assert "alpha: 0.5" in (run / "config.yaml").read_text()
    assert (run / "report" / "index.html").is_file()  # `mars run` ends with the report
    before = sorted(p.name for p in (run / "debias").iterdir())
    rc = main(["evaluate-labels", "--data", str(tiny_data), "--labels", str(run / "debias"), "--split", "train"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "background" in out and "not saved" in out
    assert sorted(p.name for p in (run / "debias").iterdir()) == before  # never written into an input
    # --run RUN: RUN/evaluate_labels/<folder>.json; --out inside an input folder is refused
    assert main(["evaluate-labels", "--data", str(tiny_data), "--labels", str(run / "debias"), "--run", str(run)]) == 0
    metrics = json.loads((run / "evaluate_labels" / "debias.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and set(metrics["per_class"]) >= {"background"} and metrics["fingerprint"]
    assert f"{100 * metrics['miou']:.1f}" in capsys.readouterr().out
    for inside in (run / "debias" / "m.json", tiny_data / "m.json"):
        assert main(["evaluate-labels", "--data", str(tiny_data), "--labels", str(run / "debias"),
                     "--out", str(inside)]) == 2
        assert "an input" in capsys.readouterr().err and not inside.exists()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run / 'report' / 'index.html'}"
    # ray_local is still up: the CLI only stops a Ray it started itself
    assert ray_local.is_initialized()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "select.alpha=1.5"], "select.alpha must be in (0, 1]"),
        (["--set", "features.k_bgg=3"], "unknown config key 'features.k_bgg'"),
        (["--split", "nosuchsplit"], "nosuchsplit.txt"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_data: Path, tmp_path: Path, capsys, extra, message):
    rc = main(["run", "--data", str(tiny_data), "--pseudo-labels", str(tiny_data / "pseudo_labels"),
               "--out", str(tmp_path / "run"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "mars_ray", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in ("make-dataset", "run", "features", "select", "debias", "evaluate-labels", "report", "demo"):
        assert cmd in out.stdout


def test_object_store_paths_are_accepted_and_errors_name_them(tiny_data: Path, s3_bucket: str, tmp_path: Path,
                                                              capsys, monkeypatch):
    """URIs are no longer refused: a missing --config URI and a tune --out URI without a tracking
    store each fail with one line naming what to fix (the full runs are in test_object_store.py)."""
    rc = main(["run", "--config", f"{s3_bucket}/nope/best.yaml", "--out", f"{s3_bucket}/run"])
    assert rc == 2
    assert f"config file {s3_bucket}/nope/best.yaml does not exist" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = Path(__file__).resolve().parents[2] / "tune_spaces" / "alpha_kbg_smoke.yaml"
    rc = main(["tune", "--space", str(space), "--data", str(tiny_data), "--pseudo-labels",
               str(tiny_data / "pseudo_labels"), "--out", f"{s3_bucket}/tune", "--smoke-test"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--tracking-uri" in err and "sqlite:////local/path/mlflow.db" in err and "object-store URIs are not" not in err
    assert not Path("s3:").exists()
