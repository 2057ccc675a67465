"""The run report's pictures: PNG bytes from matplotlib's object API (``Figure`` + Agg) and PIL.

No process-wide state is touched (no ``matplotlib.use``, no pyplot): each figure is its own
``Figure`` with its own Agg canvas. Label maps are drawn with the VOC palette
(``data.label_io.VOC_PALETTE``; BIASED 254 magenta, ignore 255 cream).
"""

from __future__ import annotations

import io
import logging
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from mars_ray.data.label_io import VOC_PALETTE
from mars_ray.labels import BIASED

logger = logging.getLogger(__name__)

TILE = 160  # px on the long side of a grid tile (our choice: five columns fit a laptop screen)
CHOSEN, NOT_CHOSEN = "#d62728", "#9e9e9e"


def _png(fig: Any, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def distance_histogram(hist: Mapping[str, Sequence[float]], *, title: str, threshold: float | None) -> bytes:
    """Stacked bars of not-chosen and chosen centroids over bias distance D (Eq 1) → PNG bytes.

    ``hist``: ``{"edges": [B+1], "chosen": [B], "not_chosen": [B]}`` as ``select/report.json`` holds
    it; ``threshold``: the smallest chosen distance (a dashed line), or ``None``.
    """
    from matplotlib.ticker import MaxNLocator

    edges = np.asarray(hist["edges"], dtype=float)
    chosen = np.asarray(hist["chosen"], dtype=float)
    rest = np.asarray(hist["not_chosen"], dtype=float)
    if edges.shape != (chosen.size + 1,) or rest.shape != chosen.shape:
        raise ValueError(f"histogram of {title!r}: {edges.size} edges for {chosen.size}/{rest.size} counts")
    fig = _figure(3.6, 1.9)
    ax = fig.add_subplot(1, 1, 1)
    widths = np.diff(edges)
    ax.bar(edges[:-1], rest, width=widths, align="edge", color=NOT_CHOSEN, label="not chosen")
    ax.bar(edges[:-1], chosen, width=widths, align="edge", bottom=rest, color=CHOSEN, label="chosen ($V^c$)")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("bias distance D (Eq 1)", fontsize=8)
    ax.set_ylabel("centroids", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout(pad=0.3)
    return _png(fig)


def training_curves(histories: Mapping[str, Sequence[Mapping[str, str]]]) -> bytes:
    """Training loss and val mIoU per epoch, one line per run (``history.csv`` rows) → PNG bytes."""
    fig = _figure(8.0, 3.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, rows in histories.items():
        ep = [int(r["epoch"]) for r in rows]
        ax1.plot(ep, [float(r["loss"]) for r in rows], marker="o", label=name)
        val = [(int(r["epoch"]), 100 * float(r["val_miou"])) for r in rows if r.get("val_miou") not in (None, "")]
        if val:
            ax2.plot(*zip(*val), marker="o", label=name)
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax2.set(xlabel="epoch", ylabel="val mIoU (%)", title="val mIoU")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def _resize(arr: np.ndarray, *, label: bool) -> np.ndarray:
    h, w = arr.shape[:2]
    scale = TILE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.NEAREST if label or scale >= 1 else Image.BILINEAR  # never blend label colours
    return np.asarray(Image.fromarray(arr).resize(size, resample))


def colour_label(label: np.ndarray) -> np.ndarray:
    """``uint8 [H, W]`` label → ``uint8 [H, W, 3]`` VOC colours."""
    return VOC_PALETTE[label]


def highlight_biased(image: np.ndarray, debiased: np.ndarray) -> np.ndarray:
    """Y^db over the image: half image, half class colour, and BIASED (254) pixels solid magenta.

    ``image`` ``uint8 [H, W, 3]``, ``debiased`` ``uint8 [H, W]`` → ``uint8 [H, W, 3]``.
    """
    out = (image[..., :3].astype(np.uint16) + colour_label(debiased)) // 2
    out[debiased == BIASED] = VOC_PALETTE[BIASED]
    return out.astype(np.uint8)


def tile_png(arr: np.ndarray, *, label: bool) -> bytes:
    """An RGB ``[H, W, 3]`` array (or a label ``[H, W]``, coloured) as a PNG tile of ``TILE`` px."""
    rgb = colour_label(arr) if arr.ndim == 2 else arr
    buf = io.BytesIO()
    Image.fromarray(_resize(np.ascontiguousarray(rgb), label=label)).save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["colour_label", "distance_histogram", "highlight_biased", "tile_png", "training_curves"]
