"""Reverse distillation: a student decoder rebuilds a frozen teacher's multi-scale features from a bottleneck.

Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022. The
teacher encoder is pretrained and frozen; a trainable one-class bottleneck embedding (OCBE) fuses its
maps into one compact code, from which a student decoder must reproduce the teacher's maps, coarse to
fine. The bottleneck drops what good images do not need, so an anomaly's features are not rebuilt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedinspect.backbones import FeatureExtractor
from fedinspect.backbones.runtime import DEFAULT_RUNTIME
from fedinspect.detectors.distillation import build_teacher, check_backbone_settings, combine_maps
from fedinspect.detectors.trained_detector import TrainedDetector, check_normalization, checked_runtime
from fedinspect.errors import SettingsError


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a (strided 1x1) shortcut, as a ResNet basic block."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(c_in, c_out, stride),
                                  nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class OneClassBottleneck(nn.Module):
    """OCBE: each finer map brought to the coarsest scale by strided 3x3 convolutions, concatenated,
    then a stride-2 residual block gives the embedding (the paper's multi-scale fusion + ResNet block)."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], embedding: int) -> None:
        super().__init__()
        coarse = channels[-1]
        self.fuse = nn.ModuleList()
        for c, s in zip(channels, strides, strict=True):
            steps = round(math.log2(strides[-1] / s))
            layers: list[nn.Module] = [_conv_bn_relu(c if i == 0 else coarse, coarse, 2) for i in range(steps)]
            self.fuse.append(nn.Sequential(*layers))  # the coarsest map passes as it is
        self.block = ResidualBlock(coarse * len(channels), embedding, stride=2)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.block(torch.cat([f(m) for f, m in zip(self.fuse, maps, strict=True)], dim=1))


class DecoderStage(nn.Module):
    """Doubles the resolution (2x2 transposed convolution) and refines; a linear 1x1 head gives the
    teacher's channels (EfficientNet stage outputs are linear projections, negative values included)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False), nn.BatchNorm2d(c_out),
                                  nn.ReLU(inplace=True), _conv_bn_relu(c_out, c_out))
        self.head = nn.Conv2d(c_out, c_out, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x)
        return hidden, self.head(hidden)


class ReverseDistillationModule(nn.Module):
    """Frozen ``teacher`` encoder, trainable ``bottleneck`` (OCBE) and ``decoder`` (one stage per scale)."""

    def __init__(self, teacher: FeatureExtractor) -> None:
        super().__init__()
        self.teacher = teacher
        channels = [teacher.channels[k] for k in teacher.layers]
        strides = [teacher.strides[k] for k in teacher.layers]
        self.bottleneck = OneClassBottleneck(channels, strides, embedding=2 * channels[-1])
        stages, c_in = [], 2 * channels[-1]
        for c in reversed(channels):  # coarse to fine, like the decoder in the paper
            stages.append(DecoderStage(c_in, c))
            c_in = c
        self.decoder = nn.ModuleList(stages)

    def distances(self, images: torch.Tensor, teacher: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per scale, 1 - cosine similarity of teacher and student features at each position: (B, h, w).

        ``teacher``: the teacher's maps of ``images`` if already computed (by a faster runtime), else torch's.
        """
        if teacher is None:
            with torch.no_grad():
                teacher = self.teacher(images)
        encoded = [teacher[k] for k in self.teacher.layers]
        x = self.bottleneck(encoded)
        rebuilt = []
        for stage in self.decoder:
            x, out = stage(x)
            rebuilt.append(out)
        return [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(encoded, reversed(rebuilt), strict=True)]


class ReverseDistillation(TrainedDetector):
    """Reverse distillation from a one-class embedding (Deng & Li, CVPR 2022).

    Teacher: a frozen pretrained encoder at three scales (strides 4, 8, 16: ``stride4/8/16`` for
    EfficientNet-Lite, ``layer1..3`` for WideResNet as in the paper). OCBE: as the paper, the finer maps
    are brought to the coarsest scale by strided 3x3 convolutions, concatenated and passed through a
    stride-2 residual block (one basic block; the paper uses three bottleneck blocks), giving an
    embedding of twice the coarsest map's channels at stride 32. Student decoder (ours, since the paper
    mirrors a ResNet): per scale, coarse to fine, a 2x2 transposed convolution doubling the resolution,
    a 3x3 convolution, and a linear 1x1 head with the teacher's channels (EfficientNet's stage outputs
    are linear, so no ReLU at the end); the stage's features, not its head, feed the next stage.

    Loss: sum over scales of the mean over positions of 1 - cosine similarity of teacher and student
    features. Map: sum over scales of 1 - cosine, upsampled to the input; image score: the map's maximum.

    Defaults (sized for a 2-core CPU): EfficientNet-Lite0 teacher, image_size 256, Adam lr 0.005 with
    betas (0.5, 0.999) as the paper, batch 8, at most 6 epochs, early stopping after 3 epochs without a
    better validation loss on 10% of the good images. The paper: WideResNet-50 teacher, 256x256, Adam
    lr 0.005, betas (0.5, 0.999), batch 16, 200 epochs; the seed study: 300 epochs at lr 0.01, 256x256.

    Parameters: ``backbone``, ``layers`` (None: the three scales above), ``weights`` (the teacher's
    weight file; None = the packaged Lite weights; required, local, for wide_resnet50_2), ``runtime``
    (what runs the frozen teacher encoder on the CPU: ``"openvino"``, ``"onnx"``, ``"torch"`` or
    ``"openvino-bf16"``, see :mod:`fedinspect.backbones.runtime`; bottleneck and decoder train in torch), then those of
    :class:`~fedinspect.detectors.trained_detector.TrainedDetector`.
    """

    name = "reverse_distillation"
    model_format = "fedinspect.reverse_distillation/1"
    input_multiple = 32
    frozen_prefixes = ("teacher.",)

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        weights: str | Path | None = None,
        runtime: str = DEFAULT_RUNTIME,
        normalization: str = "batch",
        image_size: int = 256,
        epochs: int = 6,
        learning_rate: float = 0.005,
        batch_size: int = 8,
        patience: int = 3,
        validation_fraction: float = 0.1,
        sigma: float = 4.0,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__(image_size=image_size, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                         patience=patience, validation_fraction=validation_fraction, sigma=sigma, seed=seed,
                         progress=progress)
        self._layers_used = check_backbone_settings(backbone, layers, weights)[1]
        self.backbone = backbone
        self.layers = None if layers is None else tuple(layers)
        self.weights = None if weights is None else str(weights)
        self.runtime = checked_runtime(runtime)
        self.normalization = check_normalization(normalization)

    def _build_module(self) -> ReverseDistillationModule:
        teacher = build_teacher(self.backbone, self._layers_used, self.weights)
        strides = [teacher.strides[k] for k in teacher.layers]
        if any(2 ** round(math.log2(strides[-1] / s)) != strides[-1] / s for s in strides) \
                or strides[-1] * 2 > self.input_multiple:
            raise SettingsError(f"reverse_distillation: layer strides {strides} must be powers of two apart and "
                                f"at most {self.input_multiple // 2}")
        return ReverseDistillationModule(teacher)

    def _optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """Adam with the paper's betas (0.5, 0.999)."""
        return torch.optim.Adam(self._parameters_to_train(module), lr=self.learning_rate, betas=(0.5, 0.999))

    def _training_loss(self, module: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return sum(d.mean() for d in module.distances(images, self._teacher_maps(module, images)))

    def _anomaly_maps(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return combine_maps(module.distances(images, self._teacher_maps(module, images)), images.shape[-2:], how="sum")
