"""``mars tune``: space files → Tune domains, early errors, a 2 α × 2 K_bg sweep on local Ray."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from mars_ray import config as C
from mars_ray import tune as T

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"
SMOKE = SPACES / "alpha_kbg_smoke.yaml"


def _space(tmp_path: Path, params: dict, **extra) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({"objective": {"metric": "debiased_miou", "mode": "max"}, "params": params, **extra}))
    return p


# -- space files --------------------------------------------------------------------------------


def test_every_kind_maps_to_a_tune_domain(tmp_path: Path):
    from ray.tune.search.sample import Categorical, Float, Integer

    space = T.load_space(_space(tmp_path, {
        "select.alpha": {"grid_search": [0.1, 0.5]},
        "features.k_bg": {"choice": [1, 2, 4]},
        "debias.threshold": {"uniform": [0.2, 0.8]},
        "train.lr": {"loguniform": [1e-4, 1e-1]},
        "features.k_fg": {"randint": [1, 4]},
    }))
    ps = T.validate_space(space, C.Config())
    assert ps["select.alpha"] == {"grid_search": [0.1, 0.5]}
    assert isinstance(ps["features.k_bg"], Categorical) and ps["features.k_bg"].categories == [1, 2, 4]
    assert isinstance(ps["debias.threshold"], Float) and type(ps["debias.threshold"].sampler).__name__ == "_Uniform"
    assert isinstance(ps["train.lr"], Float) and type(ps["train.lr"].sampler).__name__ == "_LogUniform"
    assert isinstance(ps["features.k_fg"], Integer) and (ps["features.k_fg"].lower, ps["features.k_fg"].upper) == (1, 4)
    # every other key of the config travels as a constant: a trial's config is the full config
    assert set(ps) == set(C.known_keys()) and ps["select.chunk_rows"] == C.Config().select.chunk_rows


@pytest.mark.parametrize("name", sorted(p.name for p in SPACES.glob("*.yaml")))
@pytest.mark.parametrize("smoke", [False, True])
def test_shipped_spaces_validate(name: str, smoke: bool):
    space = T.load_space(SPACES / name, smoke=smoke)
    T.validate_space(space, C.build(overrides=space.overrides))
    if name == "alpha_kbg.yaml":
        assert T.grid_size(space) == (4 if smoke else 45)
        assert space.metric == "debiased_miou" and space.mode == "max"
    if name == "complement.yaml":
        assert space.metric == "val_miou" and space.scheduler["type"] == "asha"
    if name == "debias.yaml":  # threshold × CRF on/off: the binarisation, our choice (README)
        assert T.grid_size(space) == (2 if smoke else 10) and space.metric == "debiased_miou"


@pytest.mark.parametrize(
    "params, match",
    [
        ({"select.alfa": {"grid_search": [0.1]}}, "unknown config key"),
        ({"select.alpha": {"grid_search": [0.1, "abc"]}}, r"select.alpha = 'abc'.*expected a number"),
        ({"features.k_bg": {"choice": [1, 2.5]}}, r"features.k_bg = 2.5.*expected an integer"),
        ({"select.alpha": {"grid_search": []}}, "non-empty list"),
        ({"select.alpha": {"grid_search": [0.4, 1.5]}}, r"select.alpha must be in \(0, 1\]"),
        ({"features.k_bg": {"uniform": [1, 4]}}, "draws real numbers but the key is int"),
        ({"train.lr": {"loguniform": [0, 1]}}, "low > 0"),
        # every point of a space goes through the whole config validation (issue 12: it used to pass here)
        ({"train.lr": {"grid_search": [-1]}}, r"train.lr = -1: train.lr must be > 0"),
        ({"uss.epochs": {"randint": [0, 3]}}, r"uss.epochs = 0: uss.epochs must be >= 1"),
        ({"wsss.bg_threshold": {"uniform": [0.5, 1.5]}}, r"wsss.bg_threshold must be in \[0, 1\]"),
        ({"evaluate.scales": {"choice": [[1.0, -0.5]]}}, "evaluate.scales must be positive factors"),
        ({"train.model": {"choice": ["deeplab_tiny", "unet"]}}, "train.model='unet' is not a segmentation model"),
    ],
)
def test_bad_space_values_are_named(tmp_path: Path, params: dict, match: str):
    space = T.load_space(_space(tmp_path, params))
    with pytest.raises(ValueError, match=match):
        T.validate_space(space, C.Config())


def test_bad_space_shapes(tmp_path: Path):
    with pytest.raises(ValueError, match="at least one config key"):
        T.load_space(_space(tmp_path, {}))
    with pytest.raises(ValueError, match="objective.metric"):
        T.load_space(_space(tmp_path, {"select.alpha": {"choice": [0.4]}}, objective={"metric": "acc"}))
    with pytest.raises(ValueError, match="ASHA needs"):
        T.load_space(_space(tmp_path, {"select.alpha": {"choice": [0.4]}}, scheduler={"type": "asha"}))
    with pytest.raises(ValueError, match="expected one of"):
        T.load_space(_space(tmp_path, {"select.alpha": {"normal": [0, 1]}}))
    with pytest.raises(ValueError, match="smoke"):
        T.load_space(_space(tmp_path, {"select.alpha": {"choice": [0.4]}}), smoke=True)


@pytest.mark.ray
def test_tune_with_a_bad_grid_fails_before_ray_starts(tiny_data: Path, tmp_path: Path, capsys):
    """`mars tune` with train.lr: {grid_search: [-1]}: one line, exit 2, no Ray, nothing written."""
    import ray

    from mars_ray.cli import main

    space = _space(tmp_path, {"train.lr": {"grid_search": [0.01, -1]}})
    was_up = ray.is_initialized()
    rc = main(["tune", "--space", str(space), "--data", str(tiny_data), "--pseudo-labels",
               str(tiny_data / "pseudo_labels"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "params.train.lr = -1: train.lr must be > 0" in err[0]
    assert ray.is_initialized() == was_up and not (tmp_path / "run").exists()


def test_asha_milestones():
    assert T.milestones(30, {"type": "fifo"}) == [30]
    assert T.milestones(10, {"type": "asha", "grace_period": 1, "reduction_factor": 2}) == [1, 2, 4, 8, 10]
    assert T.milestones(2, {"type": "asha", "grace_period": 2}) == [2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"overrides": {"select.alfa": 0.3}}, "unknown config key 'select.alfa'"),
        ({"overrides": {"features.k_bg": "two"}}, "expected an integer"),
        ({"tracking_uri": "http://127.0.0.1:9"}, "unreachable"),
    ],
)
def test_bad_input_fails_before_any_trial(tiny_data: Path, tmp_path: Path, kwargs: dict, match: str):
    overrides = {"data.root": str(tiny_data), "data.pseudo_labels": str(tiny_data / "pseudo_labels"),
                 **kwargs.pop("overrides", {})}
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        T.run_sweep(SMOKE, tmp_path / "run", overrides=overrides, verbose=0, **kwargs)
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "run" / T.TRIALS_DIR).exists() and not (tmp_path / "run" / T.TUNE_DIR).exists()


def test_uri_run_without_tracking_uri_fails_before_any_trial(tiny_data: Path, s3_bucket: str, monkeypatch):
    """sqlite cannot live on an object store: a URI --out needs --tracking-uri, said before anything runs."""
    from mars_ray.storage import upath

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = {"data.root": str(tiny_data), "data.pseudo_labels": str(tiny_data / "pseudo_labels")}
    with pytest.raises(ValueError, match=r"--tracking-uri.*sqlite:////local/path/mlflow.db"):
        T.run_sweep(SMOKE, f"{s3_bucket}/run", overrides=overrides, verbose=0)
    assert not (upath(s3_bucket) / "run").exists()


def test_uri_run_without_boto3_fails_before_any_trial(tiny_data: Path, s3_bucket: str, tmp_path: Path, monkeypatch):
    import sys

    from mars_ray.storage import upath

    monkeypatch.setitem(sys.modules, "boto3", None)  # as if boto3 were not installed
    overrides = {"data.root": str(tiny_data), "data.pseudo_labels": str(tiny_data / "pseudo_labels")}
    with pytest.raises(ValueError, match=r"s3://.*/run/mlartifacts: MLflow writes s3:// artifacts with boto3"):
        T.run_sweep(SMOKE, f"{s3_bucket}/run", overrides=overrides, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                    verbose=0)
    run = upath(s3_bucket) / "run"
    assert not (run / T.TRIALS_DIR).exists() and not (run / T.TUNE_DIR).exists() and not (run / T.CACHE_DIR).exists()


@pytest.mark.ray
def test_features_cache_computes_once_under_concurrency(tiny_data: Path, tmp_path: Path, monkeypatch, ray_local):
    """Two runs asking for the same features artifact at once: one computes, the other waits and reuses."""
    from mars_ray.stages import features

    calls = []

    def fake_compute(cfg, run_dir, dataset, sd, stats=None):  # stats: the adaptive fit it would store
        calls.append(sd.path)
        sd.begin()
        time.sleep(0.5)
        sd.finish({"table": features.TABLE})

    monkeypatch.setattr(features, "_compute", fake_compute)
    cfg = C.build(overrides={"data.root": str(tiny_data), "data.pseudo_labels": str(tiny_data / "pseudo_labels"),
                             "features.cache_dir": str(tmp_path / "cache")})
    errors = []

    def one(i: int) -> None:
        try:
            features.run(cfg, tmp_path / f"run{i}")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    target = calls[0]
    assert target.parent == tmp_path / "cache" and target.name.startswith("features-")
    for i in range(3):
        link = tmp_path / f"run{i}" / "features"
        assert link.is_symlink() and link.resolve() == target.resolve()
        assert json.loads((link / "manifest.json").read_text())["status"] == "complete"
    # a different K_bg is another artifact
    features.run(C.merge(cfg, {"features.k_bg": 3}), tmp_path / "run0")
    assert len(calls) == 2 and (tmp_path / "run0" / "features").resolve() == calls[1].resolve()


def test_mlflow_artifact_failures_are_returned_not_swallowed(tmp_path: Path):
    """An artifact store MLflow cannot write (its folder is a file) fails one trial's upload: the
    error comes back (for summary.json) and the other trial's artifacts are still logged."""
    from mlflow.tracking import MlflowClient

    from mars_ray import tracking
    from mars_ray.tune import sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    client = MlflowClient(uri)
    client.create_run(tracking.ensure_experiment(uri, "bad", blocker.as_uri()), run_name="trial_a")
    good_exp = tracking.ensure_experiment(uri, "good", (tmp_path / "art").as_uri())
    good = client.create_run(good_exp, run_name="trial_b").info.run_id
    run_dir = tmp_path / "run"
    for t in ("a", "b"):
        (run_dir / T.TRIALS_DIR / t).mkdir(parents=True)
        (run_dir / T.TRIALS_DIR / t / "config.yaml").write_text("x: 1\n")
    rows = [({"trial_id": "a"}, {})]
    errors = sweep._log_artifacts(uri, "bad", rows, run_dir, run_dir / T.TUNE_DIR, best_trial="none")
    assert len(errors) == 1 and errors[0].startswith("trial a: ") and "blocker" in errors[0]
    assert sweep._log_artifacts(uri, "good", [({"trial_id": "b"}, {})], run_dir, run_dir / T.TUNE_DIR, "none") == []
    assert [a.path for a in client.list_artifacts(good)] == ["config.yaml"]


# -- a real sweep -------------------------------------------------------------------------------


def tiny_data_root(run_dir: Path) -> str:
    return C.build(run_dir / "config.yaml").data.root


@pytest.fixture(scope="module")
def sweep(tiny_data: Path, ray_local, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("tune") / "run"
    summary = T.run_sweep(SMOKE, run_dir, overrides={"data.root": str(tiny_data),
                                                     "data.pseudo_labels": str(tiny_data / "pseudo_labels")},
                          verbose=0)
    return run_dir, summary


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sweep_reuses_features_per_k_bg(sweep):
    run_dir, summary = sweep
    assert summary["trials"] == 4 and summary["failed"] == 0
    cached = sorted((run_dir / "cache").glob("features-*"))
    assert len(cached) == 2  # one clustering per K_bg, shared by both alphas
    for c in cached:
        m = json.loads((c / "manifest.json").read_text())
        assert m["status"] == "complete"
    trials = sorted((run_dir / T.TRIALS_DIR).iterdir())
    assert len(trials) == 4
    targets = {}
    for t in trials:
        link = t / "features"
        assert link.is_symlink()
        k_bg = C.build(t / "config.yaml").features.k_bg
        targets.setdefault(k_bg, set()).add(link.resolve())
        assert (t / "select" / "report.json").is_file() and (t / "debias" / "stats.json").is_file()
    assert sorted(targets) == [1, 2] and all(len(v) == 1 for v in targets.values())
    assert summary["features_computed"] == 2
    import csv

    rows = list(csv.DictReader((run_dir / "tune" / "results.csv").open()))
    assert len(rows) == 4 and sum(float(r["features_reused"]) for r in rows) == 2
    assert {(r["select.alpha"], r["features.k_bg"]) for r in rows} == {("0.2", "1"), ("0.2", "2"), ("0.6", "1"), ("0.6", "2")}
    assert (run_dir / "tune" / "heatmap.png").stat().st_size > 1000
    assert "0.2" in summary["table"] and "0.6" in summary["table"]
    # the reference point: the pseudo labels' own score, in the summary, the table and the log note
    from mars_ray.stages.evaluate_labels import evaluate

    ref = evaluate(tiny_data_root(run_dir), C.build(run_dir / "config.yaml").data.pseudo_labels, "train")
    assert summary["reference"]["value"] == pytest.approx(ref["miou"])
    assert f"pseudo labels (reference, no debiasing): debiased_miou {100 * ref['miou']:.2f}" in summary["table"]
    assert "beat" in summary["reference_note"]


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_mlflow_runs(sweep):
    import mlflow
    from mlflow.tracking import MlflowClient

    run_dir, summary = sweep
    uri = summary["tracking_uri"]
    assert uri == f"sqlite:///{run_dir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[summary["experiment"]])
    assert len(runs) == 4 and set(runs["status"]) == {"FINISHED"}
    assert sorted(zip(runs["params.select.alpha"], runs["params.features.k_bg"])) == [
        ("0.2", "1"), ("0.2", "2"), ("0.6", "1"), ("0.6", "2")]
    assert set(runs["params.data.root"]) == {str(C.build(run_dir / "config.yaml").data.root)}
    for m in ("debiased_miou", "debiased_fp", "debiased_fn", "target_ratio", "biased_fraction", "time_features_s"):
        assert runs[f"metrics.{m}"].notna().all(), m
    assert not any(c.startswith("metrics.config/") for c in runs.columns)
    assert summary["artifact_errors"] == []
    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(runs["run_id"][0])}
    assert {"report.json", "montage.png", "stats.json", "config.yaml"} <= names


@pytest.mark.ray
@pytest.mark.slow
def test_best_yaml_reruns_to_the_same_objective(sweep, tmp_path: Path):
    from mars_ray.cli import main
    from mars_ray.stages.evaluate_labels import evaluate

    run_dir, summary = sweep
    best = run_dir / "tune" / "best.yaml"
    cfg = C.build(best)
    assert cfg.select.alpha == summary["best"]["select.alpha"]
    assert cfg.features.k_bg == summary["best"]["features.k_bg"] and cfg.features.cache_dir == ""
    assert main(["run", "--config", str(best), "--out", str(tmp_path / "rerun"), "--until", "debias"]) == 0
    m = evaluate(cfg.data.root, tmp_path / "rerun" / "debias", cfg.data.split)
    assert m["miou"] == pytest.approx(summary["best"]["debiased_miou"], abs=1e-9)


@pytest.mark.ray
@pytest.mark.slow
def test_report_of_a_sweep_shows_its_heatmap_and_table(sweep):
    from mars_ray.report import write_report

    run_dir, summary = sweep
    index = write_report(run_dir)
    html = index.read_text()
    assert '<section id="sweep">' in html and 'src="sweep-heatmap.png"' in html
    assert (index.parent / "sweep-heatmap.png").read_bytes() == (run_dir / "tune" / "heatmap.png").read_bytes()
    assert f"{summary['trials']} trials" in html and "0.6" in html
    assert 'id="label-quality"' in html  # the pseudo labels' own score: the sweep's reference point
