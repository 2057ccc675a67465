"""The sweep: check everything, prepare the shared inputs, run Ray Tune, write the results.

The space is parsed and every value it can produce checked (``tune.space``) before Ray starts; the
inputs every trial shares — pseudo labels and the learned USS — are built once, here, by the same
planning rule as ``mars run`` (``pipeline``); each trial runs its stages in ``RUN/trials/<id>``
(``tune.trial``); the results become a table, a heatmap and a best config (``tune.report``).

Resources, outputs and object-store runs: see the package docstring (``mars_ray.tune``).
"""

from __future__ import annotations

import logging
import posixpath
import time
from typing import Any, Mapping

from mars_ray import config as C
from mars_ray import errors, pipeline, storage, tracking
from mars_ray.artifacts import atomic_write_json, current, provisional
from mars_ray.runlock import run_lock
from mars_ray.storage import AnyPath, upath
from mars_ray.tune import report
from mars_ray.tune.space import Space, grid_size, grid_values, load_space, validate_space
from mars_ray.tune.trial import METRICS, TRIALS_DIR, trainable

logger = logging.getLogger(__name__)

PATH_KEYS = ("data.root", "data.pseudo_labels", "data.features_dir", "features.checkpoint", "features.cache_dir",
             "train.pretrained_backbone", "train.labels", "train.init_checkpoint", "evaluate.checkpoint",
             "uss.backbone_weights")
TUNE_DIR = "tune"
CACHE_DIR = "cache"


def _absolute_paths(cfg: C.Config) -> C.Config:
    """Tune runs trials in their own working directory: make every local path absolute (URIs stay)."""
    updates = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v:
            updates[key] = storage.absolute(v)
    return C.merge(cfg, updates)


def _prepare_inputs(cfg: C.Config, run_dir: AnyPath) -> C.Config:
    """Pseudo labels and the USS checkpoint are shared by all trials: the pre-stages the planning
    rule asks for (``pipeline.plan_stages``) run once, here, and the trials get their outputs."""
    from mars_ray.stages.inputs import uss_checkpoint

    pre = [s for s in pipeline.plan_stages(cfg) if s in pipeline.PRE_STAGES]
    done = pipeline.run_stages(cfg, run_dir, pre)
    updates: dict[str, Any] = {}
    if "wsss" in done:
        updates["data.pseudo_labels"] = storage.absolute(done["wsss"])
    if "uss" in done:
        updates["features.checkpoint"] = storage.absolute(uss_checkpoint(run_dir))
    return C.merge(cfg, updates) if updates else cfg


def _check_capacity(space: Space, cfg: C.Config) -> None:
    import ray

    if cfg.ray.address or not ray.is_initialized():
        return  # a cluster may autoscale; Tune waits for resources there
    cpus = ray.cluster_resources().get("CPU", 0)
    need = 2 * space.max_concurrent_trials
    if cpus < need:
        raise ValueError(
            f"max_concurrent_trials={space.max_concurrent_trials} needs {need} CPUs locally (1 reserved per trial "
            f"for its select actor, 1 for its Ray Data stages) but Ray has {cpus:g}; lower max_concurrent_trials"
        )


def run_sweep(
    space_path: "str | AnyPath",
    run_dir: "str | AnyPath",
    *,
    config_file: "str | AnyPath | None" = None,
    overrides: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    smoke: bool = False,
    cache: bool = True,
    verbose: int = 1,
    wait: bool = False,
    command: str = "mars tune",
) -> dict[str, Any]:
    """Validate everything, run the Tune sweep, write results/heatmap/best config, log to MLflow.

    ``run_dir`` is a local folder or an object-store URI; for a URI the tracking store must be
    given (``tracking_uri`` or ``$MLFLOW_TRACKING_URI``), which is checked before anything starts.
    Which extractor and which pre-stages: the planning rule of ``mars run`` (``pipeline``), with the
    searched keys counting as chosen. ``run_dir`` is held for the whole sweep (``runlock``; ``wait``:
    queue behind another holder; ``command`` names this sweep to a refused second process).
    """
    run_dir = upath(storage.absolute(run_dir))
    space = load_space(upath(space_path), smoke=smoke)
    base = pipeline.build_config(config_file, {**space.overrides, **dict(overrides or {})}, plan_inputs=True,
                                 searched=space.params)
    if cache and not base.features.cache_dir:
        base = C.merge(base, {"features.cache_dir": str(run_dir / CACHE_DIR)})
    base = _absolute_paths(base)
    validate_space(space, base)  # bad keys/values fail here, before anything is written or started
    uri = tracking.resolve_tracking_uri(run_dir, tracking_uri)
    with run_lock(run_dir, command=command, wait=wait, ray_cfg=base.ray):  # trials write below it, unlocked
        return _sweep(space, base, run_dir, uri, experiment, smoke, verbose)


def _sweep(space: Space, base: C.Config, run_dir: AnyPath, uri: str, experiment: str | None, smoke: bool,
           verbose: int) -> dict[str, Any]:
    """``run_sweep`` once the run folder is held: shared inputs, the Tune run, the results."""
    from mars_ray.stages.evaluate_labels import pseudo_label_reference
    from mars_ray.stages.inputs import validate_inputs
    from mars_ray.stages.runtime import ensure_ray

    run_dir.mkdir(parents=True, exist_ok=True)
    tracking.probe(uri)
    exp_name = experiment or f"mars-tune-{space.name}"
    artifact_location = tracking.default_artifact_location(uri, run_dir)
    tracking.check_artifact_location(tracking.experiment_artifact_location(uri, exp_name, artifact_location))
    base = _prepare_inputs(base, run_dir)
    validate_inputs(base, run_dir)
    param_space = validate_space(space, base)
    ensure_ray(base.ray)
    reference = pseudo_label_reference(base, space.metric)  # the score every trial must beat
    _check_capacity(space, base)
    config = run_dir / "config.yaml"
    with provisional(config, lambda: C.dump_yaml(base, config)):  # a failed sweep leaves the previous one
        tracking.ensure_experiment(uri, exp_name, artifact_location)
        n = grid_size(space)
        logger.info("tune: %s, %d trial(s), objective %s (%s), tracking %s", space.path, n, space.metric, space.mode,
                    uri)
        t0 = time.perf_counter()
        with tracking.isolated_tracking_uri():
            results = _fit(space, param_space, run_dir, uri, exp_name, verbose)
            wall = time.perf_counter() - t0
            return _finish(space, base, run_dir, results, uri, exp_name, wall, smoke, reference)


def _fit(space: Space, param_space: dict[str, Any], run_dir: AnyPath, uri: str, exp_name: str, verbose: int) -> Any:
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class _MLflowCallback(MLflowLoggerCallback):
        """Params = the trial's config; metrics = what the trial reported (not the config again)."""

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            super().log_trial_result(iteration, trial, {k: v for k, v in result.items() if k != "config"})

    run_root, expensive, sched = str(run_dir), space.expensive, dict(space.scheduler)

    def mars_trial(config: dict[str, Any]) -> None:
        trainable(config, run_dir=run_root, expensive=expensive, scheduler=sched)

    resourced = tune.with_resources(mars_trial, tune.PlacementGroupFactory([{}, {"CPU": 1}]))
    scheduler = None
    if space.scheduler["type"] == "asha":
        from ray.tune.schedulers import ASHAScheduler

        if "train.epochs" in space.params:
            max_t = max(int(v) for v in grid_values(space, "train.epochs"))
        else:
            max_t = int(param_space["train.epochs"])
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t,
                                  grace_period=int(space.scheduler.get("grace_period", 1)),
                                  reduction_factor=float(space.scheduler.get("reduction_factor", 2)))
    storage_path, storage_filesystem = storage.ray_storage(run_dir / TUNE_DIR)
    tuner = tune.Tuner(
        resourced,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=space.metric, mode=space.mode, num_samples=space.num_samples, scheduler=scheduler,
            max_concurrent_trials=space.max_concurrent_trials,
            trial_name_creator=lambda t: f"trial_{t.trial_id}",
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name="experiment", storage_path=storage_path, storage_filesystem=storage_filesystem, verbose=verbose,
            callbacks=[_MLflowCallback(tracking_uri=uri, experiment_name=exp_name,
                                       tags={"space": space.name, "run_dir": str(run_dir)})],
        ),
    )
    return tuner.fit()



def _error_line(e: BaseException) -> str:
    """A trial's error as one line: the user error behind it when there is one (``errors``)."""
    user = errors.user_error(e)
    return errors.one_line(user)[:300] if user is not None else f"{type(e).__name__}: {errors.one_line(e)}"[:300]


def _rows(space: Space, results: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """One ``(row, trial config)`` a trial: id, searched values, status, the figures it reported
    (``trial.METRICS``, in that order) and the first line of its error."""
    rows = []
    for r in results:
        m = dict(r.metrics or {})
        cfg = dict(r.config or {})
        row = {"trial_id": m.get("trial_id") or posixpath.basename(str(r.path).rstrip("/")).removeprefix("trial_"),
               **{k: cfg.get(k) for k in space.params},
               "status": "error" if r.error else "ok",
               **{k: m[k] for k in METRICS if k in m},
               "error": _error_line(r.error) if r.error else ""}
        rows.append((row, cfg))
    return rows


def _finish(space: Space, base: C.Config, run_dir: AnyPath, results: Any, uri: str, exp_name: str, wall: float,
            smoke: bool, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.csv, best.yaml, heatmap.png, MLflow artifacts, then summary.json (which records any
    artifact that could not be logged); ``RuntimeError`` when no trial reported the objective.

    ``reference``: the pseudo labels' own score (``evaluate_labels.pseudo_label_reference``), shown
    in the table, the heatmap, ``summary.json`` and the log, so a sweep whose best point does not
    beat the labels it started from says so."""
    from mars_ray.stages.evaluate_labels import reference_note

    searched = list(space.params)
    rows = _rows(space, results)
    ok = [(row, cfg) for row, cfg in rows if row["status"] == "ok" and report.finite(row.get(space.metric))]
    if not ok:
        first = next((r.error for r in results if r.error), None)  # chained: a user error behind it is
        reason = _error_line(first) if first is not None else "no trial reported the objective"  # cli's one line
        raise RuntimeError(f"tune: every trial failed ({len(rows)}); first error: {reason}") from first
    pick = max if space.mode == "max" else min
    best_row, best_cfg = pick(ok, key=lambda rc: rc[0][space.metric])
    out_dir = run_dir / TUNE_DIR
    report.write_csv([row for row, _ in rows], out_dir / "results.csv")
    best = C.build(overrides={**best_cfg, "features.cache_dir": ""})
    C.dump_yaml(best, out_dir / "best.yaml")
    ref_value = reference.get("value") if reference else None
    heatmap = report.heatmap([row for row, _ in ok], searched, space, out_dir / "heatmap.png", reference=ref_value)
    artifact_errors = _log_artifacts(uri, exp_name, rows, run_dir, out_dir, best_row["trial_id"])
    summary = {
        "space": space.path, "smoke": smoke, "objective": {"metric": space.metric, "mode": space.mode},
        "trials": len(rows), "failed": len(rows) - len(ok), "wall_s": round(wall, 1),
        "features_computed": sum(1 for row, _ in rows if row.get("features_reused") == 0.0),
        "best": {"trial_id": best_row["trial_id"], **{k: best_row[k] for k in searched},
                 space.metric: best_row[space.metric]},
        "results": str(out_dir / "results.csv"), "best_config": str(out_dir / "best.yaml"),
        "heatmap": str(heatmap) if heatmap else None, "tracking_uri": uri, "experiment": exp_name,
        "artifact_errors": artifact_errors, "reference": reference,
        "table": report.format_table([row for row, _ in rows], searched, space.metric, space.mode,
                                     reference=ref_value),
    }
    note = reference_note(reference, best_row[space.metric], space.mode)
    if note:
        logger.info("tune: %s", note)
        summary["reference_note"] = note
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _log_artifacts(uri: str, exp_name: str, rows: list[tuple[dict, dict]], run_dir: AnyPath, out_dir: AnyPath,
                   best_trial: str) -> list[str]:
    """From the driver, after the sweep: per-trial reports, label montages and training curves.

    The montage is written into the trial folder; files on an object store reach MLflow through a
    local temporary copy (``tracking.log_artifacts``). The sweep's results are on disk whatever
    happens here, so a failure is logged and returned (``"trial <id>: <error>"``, into
    ``summary.json``), and the other trials' artifacts are still logged.
    """
    errors: list[str] = []
    try:
        ids = tracking.run_ids_by_name(uri, exp_name)
    except Exception as e:  # noqa: BLE001 - recorded in summary.json
        logger.exception("tune: listing the MLflow runs of %s in %s failed", exp_name, uri)
        return [f"runs of {exp_name}: {type(e).__name__}: {e}"]
    for row, cfg in rows:
        run_id = ids.get(f"trial_{row['trial_id']}")
        if run_id is None:
            continue
        trial_dir = run_dir / TRIALS_DIR / row["trial_id"]
        try:
            files = [trial_dir / "config.yaml", current(trial_dir / "select") / "report.json",
                     current(trial_dir / "debias") / "stats.json"]
            montage = report.montage(C.build(overrides=cfg), trial_dir) if cfg else None
            files += [montage] if montage else []
            for sub in ("train", "train_baseline"):
                files += [current(trial_dir / sub) / "curves.png", current(trial_dir / sub) / "history.csv"]
            files += [current(trial_dir / "evaluate") / "metrics.json"]
            tracking.log_artifacts(uri, run_id, files)
            if row["trial_id"] == best_trial:
                tracking.log_artifacts(uri, run_id, [out_dir / "results.csv", out_dir / "heatmap.png",
                                                     out_dir / "best.yaml"], artifact_path="sweep")
        except Exception as e:  # noqa: BLE001 - recorded in summary.json
            logger.exception("tune: logging the artifacts of trial %s to MLflow (%s) failed", row["trial_id"], uri)
            errors.append(f"trial {row['trial_id']}: {type(e).__name__}: {e}")
    return errors


__all__ = ["CACHE_DIR", "PATH_KEYS", "TUNE_DIR", "run_sweep"]
