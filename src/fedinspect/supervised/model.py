"""The supervised detector's network: a pretrained trunk cut in two, global average pooling, one logit.

The trunk of a pretrained backbone (:mod:`fedinspect.classification.models`) is split into *units*
(EfficientNet-Lite: the stem, each MBConv block, the 1x1 head convolution; ResNet-50: the stem and each
bottleneck). The first units are frozen (ImageNet weights, no gradient), the last ``trainable_blocks`` are
fine-tuned, and the classifier is dropout + ``Linear(C, 1)`` on the pooled features: the seed's "fully
connected layers replaced" by a binary head. Every BatchNorm keeps its ImageNet running statistics (eval
mode even while training): CPU batches of a few images are too small to estimate them.

Because the head is linear on globally averaged features, the class-activation map (Zhou et al., CVPR 2016)
is exact and cheap: ``cam[y, x] = w . A[:, y, x] + b`` on the last feature map A, whose mean over the grid
is the image's logit. Grad-CAM (Selvaraju et al., ICCV 2017) on that layer gives the same map up to a
positive factor (its channel weights are ``w / (h * w)``), so it is not computed separately.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "resnet50")
"""Backbones of the supervised detector; ``resnet50`` (the seed's) needs torchvision's ImageNet weights locally."""
STRIDE = 32
"""Coarsest stride of every backbone: letterboxed images are padded to a multiple of it."""


class _LiteStem(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _LiteBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=None)


class _LiteHead(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = net._conv_head, net._bn1, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def trunk_units(trunk: nn.Module) -> list[nn.Module]:
    """The trunk as a list of modules applied in order (see the module docstring)."""
    if hasattr(trunk, "net") and hasattr(trunk.net, "_blocks"):  # EfficientNet-Lite
        net = trunk.net
        return [_LiteStem(net), *[_LiteBlock(block) for block in net._blocks], _LiteHead(net)]
    if all(hasattr(trunk, name) for name in ("conv1", "layer1", "layer4")):  # ResNet
        stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        return [stem, *[block for name in ("layer1", "layer2", "layer3", "layer4")
                        for block in getattr(trunk, name)]]
    raise ValueError(f"no known way to cut a {type(trunk).__name__} trunk into units")


def load_pretrained_backbone(backbone: str, weights: str | Path | None = None, pretrained: bool = True) -> nn.Module:
    """The :class:`~fedinspect.classification.models.PooledBackbone` of ``backbone``.

    ``pretrained=False`` builds the architecture only where that needs no file (ResNet-50: a saved
    detector holds all its weights, so loading one never needs the user's ImageNet file); the
    EfficientNet-Lite weights ship with their package and are always read.
    """
    from fedinspect.classification.models import PooledBackbone, efficientnet_lite_backbone

    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    if backbone.startswith("efficientnet_lite"):
        return efficientnet_lite_backbone(backbone.removeprefix("efficientnet_"), weights)
    from fedinspect.classification import torchvision_nets

    if pretrained:
        return torchvision_nets.resnet50_backbone(weights)
    from fedinspect.backbones.wide_resnet import IMAGENET_MEAN, IMAGENET_STD

    return PooledBackbone(torchvision_nets.ResNet50Trunk(), 2048, IMAGENET_MEAN, IMAGENET_STD, "resnet50")


class SupervisedNet(nn.Module):
    """Frozen units -> trainable units -> global average pooling -> dropout -> one "defective" logit."""

    def __init__(self, backbone: nn.Module, trainable_blocks: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        units = trunk_units(backbone.trunk)
        if not 1 <= trainable_blocks < len(units):
            raise ValueError(f"trainable_blocks must be in 1..{len(units) - 1} for {backbone.name}, "
                             f"got {trainable_blocks}")
        self.frozen = nn.Sequential(*units[:-trainable_blocks])
        self.trainable = nn.Sequential(*units[-trainable_blocks:])
        self.register_buffer("mean", backbone.mean.clone(), persistent=False)
        self.register_buffer("std", backbone.std.clone(), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.out_features, 1)
        for parameter in self.frozen.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> SupervisedNet:
        """As nn.Module.train, but every BatchNorm and the frozen units stay in eval mode."""
        super().train(mode)
        self.frozen.eval()
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """Output of the frozen units for float (N, 3, H, W) images in [0, 1] (no gradient)."""
        with torch.no_grad():
            return self.frozen((images - self.mean) / self.std)

    def logits(self, frozen: torch.Tensor) -> torch.Tensor:
        """(N,) logits of "defective" from frozen features."""
        pooled = self.trainable(frozen).mean(dim=(2, 3))
        return self.head(self.dropout(pooled)).squeeze(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.frozen_features(images))

    def class_activation_maps(self, frozen: torch.Tensor) -> torch.Tensor:
        """(N, h, w) CAM on the last feature grid, in logit units: its mean over the grid is the logit."""
        maps = self.trainable(frozen)
        return torch.einsum("c,nchw->nhw", self.head.weight[0], maps) + self.head.bias[0]


def build_network(backbone: str, weights: str | Path | None, trainable_blocks: int, dropout: float,
                  pretrained: bool = True) -> SupervisedNet:
    """A :class:`SupervisedNet` on ``backbone`` (ImageNet weights when ``pretrained``), head initialised."""
    return SupervisedNet(load_pretrained_backbone(backbone, weights, pretrained), trainable_blocks, dropout)

