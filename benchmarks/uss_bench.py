"""Learned USS (``stego`` from ``mars uss``) vs the built-in ``texture`` extractor, on the built-in dataset.

Quality (built-in biased pseudo labels, same select/debias settings for both):

* biased-pixel removal recall: of the pseudo-label foreground on GT background, the share set to 254;
* target retention: of the pseudo-label foreground on GT foreground, the share kept;
* target-centroid ratio: ``select/report.json`` ``target_ratio`` (chosen centroids that are mostly object).

Speed: the ``features`` stage with the learned extractor on 1 vs 2 Ray actors (``features.num_actors``).
With ``--cam`` also the built-in CAM baseline (``mars wsss``): FP of its pseudo labels and the share
of their false-positive pixels that lie on the labelled class's *context* (approximated by the
built-in biased pseudo label of that class on GT background, which is the context texture region
dilated by a few pixels), next to the context's share of the background area.

    .venv/bin/python benchmarks/uss_bench.py [--n-train 40 --size 64 --epochs 8 --cam]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mars_ray import config as C  # noqa: E402
from mars_ray.data.label_io import read_label  # noqa: E402
from mars_ray.data.synthetic import make_biased_dataset  # noqa: E402
from mars_ray.data.voc import VOCDataset  # noqa: E402
from mars_ray.stages import debias, features, select, uss, wsss  # noqa: E402


def quality(root: Path, pseudo: Path, run: Path, split: str) -> dict[str, float]:
    ds = VOCDataset(root)
    biased = removed = target = kept = 0
    for i in ds.ids(split):
        yb, ydb, gt = read_label(pseudo / f"{i}.png"), read_label(run / "debias" / f"{i}.png"), read_label(ds.gt_path(i))
        fg = (yb >= 1) & (yb <= 253)
        on_bg, on_fg = fg & (gt == 0), fg & (gt >= 1) & (gt <= 253)
        biased += on_bg.sum()
        removed += (on_bg & (ydb == 254)).sum()
        target += on_fg.sum()
        kept += (on_fg & (ydb == yb)).sum()
    report = json.loads((run / "select" / "report.json").read_text())
    return {"removal_recall": removed / max(biased, 1), "target_retention": kept / max(target, 1),
            "target_ratio": report.get("target_ratio") or 0.0}


def cam_bias(root: Path, cam_dir: Path, split: str) -> dict[str, float]:
    """FP of CAM pseudo labels and where their false positives lie."""
    ds = VOCDataset(root)
    fg = fp = fp_ctx = ctx_area = bg_area = 0
    for i in ds.ids(split):
        y, gt = read_label(cam_dir / f"{i}.png"), read_label(ds.gt_path(i))
        ref = read_label(root / "pseudo_labels" / f"{i}.png")  # object + most of its context, per class
        valid = gt != 255
        pf = (y >= 1) & (y <= 253) & valid
        wrong = pf & (y != gt)
        fg += pf.sum()
        fp += wrong.sum()
        fp_ctx += (wrong & (gt == 0) & (ref == y)).sum()
        for c in ds.image_labels(i):
            ctx_area += ((ref == c) & (gt == 0)).sum()
            bg_area += (gt == 0).sum()
    return {"fp_of_pseudo_fg": fp / max(fg, 1), "fp_on_context": fp_ctx / max(fp, 1),
            "context_share_of_bg": ctx_area / max(bg_area, 1)}


def timed_features(cfg: C.Config, run: Path, actors: int) -> float:
    """Images/s of a fresh ``features`` stage with ``actors`` actors (the rest of the run reused)."""
    shutil.rmtree(run / "features", ignore_errors=True)
    cfg = C.merge(cfg, {"features.num_actors": actors, "features.cpus_per_actor": 1.0})
    t0 = time.perf_counter()
    features.run(cfg, run)
    return len(VOCDataset(cfg.data.root).ids(cfg.data.split)) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ssl-epochs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--cam", action="store_true", help="also train the CAM baseline and measure its bias")
    ap.add_argument("--cam-epochs", type=int, default=50)
    ap.add_argument("--num-cpus", type=int, default=max(2, os.cpu_count() or 2))
    ap.add_argument("--keep", help="keep the work folder here")
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="uss_bench_"))
    root = make_biased_dataset(work / "data", n_train=args.n_train, n_val=8, size=args.size, seed=0)
    pseudo = root / "pseudo_labels"
    base = {"data.root": str(root), "data.pseudo_labels": str(pseudo), "uss.ssl_epochs": args.ssl_epochs,
            "uss.epochs": args.epochs, "uss.crop_size": args.size, "uss.batch_size": 8,
            "wsss.epochs": args.cam_epochs, "wsss.crop_size": args.size}
    t0 = time.perf_counter()
    rows, cfgs = {}, {}
    for name, over in (("texture", {}), ("stego", {"features.extractor": "stego"})):
        cfg = cfgs[name] = C.build(overrides={**base, **over})
        run = work / name
        t = time.perf_counter()
        if name == "stego":
            uss.run(cfg, run)
        for stage in (features, select, debias):
            stage.run(cfg, run)
        rows[name] = quality(root, pseudo, run, "train")
        rows[name]["seconds"] = time.perf_counter() - t
    print(f"built-in dataset: {args.n_train} train images, {args.size}px; uss: small_cnn, "
          f"{args.ssl_epochs} SSL + {args.epochs} STEGO epochs")
    print(f"{'extractor':<10} {'removal recall':>15} {'target retention':>17} {'target ratio':>13} {'seconds':>8}")
    for name, r in rows.items():
        print(f"{name:<10} {r['removal_recall']:>15.3f} {r['target_retention']:>17.3f} {r['target_ratio']:>13.3f} {r['seconds']:>8.1f}")
    s, t = rows["stego"], rows["texture"]
    print("ratios stego/texture: removal recall {:.2f}, target retention {:.2f}, target ratio {:.2f}".format(
        s["removal_recall"] / max(t["removal_recall"], 1e-9), s["target_retention"] / max(t["target_retention"], 1e-9),
        s["target_ratio"] / max(t["target_ratio"], 1e-9)))

    ips = {n: timed_features(cfgs["stego"], work / "stego", n) for n in (1, 2)}
    print(f"features stage (stego), images/s: 1 actor {ips[1]:.1f}, 2 actors {ips[2]:.1f} "
          f"→ ratio {ips[2] / ips[1]:.2f} (on {args.num_cpus} logical CPUs)")

    if args.cam:
        run = work / "cam"
        cfg = C.build(overrides={k: v for k, v in base.items() if k != "data.pseudo_labels"})
        wsss.run(cfg, run)
        for split in ("train", "val"):
            b = cam_bias(root, run / "wsss", split)
            ref = cam_bias(root, pseudo, split)
            print(f"CAM pseudo labels ({split}): FP {b['fp_of_pseudo_fg']:.3f} of their foreground; "
                  f"{b['fp_on_context']:.3f} of the FP pixels lie on the class's context, which covers "
                  f"{b['context_share_of_bg']:.3f} of the background → {b['fp_on_context'] / max(b['context_share_of_bg'], 1e-9):.1f}x "
                  f"(built-in biased labels: FP {ref['fp_of_pseudo_fg']:.3f}, on context {ref['fp_on_context']:.3f})")
    print(f"total {time.perf_counter() - t0:.0f}s; work folder {work}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
