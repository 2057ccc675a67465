"""ResNet-50/101 backbones (Bottleneck) with torchvision's state-dict key names.

The module tree mirrors ``torchvision.models.resnet`` (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` …) so an ImageNet checkpoint saved by torchvision loads from a local
file or an object-store URI with :func:`load_imagenet_weights` (never downloaded). The classifier (``avgpool``/``fc``) is left out: a
segmentation backbone never uses it, and the loader drops ``fc.*`` from the file.

``output_stride`` 16 or 8 replaces the stride of ``layer4`` (and ``layer3``) by dilation, as
torchvision's ``replace_stride_with_dilation`` does. ``frozen_bn=True`` keeps every BatchNorm in
eval mode with its affine parameters frozen (the usual setting for small per-GPU batches).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from mars_ray.checkpoints import load_torch_file
from mars_ray.models.registry import BACKBONES
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

__all__ = ["Bottleneck", "ResNet", "load_imagenet_weights", "resnet50", "resnet101"]


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3×3 conv, "ResNet v1.5"); ``x [B,Cin,H,W] -> [B,4p,H/s,W/s]``."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_DILATE_FOR_OS = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


class ResNet(nn.Module):
    """ResNet trunk returning ``{"low": layer1 [B,256,H/4,W/4], "high": layer4 [B,2048,H/os,W/os]}``.

    Input is an already-normalised ``[B,3,H,W]`` float tensor. Attributes ``low_channels``,
    ``high_channels`` and ``output_stride`` describe the two outputs.
    """

    def __init__(self, layers: Sequence[int], *, output_stride: int = 32, frozen_bn: bool = False) -> None:
        super().__init__()
        if output_stride not in _DILATE_FOR_OS:
            raise ValueError(f"output_stride must be one of {sorted(_DILATE_FOR_OS)}, got {output_stride}")
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 block counts, got {list(layers)}")
        dilate = _DILATE_FOR_OS[output_stride]
        self.output_stride = output_stride
        self.frozen_bn = frozen_bn
        self.inplanes = 64
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=dilate[2])
        self.low_channels = 64 * Bottleneck.expansion
        self.high_channels = 512 * Bottleneck.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)
            self.train(self.training)

    def _make_layer(self, planes: int, blocks: int, *, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample: Optional[nn.Module] = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers: List[nn.Module] = [
            Bottleneck(self.inplanes, planes, stride=stride, dilation=previous_dilation, downsample=downsample)
        ]
        self.inplanes = planes * Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes, dilation=self.dilation))
        return nn.Sequential(*layers)

    def train(self, mode: bool = True) -> "ResNet":
        """Set train/eval mode; with ``frozen_bn`` every BatchNorm stays in eval mode."""
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``x [B,3,H,W]`` (normalised) → ``{"low": [B,256,H/4,W/4], "high": [B,2048,H/os,W/os]}``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return {"low": low, "high": high}


def load_imagenet_weights(model: ResNet, path: "str | AnyPath") -> ResNet:
    """Load a torchvision-layout ImageNet checkpoint from ``path`` (a local file or an object-store
    URI) into ``model`` (in place).

    Accepts a bare state dict or one wrapped under ``"state_dict"``/``"model"``; a ``module.``
    prefix (DDP) is stripped; ``fc.*`` is dropped; missing ``*.num_batches_tracked`` entries (old
    torchvision files predate them) are filled with zero. Raises ``FileNotFoundError`` when the file
    is absent and ``ValueError`` naming the file and the missing / unexpected keys and shape
    mismatches when it does not fit the architecture.
    """
    obj = load_torch_file(path, "ImageNet weights")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ValueError(f"ImageNet weights {path}: expected a state dict, got {type(obj).__name__}")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(own[k])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"ImageNet weights {path} do not match the {type(model).__name__} architecture: "
            f"missing keys {_head(missing)}; unexpected keys {_head(unexpected)}; "
            f"shape mismatches {_head(mismatched)}"
        )
    model.load_state_dict(state, strict=True)
    logger.info("loaded ImageNet weights from %s (%d tensors)", path, len(state))
    return model


def _head(items: List[str], n: int = 8) -> str:
    if not items:
        return "none"
    more = f" … (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _build(*, layers: Sequence[int], output_stride: int, frozen_bn: bool, pretrained: str | Path | None) -> ResNet:
    model = ResNet(layers, output_stride=output_stride, frozen_bn=frozen_bn)
    if pretrained is not None:
        load_imagenet_weights(model, pretrained)
    return model


@BACKBONES.register("resnet50")
def resnet50(*, output_stride: int = 32, frozen_bn: bool = False, pretrained: str | Path | None = None) -> ResNet:
    """ResNet-50 trunk; ``pretrained`` is a torchvision ImageNet checkpoint (path or URI)."""
    return _build(layers=(3, 4, 6, 3), output_stride=output_stride, frozen_bn=frozen_bn, pretrained=pretrained)


@BACKBONES.register("resnet101")
def resnet101(*, output_stride: int = 32, frozen_bn: bool = False, pretrained: str | Path | None = None) -> ResNet:
    """ResNet-101 trunk; ``pretrained`` is a torchvision ImageNet checkpoint (path or URI)."""
    return _build(layers=(3, 4, 23, 3), output_stride=output_stride, frozen_bn=frozen_bn, pretrained=pretrained)
