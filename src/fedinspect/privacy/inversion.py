"""Inversion attack: a decoder from patch embeddings back to image patches.

The attacker (an honest-but-curious server, or anyone reading the updates) knows the backbone
the federation uses and owns images of its own (another category, or generated ones). It embeds
them, learns a decoder from each embedding to the image patch around its grid cell, and applies
it to the bank rows a client sends. PSNR and SSIM of the reconstructions against the true patches
say how much of the product's appearance a bank gives away, with and without each defence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from fedinspect.detectors.patchcore import PatchCore


@dataclass
class PatchPairs:
    """Patch embeddings (n, D) and the image patches around their grid cells (n, p, p, 3) in [0, 1]."""

    embeddings: np.ndarray
    patches: np.ndarray


def cell_patches(detector: PatchCore, image: np.ndarray, patch_size: int) -> np.ndarray:
    """The ``patch_size`` square around every valid grid cell of ``image``, in the order of ``embed_per_image``.

    The image is letterboxed exactly as the detector does; cell (i, j) is centred on pixel
    ``(i + 1/2, j + 1/2) * stride``; patches crossing the border repeat the edge pixels.
    """
    tensor = detector.letterbox(image)  # (3, H, W) in [0, 1], resized and padded
    stride = detector.features.stride
    cells_h, cells_w = detector._valid_cells(image.shape[:2])
    half = patch_size // 2
    padded = np.pad(tensor.permute(1, 2, 0).numpy(), ((half, half), (half, half), (0, 0)), mode="edge")
    centres_y = np.arange(cells_h) * stride + stride // 2
    centres_x = np.arange(cells_w) * stride + stride // 2
    windows = np.lib.stride_tricks.sliding_window_view(padded, (patch_size, patch_size), axis=(0, 1))
    # windows[y, x] is the patch whose top-left is (y, x) in padded coordinates = centre (y, x) in image ones
    picked = windows[centres_y[:, None], centres_x[None, :]]  # (cells_h, cells_w, 3, p, p)
    return np.ascontiguousarray(picked.reshape(-1, 3, patch_size, patch_size).transpose(0, 2, 3, 1), np.float32)


def patch_pairs(detector: PatchCore, images: Iterable[np.ndarray], patch_size: int = 16,
                per_image: int | None = 256, seed: int = 0) -> PatchPairs:
    """Training pairs for the decoder from the attacker's own images (``per_image`` cells drawn from each)."""
    rng = np.random.default_rng(seed)
    embeddings, patches = [], []
    images = list(images)
    for image, rows in zip(images, detector.embed_per_image(images, total=len(images)), strict=True):
        targets = cell_patches(detector, image, patch_size)
        keep = np.arange(len(rows)) if per_image is None or per_image >= len(rows) else \
            rng.choice(len(rows), per_image, replace=False)
        embeddings.append(rows[keep])
        patches.append(targets[keep])
    if not embeddings:
        raise ValueError("the attacker needs at least one image of its own")
    return PatchPairs(np.concatenate(embeddings), np.concatenate(patches))


class InversionAttack:
    """An MLP decoder embedding -> patch, trained with mean squared error (sklearn-style estimator)."""

    def __init__(self, hidden: int = 256, epochs: int = 10, batch_size: int = 256, learning_rate: float = 1e-3,
                 seed: int = 0) -> None:
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.seed = seed

    def fit(self, pairs: PatchPairs) -> InversionAttack:
        torch.manual_seed(self.seed)
        x = torch.from_numpy(np.asarray(pairs.embeddings, np.float32))
        y = torch.from_numpy(pairs.patches.reshape(len(pairs.patches), -1))
        self.mean_, self.std_ = x.mean(0), x.std(0) + 1e-6
        self.patch_shape_ = pairs.patches.shape[1:]
        self.decoder_ = nn.Sequential(
            nn.Linear(x.shape[1], self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden), nn.ReLU(),
            nn.Linear(self.hidden, y.shape[1]), nn.Sigmoid(),
        )
        optimizer = torch.optim.Adam(self.decoder_.parameters(), lr=self.learning_rate)
        generator = torch.Generator().manual_seed(self.seed)
        x = (x - self.mean_) / self.std_
        self.loss_curve_ = []
        for _ in range(self.epochs):
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for start in range(0, len(x), self.batch_size):
                batch = order[start:start + self.batch_size]
                loss = nn.functional.mse_loss(self.decoder_(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            self.loss_curve_.append(total / len(x))
        return self

    def reconstruct(self, embeddings: np.ndarray) -> np.ndarray:
        """Patches (n, p, p, 3) in [0, 1] decoded from embeddings (n, D)."""
        x = (torch.from_numpy(np.asarray(embeddings, np.float32)) - self.mean_) / self.std_
        with torch.no_grad():
            out = self.decoder_(x).numpy()
        return out.reshape(len(out), *self.patch_shape_)


def similarity(reconstructed: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB) and mean SSIM of reconstructed patches against the true ones (both in [0, 1])."""
    if reconstructed.shape != truth.shape or not len(truth):
        raise ValueError(f"need matching, non-empty patch arrays, got {reconstructed.shape} and {truth.shape}")
    psnr, ssim = [], []
    for rec, true in zip(reconstructed.astype(np.float64), truth.astype(np.float64), strict=True):
        psnr.append(peak_signal_noise_ratio(true, rec, data_range=1.0))
        ssim.append(structural_similarity(true, rec, data_range=1.0, channel_axis=-1,
                                          win_size=min(7, true.shape[0] - (1 - true.shape[0] % 2))))
    finite = np.isfinite(psnr)
    return float(np.mean(np.asarray(psnr)[finite])) if finite.any() else float("inf"), float(np.mean(ssim))
