"""Image pairs for the Siamese defect classifier: a good reference beside the image under test.

The seed's model (MeDetection, Eq. 1) feeds a normal sample and the sample under test through the
same extractor and classifies their feature difference; a :class:`PairBatch` carries both images of
each pair, already ImageNet-normalised, and the label of the image under test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedinspect.backbones.wide_resnet import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class PairBatch:
    """Image pairs for the Siamese model: a good reference and the image under test, same product."""

    reference: torch.Tensor  # (n, 3, H, W) float32, ImageNet-normalised (mean/std of fedinspect.backbones)
    test: torch.Tensor  # (n, 3, H, W) float32, same normalisation
    label: torch.Tensor  # (n,) float32: 0 good, 1 defective

    def __post_init__(self) -> None:
        """Refuse tensors whose shapes or types disagree, so a bad batch fails where it is built."""
        for name in ("reference", "test"):
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[1] != 3:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"PairBatch.{name} must be a (n, 3, H, W) tensor, got {shape}")
            if tensor.dtype != torch.float32:
                raise ValueError(f"PairBatch.{name} must be float32, got {tensor.dtype}")
        if self.reference.shape != self.test.shape:
            raise ValueError(
                f"PairBatch.reference {tuple(self.reference.shape)} and test {tuple(self.test.shape)} differ in shape"
            )
        if not isinstance(self.label, torch.Tensor) or self.label.shape != (self.test.shape[0],):
            shape = tuple(self.label.shape) if isinstance(self.label, torch.Tensor) else type(self.label).__name__
            raise ValueError(f"PairBatch.label must be a ({self.test.shape[0]},) tensor, got {shape}")
        if self.label.dtype != torch.float32:
            raise ValueError(f"PairBatch.label must be float32, got {self.label.dtype}")

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        """The same pairs on ``device``."""
        return PairBatch(self.reference.to(device), self.test.to(device), self.label.to(device))

    @staticmethod
    def concat(batches: Sequence[PairBatch]) -> PairBatch:
        """The pairs of several batches, in order, as one batch (all of one image size)."""
        if not batches:
            raise ValueError("PairBatch.concat needs at least one batch")
        return PairBatch(
            torch.cat([batch.reference for batch in batches]),
            torch.cat([batch.test for batch in batches]),
            torch.cat([batch.label for batch in batches]),
        )


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W, 3) or (n, 3, H, W) RGB images as float32 (n, 3, H, W), ImageNet-normalised.

    ``(x / 255 - mean) / std``, computed as ``(x - 255 mean) / (255 std)`` on the channels-last layout,
    which is about four times faster on the CPU than scaling the channels-first copy.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"normalise expects uint8 images, got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"normalise expects a batch (n, H, W, 3) or (n, 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.permute(0, 2, 3, 1)
    if images.shape[-1] != 3:
        raise ValueError(f"normalise expects 3 colour channels, got shape {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32) * 255.0
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32) * 255.0
    return ((images.float() - mean) / std).permute(0, 3, 1, 2).contiguous()


def make_pairs(reference: torch.Tensor, test: torch.Tensor, label: torch.Tensor | Sequence[int]) -> PairBatch:
    """A :class:`PairBatch` from uint8 image batches (NHWC or NCHW) and 0/1 labels."""
    labels = torch.as_tensor(label, dtype=torch.float32).reshape(-1)
    if not torch.all((labels == 0) | (labels == 1)):
        raise ValueError("pair labels must be 0 (good) or 1 (defective)")
    return PairBatch(normalise(reference), normalise(test), labels)
