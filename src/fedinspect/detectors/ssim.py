"""Structural similarity (SSIM, Wang et al. 2004) in torch: differentiable, as a loss and as a per-pixel map.

The window is Wang's Gaussian (11 taps, sigma 1.5) with population (not sample) statistics and
C1 = (0.01 L)^2, C2 = (0.03 L)^2; the image border is padded symmetrically (half-sample), so the map has
the image's size and equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, full=True)`` pixel by pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(WINDOW, dtype=dtype, device=device) - (WINDOW - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / SIGMA) ** 2)
    return kernel / kernel.sum()


def _symmetric_pad(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Pad the last two axes by mirroring with the edge pixel repeated (scipy's 'reflect', d c b a | a b c d)."""
    if min(x.shape[-2:]) < radius:
        raise ValueError(f"SSIM needs images of at least {radius} pixels a side, got {tuple(x.shape[-2:])}")
    x = torch.cat([x[..., :radius].flip(-1), x, x[..., -radius:].flip(-1)], dim=-1)
    return torch.cat([x[..., :radius, :].flip(-2), x, x[..., -radius:, :].flip(-2)], dim=-2)


def _local_mean(x: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local mean of each channel of (B, C, H, W), same size out."""
    channels = x.shape[1]
    kernel = _gaussian_window(x.dtype, x.device)
    x = _symmetric_pad(x, WINDOW // 2)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, WINDOW), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, WINDOW, 1), groups=channels)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of two (B, C, H, W) images: (B, C, H, W), 1 where they agree."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"SSIM needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _local_mean(x), _local_mean(y)
    var_x = _local_mean(x * x) - mu_x**2
    var_y = _local_mean(y * y) - mu_y**2
    cov_xy = _local_mean(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
