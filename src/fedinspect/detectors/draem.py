"""DRAEM (Zavrtanik et al., ICCV 2021): learn what a defect looks like from simulated ones.

A reconstructive sub-network (encoder-decoder) learns to turn an image with a simulated anomaly (a
Perlin-noise blob filled with a foreign texture, :mod:`fedinspect.synthesis`) back into the good image
(L2 + SSIM loss); a discriminative sub-network (a U-Net on the input and its reconstruction, stacked)
learns to segment the simulated anomaly (focal loss against its mask). At test time the discriminative
network's softmax anomaly channel is the map; the image score is the maximum of the map after a mean
filter (21 letterboxed pixels, as the paper), so that one hot pixel does not decide the score.

No pretrained backbone: everything is trained from scratch on the good images.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter
from torch import nn

from fedinspect.detectors.ssim import ssim_map
from fedinspect.detectors.trained_detector import TrainedDetector, _check_positive_int, check_normalization
from fedinspect.errors import SettingsError
from fedinspect.synthesis import TextureSource, simulate_anomaly

SCORE_WINDOW = 21  # the paper's mean filter before the image score's maximum, in letterboxed pixels
FOCAL_GAMMA = 2.0
ANOMALY_PROBABILITY = 0.5  # DRAEM trains half the time on clean images with an empty mask


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 convolutions, each with batch norm and ReLU (DRAEM's building block)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    """Bilinear x2 upsampling then a 3x3 convolution with batch norm and ReLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ReconstructiveNetwork(nn.Module):
    """Encoder-decoder without skips (widths w, 2w, 4w, 8w, 8w; four poolings): image -> reconstruction.

    As the paper's: each decoder stage upsamples at the deeper width, then narrows in its second convolution.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.encoder = nn.ModuleList([_block(3, widths[0])] + [_block(a, b) for a, b in pairwise(widths)])
        self.decoder = nn.ModuleList()
        # stages (8w -> 4w), (4w -> 2w), (2w -> w), (w -> w)
        for deep, shallow in zip(widths[-2::-1], [*widths[-3::-1], width], strict=True):
            self.decoder.append(nn.Sequential(
                _up(deep, deep),
                nn.Conv2d(deep, deep, 3, padding=1), nn.BatchNorm2d(deep), nn.ReLU(inplace=True),
                nn.Conv2d(deep, shallow, 3, padding=1), nn.BatchNorm2d(shallow), nn.ReLU(inplace=True)))
        self.head = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if i else x)
        for block in self.decoder:
            x = block(x)
        return self.head(x)


class DiscriminativeNetwork(nn.Module):
    """U-Net (widths w, 2w, 4w, 8w, 8w, 8w; five poolings, skip connections): 6 channels -> 2 logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width]
        self.encoder = nn.ModuleList([_block(6, widths[0])] + [_block(a, b) for a, b in pairwise(widths)])
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for deep, shallow in zip(widths[:0:-1], widths[-2::-1], strict=True):
            self.ups.append(_up(deep, shallow))
            self.blocks.append(_block(2 * shallow, shallow))
        self.head = nn.Conv2d(width, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        for up, block, skip in zip(self.ups, self.blocks, skips[-2::-1], strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class DraemNetwork(nn.Module):
    """Both sub-networks; ``forward`` gives the discriminative logits (B, 2, H, W) and the reconstruction."""

    def __init__(self, base_width: int) -> None:
        super().__init__()
        self.reconstructive = ReconstructiveNetwork(2 * base_width)  # the paper's widths: 128 and 64
        self.discriminative = DiscriminativeNetwork(base_width)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.reconstructive(images)
        return self.discriminative(torch.cat([images, reconstruction], dim=1)), reconstruction


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Mean focal loss (Lin et al. 2017) of (B, 2, H, W) logits against a (B, H, W) 0/1 target."""
    log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None].long())[:, 0]
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


class Draem(TrainedDetector):
    """DRAEM: reconstructive + discriminative networks trained on simulated anomalies.

    Defaults (sized for a 2-core CPU): ``base_width`` 4 (reconstructive widths 8..64, discriminative
    4..32: 0.42 M parameters, 0.92 GMAC per 256x256 image), training on random 128x128 crops
    (``crop_size``; None trains on whole images, 4x the cost), 30 epochs, Adam at lr 1e-3, batch 8,
    256 px short side; scoring is always on the whole letterboxed image. No validation share and no early
    stopping by default: the validation loss is measured on *simulated* anomalies and misleads (on the
    magnetic tiles it stopped training at epoch 4 and kept epoch 1; on metal_plate 10 epochs gave image
    AUROC 0.686, 30 epochs 0.980), so the last epoch is kept.
    The paper: widths 128 and 64 (97 M parameters), 700 epochs, Adam at lr 1e-4 (x0.2 at 80% and 90% of
    training), batch 8, 256x256 images, DTD textures; the seed 004 study trained 300 epochs at lr 0.01.

    ``texture_dir``: a folder of texture images (a DTD copy) used instead of the built-in textures
    (scikit-image's sample images and generated ones). It is read when training starts and is not saved
    with the model (a model file never names a folder to open).
    """

    name = "draem"
    model_format = "fedinspect.draem/1"
    input_multiple = 32  # five poolings in the discriminative U-Net

    def __init__(self, base_width: int = 4, crop_size: int | None = 128, texture_dir: str | None = None,
                 normalization: str = "batch", image_size: int = 256, epochs: int = 30,
                 learning_rate: float = 1e-3, batch_size: int = 8,
                 patience: int = 0,
                 validation_fraction: float = 0.0, sigma: float = 4.0, seed: int = 0, progress: bool = False) -> None:
        super().__init__(image_size=image_size, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                         patience=patience, validation_fraction=validation_fraction, sigma=sigma, seed=seed,
                         progress=progress)
        self.base_width = _check_positive_int("base_width", base_width)
        if crop_size is not None and (_check_positive_int("crop_size", crop_size, 32) % self.input_multiple):
            raise SettingsError(f"crop_size must be a multiple of {self.input_multiple} (or None), got {crop_size}")
        self.crop_size = crop_size
        if texture_dir is not None and not isinstance(texture_dir, str | Path):
            raise SettingsError(f"texture_dir must be a folder path or None, got {texture_dir!r}")
        self.texture_dir = None if texture_dir is None else str(texture_dir)
        if self.texture_dir is not None:
            TextureSource.folder_images(self.texture_dir)  # fail now, naming the folder, not at the first step
        self.normalization = check_normalization(normalization)
        self._textures: TextureSource | None = None

    @property
    def textures(self) -> TextureSource:
        """The anomaly textures: ``texture_dir``'s images (DataError if it holds none) or the built-in set."""
        if self._textures is None:
            self._textures = (TextureSource.builtin(self.seed) if self.texture_dir is None
                              else TextureSource.from_folder(self.texture_dir))
        return self._textures

    def _build_module(self) -> nn.Module:
        return DraemNetwork(self.base_width)

    def _training_loss(self, module: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        images = self._random_crops(images, rng)
        pairs = [simulate_anomaly(image, rng, self.textures, anomaly_probability=ANOMALY_PROBABILITY)
                 for image in images.permute(0, 2, 3, 1).cpu().numpy()]
        augmented = torch.from_numpy(np.stack([pair[0] for pair in pairs])).permute(0, 3, 1, 2).to(images.device)
        masks = torch.from_numpy(np.stack([pair[1] for pair in pairs])).to(images.device)
        logits, reconstruction = module(augmented)
        reconstruction_loss = F.mse_loss(reconstruction, images) + 1 - ssim_map(reconstruction, images).mean()
        return reconstruction_loss + focal_loss(logits, masks)

    def _random_crops(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """One random ``crop_size`` square per image (the whole image when it is smaller or crops are off)."""
        height, width = images.shape[-2:]
        if self.crop_size is None or (height <= self.crop_size and width <= self.crop_size):
            return images
        size_h, size_w = min(self.crop_size, height), min(self.crop_size, width)
        tops = rng.integers(0, height - size_h + 1, len(images))
        lefts = rng.integers(0, width - size_w + 1, len(images))
        return torch.stack([image[:, top:top + size_h, left:left + size_w]
                            for image, top, left in zip(images, tops, lefts, strict=True)])

    def _anomaly_maps(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        logits, _ = module(images)
        return torch.softmax(logits, dim=1)[:, 1]

    def _image_score(self, score_map: np.ndarray) -> float:
        """Maximum of the map after the paper's 21-pixel mean filter (scaled to the map's own size)."""
        window = max(1, round(SCORE_WINDOW * min(score_map.shape) / self.image_size))
        return float(uniform_filter(score_map.astype(np.float64), size=window, mode="nearest").max())

    def save(self, directory: str | Path) -> Path:
        """As the base, without ``texture_dir``: a model file never names a folder to open."""
        texture_dir, self.texture_dir = self.texture_dir, None
        try:
            return super().save(directory)
        finally:
            self.texture_dir = texture_dir
