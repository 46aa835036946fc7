"""STFPM: a student network learns to reproduce a pretrained teacher's feature pyramid on good images.

Wang, Wu, Cui & Wang, "Student-Teacher Feature Pyramid Matching for Anomaly Detection", BMVC 2021.
Teacher and student have the same architecture; the teacher is pretrained and frozen, the student
starts from random weights. Trained on good images only, the student matches the teacher there and
fails to where the image is unlike them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedinspect.backbones import FeatureExtractor, untrained_backbone
from fedinspect.backbones.runtime import DEFAULT_RUNTIME
from fedinspect.detectors.distillation import build_teacher, check_backbone_settings, combine_maps
from fedinspect.detectors.trained_detector import TrainedDetector, check_normalization, checked_runtime


class StfpmModule(nn.Module):
    """Frozen pretrained ``teacher`` and trainable ``student`` returning the same named maps."""

    def __init__(self, teacher: FeatureExtractor, student: FeatureExtractor) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student

    def distances(self, images: torch.Tensor, teacher: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per layer, 0.5 * squared distance of the L2-normalised teacher and student features: (B, h, w).

        ``teacher``: the teacher's maps of ``images`` if already computed (by a faster runtime), else torch's.
        """
        if teacher is None:
            with torch.no_grad():
                teacher = self.teacher(images)
        student = self.student(images)
        return [0.5 * (F.normalize(teacher[k], dim=1) - F.normalize(student[k], dim=1)).pow(2).sum(1)
                for k in self.teacher.layers]


class Stfpm(TrainedDetector):
    """Student-teacher feature pyramid matching (Wang et al., BMVC 2021).

    Loss: sum over the layers of 0.5 * mean over positions of the squared distance between the
    L2-normalised teacher and student features (the paper's loss), averaged over the batch. Map: the
    per-position distances upsampled to the input and multiplied over the layers (as the paper and
    anomalib); image score: the map's maximum.

    Layers: three scales, strides 4, 8 and 16 (``stride4/8/16`` for EfficientNet-Lite, ``layer1..3``
    for WideResNet), the scales of ResNet-18's layer1..3 in the paper: the finest for small defects,
    the coarsest for context.

    Defaults (sized for a 2-core CPU): EfficientNet-Lite0 teacher and student, image_size 256, Adam at
    lr 1e-3, batch 8, at most 6 epochs, early stopping after 3 epochs without a better validation
    loss on 10% of the good images. The paper: ResNet-18, 256x256, SGD lr 0.4, momentum 0.9,
    weight decay 1e-4, batch 32, 100 epochs; the seed study: 300 epochs at lr 0.01, 256x256.

    Parameters: ``backbone`` (``efficientnet_lite0``, ``efficientnet_lite2``, ``wide_resnet50_2``),
    ``layers`` (None: the three scales above), ``weights`` (the teacher's weight file; None = the
    packaged Lite weights; required, local, for wide_resnet50_2), ``runtime`` (what runs the frozen
    teacher on the CPU: ``"openvino"``, ``"onnx"``, ``"torch"`` or ``"openvino-bf16"``, see
    :mod:`fedinspect.backbones.runtime`; the student trains in torch whatever it is), then those of
    :class:`~fedinspect.detectors.trained_detector.TrainedDetector`. The student never loads ImageNet
    weights.
    """

    name = "stfpm"
    model_format = "fedinspect.stfpm/1"
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
        learning_rate: float = 1e-3,
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

    def _build_module(self) -> StfpmModule:
        teacher = build_teacher(self.backbone, self._layers_used, self.weights)
        student = untrained_backbone(self.backbone, self._layers_used)
        return StfpmModule(teacher, student)

    def _training_loss(self, module: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return sum(d.mean(dim=(1, 2)) for d in module.distances(images, self._teacher_maps(module, images))).mean()

    def _anomaly_maps(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        distances = module.distances(images, self._teacher_maps(module, images))
        return combine_maps(distances, images.shape[-2:], how="product")
