"""``RUN/report/index.html``: the page a person opens after a run — static HTML + CSS, PNGs beside it.

Every section appears only when its inputs exist in the run folder:

* label quality (``data.split``): mIoU / FP / FN of the pseudo labels Y^b, the debiased Y^db
  (``RUN/debias``) and the complemented Y^co (``RUN/complement``) when the split has ground truth,
  computed in-process and kept in ``RUN/evaluate_labels/<folder>.json`` while current
  (``stages.evaluate_labels.evaluate_cached``); the segmenters' ``RUN/evaluate*/metrics.json``;
* per class (``RUN/select/report.json``, ``RUN/debias/stats.json``): chosen / all centroids, the
  target-centroid ratio, the share of pseudo-label pixels removed, the separation score when
  ``select`` wrote one, and the bias-distance histogram of chosen vs not-chosen centroids;
* the images with the largest share of biased pixels: image | Y^b | Y^db (biased magenta) | Y^co | GT;
* training curves (``RUN/train*/history.csv``) and the sweep (``RUN/tune/summary.json``, ``heatmap.png``).

The page uses relative links only, needs no server and no JavaScript. ``RUN`` may be a local folder
or an object-store URI (``mars_ray.storage``); the page is built in a temporary folder beside
``RUN/report`` and moved into place, so an old page is replaced whole.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from mars_ray import config as C
from mars_ray import storage
from mars_ray.artifacts import atomic_write_bytes, atomic_write_text, current, read_manifest
from mars_ray.data.label_io import read_image, read_label
from mars_ray.data.voc import VOCDataset
from mars_ray.labels import BIASED
from mars_ray.report import figures
from mars_ray.stages.inputs import open_dataset, pseudo_label_dir
from mars_ray.storage import AnyPath, upath

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
LABEL_SETS = (  # (key, row title, folder under RUN or None = the pseudo labels)
    ("pseudo", "pseudo labels (Y^b)", None),
    ("debiased", "debiased (Y^db)", "debias"),
    ("complemented", "complemented (Y^co)", "complement"),
)
SEGMENTERS = (("evaluate_baseline", "trained on Y^b, plain CE (baseline)"),
              ("evaluate", "MARS: Y^db + complement (Eq 6-7)"))
HISTORIES = (("train", "MARS"), ("train_baseline", "baseline"))
NAME_CLASS = ' class="name"'  # left-aligned text column

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; vertical-align: middle; }
th { background: #f4f4f4; } td.name, th.name { text-align: left; }
.grid td { padding: 2px; text-align: center; } .grid img { display: block; image-rendering: pixelated; }
.warn { color: #a40000; font-weight: 600; } .ok { color: #1a7f37; }
.muted { color: #777; font-size: .9em; } nav a { margin-right: 1em; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; }
"""


@dataclass
class _Page:
    """What the sections produce: HTML fragments and the PNG files they reference (relative names)."""

    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (anchor, title, html)
    assets: dict[str, bytes] = field(default_factory=dict)

    def add(self, anchor: str, title: str, body: str) -> None:
        self.sections.append((anchor, title, body))

    def image(self, name: str, png: bytes, alt: str, **attrs: Any) -> str:
        self.assets[name] = png
        extra = "".join(f' {k.replace("_", "-")}="{_e(v)}"' for k, v in attrs.items())
        return f'<img src="{_e(name)}" alt="{_e(alt)}"{extra}>'


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _y(text: str) -> str:
    """Escaped text with the paper's notation set as superscripts: ``Y^db`` → Y<sup>db</sup>."""
    return re.sub(r"\^(\w+)", r"<sup>\1</sup>", _e(text))


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.1f}"


def _cell(v: Any, *, metric: str = "") -> str:
    """A percentage cell carrying its raw value (``data-value``) for anyone reading the page's numbers."""
    raw = "" if v is None else repr(float(v))
    return f'<td data-metric="{_e(metric)}" data-value="{raw}">{_pct(v)}</td>'


def _table(table_id: str, head: list[str], rows: list[str], cls: str = "") -> str:
    """``<table id=…>``: a header row (first column left-aligned, the notation set with ``_y``) + rows."""
    cells = "".join(f"<th{NAME_CLASS if j == 0 else ''}>{_y(h)}</th>" for j, h in enumerate(head))
    return f'<table id="{_e(table_id)}" class="{_e(cls)}"><tr>{cells}</tr>{"".join(rows)}</table>'


def _read_json(path: AnyPath) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _complete(folder: AnyPath) -> bool:
    m = read_manifest(folder) if folder.is_dir() else None
    return bool(m and m.get("status") == "complete")


# -- sections -------------------------------------------------------------------------------------


def _label_folders(cfg: C.Config, run: AnyPath, dataset: VOCDataset) -> dict[str, AnyPath]:
    """The label sets of this run that exist completely for ``data.split``."""
    ids = dataset.ids(cfg.data.split)
    out: dict[str, AnyPath] = {}
    for key, _, sub in LABEL_SETS:
        if sub is None:
            folder = pseudo_label_dir(cfg, run)
        else:
            folder = run / sub
        if sub == "debias" and not _complete(folder):
            continue
        if sub == "complement" and not _complete(run / "train"):
            continue
        files = current(folder)  # an object store: the current prefix
        names = storage.list_files(files) if files.is_dir() else {}
        if all(f"{i}.png" in names for i in ids):
            out[key] = folder
    return out


def _quality(page: _Page, cfg: C.Config, run: AnyPath, dataset: VOCDataset, folders: Mapping[str, AnyPath]) -> None:
    from mars_ray.stages.evaluate_labels import evaluate_cached

    split = cfg.data.split
    parts = []
    if folders and dataset.has_gt(split):
        metrics = evaluate_cached(dataset, folders, split, run)
        rows = []
        for key, title, _ in LABEL_SETS:
            if key in metrics:
                m = metrics[key]
                rows.append(f'<tr data-set="{key}"><td class="name">{_y(title)}</td>{_cell(m["miou"], metric="miou")}'
                            f'{_cell(m["fp"], metric="fp")}{_cell(m["fn"], metric="fn")}'
                            f'<td class="name muted">{_e(folders[key])}</td></tr>')
        parts.append(f"<p>Split <b>{_e(split)}</b>, {len(dataset.ids(split))} images, against ground truth; "
                     "biased pixels (254) count as background. In %.</p>"
                     + _table("label-quality", ["labels", "mIoU", "FP", "FN", "folder"], rows))
        keys = [k for k, _, _ in LABEL_SETS if k in metrics]
        per_class = [f'<tr><td class="name">{_e(n)}</td>'
                     + "".join(_cell(metrics[k]["per_class"][n]["iou"], metric=f"iou:{k}") for k in keys) + "</tr>"
                     for n in dataset.classes]
        head = ["class"] + [title.split(" (")[0] for k, title, _ in LABEL_SETS if k in metrics]
        parts.append(f"<details><summary>IoU per class (%)</summary>{_table('class-iou', head, per_class)}</details>")
    segs = [(title, _read_json(current(run / sub) / "metrics.json"))
            for sub, title in SEGMENTERS if _complete(run / sub)]
    segs = [(title, m) for title, m in segs if m and m.get("miou") is not None]  # None: a split without GT
    if segs:
        rows = [f'<tr><td class="name">{_y(t)}</td>{_cell(m["miou"], metric="miou")}{_cell(m["fp"], metric="fp")}'
                f'{_cell(m["fn"], metric="fn")}</tr>' for t, m in segs]
        split_e = segs[0][1].get("split", cfg.data.eval_split)
        parts.append(f"<p>Segmenters on split <b>{_e(split_e)}</b> ({_e(cfg.train.model)}), in %:</p>"
                     + _table("segmenters", ["trained on", "mIoU", "FP", "FN"], rows))
    if parts:
        page.add("quality", "Label quality", "".join(parts))


def _separation(entry: Any) -> str:
    """Whatever ``select`` put in ``per_class[c]["separation"]``: a number, a ``separates`` flag, a message."""
    if entry is None:
        return '<span class="muted">–</span>'
    if not isinstance(entry, Mapping):
        entry = {"score": entry}
    score = next((v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
    ok = entry.get("separates")
    text = f"{score:.2f}" if isinstance(score, (int, float)) else ""
    flag = ("" if ok is None else ' <span class="ok">separates</span>' if ok
            else ' <span class="warn">⚠ does not separate</span>')
    msg = f'<br><span class="muted">{_e(entry["message"])}</span>' if entry.get("message") else ""
    return f'<span data-separates="{_e(ok)}">{_e(text)}{flag}</span>{msg}'


def _classes(page: _Page, run: AnyPath) -> None:
    report = _read_json(current(run / "select") / "report.json")
    if not report:
        return
    stats = _read_json(current(run / "debias") / "stats.json") if _complete(run / "debias") else None
    removed = (stats or {}).get("per_class", {})
    rows = []
    for name, e in report["per_class"].items():
        hist = e.get("histogram")
        img = page.image(f"hist-{e.get('class_id', len(rows))}.png",
                         figures.distance_histogram(hist, title=name, threshold=e.get("chosen_distance_min")),
                         f"bias-distance histogram of {name}", width=360) if hist else '<span class="muted">–</span>'
        r = removed.get(name, {})
        rows.append(f'<tr data-class="{_e(name)}"><td class="name">{_e(name)}</td>'
                    f'<td data-metric="n_chosen" data-value="{e["n_chosen"]}">{e["n_chosen"]} / {e["n_centroids"]}</td>'
                    f'{_cell(e.get("paper_target_ratio"), metric="paper_target_ratio")}'
                    f'{_cell(e.get("target_ratio"), metric="target_ratio")}'
                    f'{_cell(e.get("target_ratio_not_chosen"), metric="target_ratio_not_chosen")}'
                    f'{_cell(r.get("biased_fraction"), metric="biased_fraction")}'
                    f'<td class="name">{_separation(e.get("separation"))}</td><td>{img}</td></tr>')
    total = (f"; {_pct(stats['biased_fraction'])}% of the pseudo labels' foreground pixels marked biased"
             if stats else "")
    ratio = (f"; target-centroid ratio {_pct(report['target_ratio'])}% of chosen vs "
             f"{_pct(report.get('target_ratio_all'))}% of all foreground centroids"
             if report.get("target_ratio") is not None else "")
    paper = (f"; the paper's target-centroid ratio (IoU &gt; 0.3) {_pct(report['paper_target_ratio'])}% of chosen "
             f"vs {_pct(report.get('paper_target_ratio_all'))}% of all, biased (IoU &lt; 0.1) "
             f"{_pct(report.get('paper_biased_ratio'))}% of chosen"
             if report.get("paper_target_ratio") is not None else "")
    body = (f"<p>α = {_e(report['alpha'])}: {report['n_chosen']} of {report['n_foreground_centroids']} foreground "
            f"centroids chosen as V<sup>c</sup> (Eq 2-3){paper}{ratio}{total}. Paper's target ratio (Fig 8): share "
            "of chosen centroids whose pixels overlap the class's ground truth with IoU &gt; 0.3. Target ratio: "
            "share of centroids whose pixels are mostly the target object in the ground truth (our measure). The "
            "histogram stacks chosen (red) on not-chosen (grey) centroids; the dashed line is the smallest chosen "
            "distance.</p>"
            + _table("classes", ["class", "chosen / all", "paper target ratio (IoU > 0.3) %", "target ratio chosen %",
                                 "target ratio not chosen %", "pixels removed %", "separation", "bias distance D"],
                     rows))
    page.add("classes", "Per class: centroid selection and removal", body)


def _scan_biased(folder: AnyPath, ids: list[str], k: int) -> list[dict[str, Any]]:
    """Top ``k`` images by biased share, read from the Y^db PNGs (runs whose stats predate the ranking)."""
    shares = []
    for i in ids:
        y = read_label(folder / f"{i}.png")
        b = int((y == BIASED).sum())
        if b:
            shares.append({"image_id": i, "biased_pixels": b, "biased_share": b / y.size})
    return sorted(shares, key=lambda r: -r["biased_share"])[:k]


def _grid(page: _Page, cfg: C.Config, run: AnyPath, dataset: VOCDataset, folders: Mapping[str, AnyPath],
          max_images: int) -> None:
    if "debiased" not in folders or "pseudo" not in folders:
        return
    folders = {k: current(f) for k, f in folders.items()}  # the files (object stores: current prefixes)
    stats = _read_json(current(run / "debias") / "stats.json") or {}
    top = stats.get("most_biased")
    if top is None:
        top = _scan_biased(folders["debiased"], dataset.ids(cfg.data.split), max_images)
    top = top[:max_images]
    if not top:
        page.add("images", "Images that changed most", "<p>No pixel was marked biased.</p>")
        return
    has_gt = all(dataset.gt_path(r["image_id"]) is not None for r in top)
    cols = ["image", "Y^b (pseudo)", "Y^db (biased = magenta)"]
    cols += (["Y^co (complemented)"] if "complemented" in folders else []) + (["ground truth"] if has_gt else [])
    rows = []
    for rank, r in enumerate(top):
        i = r["image_id"]
        image = read_image(dataset.image_path(i))
        tiles = [(image, False), (read_label(folders["pseudo"] / f"{i}.png"), True),
                 (figures.highlight_biased(image, read_label(folders["debiased"] / f"{i}.png")), True)]
        if "complemented" in folders:
            tiles.append((read_label(folders["complemented"] / f"{i}.png"), True))
        if has_gt:
            tiles.append((read_label(dataset.gt_path(i)), True))
        cells = "".join(f"<td>{page.image(f'grid/{rank:02d}-{c}.png', figures.tile_png(a, label=lab), f'{i}: {col}')}"
                        "</td>" for c, ((a, lab), col) in enumerate(zip(tiles, cols)))
        rows.append(f'<tr data-image="{_e(i)}"><td class="name">{_e(i)}<br><span class="muted">'
                    f'{_pct(r["biased_share"])}% biased</span></td>{cells}</tr>')
    page.add("images", "Images that changed most",
             f"<p>The {len(top)} images of split {_e(cfg.data.split)} with the largest share of pixels marked "
             "biased (Eq 5). In Y<sup>db</sup>, kept labels are blended with the image.</p>"
             + _table("grid", ["image", *cols], rows, cls="grid"))


def _training(page: _Page, run: AnyPath) -> None:
    histories = {}
    for sub, name in HISTORIES:
        path = current(run / sub) / "history.csv"
        if path.is_file():
            rows = list(csv.DictReader(io.StringIO(path.read_text())))
            if rows:
                histories[name] = rows
    if not histories:
        return
    last = []
    for name, rows in histories.items():
        r = rows[-1]
        val = float(r["val_miou"]) if r.get("val_miou") else None
        last.append(f'<tr><td class="name">{_e(name)}</td><td>{_e(r["epoch"])}</td><td>{float(r["loss"]):.4f}</td>'
                    f'{_cell(val, metric="val_miou")}</tr>')
    page.add("training", "Training",
             page.image("curves.png", figures.training_curves(histories), "training curves", width=800)
             + _table("training", ["run", "epochs", "last loss", "last val mIoU %"], last))


def _sweep(page: _Page, run: AnyPath) -> None:
    summary = _read_json(run / "tune" / "summary.json")
    if not summary:
        return
    metric, mode = summary["objective"]["metric"], summary["objective"]["mode"]
    best = summary["best"]
    parts = [f"<p>{summary['trials']} trials ({summary['failed']} failed), objective <b>{_e(metric)}</b> ({_e(mode)}); "
             f"best {_pct(best[metric])} at "
             + ", ".join(f"{_e(k)} = {_e(v)}" for k, v in best.items() if k not in ("trial_id", metric))
             + '. <a href="../tune/results.csv">results.csv</a>, <a href="../tune/best.yaml">best.yaml</a>.</p>']
    ref = summary.get("reference")
    if ref and ref.get("value") is not None:
        parts.append(f'<p id="sweep-reference">Reference: the pseudo labels score {_pct(ref["value"])} '
                     f"({_e(ref['metric'])} on split {_e(ref['split'])}).</p>")
    heatmap = run / "tune" / "heatmap.png"
    if heatmap.is_file():
        parts.append(page.image("sweep-heatmap.png", heatmap.read_bytes(), "sweep heatmap"))
    parts.append(f"<pre>{_e(summary.get('table', ''))}</pre>")
    page.add("sweep", "Sweep", "".join(parts))


# -- the page -------------------------------------------------------------------------------------


def _header(cfg: C.Config, run: AnyPath) -> str:
    f, s, d = cfg.features, cfg.select, cfg.debias
    items = [("dataset", cfg.data.root), ("split", cfg.data.split),
             ("pseudo labels", cfg.data.pseudo_labels or "RUN/wsss"),
             ("features", cfg.data.features_dir or f.extractor), ("K_fg / K_bg", f"{f.k_fg} / {f.k_bg}"),
             ("α", s.alpha), ("debias threshold / CRF", f"{d.threshold} / {d.crf}")]
    rows = "".join(f'<tr><th class="name">{_e(k)}</th><td class="name">{_e(v)}</td></tr>' for k, v in items)
    return (f"<h1>MARS run report</h1><p class=\"muted\">{_e(run)} · written {time.strftime('%Y-%m-%d %H:%M')} · "
            f'<a href="../config.yaml">config.yaml</a></p><table id="config">{rows}</table>')


def render(cfg: C.Config, run: AnyPath, page: _Page) -> str:
    """The HTML document of ``page``'s sections."""
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in page.sections)
    body = "".join(f'<section id="{a}"><h2>{_e(t)}</h2>{b}</section>' for a, t, b in page.sections)
    if not page.sections:
        body = "<p>Nothing to show yet: no stage of this run has finished.</p>"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>MARS report: {_e(run.name)}</title>'
            f"<style>{CSS}</style></head><body>{_header(cfg, run)}<nav>{nav}</nav>{body}</body></html>\n")


def write_report(run_dir: "str | os.PathLike[str] | storage.ObjectPath", *, max_images: int = 12) -> AnyPath:
    """Write ``RUN/report/index.html`` (and its PNGs) from the artifacts in ``run_dir``; returns its path.

    Reads ``RUN/config.yaml`` for the dataset, split and pseudo labels. Cheap: no Ray; the label
    metrics are computed in-process once and then reused from ``RUN/evaluate_labels/``.
    Raises ``FileNotFoundError`` when ``run_dir`` has no ``config.yaml`` (not a run folder),
    ``ValueError`` for ``max_images < 1``.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    run = upath(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run / 'config.yaml'}: not a run folder (no config.yaml)")
    cfg = C.build(run / "config.yaml")
    dataset = open_dataset(cfg)
    folders = _label_folders(cfg, run, dataset)
    page = _Page()
    _quality(page, cfg, run, dataset, folders)
    _classes(page, run)
    _grid(page, cfg, run, dataset, folders, max_images)
    _training(page, run)
    _sweep(page, run)
    tmp = run / f".{REPORT_DIR}.tmp-{os.getpid()}"
    storage.rmtree(tmp)
    for name, data in page.assets.items():
        atomic_write_bytes(tmp / name, data)
    atomic_write_text(tmp / "index.html", render(cfg, run, page))
    final = run / REPORT_DIR
    storage.rmtree(final)
    storage.move(tmp, final)
    logger.info("report: %d sections, %d images → %s", len(page.sections), len(page.assets), final / "index.html")
    return final / "index.html"


__all__ = ["REPORT_DIR", "render", "write_report"]
