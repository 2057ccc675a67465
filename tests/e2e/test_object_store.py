"""The CLI with every artifact path on S3 (an in-process moto server): ``mars run``, ``evaluate-labels``,
``mars tune --out s3://…`` and ``mars run --config s3://…/tune/best.yaml``.

The dataset is ``tiny_data`` uploaded to the bucket; only the MLflow tracking store (a SQLite file,
passed by ``--tracking-uri``) is local, as it must be.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
import yaml

from mars_ray import config as C
from mars_ray.artifacts import current
from mars_ray.cli import main
from mars_ray.storage import upath
from tests.conftest import upload_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def s3_data(tiny_data: Path, bucket: str) -> str:
    return upload_tree(tiny_data, f"{bucket}/data")


def _no_stray_local_folder() -> None:
    """A URI taken for a local path would leave a folder named ``s3:`` in the working directory."""
    assert not Path("s3:").exists()


def test_run_and_evaluate_labels_on_s3(s3_data: str, bucket: str, ray_local, capsys):
    run = f"{bucket}/run"
    rc = main(["run", "--data", s3_data, "--pseudo-labels", f"{s3_data}/pseudo_labels", "--out", run,
               "--until", "debias", "--set", "debias.crf=false", "select.alpha=0.5"])
    assert rc == 0, capsys.readouterr().err
    r = upath(run)
    assert "alpha: 0.5" in (r / "config.yaml").read_text()
    sel, deb = current(r / "select"), current(r / "debias")  # RUN/<stage>/@<key>: the current artifacts
    assert sel.parent == r / "select" and deb.parent == r / "debias" and deb.name.startswith("@")
    assert (sel / "report.json").is_file() and (sel / "centroids.npy").is_file()
    assert len(list(deb.glob("*.png"))) == 16
    assert (r / "report" / "index.html").is_file() and list((r / "report" / "grid").glob("*.png"))  # the run report
    assert "debias    debiased labels" in (r / "logs" / "mars.log").read_text()  # uploaded when `mars` ends
    rc = main(["evaluate-labels", "--data", s3_data, "--labels", f"{run}/debias", "--split", "train", "--run", run])
    assert rc == 0
    assert "mIoU" in capsys.readouterr().out
    metrics = json.loads((r / "evaluate_labels" / "debias.json").read_text())
    assert 0 <= metrics["miou"] <= 1
    assert not (r / "debias" / "metrics.json").exists()  # never into the evaluated folder
    _no_stray_local_folder()


@pytest.fixture(scope="module")
def sweep(s3_data: str, bucket: str, ray_local, tmp_path_factory) -> tuple[str, dict, str]:
    """``mars tune --out s3://…``: 2 trials over α only (one clustering), MLflow in a local SQLite file."""
    space = upath(bucket) / "spaces" / "alpha2.yaml"
    space.write_text(yaml.safe_dump({
        "objective": {"metric": "debiased_miou", "mode": "max"},
        "params": {"select.alpha": {"grid_search": [0.2, 0.6]}},
        "set": {"debias.crf": False},
    }))
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    run = f"{bucket}/tune-run"
    rc = main(["tune", "--space", str(space), "--data", s3_data, "--pseudo-labels", f"{s3_data}/pseudo_labels",
               "--out", run, "--tracking-uri", f"sqlite:///{db}", "--quiet"])
    assert rc == 0
    summary = json.loads((upath(run) / "tune" / "summary.json").read_text())
    return run, summary, f"sqlite:///{db}"


def test_tune_on_s3_writes_results_and_computes_features_once(sweep):
    run, summary, uri = sweep
    r = upath(run)
    assert summary["trials"] == 2 and summary["failed"] == 0 and summary["tracking_uri"] == uri
    assert summary["best_config"] == f"{run}/tune/best.yaml" and summary["heatmap"] == f"{run}/tune/heatmap.png"
    rows = list(csv.DictReader(io.StringIO((r / "tune" / "results.csv").read_text())))
    assert sorted(row["select.alpha"] for row in rows) == ["0.2", "0.6"]
    assert sorted(float(row["features_reused"]) for row in rows) == [0.0, 1.0]
    assert (r / "tune" / "heatmap.png").read_bytes()[:4] == b"\x89PNG" and (r / "tune" / "heatmap.png").stat().st_size > 1000
    assert (r / "tune" / "best.yaml").is_file()
    # the features cache lives on S3 under RUN/cache, computed once and shared by both trials
    assert summary["features_computed"] == 1
    cached = [p for p in (r / "cache").iterdir() if p.name.startswith("features-") and p.is_dir()]
    assert len(cached) == 1 and json.loads((cached[0] / "manifest.json").read_text())["status"] == "complete"
    from mars_ray.stages import cache

    trials = sorted((r / "trials").iterdir())
    assert len(trials) == 2
    for t in trials:
        assert cache.resolve(t) == current(cached[0])
        assert (current(t / "select") / "report.json").is_file() and (current(t / "debias") / "stats.json").is_file()
    assert C.build(trials[0] / "config.yaml").features.cache_dir == f"{run}/cache"
    # Ray Tune kept its experiment state on S3 too
    assert (r / "tune" / "experiment").is_dir()
    _no_stray_local_folder()


def test_tune_on_s3_mlflow_runs_and_artifacts(sweep):
    import mlflow
    from mlflow.tracking import MlflowClient

    run, summary, uri = sweep
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[summary["experiment"]])
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    assert sorted(runs["params.select.alpha"]) == ["0.2", "0.6"]
    assert runs["metrics.debiased_miou"].notna().all()
    client = MlflowClient(uri)
    assert client.get_experiment_by_name(summary["experiment"]).artifact_location == f"{run}/mlartifacts"
    for run_id in runs["run_id"]:
        assert client.get_run(run_id).info.artifact_uri.startswith(f"{run}/mlartifacts/")
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"report.json", "montage.png", "stats.json", "config.yaml"} <= names
    best = runs[runs["metrics.debiased_miou"] == runs["metrics.debiased_miou"].max()]["run_id"].iloc[0]
    assert {a.path for a in client.list_artifacts(best, "sweep")} >= {"sweep/results.csv", "sweep/best.yaml"}


def test_best_yaml_on_s3_reruns_to_the_same_objective(sweep, bucket: str):
    from mars_ray.stages.evaluate_labels import evaluate

    run, summary, _ = sweep
    best = f"{run}/tune/best.yaml"
    cfg = C.build(best)
    assert cfg.select.alpha == summary["best"]["select.alpha"] and cfg.features.cache_dir == ""
    assert re.match(r"s3://", cfg.data.root)
    rerun = f"{bucket}/rerun"
    assert main(["run", "--config", best, "--out", rerun, "--until", "debias"]) == 0
    m = evaluate(cfg.data.root, upath(rerun) / "debias", cfg.data.split)
    assert m["miou"] == pytest.approx(summary["best"]["debiased_miou"], abs=1e-9)
    _no_stray_local_folder()
