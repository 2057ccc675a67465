"""Render ``docs/scaling.md`` from its template and the measured figures, so the doc's numbers are measured ones.

Inputs: the JSON of ``benchmarks/scale_bench.py`` (per-image costs, Ray overheads, select at
scale, memory), optionally the JSON of ``benchmarks/gpu_efficiency.py`` (images/s of the training
step on a GPU), and the cluster preset ``jobs/coco.yaml`` (actors and workers per stage). Every
``{name}`` in ``docs/scaling.template.md`` is one value computed in :func:`values`; a name without a
measurement is rendered as ``{name: not measured}``, never invented. The expected wall times are
the formulas in the template applied to these values.

    python benchmarks/scaling_doc.py --scale benchmarks/results_scale_bench.json \\
        [--gpu benchmarks/results_gpu_efficiency.json] [--out docs/scaling.md]
    python benchmarks/scaling_doc.py            # no measurements yet: placeholders stay visible
"""

from __future__ import annotations

import argparse
import json
import math
import string
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Datasets (train / val images) and our assumption of fg classes per image (K_fg = 2 rows each,
# plus K_bg = 2 background rows): VOC ~1.5, COCO ~2.9 (its annotations), Open Images ~2 (our guess).
DATASETS = {"voc": ("VOC-aug", 10_582, 1_449, 1.5, 21), "coco": ("COCO 2014", 82_081, 40_137, 2.9, 81),
            "oi": ("Open Images", 9_000_000, 0, 2.0, 351)}
EPOCHS = 10  # jobs/coco.yaml
BATCH = 16  # paper
CLUSTER = {"gpus": 8, "cpus": 64}


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + ": not measured}"


def _fmt_s(s: float | None) -> str | None:
    if s is None or not math.isfinite(s):
        return None
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _preset() -> dict[str, Any]:
    from mars_ray import config as C

    cfg = C.build(REPO / "jobs" / "coco.yaml")
    return {"features_actors": cfg.features.num_actors, "debias_actors": cfg.debias.num_actors,
            "train_workers": cfg.train.num_workers, "train_cpus": cfg.train.cpus_per_worker,
            "crf_workers": cfg.train.crf_workers,
            "evaluate_actors": cfg.evaluate.num_actors, "k_fg": cfg.features.k_fg, "k_bg": cfg.features.k_bg}


def values(scale: dict[str, Any] | None, gpu: dict[str, Any] | None) -> dict[str, Any]:
    """Every placeholder of the template that the measurements allow (strings, formatted)."""
    v: dict[str, Any] = {}
    p = _preset()
    v.update({k: str(x) for k, x in p.items()})
    v["cluster"] = f"{CLUSTER['gpus']} GPUs + {CLUSTER['cpus']} CPUs"
    v["epochs"] = str(EPOCHS)
    v["load_note"] = ""
    if scale:
        m = scale.get("machine", {})
        v["measured_on"] = (f"{m.get('cpus')} CPUs, load average {m.get('load_avg_start', ['?'])[0]:.1f} at the start, "
                            f"Ray {m.get('ray')}, torch {m.get('torch')}")
        load = max([r["machine"]["load_avg_start"][0] for r in scale.get("runs", [])]
                   or [m.get("load_avg_start", [0.0])[0]])
        cpus = m.get("cpus") or 1
        v["load_note"] = "" if load <= cpus else (
            f"\n\n**Shared machine:** other processes kept the load average up to {load:.0f} on {cpus} cores "
            "while this ran, so every wall time (and each ratio of wall times) here is inflated by waiting "
            "for a core; the per-image costs are the measured CPU seconds of one thread, which such "
            "waiting does not inflate. Rerun on a quiet machine (\"Measuring\") before relying on the ratios.")
        if scale.get("ray_init_s") is not None:
            v["ray_init_s"] = f"{scale['ray_init_s']:.1f} s"
        ratios = scale.get("ratios", [])
        for stage in ("features", "debias"):
            rs = [r for r in ratios if r["stage"] == stage]
            if rs:
                big = max(rs, key=lambda r: r["n"])
                v[f"{stage}_bench_n"] = f"{big['n']:,}"
                v[f"{stage}_bench_s_per_image"] = f"{1 / big['bare_images_per_s']:.3f} s"
                for k in ("ray1_over_bare", "two_over_one"):
                    if k in big:
                        v[f"{stage}_{k}"] = f"{big[k]:.2f}"
                e = big.get("ray1_explained")
                if e:
                    v[f"{stage}_startup_s"] = f"{e['no_work_pipeline_s']:.1f} s"
        if scale.get("dataset"):
            v["bench_px"] = str(scale["dataset"]["image_size"])
        u = _unit(scale)
        if u:
            v["unit_px"] = str(u["size"])
            v["features_s_per_image"] = f"{u['features_s_per_image']:.3f} s"
            v["debias_s_per_image"] = f"{u['debias_s_per_image']:.3f} s"
            v["crf21_s"] = f"{u['crf21_s_per_image']:.3f} s"
        sel = [r for r in scale.get("select", []) if not r["extrapolated"]]
        for d in (70, 384):
            rows = [r for r in sel if r["d"] == d]
            if rows:
                big = max(rows, key=lambda r: r["rows"])
                v[f"select_s_per_mrow_d{d}"] = f"{big['select_s'] / big['rows'] * 1e6:.2f} s"
                v[f"select_over_read_d{d}"] = f"{big['select_over_read']:.2f}"
                v[f"select_rows_d{d}"] = f"{big['rows']:,}"
                v[f"select_actor_mb_d{d}"] = f"{big['actor_peak_private_mb']:.0f} MB"
                v[f"select_model_mb_d{d}"] = f"{big['model_mb']:.0f} MB"
                v[f"select_vectors_mb_d{d}"] = f"{big['vectors_mb']:.0f} MB"
        for r in scale.get("eq13", []):
            v[f"eq13_ratio_d{r['d']}"] = f"{r['wall_ratio']:.1f}"
            v[f"eq13_cpu_ratio_d{r['d']}"] = f"{r['cpu1_ratio']:.1f}"
        rss = scale.get("rss", [])
        if rss:
            v["rss_table"] = "\n".join(
                f"| {r['stage']} | {r['n']:,} → {r['n_large']:,} | {r['driver']['private_mb'][0]:.0f} → "
                f"{r['driver']['private_mb'][1]:.0f} MB | {r['worker']['private_mb'][0]:.0f} → "
                f"{r['worker']['private_mb'][1]:.0f} MB |" for r in rss)
        tr = scale.get("train")
        if tr:
            v["train_cpu_ray_over_bare"] = f"{tr['ray_over_bare_steady']:.2f}"
        v["targets_table"] = "\n".join(
            f"| {t['target']} | {t['value']:.2f} | {t['goal']} | {'met' if t['met'] else '**missed**'} |"
            for t in scale.get("targets", [])) or None
    if gpu:
        best = next((r for r in gpu.get("variants", []) if r["name"] == gpu.get("best")), None)
        if best:
            v["gpu_device"] = gpu.get("device")
            v["gpu_images_per_s"] = f"{best['images_per_s']:.0f}"
            v["gpu_variant"] = best["lever"]
            if best.get("utilisation") is not None:
                v["gpu_utilisation"] = f"{100 * best['utilisation']:.0f}%"
    _wall_times(v, scale, gpu, p)
    return {k: x for k, x in v.items() if x is not None}


def _unit(scale: dict[str, Any] | None) -> dict[str, Any] | None:
    """The per-image costs: CPU seconds of the one thread where the JSON has them (a shared machine
    inflates wall seconds, not these), else wall seconds (older JSON)."""
    u = (scale or {}).get("unit")
    if not u:
        return None
    keys = ("features_s_per_image", "debias_s_per_image", "crf21_s_per_image")
    return {**u, **{k: u.get(k.replace("_s_per", "_cpu_s_per"), u[k]) for k in keys}}


def _wall_times(v: dict[str, Any], scale: dict[str, Any] | None, gpu: dict[str, Any] | None, p: dict[str, Any]) -> None:
    """The expected wall time per stage and dataset (the template states each formula)."""
    u = _unit(scale)
    sel = [r for r in (scale or {}).get("select", []) if not r["extrapolated"] and r["d"] == 70]
    best = None
    if gpu:
        best = next((r for r in gpu.get("variants", []) if r["name"] == gpu.get("best")), None)
    for key, (_, n_train, n_val, cls_per_image, labels) in DATASETS.items():
        rows = n_train * (p["k_bg"] + p["k_fg"] * cls_per_image)
        v[f"rows_{key}"] = f"{rows / 1e6:.2f}M"
        if u:
            v[f"t_features_{key}"] = _fmt_s(n_train * u["features_s_per_image"] / p["features_actors"])
            v[f"t_debias_{key}"] = _fmt_s(n_train * u["debias_s_per_image"] / p["debias_actors"])
            crf = u["crf21_s_per_image"] * labels / 21  # mean-field cost grows with the labels
            # the teacher's CRF fill: train.crf_workers processes per Train worker (pydensecrf holds the GIL)
            t_crf = EPOCHS * n_train * crf / (p["train_workers"] * p["crf_workers"])
            v[f"t_train_crf_{key}"] = _fmt_s(t_crf)
            if n_val:
                v[f"t_evaluate_{key}"] = _fmt_s(n_val * crf / p["evaluate_actors"])
        if sel:
            big = max(sel, key=lambda r: r["rows"])
            v[f"t_select_{key}"] = _fmt_s(rows * big["select_s"] / big["rows"])
        if best:
            t_gpu = EPOCHS * n_train / (best["images_per_s"] * p["train_workers"])
            v[f"t_train_gpu_{key}"] = _fmt_s(t_gpu)


def render(template: str, scale: dict[str, Any] | None, gpu: dict[str, Any] | None) -> str:
    return string.Formatter().vformat(template, (), _Missing(values(scale, gpu)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", help="JSON of benchmarks/scale_bench.py")
    ap.add_argument("--gpu", help="JSON of benchmarks/gpu_efficiency.py")
    ap.add_argument("--template", default=str(REPO / "docs" / "scaling.template.md"))
    ap.add_argument("--out", default=str(REPO / "docs" / "scaling.md"))
    args = ap.parse_args(argv)
    scale = json.loads(Path(args.scale).read_text()) if args.scale else None
    gpu = json.loads(Path(args.gpu).read_text()) if args.gpu else None
    text = render(Path(args.template).read_text(), scale, gpu)
    Path(args.out).write_text(text)
    missing = text.count(": not measured}")
    print(f"{args.out}: written ({missing} values not measured)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
