from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mars_ray.models.deeplab import (
    _build,
    deeplab_tiny,
    deeplabv3plus_resnet50,
    load_segmenter_checkpoint,
    save_segmenter_checkpoint,
)
from mars_ray.models.registry import SEGMENTERS
from mars_ray.models.resnet import ResNet

DEEPLABS = ["deeplab_tiny", "deeplabv3plus_resnet50", "deeplabv3plus_resnet101"]



@pytest.mark.parametrize("name", DEEPLABS)
def test_forward_shape_and_param_groups(name: str) -> None:
    # the ResNet presets run on the meta device (shapes only, no compute); the tiny one for real
    device = torch.device("cpu" if name == "deeplab_tiny" else "meta")
    with device:
        model = SEGMENTERS.get(name, num_classes=5).eval()
        out = model(torch.rand(1, 3, 64, 48))
    assert out.shape == (1, 5, 64, 48)
    groups = model.param_groups(0.01)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}


@pytest.mark.parametrize("output_stride, rates", [(16, (6, 12, 18)), (8, (12, 24, 36))])
def test_resnet_aspp_rates_follow_output_stride(output_stride: int, rates: tuple) -> None:
    with torch.device("meta"):
        model = SEGMENTERS.get("deeplabv3plus_resnet50", num_classes=21, output_stride=output_stride)
    got = tuple(b[0].dilation[0] for b in model.aspp.branches[1:])
    assert got == rates
    assert model.low_proj[0].out_channels == 48


@pytest.mark.parametrize("output_stride", [8, 16])
def test_tiny_size_and_output_strides(output_stride: int) -> None:
    model = deeplab_tiny(num_classes=3, output_stride=output_stride)
    n = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n <= 1_000_000
    feats = model.backbone(torch.rand(2, 3, 64, 64))
    assert feats["low"].shape[-2:] == (16, 16)
    assert feats["high"].shape[-2:] == (64 // output_stride,) * 2
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3, 64, 64)  # train mode, batch 2


def test_batch_of_one_trains() -> None:
    """The ASPP pooling branch has no BatchNorm, so one image per worker step works."""
    model = deeplab_tiny(num_classes=3).train()
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_tiny_loss_drops_on_fixed_batch() -> None:
    torch.manual_seed(0)
    model = deeplab_tiny(num_classes=3).train()
    image = torch.rand(2, 3, 48, 48) * 0.2
    label = torch.zeros(2, 48, 48, dtype=torch.long)
    image[0, 0, 8:32, 8:32] += 0.8
    label[0, 8:32, 8:32] = 1
    image[1, 2, 16:44, 10:40] += 0.8
    label[1, 16:44, 10:40] = 2
    label[1, 0:4] = 255
    opt = torch.optim.SGD(model.param_groups(0.01), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(image), label, ignore_index=255)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_pretrained_backbone_loads_local_weights(tmp_path: Path) -> None:
    src = ResNet((1, 1, 1, 1))  # resnet50's module tree with one block per stage: a small file
    with torch.no_grad():
        src.conv1.weight.fill_(0.125)
    path = tmp_path / "resnet-imagenet.pth"
    torch.save(src.state_dict(), path)
    model = _build(backbone=ResNet((1, 1, 1, 1)), num_classes=3, aspp_rates=(6, 12, 18), pretrained_backbone=path)
    assert torch.all(model.backbone.conv1.weight == 0.125)
    with torch.device("meta"), pytest.raises(FileNotFoundError, match="absent.pth"):
        deeplabv3plus_resnet50(num_classes=3, pretrained_backbone=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="ResNet"):
        deeplab_tiny(num_classes=3, pretrained_backbone=str(path))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="output_stride"):
        deeplab_tiny(num_classes=3, output_stride=32)
    with pytest.raises(ValueError, match="num_classes"):
        deeplab_tiny(num_classes=1)


def test_checkpoint_round_trip_and_mismatches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = {"num_classes": 4, "output_stride": 16}
    model = SEGMENTERS.get("deeplab_tiny", **kwargs).eval()
    path = save_segmenter_checkpoint(tmp_path / "ck" / "seg.pt", model, "deeplab_tiny", kwargs, {"epoch": 3, "miou": 0.5})
    assert not list(path.parent.glob("*.tmp"))
    loaded, extra = load_segmenter_checkpoint(path, expect_name="deeplab_tiny", expect_num_classes=4)
    assert extra == {"epoch": 3, "miou": 0.5}
    assert not loaded.training
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    with pytest.raises(ValueError, match=r"seg\.pt.*num_classes=4.*expected 21"):
        load_segmenter_checkpoint(path, expect_num_classes=21)
    with pytest.raises(ValueError, match=r"seg\.pt.*'deeplab_tiny'.*deeplabv3plus_resnet101"):
        load_segmenter_checkpoint(path, expect_name="deeplabv3plus_resnet101")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_segmenter_checkpoint(tmp_path / "nope.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ValueError, match="other.pt"):
        load_segmenter_checkpoint(other)
    with pytest.raises(ValueError, match="unknown segmenter"):
        save_segmenter_checkpoint(tmp_path / "x.pt", model, "no_such_model", kwargs)


def test_checkpoint_round_trip_on_object_store(s3_bucket: str) -> None:
    from mars_ray.storage import upath

    kwargs = {"num_classes": 3}
    model = SEGMENTERS.get("deeplab_tiny", **kwargs).eval()
    path = save_segmenter_checkpoint(upath(f"{s3_bucket}/ck/seg.pt"), model, "deeplab_tiny", kwargs, {"epoch": 1})
    assert str(path) == f"{s3_bucket}/ck/seg.pt" and path.is_file()
    loaded, extra = load_segmenter_checkpoint(str(path), expect_num_classes=3)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert extra == {"epoch": 1} and torch.equal(model(x), loaded(x))
    with pytest.raises(ValueError, match=r"s3://.*/seg\.pt.*expected 21"):
        load_segmenter_checkpoint(path, expect_num_classes=21)
    with pytest.raises(FileNotFoundError, match=r"s3://.*/nope\.pt"):
        load_segmenter_checkpoint(f"{s3_bucket}/nope.pt")
