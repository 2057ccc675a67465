"""A hand-crafted, weight-free pixel-embedding extractor (a stand-in for a USS model).

MARS needs pixel embeddings whose cosine similarity separates an object from the context it
co-occurs with (boat vs water). A learned USS model (STEGO, HP, …) gives that on real photos; the
built-in dataset tells objects from contexts by texture, and this extractor measures texture
with a fixed filter bank, so the whole pipeline runs and is tested without any weights.

Embedding of a pixel (``dim = S·O + 1 + 3`` for ``S`` scales and ``O`` orientations):

1. **Spectral profile** (``S·O`` dims). Complex Gabor filters on luminance at ``S`` wavelengths
   and ``O`` orientations; local energy ``|g * Y|²`` pooled by a Gaussian a little wider than the
   filter; ``L = log(E + eps)``. Each pixel's vector is then *centred across its own channels*:
   ``P = L - mean_k L``. This keeps the *shape* of the local spectrum (which orientation and
   frequency dominate) and drops its overall level, so cosine(P, P') is a correlation of spectral
   profiles: ~1 for the same texture, <= ~0 for textures that peak at different (orientation,
   scale) cells (two one-hot profiles centred over K cells have cosine -1/(K-1)).
2. **Contrast** (1 dim): ``(mean_k L - L0) / contrast_scale`` with a fixed ``L0`` (the level of a
   moderately textured patch, amplitude ~0.1 in [0, 1] units): negative on flat regions (sky),
   positive on textured ones, so a flat context comes out opposite to a textured object.
3. **Colour** (3 dims): luminance - 0.5 and two opponent channels, Gaussian-smoothed, times
   ``colour_weight`` (small: colour helps on photos but objects and their contexts share colours
   on the built-in data).

Why this centring: it is per pixel and fixed (no statistics from the image or the dataset), so the
embedding of a texture does not shift with what else is in the image or which dataset is
processed; features are signed and zero-mean across channels, which is what MARS's
``ReLU(cos)`` activation needs for context pixels to fall at or below zero.

Output stride is 1: features are ``[B, dim, H, W]`` at the input resolution (``.stride == 1``).
Deterministic; CPU is fine (a 96×96 image takes a few ms).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mars_ray.models.registry import FEATURES

logger = logging.getLogger(__name__)


def _gabor_pair(lam: float, theta: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Even/odd Gabor kernels ``[k, k]`` (float64), envelope summing to 1, even part zero-mean."""
    r = int(math.ceil(2.5 * sigma))
    y, x = torch.meshgrid(torch.arange(-r, r + 1, dtype=torch.float64),
                          torch.arange(-r, r + 1, dtype=torch.float64), indexing="ij")
    env = torch.exp(-(x**2 + y**2) / (2 * sigma**2))
    env = env / env.sum()
    u = x * math.cos(theta) + y * math.sin(theta)
    even = env * torch.cos(2 * math.pi * u / lam)
    even = even - env * (even.sum() / env.sum())  # no DC response
    odd = env * torch.sin(2 * math.pi * u / lam)
    return even, odd


def _gauss1d(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``x [B, C, H, W]`` with 1-D kernel ``g [k]``, reflect-padded."""
    c, r = x.shape[1], g.numel() // 2
    x = F.pad(x, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class TextureExtractor(nn.Module):
    """Fixed Gabor-energy + colour pixel embeddings; see the module docstring.

    ``__call__(images [B, 3, H, W] float in [0, 1]) -> features [B, dim, H, W]`` (float32).
    """

    stride: int = 1

    def __init__(
        self,
        *,
        wavelengths: Sequence[float] = (3.0, 5.0, 8.0),
        orientations: int = 4,
        eps: float = 1e-3,
        level: float = math.log(2.5e-3),
        contrast_scale: float = 4.0,
        colour_weight: float = 0.1,
        pool: float = 0.2,
        colour_sigma: float = 3.0,
    ) -> None:
        super().__init__()
        if not wavelengths or orientations < 1:
            raise ValueError("texture extractor: needs at least one wavelength and one orientation")
        self.wavelengths = tuple(float(w) for w in wavelengths)
        self.orientations = int(orientations)
        self.eps, self.level, self.contrast_scale = float(eps), float(level), float(contrast_scale)
        self.colour_weight = float(colour_weight)
        self.n_tex = len(self.wavelengths) * self.orientations
        self.dim = self.n_tex + 1 + 3
        self._banks: list[torch.Tensor] = []
        self._pools: list[torch.Tensor] = []
        for i, lam in enumerate(self.wavelengths):
            ks = []
            for o in range(self.orientations):
                ev, od = _gabor_pair(lam, math.pi * o / self.orientations, sigma=0.5 * lam)
                ks += [ev, od]
            bank = torch.stack(ks)[:, None].float()  # [2·O, 1, k, k]
            self.register_buffer(f"bank{i}", bank, persistent=False)
            self.register_buffer(f"pool{i}", _gauss1d(pool * lam + 1.0), persistent=False)
        self.register_buffer("colour_blur", _gauss1d(colour_sigma), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, H, W]`` in [0, 1] → ``features [B, dim, H, W]`` float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"texture extractor: expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        lum = 0.299 * r + 0.587 * g + 0.114 * b
        logs = []
        for i in range(len(self.wavelengths)):
            bank: torch.Tensor = getattr(self, f"bank{i}")
            pad = bank.shape[-1] // 2
            mode = "reflect" if pad < min(lum.shape[-2:]) else "replicate"  # reflect needs pad < size
            resp = F.conv2d(F.pad(lum, (pad, pad, pad, pad), mode=mode), bank)
            energy = resp[:, 0::2] ** 2 + resp[:, 1::2] ** 2  # [B, O, H, W]
            energy = _blur(energy, getattr(self, f"pool{i}"))
            logs.append(torch.log(energy + self.eps))
        log_e = torch.cat(logs, 1)  # [B, S·O, H, W]
        mean = log_e.mean(1, keepdim=True)
        profile = log_e - mean
        contrast = (mean - self.level) / self.contrast_scale
        colour = torch.cat([lum - 0.5, (r - g) / math.sqrt(2), (r + g - 2 * b) / math.sqrt(6)], 1)
        colour = _blur(colour, self.colour_blur) * (self.colour_weight * 4.0)
        return torch.cat([profile, contrast, colour], 1).contiguous()


@FEATURES.register("texture")
def build_texture_extractor(**kw: Any) -> TextureExtractor:
    """Builder for the weight-free texture extractor; keyword arguments go to ``TextureExtractor``."""
    return TextureExtractor(**kw).eval()


__all__ = ["TextureExtractor", "build_texture_extractor"]
