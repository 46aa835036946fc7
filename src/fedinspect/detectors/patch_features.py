"""The torch part of PatchCore: locally aware patch embeddings from a pretrained backbone.

Each backbone map is average-pooled over a 3x3 neighbourhood (so every patch sees its
surroundings), the coarser maps are bilinearly upsampled to the finest one, and all are
concatenated along channels (Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022). The module knows nothing of memory banks or datasets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedinspect.backbones import FeatureExtractor


class PatchFeatures(nn.Module):
    """Backbone maps -> (B, D, h, w) patch embeddings at the finest requested stride."""

    def __init__(self, extractor: FeatureExtractor, neighbourhood: int = 3) -> None:
        super().__init__()
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be a positive odd number, got {neighbourhood}")
        self.extractor = extractor.eval()
        self.neighbourhood = neighbourhood

    @property
    def stride(self) -> int:
        """Stride of the embedding grid with respect to the input image."""
        return min(self.extractor.strides[layer] for layer in self.extractor.layers)

    @property
    def dim(self) -> int:
        return sum(self.extractor.channels[layer] for layer in self.extractor.layers)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.extractor(images)
        pooled = [
            F.avg_pool2d(maps[layer], self.neighbourhood, stride=1, padding=self.neighbourhood // 2)
            for layer in self.extractor.layers
        ]
        size = max((p.shape[-2:] for p in pooled), key=lambda s: s[0] * s[1])
        resized = [
            p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
            for p in pooled
        ]
        return torch.cat(resized, dim=1)
