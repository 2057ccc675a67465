"""One Tune trial: the stages it needs in its own folder ``RUN/trials/<trial_id>``, and its figures.

Cheap objectives (``debiased_*``): features → select → debias, then ``evaluate_labels`` of the
debiased labels on ``data.split``. ``val_miou``: additionally train → evaluate at each rung of
epochs (``space.milestones``; each rung extends the previous training run), reporting after every
rung so that ASHA can stop a trial between them.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from mars_ray import config as C
from mars_ray import pipeline
from mars_ray.artifacts import current, read_manifest
from mars_ray.storage import AnyPath, upath
from mars_ray.tune.space import milestones

TRIALS_DIR = "trials"
CHEAP_STAGES = ("features", "select", "debias")
TRAIN_STAGES = ("train", "evaluate")

#: every figure a trial reports, in the order of ``results.csv`` (``run_trial`` refuses others):
#: objective figures first, then what explains them, then bookkeeping and stage times
METRICS: tuple[str, ...] = (
    "debiased_miou", "debiased_fp", "debiased_fn", "target_ratio", "biased_fraction", "n_chosen",
    "val_miou", "val_fp", "val_fn", "epoch", "features_reused",
    *(f"time_{s}_s" for s in (*CHEAP_STAGES, "evaluate_labels", *TRAIN_STAGES)),
)


def run_trial(cfg: C.Config, trial_dir: AnyPath, *, expensive: bool = False, rungs: list[int] | None = None,
              report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the stages a trial needs in ``trial_dir``; returns (and reports) its figures (``METRICS``).

    ``rungs``: the epoch counts to train to, in order (expensive trials; default ``[train.epochs]``).
    """
    from mars_ray.stages import evaluate_labels, features

    trial_dir.mkdir(parents=True, exist_ok=True)
    C.dump_yaml(cfg, trial_dir / "config.yaml")
    cached = features.cache_path(cfg, trial_dir)
    out: dict[str, Any] = {"features_reused": float(bool(cached and _complete(cached)))}
    for name in CHEAP_STAGES:
        _, out[f"time_{name}_s"] = pipeline.run_stage(cfg, trial_dir, name)
    m, out["time_evaluate_labels_s"] = _timed(
        evaluate_labels.evaluate, cfg.data.root, trial_dir / "debias", cfg.data.split, ray_cfg=cfg.ray)
    select_report = json.loads((current(trial_dir / "select") / "report.json").read_text())
    stats = json.loads((current(trial_dir / "debias") / "stats.json").read_text())
    out.update(debiased_miou=m["miou"], debiased_fp=m["fp"], debiased_fn=m["fn"],
               target_ratio=_num(select_report.get("target_ratio")), n_chosen=select_report["n_chosen"],
               biased_fraction=stats["biased_fraction"])
    if not expensive:
        return _report(out, report)
    for epochs in rungs or [cfg.train.epochs]:
        rung = C.merge(cfg, {"train.epochs": epochs})
        for name in TRAIN_STAGES:
            folder, seconds = pipeline.run_stage(rung, trial_dir, name)
            out[f"time_{name}_s"] = out.get(f"time_{name}_s", 0.0) + seconds
        ev = json.loads((current(folder) / "metrics.json").read_text())
        out.update(val_miou=_num(ev.get("miou")), val_fp=_num(ev.get("fp")), val_fn=_num(ev.get("fn")), epoch=epochs)
        _report(out, report)
    return out


def _report(out: dict[str, Any], report: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    unknown = set(out) - set(METRICS)
    if unknown:  # a figure added here must be declared in METRICS, or results.csv would miss it
        raise RuntimeError(f"trial figures {sorted(unknown)} are not declared in tune.trial.METRICS")
    if report:
        report(dict(out))
    return out


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def _complete(folder: AnyPath) -> bool:
    return (read_manifest(folder) or {}).get("status") == "complete"


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def trainable(params: dict[str, Any], *, run_dir: str, expensive: bool, scheduler: dict[str, Any]) -> None:
    """Tune function trainable: the trial's config is exactly ``params`` (the flattened full config).

    ``run_dir`` arrives as the absolute string Ray was sent; it becomes a path here, once.
    """
    from ray import tune

    cfg = C.build(overrides=params)
    trial_dir = upath(run_dir) / TRIALS_DIR / tune.get_context().get_trial_id()
    run_trial(cfg, trial_dir, expensive=expensive, rungs=milestones(cfg.train.epochs, scheduler), report=tune.report)


__all__ = ["METRICS", "TRIALS_DIR", "run_trial", "trainable"]
