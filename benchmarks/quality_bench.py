"""Label quality of the real stages per ``mars make-dataset`` variant × USS extractor (issue 9).

For each variant (``VARIANTS``: the make-dataset options) and each extractor it runs the pipeline
exactly as ``mars run --data D --pseudo-labels D/pseudo_labels --out RUN --until train`` plans it
(``pipeline.build_config`` + ``plan_stages`` + ``run_stages`` on one local Ray), then measures
against the train split's ground truth, in this process:

* removal recall (pseudo-label foreground on GT background marked BIASED) and retention
  (pseudo-label foreground on its own class left as it was) — ``mars_ray.quality.LabelQuality``;
* mIoU / FP / FN of the pseudo labels Y^b, the debiased labels Y^db (BIASED counted as background,
  as ``mars evaluate-labels``) and the complemented labels Y^co (``RUN/complement``, the train
  stage's final teacher);
* from ``RUN/select/report.json``: the paper's target-centroid ratio (IoU > 0.3) and the smallest
  per-class separation score (no ground truth) with the classes it warns about.

Extractors: ``adaptive`` (the default: nothing set), ``texture`` (``features.extractor=texture``),
``learned`` (``--uss``: the uss stage first distils a STEGO head from the adaptive features on Ray
Train with the ``uss.*`` defaults: 5 · images steps), ``external``
(``--features-dir``: the 9-channel features of issue 9 — local RGB mean, local std of luminance
and of chroma at 2 scales, gradient magnitude at 2 scales — each standardised over the split,
written by this script).

    python benchmarks/quality_bench.py [--quick] [--variants a,b] [--extractors adaptive,texture]
        [--work DIR] [--out benchmarks/results/quality_bench] [--set KEY=VALUE ...]

``--quick``: 32 train images at 64 px (12-class: 48 at 72 px), 8 training epochs. Without it: make-dataset's default sizes (60 train images) and 16 epochs. Writes
``OUT.json`` (rows), ``OUT.md`` (table) and ``OUT.png`` (chart) after every row, so a long run can
be read while it goes. Targets checked per row (issue 9): debiased mIoU >= pseudo + 8 points,
removal >= 0.80, retention >= 0.90, complemented >= debiased.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from mars_ray import pipeline  # noqa: E402
from mars_ray.algo.metrics import ConfusionMatrix, map_biased  # noqa: E402
from mars_ray.data.label_io import read_image, read_label  # noqa: E402
from mars_ray.data.synthetic import make_biased_dataset  # noqa: E402
from mars_ray.data.voc import VOCDataset  # noqa: E402
from mars_ray.quality import LabelQuality  # noqa: E402

logger = logging.getLogger("quality_bench")

#: make-dataset variants (seeds other than the ones the adaptive design was developed on)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},  # exactly `mars make-dataset ROOT` (the demo's data): texture cue, 4 classes, 96 px
    "colour": dict(cue="colour", seed=201),
    "texture": dict(cue="texture", bias_kind="mixed", seed=202),
    "both": dict(cue="both", seed=203),
    "nonsquare-jpg": dict(height=80, width=128, image_format="jpg", cue="both", seed=204),
    "4-classes-colour": dict(n_classes=4, cue="colour", size=64, seed=205),
    "12-classes": dict(n_classes=12, cue="both", size=80, n_train=96, seed=206),
    "biased-share-0.5": dict(biased_share=0.5, seed=207),
}
QUICK = dict(n_train=32, n_val=4, size=64)
QUICK_12 = dict(n_train=48, n_val=4, size=72)
EXTRACTORS = ("adaptive", "texture", "external", "learned")


def make_variant(name: str, work: Path, quick: bool) -> Path:
    root = work / "data" / name
    if (root / "classes.txt").is_file():
        return root
    kw = dict(VARIANTS[name])
    if quick:
        q = QUICK_12 if kw.get("n_classes") == 12 else QUICK
        kw = {**kw, **{k: v for k, v in q.items() if not (k == "size" and ("height" in kw))}}
        if "height" in kw:
            kw.update(height=56, width=88)
    return make_biased_dataset(root, **kw)


def nine_channel_features(root: Path, out: Path, split: str = "train") -> Path:
    """Issue 9's external features: [9, H, W] float32 per id, each channel standardised over the split."""
    import torch
    import torch.nn.functional as F

    from mars_ray.models.handcrafted import _blur, _gauss1d

    if (out / ".done").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    ds = VOCDataset(root)
    raw = {}
    for i in ds.ids(split):
        x = torch.from_numpy(read_image(ds.image_path(i))).permute(2, 0, 1)[None].float() / 255.0
        lum = x.mean(1, keepdim=True)
        chroma = (x - lum).abs().sum(1, keepdim=True)
        chans = [_blur(x, _gauss1d(2.0))]
        for s in (2.0, 4.0):
            g = _gauss1d(s)
            for c in (lum, chroma):
                m = _blur(c, g)
                chans.append((_blur(c * c, g) - m * m).clamp_min(0).sqrt())
        for s in (1.0, 3.0):
            sm = _blur(lum, _gauss1d(s))
            gx = F.pad(sm[..., :, 1:] - sm[..., :, :-1], (0, 1, 0, 0))
            gy = F.pad(sm[..., 1:, :] - sm[..., :-1, :], (0, 0, 0, 1))
            chans.append((gx * gx + gy * gy).sqrt())
        raw[i] = torch.cat(chans, 1)[0].numpy()
    stack = np.concatenate([f.reshape(9, -1) for f in raw.values()], 1)
    mean, std = stack.mean(1), stack.std(1) + 1e-6
    for i, f in raw.items():
        np.save(out / f"{i}.npy", ((f - mean[:, None, None]) / std[:, None, None]).astype(np.float32))
    (out / ".done").write_text("")
    return out


def overrides_for(extractor: str, root: Path, work: Path, quick: bool, epochs: int = 0) -> dict[str, Any]:
    o: dict[str, Any] = {"data.root": str(root), "data.pseudo_labels": str(root / "pseudo_labels"),
                         "train.epochs": epochs or (8 if quick else 16), "train.val_every": 0,
                         "train.checkpoint_every": 100,
                         "ray.num_cpus": 2}
    if extractor == "texture":
        o["features.extractor"] = "texture"
    elif extractor == "learned":
        o["features.extractor"] = pipeline.LEARNED_EXTRACTOR  # what --uss sets; the uss.* defaults as a user gets them
    elif extractor == "external":
        o["data.features_dir"] = str(nine_channel_features(root, work / "feats" / root.name))
    return o


def measure(root: Path, run: Path, complemented: bool = True) -> dict[str, Any]:
    ds = VOCDataset(root)
    q = LabelQuality(ds.num_classes)
    cm_co = ConfusionMatrix(ds.num_classes + 1)
    for i in ds.ids("train"):
        gt = read_label(ds.gt_path(i))  # type: ignore[arg-type]
        pseudo = read_label(root / "pseudo_labels" / f"{i}.png")
        q.update(pseudo, read_label(run / "debias" / f"{i}.png"), gt)
        if complemented:
            cm_co.update(map_biased(read_label(run / "complement" / f"{i}.png"), "background"), gt)
    res = q.compute()
    nan = {"miou": float("nan"), "fp": float("nan"), "fn": float("nan")}
    co = cm_co.compute() if complemented else nan
    report = json.loads((run / "select" / "report.json").read_text())
    seps = {n: e["separation"]["score"] for n, e in report["per_class"].items() if "separation" in e}
    finite = [v for v in seps.values() if v is not None and math.isfinite(v)]
    return {
        "removal_recall": res["removal_recall"], "retention": res["retention"],
        "pseudo_miou": res["pseudo"]["miou"], "pseudo_fp": res["pseudo"]["fp"], "pseudo_fn": res["pseudo"]["fn"],
        "debiased_miou": res["debiased"]["miou"], "debiased_fp": res["debiased"]["fp"],
        "debiased_fn": res["debiased"]["fn"],
        "complemented_miou": co["miou"], "complemented_fp": co["fp"], "complemented_fn": co["fn"],
        "paper_target_ratio": report.get("paper_target_ratio"), "target_ratio": report.get("target_ratio"),
        "separation_min": min(finite) if finite else None,
        "classes_not_separating": report.get("classes_not_separating", []),
    }


def targets(r: dict[str, Any]) -> dict[str, bool]:
    out = {"gain>=8": r["debiased_miou"] - r["pseudo_miou"] >= 0.08, "removal>=0.80": r["removal_recall"] >= 0.80,
           "retention>=0.90": r["retention"] >= 0.90}
    if not math.isnan(r["complemented_miou"]):  # not trained (--no-train): not judged
        out["complemented>=debiased"] = r["complemented_miou"] >= r["debiased_miou"]
    return out


COLS = [("setting", "{}"), ("variant", "{}"), ("extractor", "{}"), ("train_epochs", "{}"), ("pseudo_miou", "{:.1f}"), ("debiased_miou", "{:.1f}"),
        ("complemented_miou", "{:.1f}"), ("removal_recall", "{:.2f}"), ("retention", "{:.2f}"),
        ("debiased_fp", "{:.1f}"), ("debiased_fn", "{:.1f}"), ("complemented_fp", "{:.1f}"),
        ("complemented_fn", "{:.1f}"), ("paper_target_ratio", "{:.2f}"), ("separation_min", "{:.2f}"),
        ("targets", "{}"), ("seconds", "{:.0f}")]
PCT = {"pseudo_miou", "debiased_miou", "complemented_miou", "debiased_fp", "debiased_fn", "complemented_fp",
       "complemented_fn"}


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(c for c, _ in COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        cells = []
        for c, f in COLS:
            v = r.get(c)
            if c == "targets":
                cells.append("".join("✓" if ok else "✗" for ok in r["targets"].values()) if "targets" in r else "")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                v = 100 * v if c in PCT else v
                cells.append("nan" if isinstance(v, float) and math.isnan(v) else f.format(v))
            else:
                cells.append("–" if v is None else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    ok = [r for r in rows if "pseudo_miou" in r]
    if not ok:
        return
    fig = Figure(figsize=(max(8, 0.55 * len(ok)), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(ok))
    for k, (key, label) in enumerate((("pseudo_miou", "pseudo Y^b"), ("debiased_miou", "debiased Y^db"),
                                      ("complemented_miou", "complemented Y^co"))):
        ax.bar(x + (k - 1) * 0.27, [100 * r[key] if not math.isnan(r[key]) else 0 for r in ok], 0.27, label=label)
    ax.set_xticks(x, [f"{r['variant']} · {r['extractor']}" + (" · full" if "full" in r.get("setting", "") else "")
                      for r in ok], rotation=90, fontsize=7)
    ax.set_ylabel("train-split label mIoU (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower left", ncol=3, framealpha=0.9)
    ax.set_title("mars_ray label quality per make-dataset variant × USS extractor")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(
        f"# quality_bench ({'quick' if meta['quick'] else 'full'}; training epochs: {meta['train_epochs']})\n\n"
        "targets column: gain>=8, removal>=0.80, retention>=0.90, complemented>=debiased (✓ met, ✗ missed; the "
        "last is not judged for rows run with --no-train, whose complemented columns are nan)\n\n"
        + table(rows) + "\n")
    chart(rows, out.with_suffix(".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--extractors", default=",".join(EXTRACTORS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mars_quality_bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quality_bench")
    ap.add_argument("--quick", action="store_true", help="smaller data, shorter training (see the module docstring)")
    ap.add_argument("--no-train", action="store_true",
                    help="stop after debias (no complemented labels): the label measures of Y^db only")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of OUT.json that have no error and run only the missing ones")
    ap.add_argument("--train-epochs", type=int, default=0,
                    help="training epochs of the train stage (0: 8 with --quick, else 16); the demo's default is 30")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="config overrides for every row (recorded in the JSON's meta; runs go to runs-<tag>/)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="RESULT",
                    help="no run: merge these results (.json, each with a 'setting' tag from its file name) into OUT")
    a = ap.parse_args()
    if a.merge:
        merged: list[dict[str, Any]] = []
        metas = {}
        for f in a.merge:
            data = json.loads(f.with_suffix(".json").read_text())
            metas[f.stem] = data["meta"]
            for r in data["rows"]:  # rows written before the column existed were trained with the file's setting
                trained = not math.isnan(r.get("complemented_miou", float("nan")))
                epochs = r.get("train_epochs", data["meta"].get("train_epochs") if trained else 0)
                merged.append({**r, "train_epochs": epochs, "setting": f.stem})
        write(merged, a.out, {"quick": any(m.get("quick") for m in metas.values()), "train_epochs": "per row",
                              "merged": metas})
        print(table(merged))
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    ray.init(num_cpus=2, object_store_memory=512 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    work = a.work / ("quick" if a.quick else "full")
    meta = {"quick": a.quick, "train_epochs": a.train_epochs or (8 if a.quick else 16), "variants": {v: VARIANTS[v] for v in a.variants.split(",")},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    from mars_ray import config as C

    extra = C.parse_set(a.set)
    if extra:
        meta["overrides"] = extra
    tag = "-".join(f"{k}={v}" for k, v in sorted(extra.items())).replace("/", "_")
    rows: list[dict[str, Any]] = []
    if a.resume and a.out.with_suffix(".json").is_file():
        rows = [r for r in json.loads(a.out.with_suffix(".json").read_text())["rows"] if "error" not in r]
    done = {(r["variant"], r["extractor"]) for r in rows}
    # extractor-major: the default's row for every variant comes first (a partial run still answers the targets)
    for ex in a.extractors.split(","):
        for v in a.variants.split(","):
            if (v, ex) in done:
                continue
            root = make_variant(v, work, a.quick)
            t0 = time.perf_counter()
            row: dict[str, Any] = {"variant": v, "extractor": ex,
                                   "train_epochs": 0 if a.no_train else (a.train_epochs or (8 if a.quick else 16))}
            try:
                cfg = pipeline.build_config(None, {**overrides_for(ex, root, work, a.quick, a.train_epochs), **extra},
                                            plan_inputs=True)
                runs = "runs" + (f"-e{a.train_epochs}" if a.train_epochs else "") + (f"-{tag}" if tag else "")
                run = work / runs / f"{v}-{ex}"
                pipeline.run_stages(cfg, run, pipeline.plan_stages(cfg, until="debias" if a.no_train else "train"))
                row.update(measure(root, run, complemented=not a.no_train))
                row["targets"] = targets(row)
            except Exception as e:  # noqa: BLE001 - one failed cell is reported in the table, the rest go on
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                logger.exception("%s × %s failed", v, ex)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            write(rows, a.out, meta)
    print(table(rows))


if __name__ == "__main__":
    main()
