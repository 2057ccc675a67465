"""How much the debiased labels depend on the M^db binarisation, which is our choice (the paper says only
"refinement (e.g. CRF)"): ``debias.threshold`` (the constant background score M competes with) × the
dense CRF on/off, on ``mars make-dataset`` variants whose objects differ from their contexts by
texture, by colour or by both.

Per variant: the real ``features`` and ``select`` stages once (the extractor the pipeline's planning
rule picks, ``pipeline.build_config``: rerun this script after the default changes), then the
``debias`` stage once per setting, scored on the train split against ground truth (mIoU / FP / FN in
%, biased pixels as background, as ``mars evaluate-labels``); the pseudo labels' own score is the
reference row.

    .venv/bin/python benchmarks/debias_sensitivity.py [--n-train 40 --size 64] [--variants texture colour both]
        [--thresholds 0.3 0.4 0.5 0.6 0.7] [--set features.extractor=…] [--smoke-test] [--json OUT.json]
        [--quality-variants quick|full]   # quality_bench.py's 8 variants at its sizes instead

``VARIANTS``, ``make_variant``, ``variant_config`` and ``label_scores`` are shared with
``benchmarks/ablation_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mars_ray import config as C  # noqa: E402
from mars_ray import pipeline  # noqa: E402
from mars_ray.algo.metrics import summarize  # noqa: E402
from mars_ray.data.synthetic import PSEUDO_DIR, make_biased_dataset  # noqa: E402
from mars_ray.data.voc import VOCDataset  # noqa: E402
from mars_ray.stages.evaluate_labels import confusions_local  # noqa: E402
from quality_bench import VARIANTS as QB_VARIANTS  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from quality_bench import make_variant as qb_make_variant  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "texture": {},  # the built-in dataset: object and context differ by texture only
    "colour": {"cue": "colour"},  # only colour separates them
    "both": {"cue": "both"},  # texture and colour
    "unbiased2": {"unbiased_classes": 2},  # texture; the last 2 classes never sit on their context
}
"""make-dataset variants by name: keyword arguments of ``make_biased_dataset``."""


def make_variant(out: Path, name: str, *, n_train: int, n_val: int, size: int, seed: int) -> Path:
    """``out/data-<name>``: the variant's dataset (rebuilt only when its parameters changed)."""
    params = {"n_train": n_train, "n_val": n_val, "size": size, "seed": seed, **VARIANTS[name]}
    root = out / f"data-{name}"
    stamp = root / "params.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
        make_biased_dataset(root, **params)
        stamp.write_text(json.dumps(params))
    return root


def variant_config(root: Path, overrides: Mapping[str, Any]) -> C.Config:
    """The run config of a variant: its pseudo labels, the pipeline's extractor rule, one actor per pool."""
    base = {"data.root": str(root), "data.pseudo_labels": str(root / PSEUDO_DIR), "ray.num_cpus": 2,
            "features.num_actors": 1, "debias.num_actors": 1}
    return pipeline.build_config(None, {**base, **overrides}, plan_inputs=True)


def label_scores(root: Path, folders: Mapping[str, Path], split: str) -> dict[str, dict[str, Any]]:
    """mIoU / FP / FN (fractions) and per-class FN of each label folder on ``split`` (in-process)."""
    ds = VOCDataset(root)
    out = {}
    for name, cm in confusions_local(ds, folders, split).items():
        m = summarize(cm, ds.classes)
        out[name] = {"miou": m["miou"], "fp": m["fp"], "fn": m["fn"],
                     "fn_per_class": {c: e["fn"] for c, e in m["per_class"].items() if c != ds.classes[0]}}
    return out


def _pct(v: float | None) -> str:
    return "    -" if v is None else f"{100 * v:5.1f}"


def sweep_variant(root: Path, run: Path, thresholds: list[float], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """features + select once, debias per (threshold, crf); scores of each setting and of Y^b."""
    cfg = variant_config(root, overrides)
    t0 = time.perf_counter()
    pipeline.run_stages(cfg, run, ["features", "select"])
    report = json.loads((run / "select" / "report.json").read_text())
    rows = []
    for crf in (False, True):
        for t in thresholds:
            c = C.merge(cfg, {"debias.threshold": t, "debias.crf": crf})
            pipeline.run_stages(c, run, ["debias"])
            score = label_scores(root, {"debias": run / "debias"}, cfg.data.split)["debias"]
            stats = json.loads((run / "debias" / "stats.json").read_text())
            rows.append({"threshold": t, "crf": crf, **{k: score[k] for k in ("miou", "fp", "fn")},
                         "biased_fraction": stats["biased_fraction"]})
    pseudo = label_scores(root, {"pseudo": root / PSEUDO_DIR}, cfg.data.split)["pseudo"]
    return {"extractor": cfg.features.extractor, "pseudo": {k: pseudo[k] for k in ("miou", "fp", "fn")},
            "paper_target_ratio": report.get("paper_target_ratio"), "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def table(name: str, result: dict[str, Any]) -> str:
    """One variant: threshold rows × (CRF off, CRF on) columns of mIoU / FP / FN (%)."""
    by = {(r["threshold"], r["crf"]): r for r in result["rows"]}
    p = result["pseudo"]
    lines = [f"{name} (extractor {result['extractor']}; paper target ratio {_pct(result['paper_target_ratio']).strip()}%;"
             f" pseudo labels mIoU {_pct(p['miou']).strip()} FP {_pct(p['fp']).strip()} FN {_pct(p['fn']).strip()})",
             f"{'threshold':>9} | {'CRF off: mIoU':>13} {'FP':>5} {'FN':>5} | {'CRF on: mIoU':>12} {'FP':>5} {'FN':>5}"]
    for t in sorted({r["threshold"] for r in result["rows"]}):
        cells = []
        for crf in (False, True):
            r = by[(t, crf)]
            cells.append(f"{_pct(r['miou']):>{13 if not crf else 12}} {_pct(r['fp'])} {_pct(r['fn'])}")
        lines.append(f"{t:>9.2f} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=None,
                   help="variant names (default: texture colour both; with --quality-variants: all of them)")
    p.add_argument("--quality-variants", choices=("quick", "full"), default=None,
                   help="use quality_bench.py's variants at its --quick (or full) sizes instead of VARIANTS; "
                        "--n-train/--size/--seed are then ignored")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--out", help="work folder (datasets and runs; default: a temporary folder)")
    p.add_argument("--smoke-test", action="store_true", help="12 images of 48 px, two thresholds, one variant")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    names = sorted(QB_VARIANTS) if args.quality_variants else sorted(VARIANTS)
    args.variants = args.variants or (list(QB_VARIANTS) if args.quality_variants else ["texture", "colour", "both"])
    unknown = [v for v in args.variants if v not in names]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.smoke_test:
        args.n_train, args.size, args.thresholds, args.variants = 12, 48, [0.4, 0.6], args.variants[:1]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="debias-sensitivity-"))
    overrides = C.parse_set(args.set)
    results = {}
    try:
        for name in args.variants:
            if args.quality_variants:
                root = qb_make_variant(name, out, quick=args.quality_variants == "quick")
            else:
                root = make_variant(out, name, n_train=args.n_train, n_val=2, size=args.size, seed=args.seed)
            results[name] = sweep_variant(root, out / f"run-{name}", args.thresholds, overrides)
            print(table(name, results[name]), flush=True)
            print(flush=True)
    finally:
        from mars_ray.stages.runtime import shutdown_if_started

        shutdown_if_started()
    summary = {"quality_variants": args.quality_variants, "n_train": args.n_train, "size": args.size, "seed": args.seed, "overrides": overrides,
               "variants": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
