"""ResNet-50 and MobileNetV2, the seed's own backbones, with torchvision's parameter names.

torchvision is not a dependency and nothing is downloaded: the architectures are written out here
and the ImageNet weights must already be on the local disk (torchvision's files in the torch hub
cache, ``$FEDINSPECT_WEIGHTS_DIR``, an explicit ``--weights`` file, or timm's ``resnet50.tv_in1k``
in the Hugging Face cache). Otherwise :class:`~fedinspect.errors.WeightsNotFoundError` lists every
place searched. The EfficientNet-Lite models (``large``, ``mobile``) are the offline default.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedinspect.backbones.weights import WeightsSpec, load_state_dict_file, locate_weights
from fedinspect.backbones.wide_resnet import IMAGENET_MEAN, IMAGENET_STD, Bottleneck
from fedinspect.classification.models import PooledBackbone
from fedinspect.errors import ModelFileError

RESNET50_WEIGHTS = WeightsSpec(
    backbone="resnet50",
    file_names=("resnet50.safetensors", "resnet50.pth"),
    torch_hub_files=("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
    hf_repos=("timm/resnet50.tv_in1k",),
    urls={"resnet50-0676ba61.pth": "https://download.pytorch.org/models/resnet50-0676ba61.pth"},
)
MOBILENET_V2_WEIGHTS = WeightsSpec(
    backbone="mobilenet_v2",
    file_names=("mobilenet_v2.safetensors", "mobilenet_v2.pth"),
    torch_hub_files=("mobilenet_v2-b0353104.pth", "mobilenet_v2-7ebf99e0.pth"),
    urls={"mobilenet_v2-b0353104.pth": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"},
)


class ResNet50Trunk(nn.Module):
    """torchvision's ResNet-50 (v1.5) without ``avgpool`` / ``fc``; output 2048 channels at stride 32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
            layer = [Bottleneck(inplanes, planes, stride)]
            layer += [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
            inplanes = planes * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block (``conv`` holds expand, depthwise, linear projection, BN)."""

    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        layers: list[nn.Module] = [] if expand_ratio == 1 else [_conv_bn_relu6(inp, hidden, kernel=1)]
        layers += [_conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Trunk(nn.Module):
    """torchvision's MobileNetV2 ``features`` (width 1.0); output 1280 channels at stride 32."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, stride=2)]
        inp = 32
        for expand, out, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(inp, out, stride if i == 0 else 1, expand))
                inp = out
        layers.append(_conv_bn_relu6(inp, 1280, kernel=1))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _load(trunk: nn.Module, path: Path, name: str, ignored: tuple[str, ...]) -> None:
    state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(ignored)}
    own = trunk.state_dict()
    state.update({k: own[k] for k in own if k.endswith("num_batches_tracked") and k not in state})
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: not a torchvision {name} state dict: {error}") from error


def resnet50_backbone(weights: str | Path | None = None) -> PooledBackbone:
    """ResNet-50 with torchvision's ImageNet weights found locally (2048 pooled features)."""
    path = locate_weights(RESNET50_WEIGHTS, weights)
    trunk = ResNet50Trunk()
    _load(trunk, path, "resnet50", ("fc.",))
    return PooledBackbone(trunk, 2048, IMAGENET_MEAN, IMAGENET_STD, "resnet50")


def mobilenet_v2_backbone(weights: str | Path | None = None) -> PooledBackbone:
    """MobileNetV2 with torchvision's ImageNet weights found locally (1280 pooled features)."""
    path = locate_weights(MOBILENET_V2_WEIGHTS, weights)
    trunk = MobileNetV2Trunk()
    _load(trunk, path, "mobilenet_v2", ("classifier.",))
    return PooledBackbone(trunk, 1280, IMAGENET_MEAN, IMAGENET_STD, "mobilenet_v2")
