"""The built-in biased dataset and its variants: procedural textures with object/context co-occurrence.

A small VOC-style dataset whose pseudo labels carry exactly the bias MARS removes: each object
class appears on its own *context* (boat on water, train on rails, cow on grass, plane on sky),
and the "WSSS" pseudo label of an object also swallows that context. The contexts also appear
without their objects (background-only images, and beside objects of other classes), so
dataset-wide they are a background concept, as the sea is in PASCAL VOC.

The default (``cue="texture"``) tells object and context apart by *texture* (orientation,
frequency, structure), not by colour: an object and its context share a colour theme with
per-instance jitter, so a colour threshold on the pseudo foreground cannot separate them. The
defaults reproduce the original built-in dataset byte for byte (a test pins the bytes).

Variants, so that the project has its own spread of test data (``mars make-dataset --help``):

* ``cue``: ``"texture"`` (default), ``"colour"`` (object painted with its context's texture family
  but in its own colour, so only colour separates them), ``"both"`` (own texture and own colour);
* ``height``/``width``: any image size >= 32 px, non-square included (``size`` = square side);
* ``image_format``: ``"png"`` (default) or ``"jpg"`` (JPEG quality 90, with its block artefacts);
* ``n_classes``: 4 (default) to 12; classes 5..12 get generated names, textures and colours;
* ``biased_share``: the share of object instances placed on their co-occurring context (whose
  pseudo label swallows it); the others sit on generic background and their pseudo label is only
  the (noisy) object; ``unbiased_classes``: the last N classes never sit on their context;
* ``bias_kind``: how a biased pseudo label swallows the context: ``"context"`` (default: most of
  the context region), ``"partial"`` (only a band of the context around the object), ``"halo"``
  (the object dilated by a random radius, into whatever surrounds it), ``"mixed"`` (one of the
  three per instance).

Variant draws use their own random generator, so for a given seed the layout of every image
(backgrounds, regions, object shapes) stays the same across ``biased_share``/``bias_kind``
settings: only what the variant changes differs.

``make_biased_dataset`` writes::

    root/JPEGImages/{id}.png|.jpg            RGB uint8 [H, W, 3]
    root/SegmentationClass/{id}.png         GT: 0 background, 1..C objects (255 ring if asked)
    root/pseudo_labels/{id}.png             biased pseudo labels (train and val)
    root/ImageSets/Segmentation/{train,val}.txt
    root/classes.txt                        background, boat, train, cow, plane[, car, …]
    root/image_labels.json                  {id: [class ids]}

Generation is deterministic from ``seed`` (byte-identical files on a rerun).

At ~550 lines this is over the house's ~450: the drawing code of every cue, bias kind and file
format shares one random stream per image (the defaults must stay byte-identical, a test pins
them), so the generator stays one unit.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from PIL import Image
from scipy import ndimage

from mars_ray.data.label_io import write_label
from mars_ray.labels import IGNORE

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

SYNTHETIC_CLASSES: list[str] = ["background", "boat", "train", "cow", "plane"]
"""Class names of the built-in dataset, background first (ids 0..4)."""

PSEUDO_DIR = "pseudo_labels"
"""Sub-folder of the dataset root that holds the biased pseudo labels."""


# --------------------------------------------------------------------------------------------
# Procedural textures: each returns float32 [H, W] roughly in [-1, 1].
# --------------------------------------------------------------------------------------------
def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return y, x


def _smooth_noise(h: int, w: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-blurred white noise ``[H, W]``."""
    n = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-6)


def _stripes(h: int, w: int, rng: np.random.Generator, *, theta: float, lam: float,
             wobble: float = 0.0, square: bool = False) -> np.ndarray:
    """Parallel stripes varying along direction ``theta`` (radians) with wavelength ``lam`` px."""
    y, x = _coords(h, w)
    theta = theta + rng.normal(0.0, math.radians(6))
    lam = lam * rng.uniform(0.9, 1.1)
    u = x * math.cos(theta) + y * math.sin(theta)
    phase = rng.uniform(0, 2 * math.pi)
    if wobble:
        phase = phase + wobble * _smooth_noise(h, w, lam * 1.5, rng)
    s = np.sin(2 * math.pi * u / lam + phase)
    return np.tanh(3 * s) if square else s


def _bandpass(h: int, w: int, rng: np.random.Generator, *, lam: float) -> np.ndarray:
    """Isotropic band-pass noise with dominant wavelength about ``lam`` px."""
    lam = lam * rng.uniform(0.9, 1.1)
    n = rng.standard_normal((h, w)).astype(np.float32)
    s1 = lam / 6.0
    b = ndimage.gaussian_filter(n, s1, mode="wrap") - ndimage.gaussian_filter(n, 2 * s1, mode="wrap")
    return np.clip(b / (b.std() + 1e-6) / 2.0, -1, 1)


def _lattice(h: int, w: int, rng: np.random.Generator, *, theta: float, lam: float) -> np.ndarray:
    """Blobs on a lattice whose axes run along ``theta`` and ``theta + 90°`` (a hide pattern)."""
    a = _stripes(h, w, rng, theta=theta, lam=lam)
    b = _stripes(h, w, rng, theta=theta + math.pi / 2, lam=lam)
    return np.tanh(2.0 * (a + b))


def _grid(h: int, w: int, rng: np.random.Generator, *, lam: float) -> np.ndarray:
    """Brick-like grid of thin dark lines on a flat field."""
    y, x = _coords(h, w)
    lam = lam * rng.uniform(0.9, 1.1)
    oy, ox = rng.uniform(0, lam, 2)
    row = np.floor((y + oy) / lam)
    xs = x + ox + (row % 2) * lam
    lines = (np.abs(((y + oy) % lam) - lam / 2) > lam / 2 - 1) | (np.abs((xs % (2 * lam)) - lam) > lam - 1)
    return np.where(lines, -1.0, 0.4).astype(np.float32)


def _smooth(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An almost flat field: a faint low-frequency gradient."""
    return 0.25 * _smooth_noise(h, w, max(h, w) / 5.0, rng)


@dataclass(frozen=True)
class _Texture:
    name: str
    make: Callable[[int, int, np.random.Generator], np.ndarray]
    amplitude: float  # luminance swing of the pattern (0..1 scale)


_D45, _D90, _D135 = math.radians(45), math.radians(90), math.radians(135)

# Objects (never in the background): diagonal stripes and blotches, a spectral region that no
# context or generic background texture occupies.
_OBJECT_TEX: dict[int, _Texture] = {
    1: _Texture("boat-hull", lambda h, w, r: _stripes(h, w, r, theta=_D45, lam=5.0), 0.22),
    2: _Texture("train-body", lambda h, w, r: _stripes(h, w, r, theta=_D135, lam=8.0, square=True), 0.20),
    3: _Texture("cow-hide", lambda h, w, r: _lattice(h, w, r, theta=_D45, lam=9.0), 0.24),
    4: _Texture("plane-fuselage", lambda h, w, r: _stripes(h, w, r, theta=_D135, lam=4.0), 0.20),
}
# Contexts: co-occur with their object class, and also appear alone as background; axis-aligned,
# isotropic-fine or flat, like the generic background.
_CONTEXT_TEX: dict[int, _Texture] = {
    1: _Texture("water", lambda h, w, r: _stripes(h, w, r, theta=_D90, lam=10.0, wobble=1.0), 0.18),
    2: _Texture("rails", lambda h, w, r: _stripes(h, w, r, theta=0.0, lam=6.0, square=True), 0.22),
    3: _Texture("grass", lambda h, w, r: _bandpass(h, w, r, lam=3.0), 0.25),
    4: _Texture("sky", _smooth, 0.10),
}
# Generic background textures.
_GENERIC_TEX: list[_Texture] = [
    _Texture("wall", lambda h, w, r: _stripes(h, w, r, theta=0.0, lam=14.0), 0.15),
    _Texture("gravel", lambda h, w, r: _bandpass(h, w, r, lam=5.0), 0.18),
    _Texture("brick", lambda h, w, r: _grid(h, w, r, lam=9.0), 0.20),
    _Texture("haze", _smooth, 0.12),
]

# Colour theme per class, shared by the object and its context (jittered per instance).
_THEME: dict[int, tuple[float, float, float]] = {
    1: (0.30, 0.45, 0.65),  # boat / water: blue-grey
    2: (0.50, 0.42, 0.36),  # train / rails: brown-grey
    3: (0.42, 0.55, 0.30),  # cow / grass: olive
    4: (0.62, 0.66, 0.74),  # plane / sky: pale grey-blue
}
# cue="colour"/"both": the object's own colour, far from its context's theme in hue or lightness.
_OBJECT_COLOUR: dict[int, tuple[float, float, float]] = {
    1: (0.72, 0.33, 0.26),  # boat: brick red on blue-grey water
    2: (0.30, 0.56, 0.68),  # train: teal on brown rails
    3: (0.78, 0.68, 0.40),  # cow: tan on olive grass
    4: (0.36, 0.30, 0.46),  # plane: dark violet on pale sky
}
_COLOUR_JITTER = 0.07  # std of the per-instance colour offset, per channel
_PIXEL_NOISE = 0.015  # std of i.i.d. pixel noise

# Classes 5..12 (``n_classes`` > 4): (object, context, object texture, context texture). Object
# textures are oblique (stripes/lattices at 15-165°, off the axes), contexts axis-aligned,
# isotropic or flat, as for the four built-in classes.
_D = math.radians
_EXTRA: list[tuple[str, str, _Texture, _Texture]] = [
    ("car", "road",
     _Texture("car-body", lambda h, w, r: _stripes(h, w, r, theta=_D(30), lam=6.0), 0.22),
     _Texture("road", lambda h, w, r: _bandpass(h, w, r, lam=7.0), 0.16)),
    ("horse", "field",
     _Texture("horse-coat", lambda h, w, r: _lattice(h, w, r, theta=_D(60), lam=7.0), 0.22),
     _Texture("field", lambda h, w, r: _stripes(h, w, r, theta=_D90, lam=7.0, wobble=0.5), 0.20)),
    ("duck", "pond",
     _Texture("duck-feathers", lambda h, w, r: _stripes(h, w, r, theta=_D(150), lam=6.0, square=True), 0.20),
     _Texture("pond", _smooth, 0.08)),
    ("sheep", "meadow",
     _Texture("sheep-wool", lambda h, w, r: _lattice(h, w, r, theta=_D(30), lam=11.0), 0.24),
     _Texture("meadow", lambda h, w, r: _bandpass(h, w, r, lam=2.0), 0.24)),
    ("bus", "street",
     _Texture("bus-body", lambda h, w, r: _stripes(h, w, r, theta=_D(60), lam=10.0, square=True), 0.20),
     _Texture("street", lambda h, w, r: _stripes(h, w, r, theta=0.0, lam=16.0, square=True), 0.18)),
    ("bird", "branches",
     _Texture("bird-plumage", lambda h, w, r: _stripes(h, w, r, theta=_D(120), lam=3.5), 0.20),
     _Texture("branches", lambda h, w, r: _stripes(h, w, r, theta=0.0, lam=4.0, wobble=1.5), 0.22)),
    ("bike", "path",
     _Texture("bike-frame", lambda h, w, r: _lattice(h, w, r, theta=_D(15), lam=6.0), 0.22),
     _Texture("path", lambda h, w, r: _bandpass(h, w, r, lam=4.5), 0.20)),
    ("seal", "ice",
     _Texture("seal-skin", lambda h, w, r: _stripes(h, w, r, theta=_D(165), lam=12.0), 0.20),
     _Texture("ice", lambda h, w, r: _stripes(h, w, r, theta=_D90, lam=16.0), 0.12)),
]
MAX_SYNTHETIC_CLASSES = 4 + len(_EXTRA)
"""Largest ``n_classes`` of ``make_biased_dataset`` (12)."""


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r, 3), round(g, 3), round(b, 3))


@dataclass(frozen=True)
class _ClassStyle:
    """How class ``cls`` looks: its object and context textures, the shared theme and the object colour."""

    name: str
    context_name: str
    object_tex: _Texture
    context_tex: _Texture
    theme: tuple[float, float, float]
    object_colour: tuple[float, float, float]


def _class_styles(n_classes: int) -> dict[int, _ClassStyle]:
    """Styles of classes 1..n_classes: the four built-in ones, then ``_EXTRA`` with hue-wheel colours.

    Extra class k gets a context theme at hue ``k·0.382`` (golden-angle steps keep neighbours apart)
    and an object colour at the opposite hue, brighter and more saturated.
    """
    ctx_names = {1: "water", 2: "rails", 3: "grass", 4: "sky"}
    out = {
        c: _ClassStyle(SYNTHETIC_CLASSES[c], ctx_names[c], _OBJECT_TEX[c], _CONTEXT_TEX[c], _THEME[c], _OBJECT_COLOUR[c])
        for c in range(1, 5)
    }
    for c in range(5, n_classes + 1):
        name, ctx, otex, ctex = _EXTRA[c - 5]
        hue = c * 0.381966
        out[c] = _ClassStyle(name, ctx, otex, ctex, _hsv(hue, 0.40, 0.58), _hsv(hue + 0.5, 0.55, 0.75))
    return out


def class_names(n_classes: int = 4) -> list[str]:
    """Class names of a generated dataset with ``n_classes`` object classes, background first."""
    styles = _class_styles(n_classes)
    return ["background"] + [styles[c].name for c in range(1, n_classes + 1)]


def _paint(canvas: np.ndarray, mask: np.ndarray, tex: _Texture, colour: np.ndarray,
           rng: np.random.Generator) -> None:
    """Fill ``canvas[mask]`` (float [H, W, 3]) with ``tex`` modulating ``colour``."""
    h, w = mask.shape
    pat = tex.make(h, w, rng)
    tint = 1.0 + rng.normal(0, 0.15, 3)  # the pattern shifts the colour a little, not just luminance
    layer = colour[None, None, :] + tex.amplitude * pat[..., None] * tint[None, None, :]
    canvas[mask] = layer[mask]


def _jittered(colour: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(colour) + rng.normal(0, _COLOUR_JITTER, 3), 0.1, 0.9)


def _blob(h: int, w: int, cy: float, cx: float, ry: float, rx: float, rng: np.random.Generator,
          warp: float = 0.25) -> np.ndarray:
    """A wobbly ellipse mask ``bool [H, W]`` centred at (cy, cx) with semi-axes (ry, rx)."""
    y, x = _coords(h, w)
    rot = rng.uniform(0, math.pi)
    dy, dx = y - cy, x - cx
    u = dx * math.cos(rot) + dy * math.sin(rot)
    v = -dx * math.sin(rot) + dy * math.cos(rot)
    r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    return r < 1.0 + warp * _smooth_noise(h, w, max(h, w) / 10.0, rng)


def _shape(h: int, w: int, cy: float, cx: float, size: float, rng: np.random.Generator) -> np.ndarray:
    """An object silhouette ``bool [H, W]``: ellipse, rotated rectangle or random convex polygon."""
    y, x = _coords(h, w)
    kind = rng.integers(3)
    rot = rng.uniform(0, math.pi)
    dy, dx = y - cy, x - cx
    u = dx * math.cos(rot) + dy * math.sin(rot)
    v = -dx * math.sin(rot) + dy * math.cos(rot)
    aspect = rng.uniform(0.6, 1.0)
    a, b = size, size * aspect
    if kind == 0:
        return (u / a) ** 2 + (v / b) ** 2 < 1.0
    if kind == 1:
        return (np.abs(u) < a * 0.9) & (np.abs(v) < b * 0.9)
    # convex polygon: intersection of half-planes tangent to a jittered circle
    n = int(rng.integers(5, 9))
    mask = np.ones((h, w), dtype=bool)
    for k in range(n):
        ang = 2 * math.pi * k / n + rng.uniform(-0.3, 0.3)
        rad = rng.uniform(0.8, 1.05)
        mask &= (u / a) * math.cos(ang) + (v / b) * math.sin(ang) < rad
    return mask


CUES = ("texture", "colour", "both")
BIAS_KINDS = ("context", "partial", "halo", "mixed")
IMAGE_FORMATS = ("png", "jpg")


@dataclass(frozen=True)
class _Variant:
    """What a variant changes (see the module docstring); the defaults are the built-in dataset."""

    cue: str = "texture"
    biased_share: float = 1.0
    unbiased: frozenset[int] = frozenset()
    bias_kind: str = "context"


def _pseudo_bias(obj: np.ndarray, ctx: np.ndarray, keep: np.ndarray, kind: str, scale: float,
                 vrng: np.random.Generator) -> np.ndarray:
    """The part of a biased instance's pseudo label beyond the object: ``bool [H, W]``.

    ``context``: the context minus holes (``keep``); ``partial``: only the context within a random
    distance (0.08-0.25 of the image scale) of the object; ``halo``: everything within a random
    distance (0.04-0.12 of the image scale) of the object, context or not, minus holes.
    """
    if kind == "mixed":
        kind = ("context", "partial", "halo")[int(vrng.integers(3))]
    if kind == "context":
        return ctx & keep
    dist = ndimage.distance_transform_edt(~obj)
    if kind == "partial":
        return ctx & keep & (dist < vrng.uniform(0.08, 0.25) * scale)
    return keep & (dist < vrng.uniform(0.04, 0.12) * scale)


def _render(h: int, w: int, rng: np.random.Generator, *, background_only: bool,
            styles: dict[int, _ClassStyle], variant: _Variant, vrng: np.random.Generator,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """One sample: image ``uint8 [H, W, 3]``, GT ``uint8 [H, W]``, pseudo ``uint8 [H, W]``, classes.

    ``rng`` draws the layout and appearance (the built-in stream, unchanged for the defaults);
    ``vrng`` draws only what a variant decides (which instances are biased, how).
    """
    s = math.sqrt(h * w)  # the image scale (the side for square images)
    hw = np.array([h, w], dtype=np.float64)
    canvas = np.zeros((h, w, 3), dtype=np.float32)
    # 1. generic background: a Voronoi layout of 2-3 generic textures
    n_cells = int(rng.integers(2, 4))
    seeds = rng.uniform(0, hw, (n_cells, 2))
    y, x = _coords(h, w)
    warp = 0.08 * s * _smooth_noise(h, w, s / 6.0, rng)
    d = np.stack([np.hypot(y - sy + warp, x - sx) for sy, sx in seeds])
    cell = d.argmin(0)
    for c, tex_i in enumerate(rng.choice(len(_GENERIC_TEX), n_cells, replace=False)):
        _paint(canvas, cell == c, _GENERIC_TEX[tex_i], rng.uniform(0.25, 0.75, 3), rng)

    gt = np.zeros((h, w), dtype=np.uint8)
    pseudo = np.zeros((h, w), dtype=np.uint8)
    n_cls = len(styles)

    # 2. instances: a context region with an object on it
    n_inst = 0 if background_only else int(rng.choice([1, 1, 2]))
    inst_cls = [int(c) for c in rng.choice(np.arange(1, n_cls + 1), n_inst, replace=False)]
    # 3. lone contexts (no object): 1-2 in background-only images, 0-1 elsewhere
    n_lone = int(rng.integers(1, 3)) if background_only else int(rng.random() < 0.8)
    lone_pool = [c for c in range(1, n_cls + 1) if c not in inst_cls]
    lone_cls = [int(c) for c in rng.choice(lone_pool, n_lone, replace=False)]
    # which instances sit on their context (the built-in data: all)
    biased = {c: c not in variant.unbiased and (variant.biased_share >= 1.0 or vrng.random() < variant.biased_share)
              for c in inst_cls}

    # centres: spread the regions over the image so they overlap little
    n_regions = n_inst + n_lone
    slots = rng.permutation(4)[:n_regions]
    centres = [((0.3 + 0.4 * (sl // 2)) * h + rng.uniform(-0.08, 0.08) * h,
                (0.3 + 0.4 * (sl % 2)) * w + rng.uniform(-0.08, 0.08) * w) for sl in slots]
    if n_regions == 1:
        centres = [(h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6))]

    objects: list[tuple[int, np.ndarray, np.ndarray]] = []
    for (cy, cx), cls in zip(centres, inst_cls + lone_cls):
        big = 1.0 if n_regions == 1 else 0.8
        ry, rx = h * rng.uniform(0.24, 0.32) * big, w * rng.uniform(0.26, 0.34) * big
        ctx = _blob(h, w, cy, cx, ry, rx, rng)
        on_context = cls not in inst_cls or biased[cls]
        # an unbiased instance draws its context too (same stream, same layout) but paints it nowhere
        target = canvas if on_context else np.zeros_like(canvas)
        _paint(target, ctx, styles[cls].context_tex, _jittered(styles[cls].theme, rng), rng)
        if cls in inst_cls:
            oy = cy + rng.uniform(-0.06, 0.06) * h
            ox = cx + rng.uniform(-0.06, 0.06) * w
            obj = _shape(h, w, oy, ox, s * rng.uniform(0.17, 0.23) * big, rng)
            objects.append((cls, ctx if on_context else np.zeros_like(ctx), obj))

    # objects go on top of all contexts
    for cls, ctx, obj in objects:
        st = styles[cls]
        tex = st.context_tex if variant.cue == "colour" else st.object_tex
        colour = st.theme if variant.cue == "texture" else st.object_colour
        _paint(canvas, obj, tex, _jittered(colour, rng), rng)
        gt[obj] = cls

    # 4. the pseudo label: noisy object mask, plus (biased instances) the context it swallows
    for cls, ctx, obj in objects:
        it = int(rng.integers(0, 3))
        noisy = obj
        if it:
            op = ndimage.binary_dilation if rng.random() < 0.6 else ndimage.binary_erosion
            noisy = op(obj, iterations=it)
        keep = _smooth_noise(h, w, s / 12.0, rng) > rng.uniform(-1.4, -0.8)  # drop ~10-20 % in holes
        extra = _pseudo_bias(obj, ctx, keep, variant.bias_kind, s, vrng) if biased[cls] else np.zeros_like(obj)
        pseudo[noisy | extra] = cls
    for cls, _, obj in objects:  # an object occluding an earlier context stays its own class
        pseudo[ndimage.binary_erosion(obj, iterations=1)] = cls

    img = canvas + rng.normal(0, _PIXEL_NOISE, canvas.shape).astype(np.float32)
    img = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    present = sorted({c for c, _, _ in objects})
    return img, gt, pseudo, present


def _boundary_ring(gt: np.ndarray, width: int) -> np.ndarray:
    """GT with a ``width``-px ignore ring (255) around every object, VOC style."""
    if width <= 0:
        return gt
    fg = gt > 0
    edges = np.zeros_like(fg)
    for c in np.unique(gt[fg]):
        m = gt == c
        edges |= ndimage.binary_dilation(m, iterations=width) & ~ndimage.binary_erosion(m, iterations=width)
    out = gt.copy()
    out[edges] = IGNORE
    return out


def _write_rgb(path: Path, img: np.ndarray, fmt: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if fmt == "png":
        Image.fromarray(img, mode="RGB").save(tmp, format="PNG")
    else:
        Image.fromarray(img, mode="RGB").save(tmp, format="JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, path)


JPEG_QUALITY = 90
"""Quality of ``image_format="jpg"`` images (a common camera/web default: visible block artefacts)."""


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def make_biased_dataset(
    root: PathLike,
    *,
    n_train: int = 60,
    n_val: int = 20,
    size: int = 96,
    seed: int = 0,
    n_background_only: float = 0.25,
    boundary: int = 0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    cue: str = "texture",
    n_classes: int = 4,
    biased_share: float = 1.0,
    unbiased_classes: int = 0,
    bias_kind: str = "context",
    image_format: str = "png",
) -> Path:
    """Write the built-in biased dataset (or a variant of it) to ``root`` and return ``root``.

    ``n_train``/``n_val``: images per split (ids ``train_0000``…, ``val_0000``…); ``size``: square
    image side in px; ``height``/``width`` (each defaulting to ``size``): the image size, >= 32 px;
    ``n_background_only``: fraction of train images with contexts but no object (their
    image-level label list is empty); ``boundary``: width of a 255 ignore ring around GT objects
    (0 = none). Variants (module docstring): ``cue`` in ``CUES``, ``n_classes`` in 4..12,
    ``biased_share`` in [0, 1], ``unbiased_classes`` (the last N classes never sit on their context)
    in 0..n_classes, ``bias_kind`` in ``BIAS_KINDS``, ``image_format`` in ``IMAGE_FORMATS``. Pseudo
    labels are written for both splits. Deterministic from ``seed``; the defaults write the original
    built-in dataset. Raises ``ValueError`` for out-of-range arguments.
    """
    h = size if height is None else height
    w = size if width is None else width
    if n_train < 1 or n_val < 1:
        raise ValueError(f"make_biased_dataset: n_train and n_val must be >= 1, got {n_train}, {n_val}")
    if min(h, w) < 32:
        raise ValueError(f"make_biased_dataset: size must be >= 32 px, got height {h}, width {w}")
    if not 0.0 <= n_background_only < 1.0:
        raise ValueError(
            f"make_biased_dataset: n_background_only must be in [0, 1), got {n_background_only}"
        )
    if cue not in CUES:
        raise ValueError(f"make_biased_dataset: cue must be one of {', '.join(CUES)}, got {cue!r}")
    if not 4 <= n_classes <= MAX_SYNTHETIC_CLASSES:
        raise ValueError(f"make_biased_dataset: n_classes must be in 4..{MAX_SYNTHETIC_CLASSES}, got {n_classes}")
    if not 0.0 <= biased_share <= 1.0:
        raise ValueError(f"make_biased_dataset: biased_share must be in [0, 1], got {biased_share}")
    if not 0 <= unbiased_classes <= n_classes:
        raise ValueError(f"make_biased_dataset: unbiased_classes must be in 0..{n_classes}, got {unbiased_classes}")
    if bias_kind not in BIAS_KINDS:
        raise ValueError(f"make_biased_dataset: bias_kind must be one of {', '.join(BIAS_KINDS)}, got {bias_kind!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"make_biased_dataset: image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}"
        )
    styles = _class_styles(n_classes)
    variant = _Variant(cue=cue, biased_share=float(biased_share), bias_kind=bias_kind,
                       unbiased=frozenset(range(n_classes - unbiased_classes + 1, n_classes + 1)))
    r = Path(root)
    dirs = {k: r / k for k in ("JPEGImages", "SegmentationClass", PSEUDO_DIR, "ImageSets/Segmentation")}
    for p in dirs.values():
        p.mkdir(parents=True, exist_ok=True)

    labels: dict[str, list[int]] = {}
    for split_i, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        n_bg = int(round(n * n_background_only)) if split == "train" else 0
        order = np.random.default_rng([seed, split_i, 7]).permutation(n)
        bg_only = set(order[:n_bg].tolist())
        ids = []
        for i in range(n):
            image_id = f"{split}_{i:04d}"
            rng = np.random.default_rng([seed, split_i, i])
            vrng = np.random.default_rng([seed, split_i, i, 1])
            img, gt, pseudo, present = _render(h, w, rng, background_only=i in bg_only, styles=styles,
                                               variant=variant, vrng=vrng)
            _write_rgb(dirs["JPEGImages"] / f"{image_id}.{image_format}", img, image_format)
            write_label(dirs["SegmentationClass"] / f"{image_id}.png", _boundary_ring(gt, boundary))
            write_label(dirs[PSEUDO_DIR] / f"{image_id}.png", pseudo)
            labels[image_id] = present
            ids.append(image_id)
        _write_text(dirs["ImageSets/Segmentation"] / f"{split}.txt", "\n".join(ids) + "\n")
    _write_text(r / "classes.txt", "\n".join(class_names(n_classes)) + "\n")
    _write_text(r / "image_labels.json", json.dumps(labels, indent=0, sort_keys=True) + "\n")
    logger.info("biased dataset (%s cue, %d classes, %dx%d %s): %d train + %d val images at %s",
                cue, n_classes, h, w, image_format, n_train, n_val, r)
    return r


__all__ = ["BIAS_KINDS", "CUES", "IMAGE_FORMATS", "MAX_SYNTHETIC_CLASSES", "PSEUDO_DIR", "SYNTHETIC_CLASSES",
           "class_names", "make_biased_dataset"]
