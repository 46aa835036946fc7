"""WideResNet-50-2 up to layer3, with torchvision's ImageNet weights found on the local disk.

PatchCore's (and the seeds') choice: layer2 + layer3, 512 + 1024 = 1536 channels at strides 8 and
16. torchvision is not a dependency, so the architecture is written out here (torchvision's ResNet
v1.5: Bottleneck blocks, stride on the 3x3 convolution, width_per_group=128) with torchvision's
parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...). Those
names are also timm's, so ``timm/wide_resnet50_2.tv_in1k`` and ``.tv2_in1k`` load as they are.

Weights are looked up locally (see :mod:`fedinspect.backbones.weights`); there is no download and
no fallback to random weights. ``layer4.*`` and ``fc.*`` in the file are ignored; every parameter
and buffer of layers up to layer3 must be in the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedinspect.backbones.extractor import FeatureExtractor, LayerSpec
from fedinspect.backbones.registry import register_architecture, register_backbone
from fedinspect.backbones.weights import WeightsSpec, load_state_dict_file, locate_weights
from fedinspect.errors import ModelFileError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WIDE_RESNET50_2_WEIGHTS = WeightsSpec(
    backbone="wide_resnet50_2",
    file_names=("wide_resnet50_2.safetensors", "wide_resnet50_2.pth"),
    # V1 first: the weights PatchCore was published with (torchvision's pretrained=True).
    torch_hub_files=("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth"),
    hf_repos=("timm/wide_resnet50_2.tv_in1k", "timm/wide_resnet50_2.tv2_in1k"),
    urls={
        "wide_resnet50_2-95faca4d.pth": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
        "wide_resnet50_2-9ba9bcbe.pth": "https://download.pytorch.org/models/wide_resnet50_2-9ba9bcbe.pth",
    },
)

# Keys of the full torchvision network that the truncated one does not have.
_IGNORED_PREFIXES = ("layer4.", "fc.")


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int, width_per_group: int) -> nn.Sequential:
    layers = [Bottleneck(inplanes, planes, stride, width_per_group)]
    layers += [
        Bottleneck(planes * Bottleneck.expansion, planes, 1, width_per_group) for _ in range(blocks - 1)
    ]
    return nn.Sequential(*layers)


_LAYERS = {
    # name: (planes, blocks, stride of the layer, stride w.r.t. the input)
    "layer1": (64, 3, 1, 4),
    "layer2": (128, 4, 2, 8),
    "layer3": (256, 6, 2, 16),
}
DEFAULT_LAYERS = ("layer2", "layer3")


class WideResNetExtractor(FeatureExtractor):
    """WideResNet-50-2 stem and layer1..layer3 (as deep as the deepest requested layer)."""

    def __init__(
        self,
        *,
        name: str = "wide_resnet50_2",
        weights_path: Path | None,
        layers: Sequence[str] | None = None,
        width_per_group: int = 128,
    ) -> None:
        available = {
            k: LayerSpec(stride=s, channels=planes * Bottleneck.expansion)
            for k, (planes, _, _, s) in _LAYERS.items()
        }
        super().__init__(
            name=name,
            available_layers=available,
            layers=layers,
            default_layers=DEFAULT_LAYERS,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_path=weights_path,
        )
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        deepest = max(list(_LAYERS).index(k) for k in self.layers)
        self.stages: tuple[str, ...] = tuple(_LAYERS)[: deepest + 1]
        inplanes = 64
        for stage in self.stages:
            planes, blocks, stride, _ = _LAYERS[stage]
            self.add_module(stage, _make_layer(inplanes, planes, blocks, stride, width_per_group))
            inplanes = planes * Bottleneck.expansion
        self.freeze()

    def _extract(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for stage in self.stages:
            x = getattr(self, stage)(x)
            if stage in self.strides:
                out[stage] = x
        return {k: out[k] for k in self.layers}


def load_truncated_state(module: WideResNetExtractor, state: dict[str, torch.Tensor], path: Path) -> None:
    """Loads ``state`` (a full torchvision/timm state dict) into the truncated ``module``, strictly.

    Keys under ``layer4.`` / ``fc.``, and of stages the module did not build, are ignored. Every
    parameter and buffer of ``module`` must be in ``state`` with the right shape, except
    BatchNorm's ``num_batches_tracked`` (absent from old torchvision files; unused in eval mode).

    Raises:
        ModelFileError: naming the missing keys, unexpected keys or mismatched shapes.
    """
    own = module.state_dict()
    skipped = _IGNORED_PREFIXES + tuple(f"{s}." for s in _LAYERS if s not in module.stages)
    unexpected = [k for k in state if k not in own and not k.startswith(skipped)]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    shapes = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes, sep='; ')}")
    if problems:
        raise ModelFileError(f"{path}: not a wide_resnet50_2 state dict: " + " | ".join(problems))
    selected = {k: state[k] if k in state else own[k] for k in own}
    module.load_state_dict(selected, strict=True)


def _listing(items: list[str], limit: int = 20, sep: str = ", ") -> str:
    shown = sep.join(items[:limit])
    return shown if len(items) <= limit else f"{shown}{sep}... ({len(items) - limit} more)"


@register_backbone("wide_resnet50_2")
def wide_resnet50_2(
    weights: str | Path | None = None, layers: Sequence[str] | None = None
) -> WideResNetExtractor:
    """WideResNet-50-2 (torchvision ImageNet weights, V1 or V2), layer2 + layer3 by default."""
    path = locate_weights(WIDE_RESNET50_2_WEIGHTS, weights)
    state = load_state_dict_file(path)
    extractor = WideResNetExtractor(weights_path=path, layers=layers)
    load_truncated_state(extractor, state, path)
    return extractor


@register_architecture("wide_resnet50_2")
def untrained_wide_resnet50_2(layers: Sequence[str] | None = None) -> WideResNetExtractor:
    """WideResNet-50-2's architecture (up to layer3), randomly initialised (a distillation student)."""
    return WideResNetExtractor(weights_path=None, layers=layers)
