"""MLflow helpers: URI resolution, probing (fast failure), experiments/artifacts, label montage."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray import tracking


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(tmp_path / "run") == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking.resolve_tracking_uri(tmp_path) == "http://example:5000"
    assert tracking.resolve_tracking_uri(tmp_path, "sqlite:////x/y.db") == "sqlite:////x/y.db"
    assert tracking.default_artifact_location("http://example:5000", tmp_path) is None
    assert tracking.default_artifact_location("sqlite:////x.db", tmp_path) == (tmp_path / "mlartifacts").as_uri()


def test_probe_unreachable_server_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="unreachable"):
        tracking.probe("http://127.0.0.1:9")
    assert time.perf_counter() - t0 < 15


def test_probe_sqlite_missing_folder(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        tracking.probe(f"sqlite:///{tmp_path}/nope/mlflow.db")


def test_sqlite_store_experiment_and_artifacts(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.probe(uri)
    exp = tracking.ensure_experiment(uri, "t", tracking.default_artifact_location(uri, tmp_path))
    assert tracking.ensure_experiment(uri, "t") == exp
    client = MlflowClient(uri)
    run = client.create_run(exp, run_name="trial_x")
    f = tmp_path / "report.json"
    f.write_text("{}")
    assert tracking.log_artifacts(uri, run.info.run_id, [f, tmp_path / "missing.json"]) == 1
    assert tracking.log_artifacts(uri, run.info.run_id, [f], rank=1) == 0  # only rank 0 writes
    tracking.log_metrics(uri, run.info.run_id, {"a": 0.5, "b": float("nan"), "c": "x"})
    assert tracking.run_ids_by_name(uri, "t") == {"trial_x": run.info.run_id}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.json"]
    assert client.get_run(run.info.run_id).data.metrics == {"a": 0.5}
    assert (tmp_path / "mlartifacts").is_dir()


def test_label_montage(tmp_path: Path):
    img = np.zeros((8, 10, 3), np.uint8)
    yb = np.ones((8, 10), np.uint8)
    ydb = yb.copy()
    ydb[:, :5] = 254
    out = tracking.label_montage([("a", img, yb, ydb), ("b", img, yb, yb)], tmp_path / "m.png", scale=2)
    arr = np.asarray(Image.open(out))
    assert arr.shape == (2 * (14 + 16), 60, 3)
    assert (arr[14:30, 40:50] == (255, 0, 255)).all()  # biased pixels of the first Y^db: VOC_PALETTE magenta
