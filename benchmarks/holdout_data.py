"""Hold-out biased datasets, generated independently of ``mars_ray.data.synthetic`` (no shared code).

Used ONLY to validate the USS extractors after their design was fixed on ``mars make-dataset``
variants; nothing in the project is chosen by looking at these numbers. Different textures
(checkerboards, dot lattices, value noise, gradients, cross-hatching, rings), different shapes
(stars, crosses, rings, rounded polygons), a different layout (band/rectangle backgrounds,
contexts made of overlapping discs) and a different pseudo-label bias (the context inside a
random ellipse around the object, plus blob noise).

* ``A`` (``kind="A"``): 120 train / 40 val, 96×96 PNG, five classes; three sit on a co-occurring
  context that their pseudo label swallows, and object and context share their texture family but
  differ in colour; two classes have no context (pseudo label = object with boundary noise).
* ``B`` (``kind="B"``): 120 train / 40 val, 112×160 JPEG, five classes; four sit on a context whose
  two colours the object takes: object and context differ only in texture and shape.

Both write the VOC layout the pipeline reads (``JPEGImages``, ``SegmentationClass``,
``pseudo_labels``, ``ImageSets/Segmentation``, ``classes.txt``, ``image_labels.json``).

    python benchmarks/holdout_data.py OUT_DIR [--kind A|B|both] [--seed 0]
"""

from __future__ import annotations

import argparse
import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

# ---------------------------------------------------------------------------- textures in [0, 1]


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")


def _rot(y: np.ndarray, x: np.ndarray, ang: float) -> tuple[np.ndarray, np.ndarray]:
    return x * np.cos(ang) + y * np.sin(ang), -x * np.sin(ang) + y * np.cos(ang)


def checker(h, w, r, period):
    y, x = _grid(h, w)
    u, v = _rot(y + r.uniform(0, period), x + r.uniform(0, period), r.uniform(0, np.pi / 2))
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)


def dots(h, w, r, period):
    y, x = _grid(h, w)
    u, v = _rot(y, x, r.uniform(0, np.pi))
    u, v = u + r.uniform(0, period), v + r.uniform(0, period)
    du = (u % period) - period / 2
    dv = (v % period) - period / 2
    return (np.hypot(du, dv) < period * 0.3).astype(np.float64)


def value_noise(h, w, r, scale):
    gh, gw = int(np.ceil(h / scale)) + 2, int(np.ceil(w / scale)) + 2
    coarse = r.random((gh, gw))
    return np.clip(ndimage.zoom(coarse, scale, order=3)[:h, :w], 0, 1)


def gradient(h, w, r, _):
    y, x = _grid(h, w)
    a = r.uniform(0, 2 * np.pi)
    g = x * np.cos(a) + y * np.sin(a)
    return (g - g.min()) / max(np.ptp(g), 1e-9)


def hatch(h, w, r, period):
    y, x = _grid(h, w)
    a = r.uniform(0, np.pi)
    u1, _ = _rot(y, x, a)
    u2, _ = _rot(y, x, a + np.pi / 2.5)
    return (((u1 % period) < 1.5) | ((u2 % period) < 1.5)).astype(np.float64)


def rings(h, w, r, period):
    y, x = _grid(h, w)
    cy, cx = r.uniform(0, h), r.uniform(0, w)
    return 0.5 + 0.5 * np.cos(2 * np.pi * np.hypot(y - cy, x - cx) / period)


TEXTURES = {"checker": checker, "dots": dots, "noise": value_noise, "gradient": gradient, "hatch": hatch,
            "rings": rings}


def paint(canvas, mask, tex, period, c1, c2, r):
    """Two-colour texture: ``c1 + t·(c2 - c1)`` with t the texture in [0, 1]."""
    t = TEXTURES[tex](*mask.shape, r, period)[..., None]
    layer = np.asarray(c1)[None, None] + t * (np.asarray(c2) - np.asarray(c1))[None, None]
    canvas[mask] = layer[mask]


# ---------------------------------------------------------------------------- shapes


def star(h, w, cy, cx, rad, r):
    y, x = _grid(h, w)
    ang = np.arctan2(y - cy, x - cx) + r.uniform(0, np.pi)
    k = int(r.integers(4, 7))
    rr = rad * (0.72 + 0.28 * np.cos(k * ang))
    return np.hypot(y - cy, x - cx) < rr


def cross(h, w, cy, cx, rad, r):
    y, x = _grid(h, w)
    u, v = _rot(y - cy, x - cx, r.uniform(0, np.pi))
    arm = rad * r.uniform(0.3, 0.45)
    return ((np.abs(u) < rad) & (np.abs(v) < arm)) | ((np.abs(v) < rad) & (np.abs(u) < arm))


def ring(h, w, cy, cx, rad, r):
    y, x = _grid(h, w)
    d = np.hypot(y - cy, x - cx)
    return (d < rad) & (d > rad * r.uniform(0.35, 0.55))


def rounded_poly(h, w, cy, cx, rad, r):
    n = int(r.integers(3, 6))
    y, x = _grid(h, w)
    m = np.ones((h, w), bool)
    off = r.uniform(0, 2 * np.pi)
    for k in range(n):
        a = off + 2 * np.pi * k / n
        m &= (x - cx) * np.cos(a) + (y - cy) * np.sin(a) < rad * 0.7
    return ndimage.binary_dilation(m, iterations=max(1, int(rad * 0.25)))


SHAPES = [star, cross, ring, rounded_poly]


def discs(h, w, cy, cx, rad, r):
    """A context region: the union of three overlapping discs."""
    y, x = _grid(h, w)
    m = np.zeros((h, w), bool)
    for _ in range(3):
        oy, ox = cy + r.normal(0, rad * 0.35), cx + r.normal(0, rad * 0.35)
        m |= np.hypot(y - oy, x - ox) < rad * r.uniform(0.65, 0.9)
    return m


# ---------------------------------------------------------------------------- datasets


def _hsv(hh, s, v):
    return np.array(colorsys.hsv_to_rgb(hh % 1.0, s, v))


def _spec(kind: str) -> dict:
    if kind == "A":
        # object and context: same texture family, different colours; classes 4-5 have no context
        return dict(
            size=(96, 96), fmt="png", names=["kite", "fish", "lamp", "frog", "vase"],
            contexts={1: ("hatch", 7), 2: ("rings", 9), 3: ("noise", 6)},
            objects={1: ("hatch", 7), 2: ("rings", 9), 3: ("noise", 6), 4: ("checker", 5), 5: ("dots", 6)},
            ctx_colour={1: (0.58, 0.35, 0.55), 2: (0.08, 0.45, 0.60), 3: (0.30, 0.40, 0.45)},
            obj_colour={1: (0.02, 0.65, 0.80), 2: (0.75, 0.55, 0.70), 3: (0.90, 0.55, 0.85),
                        4: (0.45, 0.60, 0.70), 5: (0.15, 0.70, 0.75)},
        )
    if kind == "B":
        # the object takes its context's two colours; only texture and shape differ
        return dict(
            size=(112, 160), fmt="jpg", names=["robot", "shell", "badge", "crab", "mask"],
            contexts={1: ("noise", 10), 2: ("gradient", 0), 3: ("hatch", 12), 4: ("rings", 14)},
            objects={1: ("checker", 4), 2: ("dots", 5), 3: ("checker", 6), 4: ("dots", 4), 5: ("hatch", 5)},
            ctx_colour={1: (0.55, 0.30, 0.55), 2: (0.12, 0.40, 0.60), 3: (0.33, 0.35, 0.50), 4: (0.75, 0.30, 0.60)},
            obj_colour={5: (0.95, 0.50, 0.75)},
        )
    raise ValueError(f"kind must be A or B, got {kind!r}")


GENERIC = [("gradient", 0), ("noise", 14), ("hatch", 16), ("checker", 11), ("noise", 4)]


def _sample(spec: dict, r: np.random.Generator, kind: str):
    h, w = spec["size"]
    img = np.zeros((h, w, 3))
    # background: 2-3 bands/rectangles of generic textures in muted random colours
    n = int(r.integers(2, 4))
    cuts = np.sort(r.uniform(0.2, 0.8, n - 1))
    y, x = _grid(h, w)
    axis = x / w if r.random() < 0.5 else y / h
    band = np.searchsorted(cuts, axis)
    for b in range(n):
        tex, per = GENERIC[int(r.integers(len(GENERIC)))]
        base = _hsv(r.random(), r.uniform(0.1, 0.35), r.uniform(0.35, 0.75))
        paint(img, band == b, tex, per, base, np.clip(base * r.uniform(0.6, 0.85), 0, 1), r)
    gt = np.zeros((h, w), np.uint8)
    pseudo = np.zeros((h, w), np.uint8)
    ncls = len(spec["names"])
    n_obj = int(r.choice([0, 1, 1, 2]))
    classes = [int(c) for c in r.choice(np.arange(1, ncls + 1), n_obj, replace=False)]
    lone = [c for c in spec["contexts"] if c not in classes and r.random() < 0.45]
    spots = r.permutation([(0.3, 0.28), (0.3, 0.72), (0.7, 0.3), (0.7, 0.7)])
    items = [(c, True) for c in classes] + [(c, False) for c in lone]
    objs = []
    for (fy, fx), (c, has_obj) in zip(spots, items):
        cy, cx = fy * h + r.normal(0, 3), fx * w + r.normal(0, 3)
        rad = min(h, w) * r.uniform(0.24, 0.3)
        ctx = None
        if c in spec["contexts"]:
            ctx = discs(h, w, cy, cx, rad, r)
            tex, per = spec["contexts"][c]
            c1 = np.clip(_hsv(*spec["ctx_colour"][c]) + r.normal(0, 0.04, 3), 0, 1)
            paint(img, ctx, tex, per, c1, np.clip(c1 * 0.6, 0, 1), r)
        if has_obj:
            shape = SHAPES[int(r.integers(len(SHAPES)))]
            obj = shape(h, w, cy + r.normal(0, 2), cx + r.normal(0, 2), rad * r.uniform(0.65, 0.8), r)
            objs.append((c, obj, ctx, c1 if (kind == "B" and ctx is not None) else None))
    for c, obj, ctx, ctx_c1 in objs:
        tex, per = spec["objects"][c]
        if ctx_c1 is not None:  # B: the context's colours
            c1 = ctx_c1
        else:
            c1 = np.clip(_hsv(*spec["obj_colour"][c]) + r.normal(0, 0.04, 3), 0, 1)
        paint(img, obj, tex, per, c1, np.clip(c1 * 0.6, 0, 1), r)
        gt[obj] = c
    for c, obj, ctx, _ in objs:
        grow = int(r.integers(0, 3))  # scipy treats iterations=0 as "until nothing changes"
        noisy = (ndimage.binary_dilation(obj, iterations=grow) if grow else obj) if r.random() < 0.7 else \
            ndimage.binary_erosion(obj, iterations=1)
        lab = noisy.copy()
        if ctx is not None:
            cy, cx = np.argwhere(obj).mean(0)
            ry, rx = r.uniform(0.3, 0.5) * h, r.uniform(0.3, 0.5) * w
            ell = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
            g = ndimage.gaussian_filter(r.random((h, w)), 4)
            holes = g > np.quantile(g, 1 - r.uniform(0.1, 0.25))
            lab |= ctx & ell & ~holes
        pseudo[lab] = c
    for c, obj, _, _ in objs:
        pseudo[ndimage.binary_erosion(obj, iterations=1)] = c
    img = np.clip(img + r.normal(0, 0.01, img.shape), 0, 1)
    return (img * 255).round().astype(np.uint8), gt, pseudo, sorted({c for c, *_ in objs})


def make_holdout(root: str | Path, kind: str, *, n_train: int = 120, n_val: int = 40, seed: int = 0,
                 size: tuple[int, int] | None = None) -> Path:
    """Write hold-out dataset ``kind`` ("A" or "B") to ``root``; returns ``root``.

    ``size`` (height, width) replaces the kind's image size: shapes scale with it, texture periods
    stay in pixels (what images of another resolution drawn by the same process look like)."""
    spec = _spec(kind)
    if size is not None:
        spec["size"] = tuple(size)
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "pseudo_labels", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    labels = {}
    for split, n in (("train", n_train), ("val", n_val)):
        ids = []
        for i in range(n):
            iid = f"{kind.lower()}{split}{i:04d}"
            r = np.random.default_rng([seed, ord(kind), len(split), i])
            img, gt, pseudo, present = _sample(spec, r, kind)
            if spec["fmt"] == "jpg":
                Image.fromarray(img).save(root / "JPEGImages" / f"{iid}.jpg", quality=85)
            else:
                Image.fromarray(img).save(root / "JPEGImages" / f"{iid}.png")
            Image.fromarray(gt, mode="L").save(root / "SegmentationClass" / f"{iid}.png")
            Image.fromarray(pseudo, mode="L").save(root / "pseudo_labels" / f"{iid}.png")
            labels[iid] = present
            ids.append(iid)
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(["background"] + spec["names"]) + "\n")
    (root / "image_labels.json").write_text(json.dumps(labels, sort_keys=True))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--kind", choices=["A", "B", "both"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=120)
    ap.add_argument("--n-val", type=int, default=40)
    a = ap.parse_args()
    for k in ("A", "B") if a.kind == "both" else (a.kind,):
        root = make_holdout(Path(a.out) / f"holdout_{k}", k, n_train=a.n_train, n_val=a.n_val, seed=a.seed)
        print(f"hold-out {k}: {root}")


if __name__ == "__main__":
    main()
