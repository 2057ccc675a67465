"""ViT in the DINO checkpoint format: presets, key names, save/load round trip, error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mars_ray.models.registry import BACKBONES
from mars_ray.models.vit import VisionTransformer, load_dino_checkpoint, save_dino_checkpoint
from mars_ray.storage import upath

PRESETS = {  # name: (patch, embed_dim, heads); depth 12, mlp 4x, 224 px grid in the DINO release
    "vit_small_8": (8, 384, 6),
    "vit_small_16": (16, 384, 6),
    "vit_base_8": (8, 768, 12),
    "vit_base_16": (16, 768, 12),
}


def dino_keys(patch: int, dim: int, depth: int = 12, grid: int = 224) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes of facebookresearch/dino ``vit_small``/``vit_base`` (head = Identity)."""
    n = (grid // patch) ** 2 + 1
    keys: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, n, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update({
            p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
            p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
            p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,),
        })
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return keys


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_keys_match_dino_release(name: str) -> None:
    patch, dim, heads = PRESETS[name]
    with torch.device("meta"):  # no memory for the real weights
        model = BACKBONES.get(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == dino_keys(patch, dim)
    assert model.stride == patch and model.dim == dim and model.blocks[0].attn.num_heads == heads


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (37, 50)])
def test_forward_shape_any_size(size: tuple[int, int]) -> None:
    model = BACKBONES.get("vit_tiny_test").eval()
    out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 32, -(-size[0] // 8), -(-size[1] // 8))
    assert torch.isfinite(out).all()


def _pair() -> tuple[VisionTransformer, VisionTransformer]:
    torch.manual_seed(0)
    a = BACKBONES.get("vit_tiny_test").eval()
    torch.manual_seed(1)
    b = BACKBONES.get("vit_tiny_test").eval()
    return a, b


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    a, b = _pair()
    x = torch.rand(1, 3, 48, 40)
    assert not torch.allclose(a(x), b(x))
    path = save_dino_checkpoint(a, tmp_path / "vit.pth")
    load_dino_checkpoint(b, path)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["teacher", "student", "model", "state_dict"])
def test_wrapped_and_prefixed_checkpoints_load(tmp_path: Path, wrap: str) -> None:
    a, b = _pair()
    prefix = "module.backbone." if wrap == "teacher" else "module."
    state = {prefix + k: v for k, v in a.state_dict().items()}
    state[prefix.replace("backbone.", "") + "head.mlp.0.weight"] = torch.zeros(4, 32)  # DINO projection head
    torch.save({wrap: state, "epoch": 3}, tmp_path / "full.pth")
    load_dino_checkpoint(b, tmp_path / "full.pth")
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_wrong_key_is_named(tmp_path: Path) -> None:
    a, b = _pair()
    state = a.state_dict()
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_dino_checkpoint(b, tmp_path / "bad.pth")
    msg = str(err.value)
    assert "bad.pth" in msg and "blocks.0.attn.qkv.weight" in msg and "qkv_renamed" in msg


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    small = VisionTransformer(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)
    wide = VisionTransformer(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=64)
    save_dino_checkpoint(wide, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"wide\.pth.*shape mismatches \[pos_embed \(1, 65, 32\)"):
        load_dino_checkpoint(small, tmp_path / "wide.pth")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    model = BACKBONES.get("vit_tiny_test")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_dino_checkpoint(model, tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_dino_checkpoint(model, tmp_path / "junk.pth")


def test_round_trip_on_object_store(s3_bucket: str) -> None:
    a, b = _pair()
    path = save_dino_checkpoint(a, upath(s3_bucket) / "dino" / "vit.pth")
    load_dino_checkpoint(b, str(path))
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"s3://.*/nope\.pth"):
        load_dino_checkpoint(b, f"{s3_bucket}/dino/nope.pth")
