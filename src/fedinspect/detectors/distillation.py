"""What the teacher-student detectors (STFPM, reverse distillation) share: the teacher and the map.

Both compare a frozen, pretrained teacher's feature maps at a few scales with those of a network
trained on good images only; where they disagree the image is unusual. This module builds the teacher
(and checks the backbone settings, as SettingsError, before anything is trained) and turns per-scale
distance maps into one map at the input's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedinspect.backbones import FeatureExtractor, available_backbones, get_backbone, untrained_backbone
from fedinspect.errors import FedinspectError, SettingsError

THREE_SCALES: dict[str, tuple[str, ...]] = {
    # strides 4, 8 and 16: the scales of ResNet's layer1..layer3 that both papers distil
    "efficientnet_lite0": ("stride4", "stride8", "stride16"),
    "efficientnet_lite2": ("stride4", "stride8", "stride16"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
}


def check_backbone_settings(backbone: Any, layers: Any, weights: Any) -> tuple[str, tuple[str, ...]]:
    """The backbone name and its layers (default: :data:`THREE_SCALES`), or SettingsError naming the fault.

    The layer names are checked against the backbone's architecture, built untrained (the global torch
    random state is left as it was).
    """
    if not isinstance(backbone, str) or backbone not in available_backbones():
        raise SettingsError(f"backbone must be one of {', '.join(available_backbones())}, got {backbone!r}")
    if weights is not None and not isinstance(weights, str | Path):
        raise SettingsError(f"weights must be a file path or None, got {weights!r}")
    if layers is None:
        if backbone not in THREE_SCALES:
            raise SettingsError(f"backbone {backbone}: no default layers, give layers explicitly")
        return backbone, THREE_SCALES[backbone]
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers \
            or not all(isinstance(layer, str) for layer in layers):
        raise SettingsError(f"layers must be a non-empty list of layer names, got {layers!r}")
    with torch.random.fork_rng():
        try:
            untrained_backbone(backbone, layers)
        except ValueError as error:
            raise SettingsError(f"layers: {error}") from error
    return backbone, tuple(layers)


def build_teacher(backbone: str, layers: Sequence[str], weights: str | Path | None) -> FeatureExtractor:
    """The frozen, pretrained teacher (ImageNet weights; ``weights`` = a local file, None = the default).

    Its BatchNorm layers are folded into the convolutions: same maps, ~30% faster, and the teacher is
    never trained nor saved (its weight file's hash is).
    """
    try:
        return get_backbone(backbone, weights=weights, layers=layers).fuse_batchnorm()
    except FedinspectError:
        raise
    except ValueError as error:
        raise SettingsError(str(error)) from error


def combine_maps(maps: Sequence[torch.Tensor], size: tuple[int, int], how: str) -> torch.Tensor:
    """Per-scale maps (B, h_i, w_i) upsampled bilinearly to ``size`` and multiplied or added: (B, H, W)."""
    upsampled = [F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0] for m in maps]
    result = upsampled[0]
    for m in upsampled[1:]:
        result = result * m if how == "product" else result + m
    return result
