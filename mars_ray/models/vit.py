"""A plain Vision Transformer whose ``state_dict`` matches the official DINO release.

Parameter names follow ``facebookresearch/dino`` ``vision_transformer.py`` exactly (``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``,
``norm``), so released DINO weights (``dino_deitsmall8_pretrain.pth`` …) load as they are, from a
local path only. The forward pass returns the patch tokens of the last block (after the final norm)
as a feature map; inputs are RGB in [0, 1] and ImageNet normalisation happens inside.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any, Mapping, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mars_ray import storage
from mars_ray.checkpoints import load_torch_file, save_torch_file
from mars_ray.models.registry import BACKBONES
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike, storage.ObjectPath]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: wrapper keys of DINO / generic training checkpoints, tried in this order
_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict")
_PREFIXES = ("module.", "backbone.")


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution: B x 3 x H x W → B x N x D (H, W multiples of p)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection: B x N x D → B x N x D."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # B x heads x N x d_head
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1`` → GELU → ``fc2``: B x N x D → B x N x D."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT backbone: B x 3 x H x W in [0, 1] → B x D x ceil(H/p) x ceil(W/p) patch features.

    The input is ImageNet-normalised, zero-padded (bottom/right) to a multiple of the patch size,
    and the learned position embedding (for a ``img_size``² grid) is bicubically resized to the
    patch grid: to the grid's size (``pos_interp="size"``), or exactly as DINO's
    ``interpolate_pos_encoding`` does (``"dino"``: unchanged for a square grid of the stored size,
    else ``scale_factor=((h + 0.1) / √N, (w + 0.1) / √N)``), which STEGO, HP and Leopart inherit;
    checkpoints imported from them use ``"dino"`` so that their features come out unchanged.
    ``dim`` and ``stride`` describe the output map.
    """

    def __init__(
        self,
        *,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        img_size: int = 224,
        pos_interp: str = "size",
    ) -> None:
        super().__init__()
        if pos_interp not in ("size", "dino"):
            raise ValueError(f"pos_interp must be 'size' or 'dino', got {pos_interp!r}")
        self.pos_interp = pos_interp
        self.dim = embed_dim
        self.stride = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """Position embedding for an h x w patch grid: 1 x (1 + h*w) x D (bicubic resize)."""
        n = self.pos_embed.shape[1] - 1
        side = int(math.sqrt(n))
        if side * side == n and side == h == w:
            return self.pos_embed
        if self.pos_interp == "dino" and h * w == n and h == w:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.pos_interp == "dino":  # DINO vision_transformer.py: +0.1 against floating-point floor errors
            scale = ((h + 0.1) / math.sqrt(n), (w + 0.1) / math.sqrt(n))
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic")
        else:
            patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """B x 3 x H x W in [0, 1] → B x D x ceil(H/p) x ceil(W/p) (last block, after ``norm``)."""
        x = (images - self.mean) / self.std
        p = self.stride
        pad_h, pad_w = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        b, _, hh, ww = x.shape
        h, w = hh // p, ww // p
        tokens = self.patch_embed(x)  # B x h*w x D
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h, w)
        for blk in self.blocks:
            tokens = blk(tokens)
        tokens = self.norm(tokens)
        return tokens[:, 1:].transpose(1, 2).reshape(b, self.dim, h, w)


def _build(**arch: Any) -> VisionTransformer:
    return VisionTransformer(**arch)


@BACKBONES.register("vit_small_8")
def vit_small_8(**kw: Any) -> VisionTransformer:
    return _build(patch_size=8, embed_dim=384, depth=12, num_heads=6, **kw)


@BACKBONES.register("vit_small_16")
def vit_small_16(**kw: Any) -> VisionTransformer:
    return _build(patch_size=16, embed_dim=384, depth=12, num_heads=6, **kw)


@BACKBONES.register("vit_base_8")
def vit_base_8(**kw: Any) -> VisionTransformer:
    return _build(patch_size=8, embed_dim=768, depth=12, num_heads=12, **kw)


@BACKBONES.register("vit_base_16")
def vit_base_16(**kw: Any) -> VisionTransformer:
    return _build(patch_size=16, embed_dim=768, depth=12, num_heads=12, **kw)


@BACKBONES.register("vit")
def vit(**kw: Any) -> VisionTransformer:
    """Any DINO-layout ViT, sizes as keyword arguments (imported checkpoints record theirs); default ViT-S/16."""
    return _build(**kw)


@BACKBONES.register("vit_tiny_test")
def vit_tiny_test(**kw: Any) -> VisionTransformer:
    """A 2-block, 32-dim ViT with patch 8 on a 32 x 32 grid: for tests only."""
    return _build(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32, **kw)


# ---------------------------------------------------------------------------------------------
# checkpoints in the DINO format


def _abbrev(items: list[str], n: int = 5) -> str:
    items = sorted(items)
    head = ", ".join(items[:n])
    return head + (f", … (+{len(items) - n} more)" if len(items) > n else "")


def extract_state_dict(obj: Any, path: PathLike = "<checkpoint>") -> dict[str, Tensor]:
    """Unwrap a checkpoint object into a flat backbone state dict.

    Takes the first of ``teacher``/``student``/``model``/``state_dict`` if present, strips the
    ``module.``/``backbone.`` prefixes and drops DINO projection ``head.*`` keys.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping), got {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        if key.startswith("head."):
            continue
        out[key] = value
    return out


def load_dino_checkpoint(model: nn.Module, path: PathLike) -> nn.Module:
    """Load DINO-format weights from a local file or object-store URI into ``model`` (in place; returns it).

    Accepts a raw state dict or one wrapped under ``teacher``/``student``/``model``/``state_dict``,
    with optional ``module.``/``backbone.`` prefixes; DINO ``head.*`` keys are dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected keys / shape mismatches (named).
    """
    # DINO's full checkpoints also pickle their training ``args``
    state = extract_state_dict(load_torch_file(path, "DINO checkpoint", safe_globals=[argparse.Namespace]), path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys [{_abbrev(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{_abbrev(unexpected)}]")
        if shapes:
            parts.append(f"shape mismatches [{_abbrev(shapes)}]")
        raise ValueError(f"{path}: does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    logger.info("loaded %d tensors from %s", len(state), path)
    return model


def save_dino_checkpoint(model: nn.Module, path: AnyPath) -> AnyPath:
    """Write ``model.state_dict()`` as a raw DINO-style state dict (atomically; local or URI); returns the path."""
    return save_torch_file(model.state_dict(), path)
