"""``mars tune``: Ray Tune over config keys (α, K_bg, training knobs) with MLflow tracking.

A *space* file (``tune_spaces/*.yaml``) maps dotted config keys to search domains::

    objective: {metric: debiased_miou, mode: max}   # or debiased_fp/min, debiased_fn/min, val_miou/max
    params:
      select.alpha: {grid_search: [0.1, 0.2]}       # also choice: [..], uniform: [lo, hi],
      features.k_bg: {grid_search: [1, 2]}          #   loguniform: [lo, hi], randint: [lo, hi)
    num_samples: 1                                  # repeats of the grid / number of random samples
    max_concurrent_trials: 1
    scheduler: {type: fifo}                         # or {type: asha, grace_period: 1, reduction_factor: 2}
    search_alg: {type: basic}                       # Tune's BasicVariantGenerator (grid + random)
    set: {debias.crf: true}                         # overrides for every trial (--set wins)
    smoke: {params: {...}, set: {...}, num_samples: 1}   # what --smoke-test replaces

Every value a space can produce is checked by building the config with it (unknown keys, wrong
types, out-of-range values, empty grids) before Ray starts. A trial is a function trainable that
runs the stages in its own folder ``RUN/trials/<trial_id>``: features → select → debias and
``evaluate_labels`` (cheap objectives); for ``val_miou`` also train → evaluate, in rungs of epochs
so that ASHA can stop a trial between rungs (``train`` extends a finished run).

``features`` is content-addressed (``features.cache_dir = RUN/cache``): trials differing only in α
share one clustering per K_bg (``stages/features.py``).

Resources: each trial reserves one placement-group bundle of 1 CPU, which its own Ray core actor
(``select``'s reduction actor, captured by the trial's placement group) uses; the trial function
itself takes 0 CPU, and its Ray Data stages run outside the placement group (Ray Data schedules with
``SPREAD``), so a local run needs 2 CPUs per concurrent trial — checked before the sweep starts.

Outputs: ``RUN/tune/results.csv``, ``RUN/tune/heatmap.png``, ``RUN/tune/best.yaml`` (a full config
``mars run --config`` accepts), ``RUN/tune/summary.json``, MLflow runs (one per trial) in
``RUN/mlflow.db`` unless ``--tracking-uri``/``$MLFLOW_TRACKING_URI`` says otherwise.

``RUN`` may be an object-store URI (``s3://bucket/run``, ``mars_ray.storage``): trials, the features
cache and Tune's own experiment state then live there too, and the tracking URI must be given
(``tracking.resolve_tracking_uri``); MLflow artifacts go to ``RUN/mlartifacts``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import posixpath
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


from mars_ray import config as C
from mars_ray import storage, tracking
from mars_ray.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text, read_manifest
from mars_ray.storage import AnyPath, ObjectPath, upath

logger = logging.getLogger(__name__)

OBJECTIVES: dict[str, str] = {  # metric → the mode it is normally optimised in
    "debiased_miou": "max",
    "debiased_fp": "min",
    "debiased_fn": "min",
    "val_miou": "max",
}
EXPENSIVE = {"val_miou"}  # objectives that need train → evaluate
KINDS = ("grid_search", "choice", "uniform", "loguniform", "randint")
SPACE_KEYS = {"description", "objective", "params", "num_samples", "max_concurrent_trials", "scheduler",
              "search_alg", "set", "smoke"}
PATH_KEYS = ("data.root", "data.pseudo_labels", "data.features_dir", "features.checkpoint", "features.cache_dir",
             "train.pretrained_backbone", "train.labels", "train.init_checkpoint", "evaluate.checkpoint",
             "uss.backbone_weights")
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
CACHE_DIR = "cache"
MONTAGE_IMAGES = 4


@dataclass(frozen=True)
class Space:
    """A parsed search-space file (after ``--smoke-test`` substitution)."""

    path: str
    params: dict[str, dict[str, Any]]  # key → {kind: args}
    metric: str
    mode: str
    num_samples: int = 1
    max_concurrent_trials: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "fifo"})
    search_alg: dict[str, Any] = field(default_factory=lambda: {"type": "basic"})
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return upath(self.path).stem

    @property
    def expensive(self) -> bool:
        return self.metric in EXPENSIVE


# -- space files --------------------------------------------------------------------------------


def load_space(path: "str | Path | ObjectPath", *, smoke: bool = False) -> Space:
    """Read and check the shape of a space file (values are checked by ``validate_space``)."""
    path = upath(path)
    raw = C.read_yaml_mapping(path, "search space")
    unknown = set(raw) - SPACE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown entries {sorted(unknown)}; a space has {sorted(SPACE_KEYS)}")
    if smoke:
        sm = raw.get("smoke")
        if not isinstance(sm, dict):
            raise ValueError(f"{path}: --smoke-test needs a 'smoke:' mapping (params / set / num_samples)")
        bad = set(sm) - {"params", "set", "num_samples", "max_concurrent_trials"}
        if bad:
            raise ValueError(f"{path}: unknown entries in smoke: {sorted(bad)}")
        raw = {**raw, **{k: v for k, v in sm.items() if k != "set"},
               "set": {**C.flatten(raw.get("set") or {}), **C.flatten(sm.get("set") or {})}}
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{path}: 'params' must map at least one config key to a domain")
    parsed: dict[str, dict[str, Any]] = {}
    for key, dom in params.items():
        if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in KINDS:
            raise ValueError(f"{path}: params.{key}: expected one of {{{', '.join(KINDS)}: …}}, got {dom!r}")
        parsed[str(key)] = dict(dom)
    objective = raw.get("objective") or {"metric": "debiased_miou"}
    if not isinstance(objective, dict):
        raise ValueError(f"{path}: 'objective' must be {{metric: …, mode: max|min}}")
    metric = objective.get("metric", "debiased_miou")
    if metric not in OBJECTIVES:
        raise ValueError(f"{path}: objective.metric {metric!r} is not one of {sorted(OBJECTIVES)}")
    mode = objective.get("mode", OBJECTIVES[metric])
    if mode not in ("max", "min"):
        raise ValueError(f"{path}: objective.mode must be 'max' or 'min', got {mode!r}")
    scheduler = raw.get("scheduler") or {"type": "fifo"}
    if not isinstance(scheduler, dict) or scheduler.get("type") not in ("fifo", "asha"):
        raise ValueError(f"{path}: scheduler.type must be 'fifo' or 'asha', got {scheduler!r}")
    search_alg = raw.get("search_alg") or {"type": "basic"}
    if not isinstance(search_alg, dict) or search_alg.get("type") != "basic":
        raise ValueError(f"{path}: search_alg.type must be 'basic' (grid + random sampling), got {search_alg!r}")
    overrides = raw.get("set") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: 'set' must map config keys to values")
    out = Space(
        path=str(path), params=parsed, metric=metric, mode=mode,
        num_samples=_positive_int(path, "num_samples", raw.get("num_samples", 1)),
        max_concurrent_trials=_positive_int(path, "max_concurrent_trials", raw.get("max_concurrent_trials", 1)),
        scheduler=scheduler, search_alg=search_alg, overrides=C.flatten(overrides),
    )
    if out.scheduler["type"] == "asha" and not out.expensive:
        raise ValueError(f"{path}: ASHA needs an objective reported over epochs (val_miou), not {metric!r}")
    return out


def _positive_int(path: AnyPath, key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{path}: {key} must be a positive integer, got {v!r}")
    return v


def _key_type(key: str) -> Any:
    section, name = key.split(".", 1)
    return typing.get_type_hints(typing.get_type_hints(C.Config)[section])[name]


def _check_value(space: Space, base: C.Config, key: str, value: Any) -> Any:
    """The value as the config stores it, or ``ValueError`` naming the space, key and value."""
    try:
        cfg = C.merge(base, {key: value}, source=space.path)
        C.validate(cfg)
    except ValueError as e:
        raise ValueError(f"{space.path}: params.{key} = {value!r}: {e}") from None
    section, name = key.split(".", 1)
    return C.to_dict(getattr(getattr(cfg, section), name))


def validate_space(space: Space, base: C.Config) -> dict[str, Any]:
    """Check every key and value a space can produce; returns the Tune ``param_space``.

    ``param_space`` holds the searched domains and, as constants, every other key of the flattened
    ``base`` config, so each trial's config (and its MLflow params) is the full config.
    """
    from ray import tune

    known = set(C.known_keys())
    domains: dict[str, Any] = {}
    for key, dom in space.params.items():
        if key not in known:
            raise ValueError(f"{space.path}: params.{key}: unknown config key (see `mars_ray.config.known_keys()`)")
        (kind, args), = dom.items()
        if kind in ("grid_search", "choice"):
            if not isinstance(args, list) or not args:
                raise ValueError(f"{space.path}: params.{key}: {kind} needs a non-empty list, got {args!r}")
            values = [_check_value(space, base, key, v) for v in args]
            domains[key] = tune.grid_search(values) if kind == "grid_search" else tune.choice(values)
            continue
        if not isinstance(args, list) or len(args) != 2 or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args
        ):
            raise ValueError(f"{space.path}: params.{key}: {kind} needs [low, high] numbers, got {args!r}")
        low, high = args
        typ = _key_type(key)
        if kind == "randint":
            if typ is not int or not all(isinstance(a, int) for a in args):
                raise ValueError(f"{space.path}: params.{key}: randint needs an integer key and integer bounds")
            if high <= low:
                raise ValueError(f"{space.path}: params.{key}: randint [{low}, {high}) is empty")
            _check_value(space, base, key, low)
            _check_value(space, base, key, high - 1)
            domains[key] = tune.randint(low, high)
            continue
        if typ is not float:
            raise ValueError(f"{space.path}: params.{key}: {kind} draws real numbers but the key is {typ.__name__}")
        if high <= low:
            raise ValueError(f"{space.path}: params.{key}: {kind} [{low}, {high}] is empty")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"{space.path}: params.{key}: loguniform needs low > 0, got {low}")
        _check_value(space, base, key, float(low))
        _check_value(space, base, key, float(high))
        domains[key] = tune.uniform(low, high) if kind == "uniform" else tune.loguniform(low, high)
    constants = {k: v for k, v in C.flatten(C.to_dict(base)).items() if k not in domains}
    return {**constants, **domains}


def grid_size(space: Space) -> int:
    """Trials the sweep will run: product of the grids × num_samples."""
    n = 1
    for dom in space.params.values():
        if "grid_search" in dom:
            n *= len(dom["grid_search"])
    return n * space.num_samples


# -- the trial ----------------------------------------------------------------------------------


def run_trial(cfg: C.Config, trial_dir: "str | Path | ObjectPath", *, expensive: bool = False, milestones: list[int] | None = None,
              report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the stages a trial needs in ``trial_dir``; returns (and reports) the figures.

    Cheap: features → select → debias, then ``evaluate_labels`` of the debiased labels on
    ``data.split``. Expensive: additionally train → evaluate at each epoch count in ``milestones``
    (each rung extends the previous training run) and reports ``val_miou`` after every rung.
    """
    from mars_ray.stages import debias, evaluate_labels, features, select

    trial_dir = upath(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    C.dump_yaml(cfg, trial_dir / "config.yaml")
    cached = features.cache_path(cfg, trial_dir)
    reused = bool(cached and (read_manifest(cached) or {}).get("status") == "complete")
    out: dict[str, Any] = {"features_reused": float(reused)}
    for name, stage in (("features", features), ("select", select), ("debias", debias)):
        t0 = time.perf_counter()
        stage.run(cfg, trial_dir)
        out[f"time_{name}_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = evaluate_labels.evaluate(cfg.data.root, trial_dir / "debias", cfg.data.split, ray_cfg=cfg.ray)
    out["time_evaluate_labels_s"] = time.perf_counter() - t0
    out.update(debiased_miou=m["miou"], debiased_fp=m["fp"], debiased_fn=m["fn"])
    report_json = json.loads((trial_dir / "select" / "report.json").read_text())
    stats = json.loads((trial_dir / "debias" / "stats.json").read_text())
    out.update(target_ratio=_num(report_json.get("target_ratio")), n_chosen=report_json["n_chosen"],
               biased_fraction=stats["biased_fraction"])
    if not expensive:
        if report:
            report(out)
        return out
    from mars_ray.stages import evaluate as evaluate_stage
    from mars_ray.stages import train as train_stage

    for epochs in milestones or [cfg.train.epochs]:
        rung = C.merge(cfg, {"train.epochs": epochs})
        t0 = time.perf_counter()
        train_stage.run(rung, trial_dir)
        out["time_train_s"] = out.get("time_train_s", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = json.loads((evaluate_stage.run(rung, trial_dir) / "metrics.json").read_text())
        out["time_evaluate_s"] = out.get("time_evaluate_s", 0.0) + time.perf_counter() - t0
        out.update(val_miou=_num(ev.get("miou")), val_fp=_num(ev.get("fp")), val_fn=_num(ev.get("fn")),
                   epoch=epochs)
        if report:
            report(dict(out))
    return out


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def milestones(epochs: int, scheduler: Mapping[str, Any]) -> list[int]:
    """Epoch counts at which a trial reports: ASHA's rungs (grace·η^k) below ``epochs``, then ``epochs``."""
    if scheduler.get("type") != "asha":
        return [epochs]
    grace = int(scheduler.get("grace_period", 1))
    eta = float(scheduler.get("reduction_factor", 2))
    out, r = [], grace
    while r < epochs:
        out.append(r)
        r = max(r + 1, int(math.ceil(r * eta)))
    return out + [epochs]


def _trainable(params: dict[str, Any], *, run_dir: str, expensive: bool, scheduler: dict[str, Any]) -> None:
    """Tune function trainable: the trial's config is exactly ``params`` (the flattened full config)."""
    from ray import tune

    cfg = C.build(overrides=params)
    trial_dir = upath(run_dir) / TRIALS_DIR / tune.get_context().get_trial_id()
    run_trial(cfg, trial_dir, expensive=expensive, milestones=milestones(cfg.train.epochs, scheduler),
              report=tune.report)


# -- the sweep ----------------------------------------------------------------------------------


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
    """Pseudo labels and the USS checkpoint are shared by all trials: produce them once, here."""
    updates: dict[str, Any] = {}
    if not cfg.data.pseudo_labels:
        try:
            from mars_ray.stages import wsss
        except ImportError:
            raise ValueError("no pseudo labels: pass --pseudo-labels DIR (the built-in wsss stage is not available)") from None
        updates["data.pseudo_labels"] = storage.absolute(wsss.run(cfg, run_dir))
    if cfg.features.extractor == "stego" and not cfg.features.checkpoint and not cfg.data.features_dir:
        try:
            from mars_ray.stages import uss
        except ImportError:
            raise ValueError("features.extractor=stego needs features.checkpoint (the uss stage is not available)") from None
        updates["features.checkpoint"] = storage.absolute(uss.run(cfg, run_dir) / "checkpoint.pt")
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
    space_path: "str | Path | ObjectPath",
    run_dir: "str | Path | ObjectPath",
    *,
    config_file: "str | Path | ObjectPath | None" = None,
    overrides: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    smoke: bool = False,
    cache: bool = True,
    verbose: int = 1,
) -> dict[str, Any]:
    """Validate everything, run the Tune sweep, write results/heatmap/best config, log to MLflow.

    ``run_dir`` is a local folder or an object-store URI; for a URI the tracking store must be
    given (``tracking_uri`` or ``$MLFLOW_TRACKING_URI``), which is checked before anything starts.
    """
    from mars_ray.stages import features as features_stage
    from mars_ray.stages.runtime import ensure_ray

    run_dir = upath(storage.absolute(run_dir))
    space = load_space(space_path, smoke=smoke)
    base = C.build(config_file, {**space.overrides, **dict(overrides or {})})
    if not base.data.root:
        raise ValueError("no dataset: pass --data ROOT (or data.root in --config)")
    if cache and not base.features.cache_dir:
        base = C.merge(base, {"features.cache_dir": str(run_dir / CACHE_DIR)})
    base = _absolute_paths(base)
    validate_space(space, base)  # bad keys/values fail here, before anything is written or started
    if space.expensive:
        import importlib

        try:
            for name in ("train", "evaluate"):
                importlib.import_module(f"mars_ray.stages.{name}")
        except ImportError as e:
            raise ValueError(f"objective {space.metric!r} needs the train and evaluate stages ({e})") from None
    uri = tracking.resolve_tracking_uri(run_dir, tracking_uri)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking.probe(uri)
    exp_name = experiment or f"mars-tune-{space.name}"
    artifact_location = tracking.default_artifact_location(uri, run_dir)
    tracking.check_artifact_location(tracking.experiment_artifact_location(uri, exp_name, artifact_location))
    base = _prepare_inputs(base, run_dir)
    features_stage.validate_inputs(base, run_dir)
    param_space = validate_space(space, base)
    ensure_ray(base.ray)
    _check_capacity(space, base)
    C.dump_yaml(base, run_dir / "config.yaml")
    tracking.ensure_experiment(uri, exp_name, artifact_location)

    n = grid_size(space)
    logger.info("tune: %s, %d trial(s), objective %s (%s), tracking %s", space.path, n, space.metric, space.mode, uri)
    t0 = time.perf_counter()
    with tracking.isolated_tracking_uri():
        results = _fit(space, param_space, run_dir, uri, exp_name, verbose)
        wall = time.perf_counter() - t0
        return _finish(space, base, run_dir, results, uri, exp_name, wall, smoke)


def _fit(space: Space, param_space: dict[str, Any], run_dir: AnyPath, uri: str, exp_name: str, verbose: int) -> Any:
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class _MLflowCallback(MLflowLoggerCallback):
        """Params = the trial's config; metrics = what the trial reported (not the config again)."""

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            super().log_trial_result(iteration, trial, {k: v for k, v in result.items() if k != "config"})

    run_root, expensive, sched = str(run_dir), space.expensive, dict(space.scheduler)

    def mars_trial(config: dict[str, Any]) -> None:
        _trainable(config, run_dir=run_root, expensive=expensive, scheduler=sched)

    trainable = tune.with_resources(mars_trial, tune.PlacementGroupFactory([{}, {"CPU": 1}]))
    scheduler = None
    if space.scheduler["type"] == "asha":
        from ray.tune.schedulers import ASHAScheduler

        if "train.epochs" in space.params:
            max_t = max(int(v) for v in _grid_values(space, "train.epochs"))
        else:
            max_t = int(param_space["train.epochs"])
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t,
                                  grace_period=int(space.scheduler.get("grace_period", 1)),
                                  reduction_factor=float(space.scheduler.get("reduction_factor", 2)))
    storage_path, storage_filesystem = storage.ray_storage(run_dir / TUNE_DIR)
    tuner = tune.Tuner(
        trainable,
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


def _grid_values(space: Space, key: str) -> list[Any]:
    dom = space.params.get(key)
    if not dom:
        return []
    (kind, args), = dom.items()
    return list(args) if kind in ("grid_search", "choice") else [args[1]]


def _finish(space: Space, base: C.Config, run_dir: AnyPath, results: Any, uri: str, exp_name: str, wall: float,
            smoke: bool) -> dict[str, Any]:
    searched = list(space.params)
    rows = []
    for r in results:
        m = dict(r.metrics or {})
        cfg = dict(r.config or {})
        row = {"trial_id": m.get("trial_id") or posixpath.basename(str(r.path).rstrip("/")).removeprefix("trial_"),
               **{k: cfg.get(k) for k in searched},
               "status": "error" if r.error else "ok"}
        for k in ("debiased_miou", "debiased_fp", "debiased_fn", "target_ratio", "biased_fraction", "n_chosen",
                  "val_miou", "epoch", "features_reused", "time_features_s", "time_select_s", "time_debias_s",
                  "time_evaluate_labels_s", "time_train_s", "time_evaluate_s"):
            if k in m:
                row[k] = m[k]
        row["error"] = str(r.error).splitlines()[0][:300] if r.error else ""
        rows.append((row, cfg))
    ok = [(row, cfg) for row, cfg in rows if row["status"] == "ok" and _finite(row.get(space.metric))]
    if not ok:
        first = next((row["error"] for row, _ in rows if row["error"]), "no trial reported the objective")
        raise RuntimeError(f"tune: every trial failed ({len(rows)}); first error: {first}")
    pick = max if space.mode == "max" else min
    best_row, best_cfg = pick(ok, key=lambda rc: rc[0][space.metric])
    out_dir = run_dir / TUNE_DIR
    _write_csv([row for row, _ in rows], out_dir / "results.csv")
    best = C.build(overrides={**best_cfg, "features.cache_dir": ""})
    C.dump_yaml(best, out_dir / "best.yaml")
    heatmap = _heatmap([row for row, _ in ok], searched, space, out_dir / "heatmap.png")
    summary = {
        "space": space.path, "smoke": smoke, "objective": {"metric": space.metric, "mode": space.mode},
        "trials": len(rows), "failed": len(rows) - len(ok), "wall_s": round(wall, 1),
        "features_computed": sum(1 for row, _ in rows if row.get("features_reused") == 0.0),
        "best": {"trial_id": best_row["trial_id"], **{k: best_row[k] for k in searched},
                 space.metric: best_row[space.metric]},
        "results": str(out_dir / "results.csv"), "best_config": str(out_dir / "best.yaml"),
        "heatmap": str(heatmap) if heatmap else None, "tracking_uri": uri, "experiment": exp_name,
        "table": format_table([row for row, _ in rows], searched, space.metric, space.mode),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    try:
        _log_artifacts(uri, exp_name, rows, base, run_dir, out_dir, best_row["trial_id"])
    except Exception:  # noqa: BLE001 - the sweep's results are on disk; say what failed and go on
        logger.exception("tune: logging artifacts to MLflow (%s) failed", uri)
    return summary


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _write_csv(rows: list[dict[str, Any]], path: AnyPath) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


MAX_GRID = 12  # beyond this many distinct values per axis, a table/heatmap turns into a list/scatter


def _axes(searched: list[str], rows: list[dict[str, Any]] | None = None) -> tuple[str, str] | None:
    """The two keys to tabulate over (α × K_bg when both are searched), or ``None``."""
    if "select.alpha" in searched and "features.k_bg" in searched:
        axes = ("select.alpha", "features.k_bg")
    elif len(searched) >= 2:
        axes = (searched[0], searched[1])
    else:
        return None
    if rows is not None and any(len({str(r[k]) for r in rows}) > MAX_GRID for k in axes):
        return None
    return axes


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pivot(rows: list[dict[str, Any]], x: str, y: str, metric: str) -> tuple[list, list, list[list[float]]]:
    """Mean objective per (x, y) cell: x values, y values, grid [len(y)][len(x)] (NaN = no trial)."""
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows})
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        cells.setdefault((r[x], r[y]), []).append(r[metric])
    grid = [[sum(cells[(a, b)]) / len(cells[(a, b)]) if (a, b) in cells else float("nan") for a in xs] for b in ys]
    return xs, ys, grid


def format_table(rows: list[dict[str, Any]], searched: list[str], metric: str, mode: str = "max") -> str:
    """Objective over the two main searched keys as text (rows: second key, columns: first key)."""
    ok = [r for r in rows if r["status"] == "ok" and _finite(r.get(metric))]
    if not ok:
        return "no finished trials"
    axes = _axes(searched, ok)
    if axes is None:  # one key, or continuous domains: one line a trial
        lines = ["".join(f"{k:>20}" for k in searched) + f"{metric:>16}"]
        for r in sorted(ok, key=lambda r: r[metric], reverse=mode == "max"):
            lines.append("".join(f"{_fmt(r[k]):>20}" for k in searched) + f"{100 * r[metric]:16.2f}")
        return "\n".join(lines)
    x, y = axes
    xs, ys, grid = _pivot(ok, x, y, metric)
    lines = [f"{metric} in % ({y} ↓ / {x} →)", f"{'':>8}" + "".join(f"{_fmt(a):>8}" for a in xs)]
    for b, vals in zip(ys, grid):
        lines.append(f"{_fmt(b):>8}" + "".join("       -" if math.isnan(v) else f"{100 * v:8.2f}" for v in vals))
    return "\n".join(lines)


def _heatmap(rows: list[dict[str, Any]], searched: list[str], space: Space, path: AnyPath) -> AnyPath | None:
    """``heatmap.png``: the objective over the two main searched keys (or over one key as a line)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    axes = _axes(searched, rows)
    metric = space.metric
    if axes is not None:
        x, y = axes
        xs, ys, grid = _pivot(rows, x, y, metric)
        im = ax.imshow(grid, cmap="viridis" if space.mode == "max" else "viridis_r", aspect="auto", origin="lower")
        ax.set_xticks(range(len(xs)), [_fmt(v) for v in xs])
        ax.set_yticks(range(len(ys)), [_fmt(v) for v in ys])
        for i, vals in enumerate(grid):
            for j, v in enumerate(vals):
                if not math.isnan(v):
                    ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        fig.colorbar(im, ax=ax, label=f"{metric} ({space.mode})")
    else:
        k = searched[0]
        pts = sorted((r[k], r[metric]) for r in rows if isinstance(r[k], (int, float)))
        if not pts:
            return None
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if len(searched) == 1 else "")
        if space.params[k].get("loguniform"):
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
    ax.set_title(f"{space.name}: {metric} ({space.mode})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _montage(cfg: C.Config, trial_dir: AnyPath) -> AnyPath | None:
    from mars_ray.data.label_io import read_image, read_label
    from mars_ray.data.voc import VOCDataset

    if not (trial_dir / "debias").is_dir():
        return None
    dataset = VOCDataset(cfg.data.root)
    rows = []
    for image_id in dataset.ids(cfg.data.split)[:MONTAGE_IMAGES]:
        debiased = trial_dir / "debias" / f"{image_id}.png"
        if debiased.is_file():
            rows.append((image_id, read_image(dataset.image_path(image_id)),
                         read_label(upath(cfg.data.pseudo_labels) / f"{image_id}.png"), read_label(debiased)))
    return tracking.label_montage(rows, trial_dir / "montage.png") if rows else None


def _log_artifacts(uri: str, exp_name: str, rows: list[tuple[dict, dict]], base: C.Config, run_dir: AnyPath,
                   out_dir: AnyPath, best_trial: str) -> None:
    """From the driver, after the sweep: per-trial reports, label montages and training curves.

    The montage is written into the trial folder; files on an object store reach MLflow through a
    local temporary copy (``tracking.log_artifacts``).
    """
    ids = tracking.run_ids_by_name(uri, exp_name)
    for row, cfg in rows:
        run_id = ids.get(f"trial_{row['trial_id']}")
        if run_id is None:
            continue
        trial_dir = run_dir / TRIALS_DIR / row["trial_id"]
        files = [trial_dir / "config.yaml", trial_dir / "select" / "report.json", trial_dir / "debias" / "stats.json"]
        montage = _montage(C.build(overrides=cfg), trial_dir) if cfg else None
        files += [montage] if montage else []
        for sub in ("train", "train_baseline"):
            files += [trial_dir / sub / "curves.png", trial_dir / sub / "history.csv"]
        files += [trial_dir / "evaluate" / "metrics.json"]
        tracking.log_artifacts(uri, run_id, files)
        if row["trial_id"] == best_trial:
            tracking.log_artifacts(uri, run_id, [out_dir / "results.csv", out_dir / "heatmap.png",
                                                 out_dir / "best.yaml"], artifact_path="sweep")


__all__ = ["Space", "load_space", "validate_space", "grid_size", "run_trial", "run_sweep", "milestones",
           "format_table", "OBJECTIVES"]
