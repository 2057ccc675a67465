"""The debias CRF's unary (``debias.crf_unary``, our choice) on every dataset the project generates.

``binarize_activation`` turns M (Eq 4) and the threshold t into two-label probabilities for the
dense CRF. ``ratio`` (the mapping before 2026-12) is P_fg ∝ M against P_bg ∝ t, so it is never more
than 1/(1+t) sure of a target (0.67 at M = 1) while M = 0 is certain background. ``symmetric`` (the
default) is piecewise linear through (0, 0), (t, ½), (1, 1): P_fg = M at t = 0.5. Without pairwise
terms both decide M > t; they differ in how far the CRF may overrule M.

Per dataset, in one process (``mars_ray.quality.debias_in_process``, the pipeline's defaults: the
adaptive extractor fitted on the split, K-means, Eq 1-3, Eq 4, the size-scaled CRF, Eq 5), each
mapping and the CRF off, scored on the train split against ground truth: debiased mIoU, removal
recall and retention. Datasets: ``quality_bench.py``'s 8 variants at its quick sizes and 4 at its
full sizes, ``quality_lab.py``'s 9 variants and the 2 hold-out sets generated independently of
``mars make-dataset`` (``holdout_data.py``).

    python benchmarks/unary_bench.py [--work DIR] [--out benchmarks/results/unary_bench] [--only a,b]
        [--smoke-test]

Writes ``OUT.json`` and ``OUT.md`` (one row per dataset, then wins / losses / mean gain of
``symmetric`` over ``ratio``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_bench as qb  # noqa: E402
import quality_lab as ql  # noqa: E402
from mars_ray.config import DebiasConfig  # noqa: E402
from mars_ray.models.adaptive import AdaptiveExtractor, fit_adaptive_stats  # noqa: E402
from mars_ray.quality import debias_in_process  # noqa: E402

MODES = ("ratio", "symmetric", "crf-off")
QB_FULL = ("colour", "12-classes", "nonsquare-jpg", "biased-share-0.5")  # full "default" = lab "builtin"


def datasets(work: Path, smoke: bool) -> dict[str, Callable[[], Path]]:
    """name → a function that makes (or finds) the dataset and returns its root."""
    if smoke:
        return {"lab/colour": lambda: ql.dataset("colour", work / "smoke", True)}
    out: dict[str, Callable[[], Path]] = {}
    for v in qb.VARIANTS:
        out[f"quick/{v}"] = lambda v=v: qb.make_variant(v, work / "quick", True)
    for v in QB_FULL:
        out[f"full/{v}"] = lambda v=v: qb.make_variant(v, work / "full", False)
    for v in list(ql.VARIANTS) + list(ql.HOLDOUT):
        out[f"lab/{v}"] = lambda v=v: ql.dataset(v, work / "lab", False)
    return out


def measure(root: Path) -> dict[str, Any]:
    model = AdaptiveExtractor(fit_adaptive_stats(ql._images(root), seed=0)).eval()
    source = ql._source(model)
    cache: dict[str, np.ndarray] = {}

    def cached(image_id: str, image: np.ndarray) -> np.ndarray:  # F once per image for all modes
        if image_id not in cache:
            cache[image_id] = source(image_id, image)
        return cache[image_id]

    crf = DebiasConfig().crf_kwargs()
    row: dict[str, Any] = {}
    for mode in MODES:
        r = debias_in_process(root, cached, crf=None if mode == "crf-off" else crf,
                              crf_unary="ratio" if mode == "ratio" else "symmetric").row()
        row["pseudo_miou"] = r["pseudo_miou"]
        row[mode] = {k: r[k] for k in ("debiased_miou", "removal_recall", "retention", "target_ratio")}
    return row


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = "| dataset | Y^b | " + " | ".join(f"{m}: mIoU rem/ret" for m in MODES) + " | symmetric − ratio |"
    lines = [head, "|" + "---|" * (len(MODES) + 3)]
    gains = []
    for name, r in rows.items():
        cells = [f"{100 * r[m]['debiased_miou']:.1f} {r[m]['removal_recall']:.2f}/{r[m]['retention']:.2f}" for m in MODES]
        g = 100 * (r["symmetric"]["debiased_miou"] - r["ratio"]["debiased_miou"])
        gains.append(g)
        lines.append(f"| {name} | {100 * r['pseudo_miou']:.1f} | " + " | ".join(cells) + f" | {g:+.1f} |")
    g = np.asarray(gains)
    lines.append("")
    lines.append(f"symmetric vs ratio over {len(g)} datasets: better on {(g > 0.05).sum()}, worse on {(g < -0.05).sum()}, "
                 f"mean {g.mean():+.1f} points, median {np.median(g):+.1f}, worst {g.min():+.1f}, best {g.max():+.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/mars_unary_bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "unary_bench")
    ap.add_argument("--only", default="", help="comma-separated dataset names (default: all)")
    ap.add_argument("--smoke-test", action="store_true", help="one 16-image dataset")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    todo = datasets(a.work, a.smoke_test)
    if a.only:
        todo = {k: v for k, v in todo.items() if k in a.only.split(",")}
    rows: dict[str, dict[str, Any]] = {}
    for name, make in todo.items():
        t0 = time.perf_counter()
        rows[name] = measure(make())
        rows[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(table({name: rows[name]}).splitlines()[2], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    md = table(rows)
    a.out.with_suffix(".md").write_text(f"# unary_bench (debiased mIoU %, removal / retention)\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
