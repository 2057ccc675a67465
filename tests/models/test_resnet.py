from pathlib import Path

import pytest
import torch
from torch import nn

from mars_ray.models.registry import BACKBONES
from mars_ray.models.resnet import ResNet, load_imagenet_weights, resnet50, resnet101

# A handful of torchvision resnet50 state-dict keys (torchvision.models.resnet50().state_dict()).
TORCHVISION_KEYS = [
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "bn1.num_batches_tracked",
    "layer1.0.conv1.weight",
    "layer1.0.bn3.running_var",
    "layer1.0.downsample.0.weight",
    "layer1.0.downsample.1.weight",
    "layer2.3.conv2.weight",
    "layer3.5.bn2.bias",
    "layer4.0.downsample.1.running_mean",
    "layer4.2.conv3.weight",
]



def _small() -> ResNet:
    """Same module tree as resnet50 with one block per stage: a cheap stand-in for file round trips."""
    return ResNet((1, 1, 1, 1))


def _torchvision_file(model: ResNet, path: Path, **change: torch.Tensor) -> Path:
    state = dict(model.state_dict())
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["fc.bias"] = torch.zeros(1000)
    state.update(change)
    torch.save(state, path)
    return path


def test_resnet50_keys_match_torchvision() -> None:
    with torch.device("meta"):
        m = resnet50()
    keys = list(m.state_dict())
    for k in TORCHVISION_KEYS:
        assert k in keys
    assert not any(k.startswith(("fc.", "avgpool")) for k in keys)
    # torchvision's resnet50 has 320 entries: these 318 + fc.weight + fc.bias
    assert len(keys) + 2 == 320
    # stride on the 3x3 conv (v1.5) and the downsample shapes, as torchvision has them
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)
    assert tuple(m.layer4[0].downsample[0].weight.shape) == (2048, 1024, 1, 1)


def test_resnet101_has_23_blocks_in_layer3() -> None:
    with torch.device("meta"):
        keys = resnet101().state_dict()
    assert "layer3.22.conv3.weight" in keys and "layer3.23.conv1.weight" not in keys


def test_registry_entries() -> None:
    assert {"resnet50", "resnet101"} <= set(BACKBONES.names())
    with torch.device("meta"):
        m = BACKBONES.get("resnet50", output_stride=16)
    assert m.output_stride == 16


def test_weights_round_trip(tmp_path: Path) -> None:
    src = _small()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
        src.bn1.running_mean.uniform_()
    path = _torchvision_file(src, tmp_path / "imagenet.pth")
    dst = load_imagenet_weights(_small(), path)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_old_files_without_num_batches_tracked_and_wrapped(tmp_path: Path) -> None:
    """A DDP-prefixed state dict under ``state_dict`` without the BN counters loads to the same network."""
    src = _small()
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    state = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"state_dict": state}, path)
    dst = load_imagenet_weights(_small(), path)
    for k, v in src.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert int(dst.state_dict()[k]) == 0, k  # filled in, not taken from the file
        else:
            assert torch.equal(dst.state_dict()[k], v), k
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = src.eval()(x), dst.eval()(x)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_mismatch_names_file_and_keys(tmp_path: Path) -> None:
    src = _small()
    state = dict(src.state_dict())
    del state["layer1.0.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as e:
        load_imagenet_weights(_small(), path)
    msg = str(e.value)
    assert "bad.pth" in msg
    assert "layer1.0.conv2.weight" in msg
    assert "layer5.0.conv1.weight" in msg
    assert "conv1.weight: file (64, 3, 3, 3) vs model (64, 3, 7, 7)" in msg


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_imagenet_weights(_small(), tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_imagenet_weights(_small(), junk)


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_output_shapes(output_stride: int) -> None:
    m = ResNet((1, 1, 1, 1), output_stride=output_stride).eval()  # resnet50's strides, one block per stage
    with torch.no_grad():
        out = m(torch.rand(1, 3, 64, 64))
    assert out["low"].shape == (1, 256, 16, 16)
    s = 64 // output_stride
    assert out["high"].shape == (1, 2048, s, s)
    with torch.device("meta"):
        m50 = resnet50(output_stride=output_stride)
        out50 = m50(torch.empty(1, 3, 64, 64))
    assert out50["high"].shape == (1, 2048, s, s)
    # torchvision's replace_stride_with_dilation: the first block of a dilated stage keeps the previous
    # dilation with stride 1, the later blocks use the new dilation
    first, later = {32: (1, 1), 16: (1, 2), 8: (2, 4)}[output_stride]
    assert m50.layer4[0].conv2.dilation == (first, first) and m50.layer4[1].conv2.dilation == (later, later)
    assert m50.layer4[0].conv2.stride == ((2, 2) if output_stride == 32 else (1, 1))


def test_resnet101_shapes_on_meta() -> None:
    with torch.device("meta"):
        out = resnet101(output_stride=8)(torch.empty(2, 3, 96, 64))
    assert out["low"].shape == (2, 256, 24, 16)
    assert out["high"].shape == (2, 2048, 12, 8)


def test_bad_output_stride() -> None:
    with pytest.raises(ValueError, match="output_stride"):
        ResNet((1, 1, 1, 1), output_stride=4)


def test_frozen_bn_stays_eval_and_fixed() -> None:
    m = ResNet((1, 1, 1, 1), frozen_bn=True)
    m.train()
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert bns and all(not b.training for b in bns)
    assert all(not p.requires_grad for b in bns for p in b.parameters())
    assert m.conv1.weight.requires_grad
    before = m.bn1.running_mean.clone()
    m(torch.rand(2, 3, 32, 32))
    assert torch.equal(before, m.bn1.running_mean)


def test_weights_from_object_store_name_the_uri(s3_bucket: str) -> None:
    """The URI goes through the same reader as a local file (a full round trip is tested on deeplab_tiny:
    ResNet weights are tens of MB, slow to push through the test S3 server)."""
    from mars_ray.storage import upath

    upath(f"{s3_bucket}/w/junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"ImageNet weights s3://.*/junk\.pth: cannot be read"):
        load_imagenet_weights(_small(), f"{s3_bucket}/w/junk.pth")
    with pytest.raises(FileNotFoundError, match=r"s3://.*/nope\.pth: no such file"):
        load_imagenet_weights(_small(), f"{s3_bucket}/w/nope.pth")
