"""DeepLabV3+ segmenters: ResNet-50/101 presets (ResNet-101 is the paper's) and ``deeplab_tiny`` for CPU demos.

Every segmenter takes ``x [B,3,H,W]`` float in ``[0,1]`` (ImageNet-normalised inside) and returns
``logits [B,num_classes,H,W]`` where ``num_classes`` counts the background. ``param_groups(lr)``
gives the decoder/ASPP head 10× the backbone learning rate.

Presets are one-line builders over :func:`_build`; checkpoints written by
:func:`save_segmenter_checkpoint` carry the preset name and its kwargs so
:func:`load_segmenter_checkpoint` rebuilds the same network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mars_ray.checkpoints import load_torch_file, save_torch_file
from mars_ray.models.registry import SEGMENTERS
from mars_ray.models.resnet import ResNet, load_imagenet_weights
from mars_ray.storage import AnyPath

logger = logging.getLogger(__name__)

__all__ = [
    "ASPP",
    "DeepLabV3Plus",
    "TinyBackbone",
    "deeplab_tiny",
    "deeplabv3plus_resnet50",
    "deeplabv3plus_resnet101",
    "load_segmenter_checkpoint",
    "save_segmenter_checkpoint",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "mars_ray.segmenter/1"


def _conv_bn_relu(cin: int, cout: int, k: int = 3, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``[B,Cin,h,w] -> [B,C,h,w]``.

    Branches: 1×1 conv, one 3×3 conv per rate, image pooling; concatenated and projected by a
    1×1 conv. The pooling branch has no BatchNorm (a 1×1 map with batch 1 cannot be normalised in
    training), so a DDP worker may train with one image per step.
    """

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            _conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 1), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outs, dim=1))


class TinyBackbone(nn.Module):
    """A seven-conv trunk for CPU demos: ``[B,3,H,W] -> {"low": [B,32,H/4,W/4], "high": [B,128,H/os,W/os]}``."""

    def __init__(self, *, output_stride: int = 8, width: int = 32) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"deeplab_tiny output_stride must be 8 or 16, got {output_stride}")
        self.output_stride = output_stride
        self.low_channels = width
        self.high_channels = 4 * width
        d3 = 2 if output_stride == 8 else 1
        self.stem = nn.Sequential(
            _conv_bn_relu(3, width // 2, stride=2), _conv_bn_relu(width // 2, width, stride=2), _conv_bn_relu(width, width)
        )
        self.stage2 = nn.Sequential(_conv_bn_relu(width, 2 * width, stride=2), _conv_bn_relu(2 * width, 2 * width))
        self.stage3 = nn.Sequential(
            _conv_bn_relu(2 * width, 4 * width, stride=1 if output_stride == 8 else 2, dilation=d3),
            _conv_bn_relu(4 * width, 4 * width, dilation=d3),
        )

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        low = self.stem(x)
        return {"low": low, "high": self.stage3(self.stage2(low))}


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ over a backbone returning ``{"low", "high"}``; ``x [B,3,H,W] in [0,1] -> logits [B,K,H,W]``.

    Decoder: ASPP on the high-level map, upsampled to the low-level (stride 4) map, concatenated with
    its ``low_proj_channels`` (48) projection, two 3×3 conv-BN-ReLU, a 1×1 classifier, bilinear
    upsampling to the input size.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        aspp_rates: Sequence[int],
        aspp_channels: int = 256,
        low_proj_channels: int = 48,
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.aspp = ASPP(backbone.high_channels, aspp_rates, aspp_channels)
        self.low_proj = _conv_bn_relu(backbone.low_channels, low_proj_channels, 1)
        self.decoder = nn.Sequential(
            _conv_bn_relu(aspp_channels + low_proj_channels, decoder_channels),
            _conv_bn_relu(decoder_channels, decoder_channels),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B,3,H,W]`` float in [0,1] → ``logits [B,num_classes,H,W]``."""
        size = x.shape[-2:]
        feats = self.backbone((x - self.mean) / self.std)
        low = self.low_proj(feats["low"])
        high = F.interpolate(self.aspp(feats["high"]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(self.decoder(torch.cat([high, low], dim=1)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def param_groups(self, lr: float) -> List[Dict[str, Any]]:
        """Optimiser groups: backbone at ``lr``, ASPP + decoder + classifier at ``10 * lr`` (trainable params only)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [
            {"params": backbone, "lr": lr, "name": "backbone"},
            {"params": head, "lr": 10 * lr, "name": "head"},
        ]


def _build(
    *,
    backbone: nn.Module,
    num_classes: int,
    aspp_rates: Sequence[int],
    aspp_channels: int = 256,
    decoder_channels: int = 256,
    pretrained_backbone: str | Path | None = None,
) -> DeepLabV3Plus:
    if pretrained_backbone is not None:
        if not isinstance(backbone, ResNet):
            raise ValueError(f"pretrained_backbone={pretrained_backbone!r}: only ResNet backbones take ImageNet weights")
        load_imagenet_weights(backbone, pretrained_backbone)
    return DeepLabV3Plus(
        backbone,
        num_classes=num_classes,
        aspp_rates=aspp_rates,
        aspp_channels=aspp_channels,
        decoder_channels=decoder_channels,
    )


def _resnet_rates(output_stride: int) -> Tuple[int, int, int]:
    if output_stride not in (8, 16):
        raise ValueError(f"DeepLabV3+ output_stride must be 8 or 16, got {output_stride}")
    return (6, 12, 18) if output_stride == 16 else (12, 24, 36)


@SEGMENTERS.register("deeplabv3plus_resnet50")
def deeplabv3plus_resnet50(
    *, num_classes: int, output_stride: int = 16, pretrained_backbone: str | None = None, frozen_bn: bool = False
) -> DeepLabV3Plus:
    """DeepLabV3+ / ResNet-50; ``pretrained_backbone`` is a torchvision ImageNet checkpoint (path or URI)."""
    return _build(
        backbone=ResNet((3, 4, 6, 3), output_stride=output_stride, frozen_bn=frozen_bn),
        num_classes=num_classes,
        aspp_rates=_resnet_rates(output_stride),
        pretrained_backbone=pretrained_backbone,
    )


@SEGMENTERS.register("deeplabv3plus_resnet101")
def deeplabv3plus_resnet101(
    *, num_classes: int, output_stride: int = 16, pretrained_backbone: str | None = None, frozen_bn: bool = False
) -> DeepLabV3Plus:
    """DeepLabV3+ / ResNet-101 (the MARS paper's segmenter); ``pretrained_backbone`` as above."""
    return _build(
        backbone=ResNet((3, 4, 23, 3), output_stride=output_stride, frozen_bn=frozen_bn),
        num_classes=num_classes,
        aspp_rates=_resnet_rates(output_stride),
        pretrained_backbone=pretrained_backbone,
    )


@SEGMENTERS.register("deeplab_tiny")
def deeplab_tiny(*, num_classes: int, output_stride: int = 8, pretrained_backbone: str | None = None) -> DeepLabV3Plus:
    """DeepLabV3+ over :class:`TinyBackbone` (~0.6M params; 64–128 px images); ASPP rates (2,4,6) at OS 8, (1,2,3) at 16."""
    return _build(
        backbone=TinyBackbone(output_stride=output_stride),
        num_classes=num_classes,
        aspp_rates=(2, 4, 6) if output_stride == 8 else (1, 2, 3),
        aspp_channels=64,
        decoder_channels=64,
        pretrained_backbone=pretrained_backbone,
    )


# --------------------------------------------------------------------------------------------- checkpoints


def save_segmenter_checkpoint(
    path: AnyPath, model: nn.Module, name: str, kwargs: Dict[str, Any],
    extra: Optional[Dict[str, Any]] = None,
) -> AnyPath:
    """Write ``{format, name, kwargs, state_dict, extra}`` to ``path`` atomically (tmp file + rename;
    one upload when ``path`` is an object-store URI, see ``mars_ray.storage``); returns the path.

    ``name`` is the SEGMENTERS preset and ``kwargs`` its build arguments (``pretrained_backbone`` is
    dropped: the weights are in the checkpoint). A DDP wrapper is unwrapped. ``extra`` must hold
    plain Python values or tensors (it is read back with ``weights_only=True``).
    """
    if name not in SEGMENTERS:
        raise ValueError(f"checkpoint {path}: unknown segmenter {name!r}; known: {', '.join(SEGMENTERS.names())}")
    model = getattr(model, "module", model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "name": name,
        "kwargs": {k: v for k, v in kwargs.items() if k != "pretrained_backbone"},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    return save_torch_file(payload, path)


def load_segmenter_checkpoint(
    path: "str | AnyPath",
    *,
    expect_name: Optional[str] = None,
    expect_num_classes: Optional[int] = None,
    map_location: str | torch.device = "cpu",
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the segmenter saved at ``path`` → ``(model in eval mode, extra)``.

    ``path`` is a local file or an object-store URI (``mars_ray.storage``). Raises
    ``FileNotFoundError`` when ``path`` is absent and ``ValueError`` naming the file when it is not a
    segmenter checkpoint, was saved from another preset than ``expect_name``, or for another class
    count than ``expect_num_classes`` (background included).
    """
    ckpt = load_torch_file(path, "segmenter checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"segmenter checkpoint {path}: not written by save_segmenter_checkpoint ({CHECKPOINT_FORMAT})")
    name, kwargs = ckpt["name"], dict(ckpt["kwargs"])
    if expect_name is not None and name != expect_name:
        raise ValueError(f"segmenter checkpoint {path}: holds model {name!r}, expected {expect_name!r}")
    saved_classes = kwargs.get("num_classes")
    if expect_num_classes is not None and saved_classes != expect_num_classes:
        raise ValueError(
            f"segmenter checkpoint {path}: trained for num_classes={saved_classes} (incl. background), "
            f"expected {expect_num_classes}"
        )
    if name not in SEGMENTERS:
        raise ValueError(
            f"segmenter checkpoint {path}: model {name!r} is not registered (import its module first); "
            f"known: {', '.join(SEGMENTERS.names())}"
        )
    try:
        model = SEGMENTERS.get(name, **kwargs)
    except TypeError as e:
        raise ValueError(f"segmenter checkpoint {path}: {name!r} does not accept the saved kwargs {kwargs}: {e}") from e
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"segmenter checkpoint {path}: weights do not fit {name!r} with {kwargs}: {e}") from e
    model.eval()
    logger.info("loaded segmenter %s from %s", name, path)
    return model, dict(ckpt.get("extra", {}))
