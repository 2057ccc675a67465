"""MLflow helpers: URI resolution, probing (fast failure), experiments/artifacts, label montage."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars_ray import tracking
from mars_ray.storage import ObjectPath


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


# -- run folders on an object store ----------------------------------------------------------------


def test_uri_run_needs_an_explicit_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = ObjectPath("s3://bkt/run")
    with pytest.raises(ValueError) as e:
        tracking.resolve_tracking_uri(run)
    msg = str(e.value)
    assert "s3://bkt/run" in msg and "--tracking-uri" in msg and "sqlite:////" in msg and "http://" in msg
    assert tracking.resolve_tracking_uri(run, "sqlite:////x/y.db") == "sqlite:////x/y.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking.resolve_tracking_uri(run) == "http://example:5000"


def test_uri_run_keeps_artifacts_with_the_run():
    run = ObjectPath("s3://bkt/run")
    for store in ("sqlite:////x/mlflow.db", "http://example:5000"):
        assert tracking.default_artifact_location(store, run) == "s3://bkt/run/mlartifacts"
    assert tracking.default_artifact_location("databricks", run) is None


def test_artifact_location_needs_its_client_library(monkeypatch):
    import sys

    for ok in (None, "/local/mlartifacts", "file:///x/mlartifacts", "s3://bkt/run/mlartifacts",
               "mlflow-artifacts:/1"):
        tracking.check_artifact_location(ok)
    with pytest.raises(ValueError, match=r"memory://.*cannot store artifacts"):
        tracking.check_artifact_location("memory://bkt/run/mlartifacts")
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if boto3 were not installed
    with pytest.raises(ValueError, match=r"s3://bkt/run/mlartifacts: .*boto3.*pip install boto3"):
        tracking.check_artifact_location("s3://bkt/run/mlartifacts")


def test_artifacts_on_s3(s3_bucket: str, tmp_path: Path):
    """sqlite tracking store on a local disk, artifacts in RUN/mlartifacts on S3 (MLflow uses boto3)."""
    from mlflow.tracking import MlflowClient

    from mars_ray.storage import upath

    run = upath(s3_bucket) / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.probe(uri)
    loc = tracking.default_artifact_location(uri, run)
    tracking.check_artifact_location(loc)
    exp = tracking.ensure_experiment(uri, "s3", loc)
    assert tracking.experiment_artifact_location(uri, "s3", None) == loc
    run_id = MlflowClient(uri).create_run(exp, run_name="trial_s3").info.run_id
    (run / "trial" / "report.json").write_text('{"n": 1}')
    local = tmp_path / "stats.json"
    local.write_text("{}")
    assert tracking.log_artifacts(uri, run_id, [run / "trial" / "report.json", local, run / "missing.json"]) == 2
    assert sorted(a.path for a in MlflowClient(uri).list_artifacts(run_id)) == ["report.json", "stats.json"]
    stored = [p for p in (run / "mlartifacts").rglob("report.json")]
    assert len(stored) == 1 and stored[0].read_text() == '{"n": 1}'
    out = tracking.label_montage([("a", np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), np.uint8),
                                   np.ones((4, 4), np.uint8))], run / "trial" / "montage.png")
    assert out == run / "trial" / "montage.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_isolated_tracking_uri_undoes_mlflow_set_tracking_uri(monkeypatch, tmp_path):
    import mlflow

    from mars_ray import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    with tracking.isolated_tracking_uri():
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'a.db'}")  # what Tune's MLflow callback does
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("a.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == before
    assert tracking.resolve_tracking_uri(tmp_path / "run") == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
