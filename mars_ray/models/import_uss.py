"""``mars import-uss``: STEGO, HP and Leopart checkpoints → the project's USS checkpoint (``models.stego``).

Layouts (checked against each repository's code):

* **STEGO** (``mhamilton723/STEGO`` ``src/train_segmentation.py``, ``src/modules.py``): a Lightning
  ``.ckpt`` whose ``state_dict`` holds ``net.model.*`` (the DINO ViT, ``dino/vision_transformer.py``
  key names), ``net.cluster1.0.*`` (linear 1x1 conv) and ``net.cluster2.{0,2}.*`` (conv, ReLU, conv);
  the code is ``cluster1(f) + cluster2(f)`` on the last block's normed patch tokens ``f``.
  ``hyper_parameters["cfg"]`` (an OmegaConf ``DictConfig``) gives ``model_type`` (``vit_small`` /
  ``vit_base`` → 6 / 12 heads), ``dino_patch_size``, ``dino_feat_type``, ``projection_type``,
  ``dim`` (``continuous``; else ``n_classes``). ``dino_feat_type: KK`` is refused: those features are
  the last block's attention keys, not the patch tokens the backbone returns.
* **HP** (``hynnsk/HP`` ``utils/common_utils.py`` ``save_checkpoint``, ``build.py``): ``ckpt.pth``
  with ``net_model_state_dict`` = the ``DinoFeaturizer`` itself (``model.*``, ``cluster1.0.*``,
  ``cluster2.{0,2}.*``, plus EMA copies ``ema_model{1,2}`` that evaluation does not use); no config
  is stored, so sizes come from the weights (``dim`` 512 or 256) and heads from the width.
* **Leopart** (``MkuuWaUjinga/leopart`` README, ``src/vit.py``): ``leopart_vits16.ckpt`` /
  ``leopart_vitb8.ckpt`` hold a flat state dict of a DINO/timm-layout ViT under a one-level key
  prefix (the README strips ``k.split(".")[0]``) plus ``projection_head.*`` and ``prototypes.*``;
  the ViT becomes the backbone and its patch tokens are F (no STEGO head).

All three ViTs resize position embeddings as DINO does, so the imported backbone uses
``pos_interp="dino"``; the weights are embedded in the output checkpoint. Pickled configs are read
with :mod:`mars_ray.safe_pickle` (no code in the file runs).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from mars_ray import safe_pickle, storage
from mars_ray.models.registry import BACKBONES
from mars_ray.models.stego import SegHead, StegoModel, save_stego_checkpoint
from mars_ray.models.vit import VisionTransformer

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]", storage.ObjectPath]

SOURCES: tuple[str, ...] = ("stego", "hp", "leopart")
#: DINO's ``vits.__dict__[arch]`` presets (STEGO/HP ``model_type``; Leopart ``arch``)
HEADS_BY_ARCH: dict[str, int] = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12, "vit_large": 16,
                                 "vit-small": 6, "vit-base": 12, "vit-large": 16}
HEADS_BY_WIDTH: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16}
_DROPPED_LEOPART = ("projection_head.", "prototypes.", "head.")


def _load(path: PathLike) -> tuple[storage.AnyPath, Any]:
    p = storage.upath(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    try:
        with storage.open_read(p) as f:
            return p, safe_pickle.torch_load(f)
    except Exception as e:  # noqa: BLE001 - corrupt or foreign files fail in many ways
        raise ValueError(f"{p}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None


def _sub(state: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def vit_arch(state: Mapping[str, Tensor], path: str, *, num_heads: Optional[int] = None) -> dict[str, Any]:
    """ViT sizes from a DINO-layout state dict: patch, width, depth, MLP ratio, qkv bias, stored grid.

    The number of heads is not in the weights: ``num_heads``, else from the width (384 → 6, 768 → 12, …).
    Raises ``ValueError`` naming ``path`` when a key is missing or the heads cannot be known.
    """
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"{path}: no ViT weight {key!r} (keys: {sorted(state)[:6]} …)")
    width, _, p, p2 = state["patch_embed.proj.weight"].shape
    n = state["pos_embed"].shape[1] - 1
    side = int(math.isqrt(n))
    if p != p2 or side * side != n:
        raise ValueError(f"{path}: non-square patches {p}x{p2} or position grid of {n} tokens")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    heads = num_heads or HEADS_BY_WIDTH.get(int(width))
    if heads is None:
        raise ValueError(f"{path}: a {width}-wide ViT; its number of heads is not in the weights: pass --num-heads")
    if width % heads:
        raise ValueError(f"{path}: width {width} is not divisible by {heads} heads")
    return {"patch_size": int(p), "embed_dim": int(width), "depth": depth, "num_heads": int(heads),
            "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width,
            "qkv_bias": "blocks.0.attn.qkv.bias" in state, "img_size": side * int(p), "pos_interp": "dino"}


def _backbone(state: dict[str, Tensor], arch: dict[str, Any], path: str) -> VisionTransformer:
    model = BACKBONES.get("vit", **arch)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: ViT weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shapes {shapes[:3]}")
    model.load_state_dict(state, strict=True)
    return model


def _head(state: Mapping[str, Any], prefix: str, in_dim: int, path: str, dim: Optional[int],
          kind: str) -> Optional[SegHead]:
    """STEGO ``cluster1.0`` (+ ``cluster2.{0,2}``) under ``prefix`` → :class:`SegHead` (``kind`` stego/linear)."""
    w = state.get(f"{prefix}cluster1.0.weight")
    if w is None:
        raise ValueError(f"{path}: no {prefix}cluster1.0.weight (the STEGO linear head)")
    if dim is not None and w.shape[0] != dim:
        raise ValueError(f"{path}: cluster1 has {w.shape[0]} outputs, the stored config says dim {dim}")
    head = SegHead(in_dim, int(w.shape[0]), nonlinear=kind == "stego")
    mapping = {"linear.weight": "cluster1.0.weight", "linear.bias": "cluster1.0.bias"}
    if kind == "stego":
        mapping.update({f"nonlinear.{i}.{t}": f"cluster2.{i}.{t}" for i in (0, 2) for t in ("weight", "bias")})
    missing = [prefix + v for v in mapping.values() if prefix + v not in state]
    if missing:
        raise ValueError(f"{path}: head weights missing: {missing}")
    head.load_state_dict({ours: state[prefix + theirs] for ours, theirs in mapping.items()}, strict=True)
    return head


def _cfg_get(cfg: Mapping[str, Any], key: str) -> Any:
    """STEGO's cfg key at the top level (upstream) or one level down (``train``/``model`` sections)."""
    if key in cfg:
        return cfg[key]
    for section in cfg.values():
        if isinstance(section, Mapping) and key in section:
            return section[key]
    raise KeyError(key)


def import_stego(path: PathLike, *, num_heads: Optional[int] = None) -> tuple[StegoModel, dict[str, Any]]:
    """STEGO Lightning ``.ckpt`` → (model, backbone kwargs). See the module docstring for the layout."""
    p, ckpt = _load(path)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError(f"{p}: not a Lightning checkpoint (no 'state_dict')")
    hp = safe_pickle.plain(ckpt.get("hyper_parameters") or {})
    cfg = hp.get("cfg") if isinstance(hp, Mapping) else None
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{p}: no hyper_parameters['cfg'] (STEGO's config) in the checkpoint")
    try:
        arch_name, patch = _cfg_get(cfg, "model_type"), int(_cfg_get(cfg, "dino_patch_size"))
        feat_type, proj = _cfg_get(cfg, "dino_feat_type"), _cfg_get(cfg, "projection_type")
        continuous = bool(_cfg_get(cfg, "continuous"))
        dim = int(_cfg_get(cfg, "dim")) if continuous else int(hp["n_classes"])
    except KeyError as e:
        raise ValueError(f"{p}: STEGO config has no {e.args[0]!r}") from None
    if cfg.get("arch", "dino") != "dino":
        raise ValueError(f"{p}: arch {cfg.get('arch')!r}; only STEGO's 'dino' (ViT) featurizer imports")
    if feat_type != "feat":
        raise ValueError(f"{p}: dino_feat_type {feat_type!r} cannot be imported: STEGO's 'KK' features are the keys "
                         "of the last attention layer, not the patch tokens this ViT backbone returns "
                         "(only dino_feat_type: feat)")
    state = ckpt["state_dict"]
    bb_state = _sub(state, "net.model.")
    arch = vit_arch(bb_state, str(p), num_heads=num_heads or HEADS_BY_ARCH.get(str(arch_name)))
    if arch["patch_size"] != patch:
        raise ValueError(f"{p}: config says dino_patch_size {patch}, the weights have patch {arch['patch_size']}")
    backbone = _backbone(bb_state, arch, str(p))
    kind = "none" if proj is None else ("stego" if proj == "nonlinear" else "linear")
    head = None if kind == "none" else _head(state, "net.", arch["embed_dim"], str(p), dim, kind)
    return StegoModel(backbone, head), arch


def import_hp(path: PathLike, *, num_heads: Optional[int] = None) -> tuple[StegoModel, dict[str, Any]]:
    """HP ``ckpt.pth`` → (model, backbone kwargs); sizes from the weights (HP stores no config)."""
    p, ckpt = _load(path)
    if not isinstance(ckpt, Mapping) or "net_model_state_dict" not in ckpt:
        raise ValueError(f"{p}: not an HP checkpoint (no 'net_model_state_dict')")
    state = {re.sub(r"^module\.", "", k): v for k, v in ckpt["net_model_state_dict"].items()}
    bb_state = _sub(state, "model.")
    arch = vit_arch(bb_state, str(p), num_heads=num_heads)
    backbone = _backbone(bb_state, arch, str(p))
    kind = "stego" if "cluster2.0.weight" in state else "linear"
    return StegoModel(backbone, _head(state, "", arch["embed_dim"], str(p), None, kind)), arch


def import_leopart(path: PathLike, *, num_heads: Optional[int] = None,
                   prefix: Optional[str] = None) -> tuple[StegoModel, dict[str, Any]]:
    """Leopart ``leopart_vit*.ckpt`` → (backbone-only model, backbone kwargs); F = the ViT's patch tokens."""
    p, ckpt = _load(path)
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        ckpt = ckpt["state_dict"]  # a Lightning checkpoint of Leopart training
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{p}: expected a state dict, got {type(ckpt).__name__}")
    if prefix is None:
        found = sorted(k[: -len(".cls_token")] for k in ckpt if k.endswith(".cls_token") and k.count(".") == 1)
        if len(found) > 1:
            raise ValueError(f"{p}: ViTs under several prefixes {found}; choose one with --prefix")
        prefix = found[0] if found else ""
    lead = f"{prefix}." if prefix else ""
    state = {k: v for k, v in _sub(ckpt, lead).items() if not k.startswith(_DROPPED_LEOPART)}
    if "cls_token" not in state:
        raise ValueError(f"{p}: no ViT under prefix {prefix!r} (keys: {sorted(ckpt)[:6]} …)")
    arch = vit_arch(state, str(p), num_heads=num_heads)
    return StegoModel(_backbone(state, arch, str(p)), None), arch


def import_uss(ckpt: PathLike, out: PathLike, *, source: str, num_heads: Optional[int] = None,
               prefix: Optional[str] = None) -> storage.AnyPath:
    """Convert a ``source`` checkpoint (stego | hp | leopart) into ``out`` (``save_stego_checkpoint``).

    The result loads with ``load_stego_checkpoint`` and serves as ``features.extractor=stego``
    ``features.checkpoint=OUT``. Raises ``ValueError`` / ``FileNotFoundError`` naming the file.
    """
    if source == "stego":
        model, arch = import_stego(ckpt, num_heads=num_heads)
    elif source == "hp":
        model, arch = import_hp(ckpt, num_heads=num_heads)
    elif source == "leopart":
        model, arch = import_leopart(ckpt, num_heads=num_heads, prefix=prefix)
    else:
        raise ValueError(f"unknown USS source {source!r}; known: {', '.join(SOURCES)}")
    path = save_stego_checkpoint(model, storage.upath(out), "vit", arch)
    head = "no head (patch tokens)" if model.head is None else (
        f"{'linear + nonlinear' if model.head.nonlinear is not None else 'linear'} head")
    logger.info("imported %s checkpoint %s: ViT width %d, depth %d, patch %d, %s, F dim %d → %s", source, ckpt,
                arch["embed_dim"], arch["depth"], arch["patch_size"], head, model.dim, path)
    return path


__all__ = ["SOURCES", "import_hp", "import_leopart", "import_stego", "import_uss", "vit_arch"]
