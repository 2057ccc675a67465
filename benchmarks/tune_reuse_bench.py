"""What the content-addressed features cache saves in a real ``mars tune`` grid (measured, not estimated).

Runs the same sweep twice on the built-in biased dataset, into two fresh run folders: once as
``mars tune`` does by default (``features`` computed once per K_bg and shared by the trials that
differ only in α), once with ``--no-cache`` (every trial clusters again). Reports each sweep's wall
time, how many trials computed ``features``, the summed stage times and the saving.

    python benchmarks/tune_reuse_bench.py [--space tune_spaces/alpha_kbg.yaml] [--n-train 40 --size 64]
    python benchmarks/tune_reuse_bench.py --smoke      # the space's 2 x 2 smoke grid
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]


def _sweep(space: str, data: Path, out: Path, *, cache: bool, smoke: bool) -> dict:
    from mars_ray.tune import run_sweep

    t0 = time.perf_counter()
    summary = run_sweep(space, out, overrides={"data.root": str(data), "data.pseudo_labels": str(data / "pseudo_labels")},
                        smoke=smoke, cache=cache, verbose=0)
    wall = time.perf_counter() - t0
    with open(out / "tune" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    stage = {k: sum(float(r[k]) for r in rows if r.get(k)) for k in ("time_features_s", "time_select_s", "time_debias_s",
                                                                     "time_evaluate_labels_s")}
    return {"wall_s": wall, "trials": len(rows), "features_computed": summary["features_computed"],
            "best": summary["best"], **stage}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(ROOT / "tune_spaces" / "alpha_kbg.yaml"))
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="the space's small smoke grid")
    ap.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    args = ap.parse_args()

    from mars_ray.data.synthetic import make_biased_dataset

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        data = make_biased_dataset(base / "data", n_train=args.n_train, n_val=4, size=args.size, seed=0)
        res = {}
        for name, cache in (("cache", True), ("no_cache", False)):
            res[name] = _sweep(args.space, data, base / f"run_{name}", cache=cache, smoke=args.smoke)
            print(f"{name:9s} {json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in res[name].items()})}",
                  flush=True)
    c, n = res["cache"], res["no_cache"]
    print(f"\n{c['trials']} trials on {args.n_train} images at {args.size}px, 2 CPUs, one machine:")
    print(f"  features computed: {c['features_computed']} with the cache vs {n['features_computed']} without")
    print(f"  sweep wall time:   {c['wall_s']:.1f} s vs {n['wall_s']:.1f} s  -> saving {1 - c['wall_s'] / n['wall_s']:.1%}"
          f" (ratio {n['wall_s'] / c['wall_s']:.2f}x)")
    print(f"  summed features stage time: {c['time_features_s']:.1f} s vs {n['time_features_s']:.1f} s")
    same = {k: v for k, v in c["best"].items() if k != "trial_id"} == {k: v for k, v in n["best"].items() if k != "trial_id"}
    print(f"  same best trial: {same}  ({c['best']})")


if __name__ == "__main__":
    main()
