"""``mars demo``: the built-in biased dataset through the pipeline, with the paper-style table.

Writes ``OUT/data`` (the dataset, reused when it already exists with the same parameters),
``OUT/run`` (the stage artifacts) and ``OUT/demo.json`` (the figures behind the table).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from mars_ray import config as C
from mars_ray import console, pipeline
from mars_ray.artifacts import atomic_write_json, atomic_write_text, current

logger = logging.getLogger(__name__)


def _dataset(out: Path, **params: Any) -> Path:
    from mars_ray.data.synthetic import make_biased_dataset

    root = out / "data"
    stamp = root / "params.json"
    with console.stage("dataset", "the built-in biased dataset") as st:
        fresh = not (stamp.is_file() and json.loads(stamp.read_text()) == params)
        if fresh:
            make_biased_dataset(root, **params)
            atomic_write_text(stamp, json.dumps(params))
        st.finish(root, status="done" if fresh else "up to date",
                  summary=f"{params['n_train']} train + {params['n_val']} val images, {params['size']} px")
    return root


def _pct(v: float | None) -> str:
    return "    -" if v is None else f"{100 * v:5.1f}"


def run_demo(
    out: Path, *, n_train: int = 60, n_val: int = 20, size: int = 96, seed: int = 0,
    overrides: Mapping[str, Any] | None = None, wait: bool = False,
) -> dict[str, Any]:
    """Build the dataset, run every stage for MARS and train/evaluate the baseline too; returns the figures.

    Rows: train-split mIoU/FP/FN of the pseudo labels Y^b, the debiased Y^db and the complemented
    Y^co (``RUN/complement``, from the final MARS teacher); then val mIoU of the segmenter trained
    on Y^b with plain CE (``RUN/evaluate_baseline``) against MARS (``RUN/evaluate``).

    ``out`` is held for the whole demo (``runlock``; ``wait``: queue behind another holder).
    """
    from mars_ray.runlock import run_lock

    with run_lock(out, command="mars demo", wait=wait):
        return _run_demo(out, n_train=n_train, n_val=n_val, size=size, seed=seed, overrides=overrides)


def _run_demo(out: Path, *, n_train: int, n_val: int, size: int, seed: int,
              overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    from mars_ray.stages.evaluate_labels import evaluate
    from mars_ray.stages.train import with_baseline

    out.mkdir(parents=True, exist_ok=True)
    root = _dataset(out, n_train=n_train, n_val=n_val, size=size, seed=seed)
    pseudo = root / "pseudo_labels"
    cfg = C.build(overrides={"data.root": str(root), "data.pseudo_labels": str(pseudo), **dict(overrides or {})})
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    C.dump_yaml(cfg, run_dir / "config.yaml")
    pipeline.run_stages(cfg, run_dir, pipeline.plan_stages(cfg))
    pipeline.run_stages(with_baseline(cfg), run_dir, ("train", "evaluate"))

    split = cfg.data.split
    with console.stage("labels", f"Y^b, Y^db and Y^co against the ground truth ({split} split)") as st:
        rows = {
            "pseudo labels (Y^b)": evaluate(root, pseudo, split, ray_cfg=cfg.ray),
            "debiased (Y^db)": evaluate(root, run_dir / "debias", split, ray_cfg=cfg.ray),
            "complemented (Y^co)": evaluate(root, run_dir / "complement", split, ray_cfg=cfg.ray),
        }
        st.finish()
    val = {name: json.loads((current(run_dir / folder) / "metrics.json").read_text())
           for name, folder in (("baseline", "evaluate_baseline"), ("mars", "evaluate"))}
    report = json.loads((current(run_dir / "select") / "report.json").read_text())
    lines = [f"MARS demo on the built-in biased dataset ({split} split, {n_train} images, {size}px)",
             f"{'labels':<24} {'mIoU':>6} {'FP':>6} {'FN':>6}"]
    for name, m in rows.items():
        lines.append(f"{name:<24} {_pct(m['miou']):>6} {_pct(m['fp']):>6} {_pct(m['fn']):>6}")
    ratio, paper = report.get("target_ratio"), report.get("paper_target_ratio")
    lines.append(
        f"debiased centroids: {report['n_chosen']} of {report['n_foreground_centroids']} chosen "
        f"(alpha={report['alpha']}); target-centroid ratio (paper: IoU > 0.3) {_pct(paper).strip()}%, "
        f"biased (IoU < 0.1) {_pct(report.get('paper_biased_ratio')).strip()}% "
        f"(all fg centroids: {_pct(report.get('paper_target_ratio_all')).strip()}%); "
        f"pixel-share ratio {_pct(ratio).strip()}%"
    )
    lines.append(f"{cfg.data.eval_split} mIoU ({cfg.train.model}, {cfg.train.epochs} epochs): "
                 f"baseline (Y^b) {_pct(val['baseline']['miou']).strip()} vs MARS {_pct(val['mars']['miou']).strip()}")
    summary = {
        "table": "\n".join(lines),
        "rows": {k: {m: v[m] for m in ("miou", "fp", "fn")} for k, v in rows.items()},
        "target_ratio": ratio,
        "target_ratio_all": report.get("target_ratio_all"),
        "paper_target_ratio": paper,
        "paper_biased_ratio": report.get("paper_biased_ratio"),
        "paper_target_ratio_all": report.get("paper_target_ratio_all"),
        "val": {k: {m: v[m] for m in ("miou", "fp", "fn")} for k, v in val.items()},
        "run": str(run_dir),
    }
    atomic_write_json(out / "demo.json", summary)
    return summary
