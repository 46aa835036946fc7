"""The convolutional autoencoder of Bergmann et al. (VISAPP 2019), scored by squared error or by SSIM.

An autoencoder trained on good images only reconstructs what it has seen; a defect comes back wrong, and
the difference between an image and its reconstruction is the anomaly map. ``ae_mse`` trains and scores
with the squared error, ``ae_ssim`` with the structural similarity (SSIM), which compares local means,
contrasts and structure instead of single pixels, so it forgives small shifts and brightness changes that
a reconstruction blurs. Both share the network (:class:`ConvAutoencoder`) and everything else.
"""

from __future__ import annotations

import torch
from torch import nn

from fedinspect.detectors.ssim import ssim_map
from fedinspect.detectors.trained_detector import TrainedDetector, _check_positive_int

# (out_channels, kernel, stride, padding) of the encoder, the seed's Table 2 (Bergmann et al.'s Table 1 up to
# the last layer); the decoder mirrors it with transposed convolutions.
ENCODER_LAYERS = ((32, 4, 2, 1), (32, 4, 2, 1), (32, 3, 1, 1), (64, 4, 2, 1), (64, 3, 1, 1), (128, 4, 2, 1),
                  (64, 3, 1, 1))
LATENT_KERNEL = 3


class ConvAutoencoder(nn.Module):
    """Encoder Conv1..Conv8 (total stride 16, LeakyReLU 0.2) and its mirror image as decoder.

    Conv8 keeps a spatial latent code (``latent_dim`` channels at 1/16 of the input's size, as the seed's
    Table 2), so the network takes any input whose sides are multiples of 16 (letterboxed, not squashed).
    The output layer is a sigmoid, as the inputs are in [0, 1].
    """

    def __init__(self, latent_dim: int = 100, channels: int = 3) -> None:
        super().__init__()
        encoder: list[nn.Module] = []
        previous = channels
        for out, kernel, stride, padding in ENCODER_LAYERS:
            encoder += [nn.Conv2d(previous, out, kernel, stride, padding), nn.LeakyReLU(0.2)]
            previous = out
        encoder.append(nn.Conv2d(previous, latent_dim, LATENT_KERNEL, 1, LATENT_KERNEL // 2))
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, previous, LATENT_KERNEL, 1, LATENT_KERNEL // 2),
                                    nn.LeakyReLU(0.2)]
        mirrored = [*(layer[0] for layer in ENCODER_LAYERS[-2::-1]), channels]  # 128, 64, ..., 32, 3
        for out, (_, kernel, stride, padding) in zip(mirrored, ENCODER_LAYERS[::-1], strict=True):
            decoder += [nn.ConvTranspose2d(previous, out, kernel, stride, padding), nn.LeakyReLU(0.2)]
            previous = out
        decoder[-1] = nn.Sigmoid()
        self.decoder = nn.Sequential(*decoder)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction of (B, C, H, W) images in [0, 1]; H and W must be multiples of 16."""
        return self.decoder(self.encoder(images))


class _Autoencoder(TrainedDetector):
    """What ``ae_mse`` and ``ae_ssim`` share: the network, its parameter and the defaults.

    latent_dim:
        Channels of the latent code at each position of the 1/16-size grid (Bergmann et al.: 100 in a
        single 1x1 code for 128x128 patches; here 100 per position, at 256 px a 16x16 grid).

    Defaults (sized for a 2-core CPU): 256 px short side, at most 40 epochs at Adam lr 1e-3, batch 8,
    early stopping after 5 epochs without a better validation loss on 10% of the good images, maps smoothed
    with sigma 4. Cost grows with the images' area: on two idle cores an epoch over 400 elongated images
    (magnetic tiles, ~1.5x the area of 256x256, mostly one image per batch) takes ~18 s for ae_mse and
    ~45 s for ae_ssim, so ae_ssim defaults to 20 epochs (40 would exceed 15 minutes there). The seed
    trained 300 epochs at lr 0.01 on 256x256 images (early stopping after 20 epochs); Bergmann et al.
    trained 200 epochs at Adam lr 2e-4 (weight decay 1e-5, batch 128) on 128x128 patches cut from
    augmented images.

    No "clean border" step (the seed's skimage ``clear_border``): it needs a binarised map (ours stay
    continuous until a threshold is chosen), it would delete every real defect touching the edge, and
    flattening a 32 px border band of the maps moved metal_plate's pixel AUROC by only +0.005.
    """

    input_multiple = 16

    def __init__(self, latent_dim: int = 100, image_size: int = 256, epochs: int = 40, learning_rate: float = 1e-3,
                 batch_size: int = 8, patience: int = 5, validation_fraction: float = 0.1, sigma: float = 4.0,
                 seed: int = 0, progress: bool = False) -> None:
        super().__init__(image_size=image_size, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                         patience=patience, validation_fraction=validation_fraction, sigma=sigma, seed=seed,
                         progress=progress)
        self.latent_dim = _check_positive_int("latent_dim", latent_dim)

    def _build_module(self) -> nn.Module:
        return ConvAutoencoder(self.latent_dim)


class AutoencoderMSE(_Autoencoder):
    """Bergmann et al.'s autoencoder with the squared error: loss = MSE, map = per-pixel squared error.

    The map is the squared difference averaged over the three channels. See :class:`_Autoencoder` for the
    parameters, the defaults and the paper's settings.
    """

    name = "ae_mse"
    model_format = "fedinspect.ae_mse/1"

    def _training_loss(self, module: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return ((module(images) - images) ** 2).mean()

    def _anomaly_maps(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return ((module(images) - images) ** 2).mean(1)


class AutoencoderSSIM(_Autoencoder):
    """Bergmann et al.'s autoencoder with SSIM: loss = 1 - mean SSIM, map = 1 - SSIM per pixel.

    SSIM uses an 11x11 Gaussian window (sigma 1.5, Wang et al. 2004; Bergmann et al. use an 11x11 window)
    and is averaged over the three channels (:mod:`fedinspect.detectors.ssim`).
    """

    name = "ae_ssim"
    model_format = "fedinspect.ae_ssim/1"

    def __init__(self, latent_dim: int = 100, image_size: int = 256, epochs: int = 20, learning_rate: float = 1e-3,
                 batch_size: int = 8, patience: int = 5, validation_fraction: float = 0.1, sigma: float = 4.0,
                 seed: int = 0, progress: bool = False) -> None:
        """As :class:`_Autoencoder`, but at most 20 epochs: an SSIM epoch costs ~2.5x an MSE one, and 20 keep
        the 400 magnetic tiles under 15 minutes on two cores (40 would take ~29)."""
        super().__init__(latent_dim=latent_dim, image_size=image_size, epochs=epochs, learning_rate=learning_rate,
                         batch_size=batch_size, patience=patience, validation_fraction=validation_fraction,
                         sigma=sigma, seed=seed, progress=progress)

    def _training_loss(self, module: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return 1.0 - ssim_map(module(images), images).mean()

    def _anomaly_maps(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return 1.0 - ssim_map(module(images), images).mean(1)
