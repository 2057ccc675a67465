"""The adaptive USS extractor: pixel embeddings whose scaling is fitted, without labels, on the split itself.

MARS needs embeddings F in which (Eq 1) an object's centroids lie far from the background of the
whole dataset while its co-occurring context's centroids lie close to it (the context also appears
as background elsewhere), and (Eq 4) ReLU(cos(F, V^c)) is high on the object and low on its
context. What tells an object from its context differs between datasets (colour on one, texture on
another, both on a third), so no fixed weighting of cues suits all; the ``texture`` extractor's
colour weight of 0.1 is such a fixed choice. Here every scale comes from statistics of the data:

1. **Cues** (``D = 3 + S·O`` numbers a pixel). Colour in CIELAB (L*, a*, b*; perceptually
   uniform, so equal distances mean equal visible differences), lightly smoothed. Texture energy:
   complex Gabor filters on L* at ``S`` octave-spaced wavelengths and ``O`` orientations; local
   energy ``|g * L*|²`` pooled by a Gaussian, ``log(E + 1)``. The energy level also measures local
   contrast, so contrast needs no channel of its own (a separate local-std channel was measured and
   did not help).
2. **Block whitening**, fitted on a pixel sample of the split: each cue group (colour, texture) is
   centred on the dataset mean and whitened (PCA, divided by the square root of each eigenvalue),
   then divided by the square root of its rank, so each group contributes the same expected squared
   norm (1) and within a group every direction counts alike. Features are zero-centred over the
   dataset, which is what makes cosine meaningful; no hand weight decides colour vs texture.
3. **Kernel codebooks**, fitted on the same sample: K-means prototypes of the whitened pixels at
   ``K`` = 16, 32 and 64, each size fitted twice from different K-means starts (an ensemble of two
   quantisations), and per pixel the soft assignment ``softmax_k(-|z - p_k|² / 2σ²)``.
   A linear (whitened) feature space is additive: a context that shares one cue with its object
   (the same texture, another colour) stays similar to it, and Eq 1's background mean direction
   mixes unrelated appearances. A codebook encodes conjunctions of cues (this texture *and* this
   colour), so an object's appearance that never occurs in the background is far from the
   background mean whatever cue makes it unique.
4. F is the concatenation ``[z, c16, c32, c64, c16', c32', c64']``, each part divided by its
   root-mean-square norm over the sample and each codebook copy further by sqrt(2), so the linear
   part and each codebook size weigh alike. ``dim = rank(z) + 224``; stride 1.
   ``features.codebook_copies = n`` (default 2) sets the number of copies: n copies at 1/sqrt(n) each,
   ``dim = rank(z) + 112·n``. One copy (the design until 2026-12-08) gives labels that move more
   with the fit's seed (README, "Debiasing quality").

Constants that remain, and why (none is tuned to one dataset):

* Gabor wavelengths ``3·2^k`` px for k = 0, 1, … while ``λ <= short side / 6`` of the sample's
  median image (at least two): 3 px is the shortest period a Gabor pair resolves above the 2 px
  Nyquist limit; octave steps match a Gabor filter's one-octave bandwidth (envelope σ = λ/2); a
  texture needs a few periods inside an object, and objects seldom exceed a third of the short
  side. Wavelengths above 6 px are filtered on a 2× (4×, …) downsampled image with the 6 px
  filter: the same filter, at a cost that does not grow with λ.
* 4 orientations (0°, 45°, 90°, 135°): with a one-octave Gabor their tuning curves (±~20°) tile
  orientation; fewer leave gaps, more add correlated channels that whitening would then amplify.
* Energy pooling σ = 0.3·λ + 1 px and colour smoothing σ = 1.5 px: enough to make the energy of a
  periodic texture stable (phase-free) while keeping boundaries within a few pixels; the dense CRF
  of Eq 4 then snaps them to image edges.
* ``log(E + 1)``: 1 (L* units²) is an energy of one CIELAB unit of amplitude, about a just
  noticeable difference; weaker modulations are not texture.
* Eigenvalues below ``1e-6`` of the largest in a group are dropped (numerical rank: a constant
  channel or an exactly dependent one would otherwise be amplified from rounding noise).
* Two copies of each codebook: a K-means quantisation depends on its start, and Eq 1-3 amplify that
  (one class's chosen centroids can flip between refits); averaging two quantisations halves how
  far the labels move between refits (19 datasets x 3 seeds: mean range 2.2 against 3.7 points)
  without a finer codebook, which would split one class's varied appearances (16-128 lost retention
  on ``benchmarks/variation_bench.py``). More copies were not measured.
* Codebook sizes 16, 32, 64: a pyramid of doubling sizes, so no single K has to match the unknown
  number of appearance types (a handful to a few dozen: classes × object/context + background
  kinds). σ = half the median distance of a sample pixel to its nearest prototype: assignments are
  nearly hard (a prototype one typical quantisation error farther than the nearest gets about
  e^-2 of its weight) yet pixels midway between two prototypes keep both. A σ equal to the median
  distance made unrelated appearances look alike (measured: removal of biased pixels fell by half).
* Fitting samples ``pixels_per_image`` (1024) pixels of each given image and runs K-means on at most
  ``MAX_KMEANS_POINTS`` (20000) of them: bounded memory, deterministic for a seed.

``benchmarks/adaptive_ablation.py`` measures the alternatives to these constants (other colour and
energy smoothing, codebook pyramids, no linear part, K-means restarts; measured when one codebook
copy was the default) on 19 datasets and three seeds; besides the second copy none is clearly
better: codebooks 16-128 raises the mean by trading retention for removal (README, "Debiasing
quality across datasets").

``fit_adaptive_stats`` fits, ``AdaptiveStats.save``/``load`` store the fitted arrays with a content
hash (``digest``) in one ``.npz``, and ``AdaptiveExtractor(stats)`` (registry name ``adaptive``,
``FEATURES.get("adaptive", stats=path)``) computes F from them, identically wherever it is rebuilt.
Fewer than ``MIN_FIT_IMAGES`` (8) images raise ``ValueError`` by default: such statistics describe
the images, not the dataset. The ``features`` stage fits on the split it then debiases, so there it
falls back to fitting on whatever the split holds (>= 1 image), with a warning.

The fitted bytes are deterministic for a seed, the images and their order, and torch's thread count
(float32 convolutions round differently with other thread counts); the ``features`` stage fits in a
one-thread Ray task and keeps the file, so a rerun reuses it rather than refitting.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mars_ray import storage
from mars_ray.algo.clustering import kmeans
from mars_ray.models.handcrafted import _blur, _gabor_pair, _gauss1d
from mars_ray.models.registry import BACKBONES, FEATURES

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]", storage.ObjectPath]

FORMAT = "mars_ray.adaptive/1"
MIN_FIT_IMAGES = 8
MAX_KMEANS_POINTS = 20000
CODEBOOK_SIZES = (16, 32, 64)
CODEBOOK_COPIES = 2  # features.codebook_copies: each codebook size fitted this many times (an ensemble)
ORIENTATIONS = 4
BASE_WAVELENGTH = 3.0
FILTER_WAVELENGTH = 6.0  # longer wavelengths use this filter on a downsampled image
COLOUR_SIGMA = 1.5
ENERGY_FLOOR = 1.0  # L* units²: about one just-noticeable difference of amplitude
RANK_TOL = 1e-6
SIGMA_FACTOR = 0.5
ENERGY_POOL = (0.3, 1.0)  # energy pooling σ = ENERGY_POOL[0]·λ + ENERGY_POOL[1] px


def wavelengths_for(short_side: int) -> tuple[float, ...]:
    """Gabor wavelengths ``3·2^k`` px with ``λ <= short_side / 6`` (at least two); see the module docstring."""
    if short_side < 1:
        raise ValueError(f"adaptive extractor: image short side must be >= 1 px, got {short_side}")
    lams = [BASE_WAVELENGTH, 2 * BASE_WAVELENGTH]
    while lams[-1] * 2 <= short_side / 6.0:
        lams.append(lams[-1] * 2)
    return tuple(lams)


# --------------------------------------------------------------------------------------------
# cues


def srgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] ``[B, 3, H, W]`` → CIELAB (D65) ``[B, 3, H, W]``: L* in [0, 100], a*, b* ≈ [-128, 127]."""
    lin = torch.where(x <= 0.04045, x / 12.92, ((x.clamp_min(0) + 0.055) / 1.055) ** 2.4)
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                      [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]], dtype=x.dtype, device=x.device)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    t = torch.einsum("ij,bjhw->bihw", m, lin) / white
    d = 6.0 / 29.0
    f = torch.where(t > d**3, t.clamp_min(1e-12) ** (1.0 / 3.0), t / (3 * d * d) + 4.0 / 29.0)
    return torch.cat([116 * f[:, 1:2] - 16, 500 * (f[:, 0:1] - f[:, 1:2]), 200 * (f[:, 1:2] - f[:, 2:3])], 1)


class _Cues(nn.Module):
    """Raw cues ``[B, 3 + S·O, H, W]``: smoothed CIELAB, then log Gabor energies (scale-major)."""

    def __init__(self, wavelengths: tuple[float, ...], orientations: int) -> None:
        super().__init__()
        self.wavelengths, self.orientations = wavelengths, orientations
        self.dim = 3 + len(wavelengths) * orientations
        for lam in sorted({min(w, FILTER_WAVELENGTH) for w in wavelengths}):
            ks = []
            for o in range(orientations):
                ev, od = _gabor_pair(lam, math.pi * o / orientations, sigma=0.5 * lam)
                ks += [ev, od]
            self.register_buffer(f"bank{int(lam)}", torch.stack(ks)[:, None].float(), persistent=False)
        self.register_buffer("colour_blur", _gauss1d(COLOUR_SIGMA), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        lab = srgb_to_lab(images.float())
        out = [_blur(lab, self.colour_blur)]
        lum = lab[:, :1]
        h, w = lum.shape[-2:]
        for lam in self.wavelengths:
            factor = max(1, int(round(lam / FILTER_WAVELENGTH)))  # 1 for λ <= 6, then 2, 4, …
            x = F.avg_pool2d(lum, factor, ceil_mode=True) if factor > 1 else lum
            bank: torch.Tensor = getattr(self, f"bank{int(min(lam, FILTER_WAVELENGTH))}")
            pad = bank.shape[-1] // 2
            mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
            resp = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode), bank)
            energy = resp[:, 0::2] ** 2 + resp[:, 1::2] ** 2  # [B, O, h', w']
            energy = _blur(energy, _gauss1d((ENERGY_POOL[0] * lam + ENERGY_POOL[1]) / factor).to(energy))
            if factor > 1:
                energy = F.interpolate(energy, size=(h, w), mode="bilinear", align_corners=False)
            out.append(torch.log(energy + ENERGY_FLOOR))
        return torch.cat(out, 1)


# --------------------------------------------------------------------------------------------
# fitted statistics


@dataclass(frozen=True)
class AdaptiveStats:
    """Everything the extractor computes F from (float32 arrays; see the module docstring).

    ``mean [D]``, ``transform [D, r]`` (block whitening), ``prototypes`` (one ``[K, r]`` per codebook),
    ``sigmas [L]`` (kernel widths), ``scales [L + 1]`` (RMS norms of the parts: linear, then codebooks),
    ``wavelengths`` / ``orientations`` (the cues), and what it was fitted on (``n_images``,
    ``n_pixels``, ``seed``). ``digest`` is the sha256 of the settings and arrays (the content hash a stage
    key uses).
    """

    wavelengths: tuple[float, ...]
    orientations: int
    mean: np.ndarray
    transform: np.ndarray
    prototypes: tuple[np.ndarray, ...]
    sigmas: np.ndarray
    scales: np.ndarray
    n_images: int
    n_pixels: int
    seed: int

    @property
    def dim(self) -> int:
        return int(self.transform.shape[1] + sum(p.shape[0] for p in self.prototypes))

    def _shape_meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "wavelengths": list(self.wavelengths), "orientations": self.orientations,
                "codebooks": [int(p.shape[0]) for p in self.prototypes]}

    def _meta(self) -> dict[str, Any]:
        return {**self._shape_meta(), "n_images": self.n_images, "n_pixels": self.n_pixels, "seed": self.seed}

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"mean": self.mean, "transform": self.transform, "sigmas": self.sigmas, "scales": self.scales}
        arrays.update({f"prototypes{i}": p for i, p in enumerate(self.prototypes)})
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}

    @property
    def digest(self) -> str:
        """sha256 over the cue settings and the exact bytes of every array: it changes when any fitted value
        does, and only then (how many images/pixels it was fitted on is provenance, not part of it)."""
        h = hashlib.sha256(json.dumps(self._shape_meta(), sort_keys=True).encode())
        for name, arr in sorted(self._arrays().items()):
            h.update(name.encode())
            h.update(str(arr.shape).encode())
            h.update(arr.astype("<f4").tobytes())
        return h.hexdigest()

    def save(self, path: PathLike) -> "storage.AnyPath":
        """Write one ``.npz`` (arrays + ``meta`` JSON with the digest), atomically; local path or URI."""
        buf = io.BytesIO()
        meta = {**self._meta(), "digest": self.digest}
        np.savez(buf, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8), **self._arrays())
        p = storage.upath(path)
        with storage.atomic_open(p) as f:
            f.write(buf.getvalue())
        return p

    @classmethod
    def load(cls, path: PathLike) -> "AdaptiveStats":
        """Read ``save``'s file. ``FileNotFoundError`` if missing; ``ValueError`` naming the file when it is
        not such a file or its content no longer matches its recorded digest."""
        p = storage.upath(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: adaptive feature statistics not found")
        try:
            with storage.open_read(p) as f:
                data = io.BytesIO(f.read())
            with np.load(data, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except Exception as exc:  # noqa: BLE001 - a corrupt file fails in many ways
            raise ValueError(f"{p}: not readable as adaptive feature statistics ({type(exc).__name__}: {exc})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{p}: format {meta.get('format')!r}, expected {FORMAT!r}")
        try:
            stats = cls(
                wavelengths=tuple(float(w) for w in meta["wavelengths"]),
                orientations=int(meta["orientations"]),
                mean=arrays["mean"], transform=arrays["transform"],
                prototypes=tuple(arrays[f"prototypes{i}"] for i in range(len(meta["codebooks"]))),
                sigmas=arrays["sigmas"], scales=arrays["scales"],
                n_images=int(meta["n_images"]), n_pixels=int(meta["n_pixels"]), seed=int(meta["seed"]),
            )
        except KeyError as exc:
            raise ValueError(f"{p}: adaptive feature statistics miss {exc}") from None
        _check_consistent(stats, p)
        if stats.digest != meta.get("digest"):
            raise ValueError(f"{p}: content does not match its digest (file changed or corrupt)")
        return stats


def _check_consistent(stats: AdaptiveStats, where: Any) -> None:
    d = 3 + len(stats.wavelengths) * stats.orientations
    r = stats.transform.shape[1] if stats.transform.ndim == 2 else -1
    if stats.mean.shape != (d,) or stats.transform.shape != (d, r) or r < 1:
        raise ValueError(f"{where}: mean {stats.mean.shape} / transform {stats.transform.shape} do not fit {d} cues")
    if any(p.ndim != 2 or p.shape[1] != r for p in stats.prototypes):
        raise ValueError(f"{where}: prototypes {[p.shape for p in stats.prototypes]} do not fit rank {r}")
    if stats.sigmas.shape != (len(stats.prototypes),) or stats.scales.shape != (len(stats.prototypes) + 1,):
        raise ValueError(f"{where}: sigmas {stats.sigmas.shape} / scales {stats.scales.shape} do not fit the codebooks")


def _block_whitening(x: np.ndarray, groups: list[slice]) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and block-diagonal whitening ``[D, r]``: each group whitened, scaled to total variance 1."""
    mean = x.mean(0)
    blocks, ranks = [], []
    for g in groups:
        xc = x[:, g] - mean[g]
        ev, vec = np.linalg.eigh(xc.T @ xc / max(len(xc) - 1, 1))
        keep = ev > RANK_TOL * max(float(ev.max()), 0.0) if ev.max() > 0 else np.zeros_like(ev, bool)
        blocks.append(vec[:, keep] / np.sqrt(ev[keep]) / math.sqrt(max(int(keep.sum()), 1)))
        ranks.append(int(keep.sum()))
    if sum(ranks) == 0:
        raise ValueError("adaptive extractor: the sampled pixels do not vary at all (constant images?)")
    transform = np.zeros((x.shape[1], sum(ranks)))
    col = 0
    for g, b in zip(groups, blocks):
        transform[g, col : col + b.shape[1]] = b
        col += b.shape[1]
    return mean, transform


def _soft_assign(z: np.ndarray | torch.Tensor, protos: Any, sigma: float) -> Any:
    """``softmax_k(-|z - p_k|² / 2σ²)`` rows: z ``[n, r]``, protos ``[K, r]`` → ``[n, K]`` (numpy or torch)."""
    if isinstance(z, torch.Tensor):
        d2 = (z * z).sum(1, keepdim=True) - 2 * z @ protos.t() + (protos * protos).sum(1)[None]
        return torch.softmax(-d2.clamp_min(0) / (2 * sigma * sigma), dim=1)
    d2 = np.maximum((z * z).sum(1)[:, None] - 2 * z @ protos.T + (protos * protos).sum(1)[None], 0)
    logits = -d2 / (2 * sigma * sigma)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class AdaptiveFitter:
    """Streams images into a bounded pixel sample, then fits :class:`AdaptiveStats`.

    ``AdaptiveFitter(short_side, seed=…)`` (the median short side of the images, which fixes the
    wavelengths), ``add(image uint8 [H, W, 3])`` per image, ``finish() -> AdaptiveStats``. Memory:
    ``pixels_per_image`` cue vectors per image added. Deterministic for a seed and the order of images.
    """

    def __init__(self, short_side: int, *, seed: int = 0, pixels_per_image: int = 1024,
                 codebook_sizes: tuple[int, ...] = CODEBOOK_SIZES, copies: int = CODEBOOK_COPIES) -> None:
        if int(copies) < 1:
            raise ValueError(f"adaptive extractor: codebook copies must be >= 1, got {copies}")
        self.wavelengths = wavelengths_for(int(short_side))
        self.cues = _Cues(self.wavelengths, ORIENTATIONS).eval()
        self.seed, self.pixels_per_image, self.copies = int(seed), int(pixels_per_image), int(copies)
        self.codebook_sizes = tuple(codebook_sizes) * self.copies
        self._samples: list[np.ndarray] = []

    @torch.no_grad()
    def add(self, image: np.ndarray) -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"adaptive extractor: expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        cues = self.cues(x)[0].reshape(self.cues.dim, -1).numpy()
        rng = np.random.default_rng([self.seed, len(self._samples)])
        n = cues.shape[1]
        idx = rng.choice(n, min(self.pixels_per_image, n), replace=False)
        self._samples.append(cues[:, np.sort(idx)].T.astype(np.float64))

    def finish(self, *, min_images: int = MIN_FIT_IMAGES) -> AdaptiveStats:
        """Fit the whitening and the codebooks. ``ValueError`` for fewer than ``min_images`` images (at least 1).

        The ``features`` stage passes ``min_images=1`` and warns below ``MIN_FIT_IMAGES`` (its documented
        fallback for a tiny split: statistics of the very images it then describes)."""
        n_images = len(self._samples)
        if n_images < max(1, int(min_images)):
            raise ValueError(
                f"adaptive extractor: {n_images} image(s) to fit on, at least {MIN_FIT_IMAGES} needed "
                "(statistics of fewer images describe those images, not the dataset); use a larger split "
                "or a fixed extractor such as 'texture'"
            )
        x = np.concatenate(self._samples)
        mean, transform = _block_whitening(x, [slice(0, 3), slice(3, x.shape[1])])
        z = (x - mean) @ transform
        rng = np.random.default_rng([self.seed, 1])
        sub = z[np.sort(rng.choice(len(z), min(len(z), MAX_KMEANS_POINTS), replace=False))]
        prototypes, sigmas, scales = [], [], [float(np.sqrt((z * z).sum(1).mean()))]
        for i, k in enumerate(self.codebook_sizes):
            k_eff = min(k, len(np.unique(sub.round(6), axis=0)))
            protos, _ = kmeans(sub, k_eff, iters=50, seed=self.seed + i)
            protos = protos.astype(np.float64)
            d2 = np.maximum((sub * sub).sum(1)[:, None] - 2 * sub @ protos.T + (protos * protos).sum(1)[None], 0)
            sigma = SIGMA_FACTOR * float(np.median(np.sqrt(d2.min(1))))
            if not sigma > 0:
                sigma = SIGMA_FACTOR * float(np.sqrt(np.median(d2[d2 > 0]))) if (d2 > 0).any() else 1.0
            a = _soft_assign(sub, protos, sigma)
            prototypes.append(protos)
            sigmas.append(sigma)
            # copies of one size share one codebook's weight (RMS norm 1/sqrt(copies) each): the ensemble
            # averages the quantisation, the linear part keeps its share of F
            scales.append(float(np.sqrt((a * a).sum(1).mean() * self.copies)))
        f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
        stats = AdaptiveStats(
            wavelengths=self.wavelengths, orientations=ORIENTATIONS, mean=f32(mean), transform=f32(transform),
            prototypes=tuple(f32(p) for p in prototypes), sigmas=f32(sigmas), scales=f32(scales),
            n_images=n_images, n_pixels=int(len(x)), seed=self.seed,
        )
        logger.info("adaptive extractor: fitted on %d pixels of %d images (wavelengths %s, dim %d, digest %s)",
                    len(x), n_images, list(self.wavelengths), stats.dim, stats.digest[:12])
        return stats


MAX_FIT_IMAGES = 256


def fit_sample(ids: Sequence[str], *, max_images: int = MAX_FIT_IMAGES, seed: int = 0) -> list[str]:
    """The image ids to fit on: all of ``ids`` up to ``max_images``, else a seeded random subset (in split order).

    256 images × 1024 pixels = 262k cue vectors: the ≤ 51-dim covariances and the K-means on 20k points
    are then estimated from far more samples than they have parameters; more images change little.
    """
    ids = list(ids)
    if len(ids) <= max_images:
        return ids
    keep = np.sort(np.random.default_rng([seed, 2]).choice(len(ids), max_images, replace=False))
    return [ids[i] for i in keep]


def fit_adaptive_stats(images: Iterable[np.ndarray], *, short_side: Optional[int] = None, seed: int = 0,
                       pixels_per_image: int = 1024, min_images: int = MIN_FIT_IMAGES,
                       copies: int = CODEBOOK_COPIES) -> AdaptiveStats:
    """Fit :class:`AdaptiveStats` on ``images`` (uint8 ``[H, W, 3]`` each, streamed once).

    ``short_side``: the images' typical short side, which fixes the Gabor wavelengths; None → the
    first image's (give it when sizes vary). ``copies``: each codebook size fitted that many times
    from different K-means seeds (``features.codebook_copies``). Raises ``ValueError`` for fewer than
    ``min_images`` images (default ``MIN_FIT_IMAGES``), a non-RGB image, or images without any variation.
    """
    fitter: Optional[AdaptiveFitter] = None
    for image in images:
        if fitter is None:
            fitter = AdaptiveFitter(short_side or int(min(np.asarray(image).shape[:2])), seed=seed,
                                    pixels_per_image=pixels_per_image, copies=copies)
        fitter.add(image)
    if fitter is None:
        raise ValueError(f"adaptive extractor: no images to fit on, at least {MIN_FIT_IMAGES} needed")
    return fitter.finish(min_images=min_images)


# --------------------------------------------------------------------------------------------
# the extractor


class AdaptiveExtractor(nn.Module):
    """Pixel embeddings from fitted :class:`AdaptiveStats` (module docstring).

    ``__call__(images [B, 3, H, W] float in [0, 1]) -> features [B, dim, H, W]`` float32; ``stride`` 1.
    The fitted arrays are persistent buffers, so a ``state_dict`` carries them (a STEGO checkpoint on
    this backbone embeds them); ``stats()`` rebuilds the :class:`AdaptiveStats` (and its digest) from them.
    """

    stride: int = 1

    def __init__(self, stats: AdaptiveStats) -> None:
        super().__init__()
        _check_consistent(stats, "adaptive statistics")
        self._meta = {"n_images": stats.n_images, "n_pixels": stats.n_pixels, "seed": stats.seed}
        self.wavelengths, self.orientations = tuple(stats.wavelengths), int(stats.orientations)
        self.dim = stats.dim
        self.n_codebooks = len(stats.prototypes)
        self.cues = _Cues(self.wavelengths, self.orientations)
        self.register_buffer("mean", torch.from_numpy(stats.mean.copy()))
        self.register_buffer("transform", torch.from_numpy(stats.transform.copy()))
        for i, p in enumerate(stats.prototypes):
            self.register_buffer(f"prototypes{i}", torch.from_numpy(p.copy()))
        self.register_buffer("sigmas", torch.from_numpy(stats.sigmas.copy()))
        self.register_buffer("scales", torch.from_numpy(stats.scales.copy()))

    def stats(self) -> AdaptiveStats:
        """The statistics held now (after ``load_state_dict`` too)."""
        return AdaptiveStats(
            wavelengths=self.wavelengths, orientations=self.orientations,
            mean=self.mean.cpu().numpy(), transform=self.transform.cpu().numpy(),
            prototypes=tuple(getattr(self, f"prototypes{i}").cpu().numpy() for i in range(self.n_codebooks)),
            sigmas=self.sigmas.cpu().numpy(), scales=self.scales.cpu().numpy(), **self._meta,
        )

    @property
    def digest(self) -> str:
        return self.stats().digest

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, H, W]`` in [0, 1] → ``features [B, dim, H, W]`` float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"adaptive extractor: expected images [B, 3, H, W], got {tuple(images.shape)}")
        b, _, h, w = images.shape
        cues = self.cues(images.float())  # [B, D, H, W]
        x = cues.permute(0, 2, 3, 1).reshape(-1, cues.shape[1])
        z = (x - self.mean) @ self.transform
        parts = [z / self.scales[0]]
        for i in range(self.n_codebooks):
            sigma = float(self.sigmas[i])
            parts.append(_soft_assign(z, getattr(self, f"prototypes{i}"), sigma) / self.scales[i + 1])
        out = torch.cat(parts, 1).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return out.contiguous().float()


def _placeholder_stats(wavelengths: Iterable[float], orientations: int, rank: int,
                       codebooks: Iterable[int]) -> AdaptiveStats:
    """Zero statistics of the given shapes, for a module that ``load_state_dict`` then fills."""
    lams = tuple(float(w) for w in wavelengths)
    d = 3 + len(lams) * int(orientations)
    ks = [int(k) for k in codebooks]
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    return AdaptiveStats(wavelengths=lams, orientations=int(orientations), mean=z(d), transform=z(d, rank),
                         prototypes=tuple(z(k, rank) for k in ks), sigmas=np.ones(len(ks), np.float32),
                         scales=np.ones(len(ks) + 1, np.float32), n_images=0, n_pixels=0, seed=0)


def backbone_kwargs(stats: AdaptiveStats) -> dict[str, Any]:
    """The ``BACKBONES["adaptive"]`` keyword arguments that rebuild a module of these shapes."""
    return {"wavelengths": list(stats.wavelengths), "orientations": stats.orientations,
            "rank": int(stats.transform.shape[1]), "codebooks": [int(p.shape[0]) for p in stats.prototypes]}


@BACKBONES.register("adaptive")
def adaptive_backbone(*, wavelengths: Iterable[float], orientations: int, rank: int,
                      codebooks: Iterable[int]) -> AdaptiveExtractor:
    """An :class:`AdaptiveExtractor` of the given shapes with zero statistics: a frozen STEGO backbone whose
    fitted arrays come from ``load_state_dict`` (``save_stego_checkpoint`` embeds them)."""
    return AdaptiveExtractor(_placeholder_stats(wavelengths, orientations, rank, codebooks))


@FEATURES.register("adaptive")
def build_adaptive_extractor(stats: Union[AdaptiveStats, PathLike, None] = None, device: str = "cpu", *,
                             checkpoint: Optional[PathLike] = None) -> AdaptiveExtractor:
    """The ``adaptive`` extractor from fitted statistics: an :class:`AdaptiveStats`, or its saved file given as
    ``stats`` or ``checkpoint`` (the key ``features.checkpoint`` fills). ``ValueError`` if neither is given."""
    if stats is None and checkpoint is None:
        raise ValueError("adaptive extractor: needs fitted statistics (stats= or checkpoint= the .npz file)")
    if stats is not None and checkpoint is not None:
        raise ValueError("adaptive extractor: give stats or checkpoint, not both")
    src = stats if stats is not None else checkpoint
    loaded = src if isinstance(src, AdaptiveStats) else AdaptiveStats.load(src)  # type: ignore[arg-type]
    return AdaptiveExtractor(loaded).to(device).eval()


__all__ = ["AdaptiveExtractor", "AdaptiveFitter", "AdaptiveStats", "MAX_FIT_IMAGES", "MIN_FIT_IMAGES", "adaptive_backbone",
           "backbone_kwargs", "build_adaptive_extractor", "fit_adaptive_stats", "fit_sample", "srgb_to_lab",
           "wavelengths_for"]
