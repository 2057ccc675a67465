"""STEGO (Hamilton et al., ICLR 2022): a segmentation head distilled from a frozen backbone's feature correspondences.

A frozen backbone gives features ``f``; a small head maps them to codes ``s`` (70-dim). The loss asks
the codes' cosine-similarity tensor ``S`` to follow the (centred) feature similarity ``F``:
``L = -Σ (F - b) · max(S, 0)`` for pairs (image, itself), (image, a k-NN image), (image, a random
image), each with its own shift ``b`` and weight. The trained model is exposed to the pipeline as the
``stego`` FEATURES extractor, rebuilt from one checkpoint file.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mars_ray.models import small_cnn as _small_cnn  # noqa: F401  (registers "small_cnn")
from mars_ray.models import vit as _vit  # registers the ViT presets
from mars_ray import storage
from mars_ray.checkpoints import load_torch_file, save_torch_file
from mars_ray.models.registry import BACKBONES, FEATURES
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike, storage.ObjectPath]

#: STEGO's cocostuff ViT-S config: shifts and weights for (self, k-NN, random) pairs
DEFAULT_SHIFTS = (0.18, 0.12, 0.46)
DEFAULT_WEIGHTS = (0.67, 0.25, 0.63)
CHECKPOINT_FORMAT = "mars_ray.stego/2"  # /2 adds head_kind (linear-only or no head); /1 files still load
_READABLE_FORMATS = ("mars_ray.stego/1", CHECKPOINT_FORMAT)
HEAD_KINDS = ("stego", "linear", "none")


class SegHead(nn.Module):
    """STEGO head: linear 1x1 conv + (1x1 conv, ReLU, 1x1 conv), summed: B x in_dim x h x w → B x dim x h x w.

    The layout of STEGO's ``DinoFeaturizer`` (``src/modules.py``): ``cluster1`` = ``linear``,
    ``cluster2`` = ``nonlinear``, code = ``cluster1(x) + cluster2(x)``; with ``nonlinear=False`` the
    linear branch alone (STEGO's ``projection_type: linear``). STEGO draws one dropout mask per branch
    while training, this head one for both; at inference both are the identity.
    """

    def __init__(self, in_dim: int, dim: int = 70, dropout: float = 0.1, nonlinear: bool = True) -> None:
        super().__init__()
        self.in_dim, self.dim = in_dim, dim
        self.dropout = nn.Dropout2d(dropout)
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = (nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))
                          if nonlinear else None)

    def forward(self, feats: Tensor) -> Tensor:
        x = self.dropout(feats)
        return self.linear(x) if self.nonlinear is None else self.linear(x) + self.nonlinear(x)


class StegoModel(nn.Module):
    """Frozen backbone + trainable :class:`SegHead`: B x 3 x H x W in [0, 1] → B x dim x h x w codes.

    ``head=None``: the backbone's features are the codes (an imported Leopart ViT's patch tokens).
    """

    def __init__(self, backbone: nn.Module, head: Optional[SegHead]) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = head
        self.dim = head.dim if head is not None else int(getattr(backbone, "dim"))
        self.stride = int(getattr(backbone, "stride"))

    def train(self, mode: bool = True) -> "StegoModel":
        super().train(mode)
        self.backbone.eval()  # frozen: BN statistics and dropout stay in eval mode
        return self

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Frozen backbone features: B x 3 x H x W → B x D x h x w."""
        return self.backbone(images)

    def forward(self, images: Tensor) -> Tensor:
        feats = self.features(images)
        return feats if self.head is None else self.head(feats)


# ---------------------------------------------------------------------------------------------
# the correspondence distillation loss


def _sample(t: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples at a grid of points: t B x C x h x w, coords B x n x n x 2 in [-1, 1] → B x C x n x n."""
    return F.grid_sample(t, coords, mode="bilinear", padding_mode="border", align_corners=True)


def _pair_loss(f1: Tensor, f2: Tensor, c1: Tensor, c2: Tensor, shift: float) -> Tensor:
    """STEGO's helper: mean of ``-(F - shift) · max(S, 0)`` over B x n x n x n x n point pairs."""
    with torch.no_grad():
        fd = torch.einsum("bchw,bcij->bhwij", F.normalize(f1, dim=1, eps=1e-10), F.normalize(f2, dim=1, eps=1e-10))
        old_mean = fd.mean()
        fd = fd - fd.mean(dim=(3, 4), keepdim=True)  # centre over the second image's points
        fd = fd - fd.mean() + old_mean
    cd = torch.einsum("bchw,bcij->bhwij", F.normalize(c1, dim=1, eps=1e-10), F.normalize(c2, dim=1, eps=1e-10))
    return (-cd.clamp(min=0) * (fd - shift)).mean()


def _derangement(n: int, device: torch.device) -> Tensor:
    """A permutation of range(n) without fixed points (n >= 2): image i pairs with another image."""
    return (torch.arange(n, device=device) + torch.randint(1, n, (1,), device=device)) % n


def correspondence_loss(
    feats: Tensor,
    codes: Tensor,
    *,
    knn_feats: Optional[Tensor] = None,
    knn_codes: Optional[Tensor] = None,
    rand_feats: Optional[Tensor] = None,
    rand_codes: Optional[Tensor] = None,
    shifts: Sequence[float] = DEFAULT_SHIFTS,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    n_samples: int = 11,
) -> dict[str, Tensor]:
    """STEGO's contrastive correspondence loss (Hamilton et al. 2022, Eq. 3–4), weighted terms.

    Args:
        feats, codes: B x D x h x w backbone features and B x K x h x w codes of the images.
        knn_feats, knn_codes: the same for one k-NN image per image; the term is skipped if None.
        rand_feats, rand_codes: the same for a random other image; None → the batch shifted by a
            random offset (a permutation without fixed points; the term is skipped when B = 1).
        shifts, weights: (self, knn, random) shift ``b`` and weight of each term.
        n_samples: points are sampled on an ``n_samples`` x ``n_samples`` random grid per image.

    Returns:
        ``{"corr_self", "corr_knn", "corr_random"}`` (present terms only), each already weighted;
        a loop sums them. Gradients flow into ``codes`` only (features are treated as constants).
    """
    if len(shifts) != 3 or len(weights) != 3:
        raise ValueError(f"shifts and weights need 3 entries (self, knn, random), got {shifts}, {weights}")
    if feats.shape[0] != codes.shape[0] or feats.shape[2:] != codes.shape[2:]:
        raise ValueError(f"feats {tuple(feats.shape)} and codes {tuple(codes.shape)} disagree in B/h/w")
    b, device = feats.shape[0], feats.device
    shape = (b, n_samples, n_samples, 2)
    coords1 = torch.rand(shape, device=device) * 2 - 1
    coords2 = torch.rand(shape, device=device) * 2 - 1
    f1, c1 = _sample(feats.detach(), coords1), _sample(codes, coords1)

    out: dict[str, Tensor] = {}
    out["corr_self"] = weights[0] * _pair_loss(f1, f1, c1, c1, shifts[0])
    if (knn_feats is None) != (knn_codes is None):
        raise ValueError("knn_feats and knn_codes must be given together")
    if knn_feats is not None and knn_codes is not None:
        f2, c2 = _sample(knn_feats.detach(), coords2), _sample(knn_codes, coords2)
        out["corr_knn"] = weights[1] * _pair_loss(f1, f2, c1, c2, shifts[1])
    if (rand_feats is None) != (rand_codes is None):
        raise ValueError("rand_feats and rand_codes must be given together")
    if rand_feats is None and b > 1:
        perm = _derangement(b, device)
        rand_feats, rand_codes = feats[perm], codes[perm]
    if rand_feats is not None and rand_codes is not None:
        f3, c3 = _sample(rand_feats.detach(), coords2), _sample(rand_codes, coords2)
        out["corr_random"] = weights[2] * _pair_loss(f1, f3, c1, c3, shifts[2])
    return out


def stego_step(
    model: StegoModel,
    images: Tensor,
    knn_images: Optional[Tensor] = None,
    rand_images: Optional[Tensor] = None,
    **loss_kw: Any,
) -> dict[str, Tensor]:
    """One STEGO loss evaluation: images (and their k-NN / random partners) B x 3 x H x W in [0, 1] → loss dict.

    The backbone runs without gradients; ``loss_kw`` goes to :func:`correspondence_loss`.
    """
    batches = [images] + [x for x in (knn_images, rand_images) if x is not None]
    feats = model.features(torch.cat(batches))
    codes = model.head(feats)
    parts_f, parts_c = feats.split(images.shape[0]), codes.split(images.shape[0])
    kw: dict[str, Any] = {}
    i = 1
    if knn_images is not None:
        kw.update(knn_feats=parts_f[i], knn_codes=parts_c[i])
        i += 1
    if rand_images is not None:
        kw.update(rand_feats=parts_f[i], rand_codes=parts_c[i])
    return correspondence_loss(parts_f[0], parts_c[0], **kw, **loss_kw)


@torch.no_grad()
def global_features(backbone: nn.Module, images: Tensor) -> Tensor:
    """L2-normalised mean-pooled backbone features, for k-NN search: B x 3 x H x W → B x D."""
    return F.normalize(backbone(images).mean(dim=(2, 3)), dim=1)


def knn_table(global_feats: Tensor, k: int = 7) -> Tensor:
    """Indices of each image's ``k`` nearest other images by cosine similarity: N x D → N x k."""
    n = global_feats.shape[0]
    if n < 2:
        raise ValueError(f"k-NN needs at least 2 images, got {n}")
    sim = global_feats @ global_feats.t()
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(min(k, n - 1), dim=1).indices


# ---------------------------------------------------------------------------------------------
# checkpoint + FEATURES extractor

_REQUIRED = ("format", "backbone", "backbone_kwargs", "head_in_dim", "head_dim", "head_state")


def save_stego_checkpoint(
    model: StegoModel,
    path: AnyPath,
    backbone_name: str,
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
    backbone_weights: Optional[PathLike] = None,
) -> AnyPath:
    """Write one self-describing STEGO checkpoint (atomically; ``path`` local or an object-store URI);
    returns the path.

    It records the BACKBONES name and kwargs, the head's kind (``stego``: linear + nonlinear,
    ``linear``, or ``none``: the backbone's features are the codes), sizes and weights, and either
    the absolute path or URI of the backbone weights (``backbone_weights``, e.g. a DINO ``.pth``) or,
    if None, the backbone's own state dict embedded (the self-trained ``small_cnn``, imported models).
    """
    if backbone_name not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone_name!r}; known: {', '.join(BACKBONES.names())}")
    head = model.head
    kind = "none" if head is None else ("stego" if head.nonlinear is not None else "linear")
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "backbone": backbone_name,
        "backbone_kwargs": dict(backbone_kwargs or {}),
        "backbone_weights": None if backbone_weights is None else storage.absolute(backbone_weights),
        "backbone_state": None if backbone_weights is not None else model.backbone.state_dict(),
        "head_kind": kind,
        "head_in_dim": model.dim if head is None else head.in_dim,
        "head_dim": model.dim if head is None else head.dim,
        "head_state": None if head is None else head.state_dict(),
    }
    return save_torch_file(ckpt, path)


def _load_backbone_weights(backbone: nn.Module, weights: str, ckpt_path: "str | AnyPath") -> None:
    try:
        _vit.load_dino_checkpoint(backbone, weights)  # generic: raw / wrapped state dict, strict match
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{ckpt_path}: names backbone weights that do not exist ({e})") from None


def load_stego_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> StegoModel:
    """Rebuild a :class:`StegoModel` (eval mode) from :func:`save_stego_checkpoint`'s file.

    Raises:
        FileNotFoundError: the checkpoint or the backbone weights it names do not exist.
        ValueError: unreadable file, missing keys, unknown backbone, or weights that do not fit.
    """
    ckpt = load_torch_file(path, "STEGO checkpoint")
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: not a STEGO checkpoint (got {type(ckpt).__name__})")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a STEGO checkpoint, missing keys {missing}")
    if ckpt["format"] not in _READABLE_FORMATS:
        raise ValueError(f"{path}: format {ckpt['format']!r}, expected one of {list(_READABLE_FORMATS)}")
    kind = ckpt.get("head_kind", "stego")
    if kind not in HEAD_KINDS:
        raise ValueError(f"{path}: head_kind {kind!r}, expected one of {list(HEAD_KINDS)}")
    if ckpt["backbone"] not in BACKBONES:
        raise ValueError(f"{path}: unknown backbone {ckpt['backbone']!r}; known: {', '.join(BACKBONES.names())}")
    backbone = BACKBONES.get(ckpt["backbone"], **ckpt["backbone_kwargs"])
    if ckpt.get("backbone_state") is not None:
        try:
            backbone.load_state_dict(ckpt["backbone_state"])
        except RuntimeError as exc:
            raise ValueError(f"{path}: embedded backbone weights do not fit {ckpt['backbone']}: {exc}") from exc
    elif ckpt.get("backbone_weights"):
        _load_backbone_weights(backbone, ckpt["backbone_weights"], path)
    else:
        raise ValueError(f"{path}: neither backbone_state nor backbone_weights is set")
    head = None
    if kind != "none":
        head = SegHead(int(ckpt["head_in_dim"]), int(ckpt["head_dim"]), nonlinear=kind == "stego")
        try:
            head.load_state_dict(ckpt["head_state"])
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: head weights do not fit: {exc}") from exc
    return StegoModel(backbone, head).to(device).eval()


class StegoFeatures:
    """USS pixel embeddings from a STEGO checkpoint: ``__call__(B x 3 x H x W in [0, 1]) → B x dim x h x w``.

    ``dim`` is the code size, ``stride`` the backbone's output stride (h = ceil(H / stride)).
    """

    def __init__(self, checkpoint: PathLike, device: Union[str, torch.device] = "cpu") -> None:
        self.device = torch.device(device)
        self.model = load_stego_checkpoint(checkpoint, self.device)
        self.dim = self.model.dim
        self.stride = self.model.stride
        logger.info("STEGO features from %s: dim %d, stride %d", checkpoint, self.dim, self.stride)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.model(images.to(self.device, torch.float32))


@FEATURES.register("stego")
def stego_features(checkpoint: str, device: str = "cpu") -> StegoFeatures:
    """The ``stego`` extractor, rebuilt from a :func:`save_stego_checkpoint` file."""
    return StegoFeatures(checkpoint, device)
