"""The pipeline: the stage list, the one planning rule, and ``run_stages``; cli, demo and tune call it.

The planning rule, in full (README "Three situations"):

* ``wsss`` (CAM pseudo labels → ``RUN/wsss``) runs first when no pseudo labels are given;
* ``uss`` (learned USS → ``RUN/uss/checkpoint.pt``) runs first when the features come from the
  learned extractor without a checkpoint (no ``data.features_dir``, no ``features.checkpoint``);
* which USS: ``data.features_dir`` wins; else ``features.extractor`` as the user set it (``--uss``,
  ``--set``, ``--config``, a sweep's ``set:`` or searched keys); else ``adaptive``
  (``default_extractor``): a weight-free extractor whose statistics the ``features`` stage fits on
  the split itself, with or without pseudo labels (measured on every ``make-dataset`` variant in
  ``benchmarks/quality_bench.py``; the learned one needs ``--uss`` and training time).

Stages are imported by name when they run (``mars_ray.stages.<name>``), so planning needs no Ray.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any, Collection, Mapping, Sequence

from mars_ray import config as C
from mars_ray import console
from mars_ray.artifacts import read_manifest
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

STAGES = ("features", "select", "debias", "train", "evaluate")
PRE_STAGES = ("wsss", "uss")  # built-in WSSS / USS: run first when their inputs are not given
LEARNED_EXTRACTOR = "stego"  # the FEATURES extractor the ``uss`` stage trains
DEFAULT_EXTRACTOR = "adaptive"  # fitted on the split by the features stage (models/adaptive.py)
EXTRACTOR_KEY = "features.extractor"


def default_extractor(cfg: C.Config) -> str:
    """The extractor when the user chose none: ``adaptive``, whatever else was given (with
    ``data.features_dir`` set it is not used). The learned one is ``--uss``."""
    return DEFAULT_EXTRACTOR


def build_config(config_file: "str | AnyPath | None", overrides: Mapping[str, Any], *,
                 plan_inputs: bool = False, searched: Collection[str] = ()) -> C.Config:
    """Defaults → ``config_file`` → ``overrides``, checked; ``ValueError`` without a dataset.

    ``plan_inputs`` (``mars run``, ``mars tune``): when ``features.extractor`` is set nowhere —
    not in ``overrides``, not in ``config_file``, not among the ``searched`` keys of a sweep — it
    becomes :func:`default_extractor`.
    """
    cfg = C.build(config_file, overrides)
    if not cfg.data.root:
        raise ValueError("no dataset: pass --data ROOT (or data.root in --config)")
    if plan_inputs and not _extractor_chosen(config_file, overrides, searched):
        extractor = default_extractor(cfg)
        if extractor != cfg.features.extractor:
            cfg = C.merge(cfg, {EXTRACTOR_KEY: extractor})
    return cfg


def _extractor_chosen(config_file: "str | AnyPath | None", overrides: Mapping[str, Any],
                      searched: Collection[str]) -> bool:
    if EXTRACTOR_KEY in overrides or EXTRACTOR_KEY in searched:
        return True
    return bool(config_file) and EXTRACTOR_KEY in C.flatten(C.load_yaml(config_file))


def needs_uss(cfg: C.Config) -> bool:
    """The features come from the learned extractor and nobody gave its checkpoint."""
    return not cfg.data.features_dir and cfg.features.extractor == LEARNED_EXTRACTOR and not cfg.features.checkpoint


def plan_stages(cfg: C.Config, until: str | None = None) -> list[str]:
    """The stages a full run runs, in order: ``wsss`` and ``uss`` when needed, then ``STAGES``;
    with ``until``, none after that one."""
    stages = [] if cfg.data.pseudo_labels else ["wsss"]
    if needs_uss(cfg):
        stages.append("uss")
    stages += list(STAGES)
    if until:
        order = list(PRE_STAGES + STAGES)
        stages = [s for s in stages if order.index(s) <= order.index(until)]
    return stages


def stage_module(name: str) -> Any:
    """``mars_ray.stages.<name>`` (imported on first use: Ray and torch load only when a stage runs)."""
    if name not in PRE_STAGES + STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(PRE_STAGES + STAGES)}")
    return importlib.import_module(f"mars_ray.stages.{name}")


#: what each stage does, for its start line
DESCRIPTIONS = {
    "wsss": "CAM classifier on the image labels → pseudo labels",
    "uss": "learned USS (STEGO-style head, no labels)",
    "features": "USS features + per-image K-means → centroid table",
    "select": "debiased centroids (Eq 1–3)",
    "debias": "debiased labels Y^db (Eq 4–5)",
    "train": "segmenter on Y^db (EMA teacher, CRF fill, certain mask, WCE)",
    "evaluate": "multi-scale predictions of the segmenter → mIoU",
}
_BASELINE = {"train": "baseline segmenter on Y^b (plain CE)", "evaluate": "predictions of the baseline → mIoU"}


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}"


#: the end line's summary, from the stage manifest's ``outputs`` (a missing key: no summary)
_SUMMARIES = {
    "wsss": lambda o: f"{o['images']} images",
    "uss": lambda o: f"{o['steps']} steps, loss {o['final_loss']:.4g}",
    "features": lambda o: f"{o['rows']} centroids: {o['fg_rows']} fg, {o['bg_rows']} bg",
    "select": lambda o: f"{o['n_chosen']} centroids chosen"
                        + (f", target ratio {_pct(o['target_ratio'])}%" if o.get("target_ratio") is not None else ""),
    "debias": lambda o: f"{o['images']} images, {_pct(o['biased_fraction'])}% of the foreground marked biased",
    "train": lambda o: f"{o['epochs']} epochs, loss {o['loss']:.4g}"
                       + (f", val mIoU {_pct(o['val_miou'])}" if o.get("val_miou") is not None else ""),
    "evaluate": lambda o: f"mIoU {_pct(o['miou'])}, FP {_pct(o['fp'])}, FN {_pct(o['fn'])}",
}


def _outcome(name: str, out: AnyPath, started: float) -> tuple[str, str]:
    """(status, summary) of a stage that returned ``out``: "up to date" when its manifest was
    finished before the stage began (it skipped itself), "reused" for a features-cache link."""
    m = read_manifest(out) or {}
    finished = m.get("finished") or ""
    status = "done"
    if finished and finished < time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)):
        status = "reused" if m.get("link") else "up to date"
    try:
        summary = _SUMMARIES[name](m.get("outputs") or {})
    except (KeyError, TypeError, ValueError):  # an output this stage's manifest does not hold (older runs)
        summary = ""
    return status, summary


def run_stage(cfg: C.Config, run_dir: AnyPath, name: str) -> tuple[AnyPath, float]:
    """Run one stage (it skips itself when its artifact is up to date) → (its folder, seconds).

    Logs a start and an end line (``console.stage``): what the stage does, how long it took,
    where its output went, whether it was up to date, and a summary from its manifest.
    """
    baseline = name in _BASELINE and cfg.train.baseline  # read only where it matters (stage-key test)
    with console.stage(f"{name} (baseline)" if baseline else name,
                       _BASELINE[name] if baseline else DESCRIPTIONS.get(name, "")) as st:
        started = time.time()
        out = stage_module(name).run(cfg, run_dir)
        status, summary = _outcome(name, out, started)
        st.finish(out, status=status, summary=summary)
    return out, st.seconds


def run_stages(cfg: C.Config, run_dir: AnyPath, stages: Sequence[str]) -> dict[str, AnyPath]:
    """Run the named stages in order → ``{stage: its folder}``."""
    return {name: run_stage(cfg, run_dir, name)[0] for name in stages}


__all__ = ["STAGES", "PRE_STAGES", "DEFAULT_EXTRACTOR", "LEARNED_EXTRACTOR", "DESCRIPTIONS", "build_config", "default_extractor",
           "needs_uss", "plan_stages", "run_stage", "run_stages", "stage_module"]
