"""import-uss: STEGO / HP / Leopart checkpoints built in their exact key layouts; features before == after.

The reference features come from a plain re-implementation of the original forward (DINO's
``vision_transformer.py`` ``prepare_tokens`` / ``Block`` / ``norm`` as STEGO, HP and Leopart ship it,
and STEGO's ``cluster1(f) + cluster2(f)``), written here with explicit tensor ops.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mars_ray.models.import_uss import import_uss
from mars_ray.models.registry import FEATURES
from mars_ray.models.stego import load_stego_checkpoint

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def dino_vit_state(width: int, depth: int, patch: int, grid: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under DINO's vision_transformer.py parameter names (qkv_bias=True, mlp_ratio 4)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    s = {"cls_token": r(1, 1, width, scale=0.5), "pos_embed": r(1, grid * grid + 1, width, scale=0.5),
         "patch_embed.proj.weight": r(width, 3, patch, patch, scale=0.2), "patch_embed.proj.bias": r(width)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
                  b + "attn.qkv.weight": r(3 * width, width, scale=0.3), b + "attn.qkv.bias": r(3 * width),
                  b + "attn.proj.weight": r(width, width, scale=0.2), b + "attn.proj.bias": r(width),
                  b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
                  b + "mlp.fc1.weight": r(4 * width, width, scale=0.2), b + "mlp.fc1.bias": r(4 * width),
                  b + "mlp.fc2.weight": r(width, 4 * width, scale=0.1), b + "mlp.fc2.bias": r(width)})
    s.update({"norm.weight": 1 + r(width), "norm.bias": r(width)})
    return s


def reference_patch_tokens(s: dict[str, torch.Tensor], img: torch.Tensor, patch: int, heads: int) -> torch.Tensor:
    """DINO forward (prepare_tokens → blocks → norm) on an ImageNet-normalised image: B x D x h x w."""
    x = (img - MEAN) / STD
    b, _, hh, ww = x.shape
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([s["cls_token"].expand(b, -1, -1), t], 1)
    pos, n, dim = s["pos_embed"], s["pos_embed"].shape[1] - 1, t.shape[-1]
    if not (t.shape[1] - 1 == n and hh == ww):  # DINO interpolate_pos_encoding
        h0, w0 = hh // patch + 0.1, ww // patch + 0.1
        pp = F.interpolate(pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
                           scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
        pos = torch.cat([pos[:, :1], pp.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)
    t = t + pos
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (dim,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"])
        qkv = qkv.reshape(b, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
        y = (attn @ qkv[2]).transpose(1, 2).reshape(b, -1, dim)
        t = t + F.linear(y, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        y = F.layer_norm(t, (dim,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
                     s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
        t = t + y
    t = F.layer_norm(t, (dim,), s["norm.weight"], s["norm.bias"], eps=1e-6)
    return t[:, 1:].reshape(b, hh // patch, ww // patch, dim).permute(0, 3, 1, 2)


def stego_head_state(width: int, dim: int, seed: int, nonlinear: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = {"cluster1.0.weight": torch.randn(dim, width, 1, 1, generator=g) * 0.1,
         "cluster1.0.bias": torch.randn(dim, generator=g) * 0.1}
    if nonlinear:
        s.update({"cluster2.0.weight": torch.randn(width, width, 1, 1, generator=g) * 0.1,
                  "cluster2.0.bias": torch.randn(width, generator=g) * 0.1,
                  "cluster2.2.weight": torch.randn(dim, width, 1, 1, generator=g) * 0.1,
                  "cluster2.2.bias": torch.randn(dim, generator=g) * 0.1})
    return s


def reference_code(h: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    """STEGO DinoFeaturizer: code = cluster1(f) (+ cluster2(f)); dropout is the identity at eval."""
    code = F.conv2d(f, h["cluster1.0.weight"], h["cluster1.0.bias"])
    if "cluster2.0.weight" in h:
        code = code + F.conv2d(F.relu(F.conv2d(f, h["cluster2.0.weight"], h["cluster2.0.bias"])),
                               h["cluster2.2.weight"], h["cluster2.2.bias"])
    return code


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    # the stored grid (square, no interpolation) and a non-square one (DINO's bicubic resize)
    return [torch.rand(2, 3, 32, 32, generator=g), torch.rand(1, 3, 40, 56, generator=g)]


def _stego_ckpt(path: Path, cfg: dict, width: int = 48, dim: int = 20, nonlinear: bool = True) -> dict:
    omegaconf = pytest.importorskip("omegaconf", reason="building a real STEGO .ckpt needs omegaconf")
    vit = dino_vit_state(width, depth=2, patch=8, grid=4, seed=0)
    head = stego_head_state(width, dim, seed=1, nonlinear=nonlinear)
    state = {f"net.model.{k}": v for k, v in vit.items()}
    state.update({f"net.{k}": v for k, v in head.items()})
    # LitUnsupervisedSegmenter's other modules (probes, decoder), as save_hyperparameters + Lightning store them
    state.update({"train_cluster_probe.clusters": torch.randn(27, dim), "cluster_probe.clusters": torch.randn(27, dim),
                  "linear_probe.weight": torch.randn(27, dim, 1, 1), "linear_probe.bias": torch.randn(27),
                  "decoder.weight": torch.randn(width, dim, 1, 1), "decoder.bias": torch.randn(width)})
    torch.save({"epoch": 3, "global_step": 7000, "pytorch-lightning_version": "1.4.9", "state_dict": state,
                "callbacks": {}, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 5e-4}]}],
                "lr_schedulers": [], "hparams_name": "kwargs",
                "hyper_parameters": {"n_classes": 27, "cfg": omegaconf.OmegaConf.create(cfg)}}, path)
    return {"vit": vit, "head": head}


STEGO_CFG = {"output_root": "../", "arch": "dino", "model_type": "vit_small", "dino_patch_size": 8,
             "dino_feat_type": "feat", "projection_type": "nonlinear", "continuous": True, "dim": 20,
             "dropout": True, "pretrained_weights": None, "extra_clusters": 0}


@pytest.mark.parametrize("projection", ["nonlinear", "linear"])
def test_stego_lightning_ckpt(tmp_path: Path, projection: str) -> None:
    w = _stego_ckpt(tmp_path / "stego.ckpt", {**STEGO_CFG, "projection_type": projection},
                    nonlinear=projection == "nonlinear")
    out = import_uss(tmp_path / "stego.ckpt", tmp_path / "imported.pt", source="stego")
    feats = FEATURES.get("stego", checkpoint=str(out))
    assert feats.dim == 20 and feats.stride == 8
    for img in _images():
        ref = reference_code(w["head"], reference_patch_tokens(w["vit"], img, 8, heads=6))
        torch.testing.assert_close(feats(img), ref, atol=2e-5, rtol=1e-4)
    model = load_stego_checkpoint(out)
    assert (model.head.nonlinear is None) == (projection == "linear")


def test_stego_refuses_kk_and_checks_the_config(tmp_path: Path) -> None:
    _stego_ckpt(tmp_path / "kk.ckpt", {**STEGO_CFG, "dino_feat_type": "KK"})
    with pytest.raises(ValueError, match=r"kk.ckpt: dino_feat_type 'KK' cannot be imported.*keys of the last attention"):
        import_uss(tmp_path / "kk.ckpt", tmp_path / "o.pt", source="stego")
    _stego_ckpt(tmp_path / "p16.ckpt", {**STEGO_CFG, "dino_patch_size": 16})
    with pytest.raises(ValueError, match=r"p16.ckpt: config says dino_patch_size 16.*patch 8"):
        import_uss(tmp_path / "p16.ckpt", tmp_path / "o.pt", source="stego")
    _stego_ckpt(tmp_path / "dim.ckpt", {**STEGO_CFG, "dim": 70})
    with pytest.raises(ValueError, match=r"dim.ckpt: cluster1 has 20 outputs.*dim 70"):
        import_uss(tmp_path / "dim.ckpt", tmp_path / "o.pt", source="stego")
    torch.save({"net_model_state_dict": {}}, tmp_path / "hp.pth")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        import_uss(tmp_path / "hp.pth", tmp_path / "o.pt", source="stego")


def test_hp_ckpt_pth(tmp_path: Path) -> None:
    vit = dino_vit_state(48, depth=2, patch=8, grid=4, seed=3)
    head = stego_head_state(48, 256, seed=4)
    ema = {k.replace("cluster1", "ema_model1").replace("cluster2", "ema_model2"): v * 0 for k, v in head.items()}
    net = {**{f"model.{k}": v for k, v in vit.items()}, **head, **ema}
    # HP utils/common_utils.py save_checkpoint(..., model_only=True)
    torch.save({"epoch": 2, "iter": 900, "best_epoch": 2, "best_iter": 900, "net_model_state_dict": net,
                "net_optimizer_state_dict": None, "linear_model_state_dict": {"weight": torch.randn(27, 256, 1, 1)},
                "linear_optimizer_state_dict": None, "cluster_model_state_dict": {"clusters": torch.randn(27, 256)},
                "cluster_optimizer_state_dict": None, "best": 1.23}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="48-wide ViT.*--num-heads"):
        import_uss(tmp_path / "ckpt.pth", tmp_path / "o.pt", source="hp")
    out = import_uss(tmp_path / "ckpt.pth", tmp_path / "hp.pt", source="hp", num_heads=6)
    feats = FEATURES.get("stego", checkpoint=str(out))
    assert feats.dim == 256
    for img in _images():
        ref = reference_code(head, reference_patch_tokens(vit, img, 8, heads=6))
        torch.testing.assert_close(feats(img), ref, atol=2e-5, rtol=1e-4)


def test_leopart_ckpt_patch_tokens(tmp_path: Path) -> None:
    vit = dino_vit_state(48, depth=2, patch=16, grid=3, seed=5)
    proj = {"projection_head.0.weight": torch.randn(64, 48), "projection_head.0.bias": torch.randn(64),
            "projection_head.2.weight": torch.randn(64, 64), "projection_head.2.bias": torch.randn(64),
            "projection_head.4.weight": torch.randn(32, 64), "projection_head.4.bias": torch.randn(32),
            "prototypes.weight": torch.randn(100, 32)}
    # the released file: a flat state dict under a one-level prefix (the README strips k.split(".")[0])
    torch.save({f"model.{k}": v for k, v in {**vit, **proj}.items()}, tmp_path / "leopart_vits16.ckpt")
    out = import_uss(tmp_path / "leopart_vits16.ckpt", tmp_path / "leo.pt", source="leopart", num_heads=6)
    feats = FEATURES.get("stego", checkpoint=str(out))
    assert feats.dim == 48 and feats.stride == 16 and load_stego_checkpoint(out).head is None
    g = torch.Generator().manual_seed(9)
    for img in (torch.rand(1, 3, 48, 48, generator=g), torch.rand(2, 3, 64, 80, generator=g)):
        torch.testing.assert_close(feats(img), reference_patch_tokens(vit, img, 16, heads=6), atol=2e-5, rtol=1e-4)
    # a training checkpoint with student and teacher: the prefix must be chosen
    both = {**{f"model.{k}": v for k, v in vit.items()}, **{f"teacher.{k}": v for k, v in vit.items()}}
    torch.save({"state_dict": both, "epoch": 1}, tmp_path / "train.ckpt")
    with pytest.raises(ValueError, match=r"several prefixes \['model', 'teacher'\].*--prefix"):
        import_uss(tmp_path / "train.ckpt", tmp_path / "o.pt", source="leopart", num_heads=6)
    assert import_uss(tmp_path / "train.ckpt", tmp_path / "t.pt", source="leopart", num_heads=6, prefix="teacher")


def test_old_checkpoints_still_load(tmp_path: Path) -> None:
    """A mars_ray.stego/1 file (no head_kind) loads as linear + nonlinear head."""
    from mars_ray.models.stego import SegHead, StegoModel, save_stego_checkpoint
    from mars_ray.models.vit import vit_tiny_test

    model = StegoModel(vit_tiny_test(), SegHead(32, 8))
    save_stego_checkpoint(model, tmp_path / "new.pt", "vit_tiny_test")
    ckpt = torch.load(tmp_path / "new.pt", weights_only=True)
    ckpt["format"] = "mars_ray.stego/1"
    del ckpt["head_kind"]
    torch.save(ckpt, tmp_path / "old.pt")
    old = load_stego_checkpoint(tmp_path / "old.pt")
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(old(x), model.eval()(x))
