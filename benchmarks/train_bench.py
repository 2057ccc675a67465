"""Training benchmarks; prints ratios.

1. Ray Train throughput (images/s, mean over epochs after the first) with 1 vs 2 CPU workers
   (one core each, global batch fixed) on the built-in dataset, MARS complementing step.
2. Cost of MARS's teacher + CRF fill per step: ``engine.complement_step`` vs ``engine.baseline_step``
   (plain CE) on the same batches, in-process, one thread.

Usage: ``python benchmarks/train_bench.py [--smoke-test]`` (runs in < 3 min on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def step_overhead(steps: int) -> tuple[float, float]:
    """Seconds per step of complement_step (teacher + CRF fill + WCE) and baseline_step (CE)."""
    import numpy as np
    import torch

    import mars_ray.models.deeplab  # noqa: F401 - registers the segmenters
    from mars_ray import engine
    from mars_ray.algo.complement import ema_update
    from mars_ray.models.registry import SEGMENTERS

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        label = torch.from_numpy(rng.integers(0, 5, (8, 64, 64))).long()
        label[:, 16:40, 16:40] = 254  # ~14% BIASED pixels, as in the demo's Y^db
        batches.append({"image": torch.rand(8, 3, 64, 64), "label": label})
    out = []
    for kind in ("complement", "baseline"):
        model = SEGMENTERS.get("deeplab_tiny", num_classes=5)
        teacher = engine.make_ema_teacher(model)
        opt = engine.build_sgd(model.param_groups(0.01), 0.01)
        if kind == "complement":
            fn = lambda b: engine.complement_step(model, teacher, b, num_classes=5, crf={"iters": 10})  # noqa: E731
            after = lambda i: ema_update(teacher, model, 0.9)  # noqa: E731
        else:
            fn, after = (lambda b: engine.baseline_step(model, b)), None  # noqa: E731
        engine.train_one_epoch(fn, batches[:2], opt, after_step=after, log_every=0)  # warm-up
        t0 = time.perf_counter()
        engine.train_one_epoch(fn, batches, opt, after_step=after, log_every=0)
        out.append((time.perf_counter() - t0) / steps)
    return out[0], out[1]


def ray_throughput(epochs: int, n_train: int) -> dict[int, float]:
    """Images/s of the train stage with 1 and 2 Ray Train workers (mean over epochs 2..)."""
    import ray

    from mars_ray import config as C
    from mars_ray.data.synthetic import make_biased_dataset
    from mars_ray.stages import debias, features, select, train

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = make_biased_dataset(Path(tmp) / "data", n_train=n_train, n_val=4, size=64, seed=0)
            base = {"data.root": str(root), "data.pseudo_labels": str(root / "pseudo_labels"), "debias.crf": False,
                    "train.epochs": epochs, "train.batch_size": 8, "train.crop_size": 64, "train.val_every": 0,
                    "train.checkpoint_every": epochs, "train.cpus_per_worker": 1.0}
            run_dir = Path(tmp) / "run"
            cfg = C.build(overrides=base)
            for stage in (features, select, debias):
                stage.run(cfg, run_dir)
            out = {}
            for workers in (1, 2):
                cfg = C.build(overrides={**base, "train.num_workers": workers})
                folder = train.run(cfg, _copy_run(run_dir, workers))
                with open(folder / "history.csv") as f:
                    rows = list(csv.DictReader(f))[1:]
                out[workers] = sum(float(r["images_per_s"]) for r in rows) / len(rows)
            return out
    finally:
        ray.shutdown()


def _copy_run(run_dir: Path, workers: int) -> Path:
    import shutil

    dst = run_dir.with_name(f"run_{workers}w")
    if not dst.exists():
        shutil.copytree(run_dir, dst, symlinks=True)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke-test", action="store_true", help="fewer steps and epochs")
    args = p.parse_args()
    comp, base = step_overhead(3 if args.smoke_test else 10)
    print(f"complement_step (teacher + CRF fill + WCE) {1000 * comp:.0f} ms/step vs baseline_step (CE) "
          f"{1000 * base:.0f} ms/step: ratio {comp / base:.2f}x (batch 8 x 64x64, deeplab_tiny, 1 thread)")
    ips = ray_throughput(2 if args.smoke_test else 4, 32)
    print(f"Ray Train throughput: 1 worker {ips[1]:.1f} img/s, 2 workers {ips[2]:.1f} img/s: "
          f"speed-up {ips[2] / ips[1]:.2f}x (MARS step, global batch 8, 1 CPU per worker)")


if __name__ == "__main__":
    main()
