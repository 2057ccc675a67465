"""What a sweep leaves for people: ``results.csv``, the text table, ``heatmap.png``, label montages.

Pure functions of the result rows (one dict a trial: searched values, status, ``trial.METRICS``);
plots use matplotlib's ``Figure`` API, so no process-wide backend is changed.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from mars_ray import config as C
from mars_ray import tracking
from mars_ray.artifacts import atomic_write_bytes, atomic_write_text
from mars_ray.storage import AnyPath
from mars_ray.tune.space import Space

MONTAGE_IMAGES = 4


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def write_csv(rows: list[dict[str, Any]], path: AnyPath) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


MAX_GRID = 12  # beyond this many distinct values per axis, a table/heatmap turns into a list/scatter


def _axes(searched: list[str], rows: list[dict[str, Any]] | None = None) -> tuple[str, str] | None:
    """The two keys to tabulate over (α × K_bg when both are searched), or ``None``."""
    if "select.alpha" in searched and "features.k_bg" in searched:
        axes = ("select.alpha", "features.k_bg")
    elif len(searched) >= 2:
        axes = (searched[0], searched[1])
    else:
        return None
    if rows is not None and any(len({str(r[k]) for r in rows}) > MAX_GRID for k in axes):
        return None
    return axes


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pivot(rows: list[dict[str, Any]], x: str, y: str, metric: str) -> tuple[list, list, list[list[float]]]:
    """Mean objective per (x, y) cell: x values, y values, grid [len(y)][len(x)] (NaN = no trial)."""
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows})
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        cells.setdefault((r[x], r[y]), []).append(r[metric])
    grid = [[sum(cells[(a, b)]) / len(cells[(a, b)]) if (a, b) in cells else float("nan") for a in xs] for b in ys]
    return xs, ys, grid


def format_table(rows: list[dict[str, Any]], searched: list[str], metric: str, mode: str = "max",
                 reference: float | None = None) -> str:
    """Objective over the two main searched keys as text (rows: second key, columns: first key);
    ``reference`` (the pseudo labels' own figure for ``metric``) adds a last line to compare with."""
    ok = [r for r in rows if r["status"] == "ok" and finite(r.get(metric))]
    if not ok:
        return "no finished trials"
    table = _table(ok, searched, metric, mode)
    if reference is not None and finite(reference):
        table += f"\npseudo labels (reference, no debiasing): {metric} {100 * reference:.2f}"
    return table


def _table(ok: list[dict[str, Any]], searched: list[str], metric: str, mode: str) -> str:
    axes = _axes(searched, ok)
    if axes is None:  # one key, or continuous domains: one line a trial
        lines = ["".join(f"{k:>20}" for k in searched) + f"{metric:>16}"]
        for r in sorted(ok, key=lambda r: r[metric], reverse=mode == "max"):
            lines.append("".join(f"{_fmt(r[k]):>20}" for k in searched) + f"{100 * r[metric]:16.2f}")
        return "\n".join(lines)
    x, y = axes
    xs, ys, grid = _pivot(ok, x, y, metric)
    lines = [f"{metric} in % ({y} ↓ / {x} →)", f"{'':>8}" + "".join(f"{_fmt(a):>8}" for a in xs)]
    for b, vals in zip(ys, grid):
        lines.append(f"{_fmt(b):>8}" + "".join("       -" if math.isnan(v) else f"{100 * v:8.2f}" for v in vals))
    return "\n".join(lines)


def heatmap(rows: list[dict[str, Any]], searched: list[str], space: Space, path: AnyPath,
            reference: float | None = None) -> AnyPath | None:
    """``heatmap.png``: the objective over the two main searched keys (or over one key as a line).

    ``reference`` (the pseudo labels' figure for the objective) is drawn as a red line on the
    colour bar (or a dashed line on the plot) and named in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    axes = _axes(searched, rows)
    metric = space.metric
    if axes is not None:
        x, y = axes
        xs, ys, grid = _pivot(rows, x, y, metric)
        im = ax.imshow(grid, cmap="viridis" if space.mode == "max" else "viridis_r", aspect="auto", origin="lower")
        ax.set_xticks(range(len(xs)), [_fmt(v) for v in xs])
        ax.set_yticks(range(len(ys)), [_fmt(v) for v in ys])
        for i, vals in enumerate(grid):
            for j, v in enumerate(vals):
                if not math.isnan(v):
                    ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        cbar = fig.colorbar(im, ax=ax, label=f"{metric} ({space.mode})")
        if reference is not None and finite(reference):
            cbar.ax.axhline(reference, color="red", lw=2)
    else:
        k = searched[0]
        pts = sorted((r[k], r[metric]) for r in rows if isinstance(r[k], (int, float)))
        if not pts:
            return None
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if len(searched) == 1 else "")
        if space.params[k].get("loguniform"):
            ax.set_xscale("log")
        if reference is not None and finite(reference):
            ax.axhline(reference, color="red", ls="--", label="pseudo labels")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
    ref = f"; pseudo labels {100 * reference:.1f}" if reference is not None and finite(reference) else ""
    ax.set_title(f"{space.name}: {metric} ({space.mode}){ref}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def montage(cfg: C.Config, trial_dir: AnyPath) -> AnyPath | None:
    """``trial_dir/montage.png``: image | Y^b | Y^db of the split's first images (``None`` before debias)."""
    from mars_ray.data.label_io import read_image, read_label
    from mars_ray.stages.inputs import open_dataset
    from mars_ray.stages.inputs import pseudo_label_dir

    from mars_ray.artifacts import current

    if not (trial_dir / "debias").is_dir():
        return None
    labels = current(trial_dir / "debias")
    dataset = open_dataset(cfg)
    pseudo = pseudo_label_dir(cfg, trial_dir)
    rows = []
    for image_id in dataset.ids(cfg.data.split)[:MONTAGE_IMAGES]:
        debiased = labels / f"{image_id}.png"
        if debiased.is_file():
            rows.append((image_id, read_image(dataset.image_path(image_id)),
                         read_label(pseudo / f"{image_id}.png"), read_label(debiased)))
    return tracking.label_montage(rows, trial_dir / "montage.png") if rows else None


__all__ = ["MAX_GRID", "finite", "format_table", "heatmap", "montage", "write_csv"]
