"""PaDiM anomaly detection (Defard et al., ICPR 2021) as a scikit-learn style estimator.

Every position of the patch-feature grid gets a multivariate Gaussian (mean and covariance of a
seeded random subset of ``n_features`` channels, regularised by ``eps * I``); a test patch scores
its Mahalanobis distance to the Gaussian of its position. Maps are upsampled, smoothed and brought
back to each image's own size through the same :class:`Letterbox` as PatchCore; the image score is
the maximum of the map.

Positions: a Gaussian belongs to one cell of the letterboxed grid, so every image of a category
must give the same grid (same aspect ratio after resizing the short side to ``image_size``). ``fit``
refuses a mix of grids and ``predict`` refuses an image whose grid differs from the fitted one: a
category of mixed aspect ratios is a case for PatchCore, which has no positions.

Fitting accumulates the count, sum and sum of outer products per position
(:attr:`Padim.sufficient_statistics_`): statistics of disjoint image sets add up exactly, so the
model can later be federated without loss. Size: the sum of outer products is float64 (P, k, k) for
P grid positions, and the saved inverse covariances float32 of the same shape (efficientnet_lite0 at
image size 256: 32 x 32 positions x 100^2 features = 41 MB on disk).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as save_tensors
from torch import nn
from tqdm.auto import tqdm

from fedinspect import __version__
from fedinspect.detectors.feature_detector import FeatureDetector
from fedinspect.detectors.model_files import (
    check_image_size,
    check_weights,
    constructor_params,
    file_sha256,
    read_settings,
    read_tensors,
)
from fedinspect.detectors.patch_features import PatchFeatures
from fedinspect.detectors.preprocessing import gaussian_blur
from fedinspect.errors import FedinspectError, ModelFileError, SettingsError

MODEL_FORMAT = "fedinspect.padim/1"
CONFIG_FILE = "padim.json"
GAUSSIANS_FILE = "gaussians.safetensors"


class PadimFitError(FedinspectError, ValueError):
    """Images PaDiM cannot model: too few of them, or not all on one feature grid."""


class GridMismatchError(PadimFitError):
    """An image whose feature grid is not the one the Gaussians were (or are being) fitted on."""


def select_channels(dim: int, n_features: int, seed: int) -> np.ndarray:
    """Sorted random subset of ``n_features`` of ``dim`` channels (the paper's random dimension reduction)."""
    if isinstance(n_features, bool) or not isinstance(n_features, int) or not 1 <= n_features <= dim:
        raise SettingsError(f"n_features must be an integer between 1 and the backbone's {dim} channels, "
                            f"got {n_features!r}")
    return np.sort(np.random.default_rng(seed).choice(dim, size=n_features, replace=False)).astype(np.int64)


class MahalanobisMap(nn.Module):
    """(B, D, h, w) patch features -> (B, h, w) Mahalanobis distances to per-position Gaussians.

    Holds, as buffers, the selected channels (k,), the means (h*w, k) and the inverse covariances
    (h*w, k, k) of the positions of an (h, w) grid.
    """

    def __init__(self, channels: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor,
                 grid_shape: tuple[int, int]) -> None:
        super().__init__()
        positions, k = mean.shape
        if positions != grid_shape[0] * grid_shape[1] or inv_cov.shape != (positions, k, k) or channels.shape != (k,):
            raise ValueError(f"inconsistent Gaussians: grid {grid_shape}, mean {tuple(mean.shape)}, "
                             f"inverse covariance {tuple(inv_cov.shape)}, channels {tuple(channels.shape)}")
        self.grid_shape = tuple(grid_shape)
        self.register_buffer("channels", channels)
        self.register_buffer("mean", mean)
        self.register_buffer("inv_cov", inv_cov)

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = features.shape
        selected = features[:, self.channels].flatten(2).transpose(1, 2)  # (B, P, k)
        delta = selected - self.mean
        squared = torch.einsum("bpi,pij,bpj->bp", delta, self.inv_cov, delta)
        return squared.clamp_min_(0).sqrt_().reshape(batch, height, width)


class Padim(FeatureDetector):
    """PaDiM detector.

    Parameters
    ----------
    backbone, layers, weights, image_size, sigma, batch_size, seed, progress:
        As for :class:`~fedinspect.detectors.patchcore.PatchCore` (same patch features and letterbox).
    n_features:
        Channels kept, chosen at random with ``seed`` (paper: 100 of 448 for ResNet18, 550 for WRN50).
    eps:
        Regularisation added to every covariance's diagonal (paper: 0.01).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        weights: str | None = None,
        image_size: int = 256,
        n_features: int = 100,
        eps: float = 0.01,
        sigma: float = 4.0,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers) if layers is not None else None
        self.weights = weights
        self.image_size = check_image_size(image_size)
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise SettingsError(f"n_features must be a positive integer, got {n_features!r}")
        self.n_features = n_features
        if not isinstance(eps, int | float) or not math.isfinite(eps) or eps <= 0:
            raise SettingsError(f"eps must be a positive number, got {eps!r}")
        self.eps = float(eps)
        self.sigma = sigma
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self._features: PatchFeatures | None = None
        self._scorer: MahalanobisMap | None = None

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (scikit-learn convention)."""
        return {
            "backbone": self.backbone,
            "layers": list(self.layers) if self.layers is not None else None,
            "weights": self.weights,
            "image_size": self.image_size,
            "n_features": self.n_features,
            "eps": self.eps,
            "sigma": self.sigma,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    @property
    def channels(self) -> np.ndarray:
        """The channels this detector models, drawn from ``seed``."""
        return select_channels(self.features.dim, self.n_features, self.seed)

    def grid_shape(self, image_shape: tuple[int, int]) -> tuple[int, int]:
        """(h, w) feature grid of an image of this (height, width), padding cells included."""
        padded_h, padded_w = self.letterbox.padded_shape(*image_shape)
        stride = self.features.stride
        return padded_h // stride, padded_w // stride

    # ------------------------------------------------------------------ embedding
    def _embed_batches(self, images: Iterable[np.ndarray], total: int | None, desc: str,
                       grid: tuple[int, int] | None) -> Iterator[tuple[list[np.ndarray], torch.Tensor]]:
        """Batches of images with their (B, D, h, w) patch features, every image on the same grid.

        ``grid``: the grid every image must give (None: the first image's). An image on another grid is
        refused as soon as it is read, so a caller reading images from files knows which one it was.
        """
        letterbox = self.letterbox

        def batches() -> Iterator[list[np.ndarray]]:
            expected = grid
            batch: list[np.ndarray] = []
            for image in images:
                found = self.grid_shape(image.shape[:2])
                expected = expected or found
                if found != expected:
                    raise GridMismatchError(
                        f"PaDiM models one Gaussian per position of a {expected[0]}x{expected[1]} feature grid, but "
                        f"an image of {image.shape[1]}x{image.shape[0]} px gives a {found[0]}x{found[1]} grid at "
                        f"image size {self.image_size}: every image of a category must have the same aspect ratio "
                        "(use PatchCore for mixed shapes)"
                    )
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
                batch.append(image)
            if batch:
                yield batch

        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress) as bar:
            for batch in batches():
                # one grid, but images of one grid may differ in size: the letterbox resizes each
                yield batch, self.features(torch.stack([letterbox(image) for image in batch]))
                bar.update(len(batch))

    # ------------------------------------------------------------------ fitting
    def fit(self, images: Iterable[np.ndarray], total: int | None = None) -> Padim:
        """Fit one Gaussian per grid position on good images (uint8 RGB, one aspect ratio)."""
        channels = torch.from_numpy(self.channels)
        count, total_sum, outer, grid = 0, None, None, None
        for _, embeddings in self._embed_batches(images, total, "fitting", None):
            grid = tuple(embeddings.shape[-2:])
            selected = embeddings[:, channels].flatten(2).transpose(1, 2).double()  # (B, P, k)
            batch_sum = selected.sum(0)
            batch_outer = torch.einsum("bpi,bpj->pij", selected, selected)
            total_sum = batch_sum if total_sum is None else total_sum + batch_sum
            outer = batch_outer if outer is None else outer + batch_outer
            count += embeddings.shape[0]
        if grid is None:
            raise PadimFitError("no images given")
        return self.set_statistics(count, total_sum.numpy(), outer.numpy(), grid)

    def set_statistics(self, count: int, total: np.ndarray, outer: np.ndarray, grid_shape: Sequence[int]) -> Padim:
        """Form the Gaussians from summed statistics (e.g. of several clients): count, sum (P, k), sum x x^T (P, k, k).

        Covariances use the unbiased (n - 1) normalisation of ``np.cov``, plus ``eps * I``.
        """
        grid = (int(grid_shape[0]), int(grid_shape[1]))
        total = np.asarray(total, dtype=np.float64)
        outer = np.asarray(outer, dtype=np.float64)
        positions, k = grid[0] * grid[1], self.n_features
        if total.shape != (positions, k) or outer.shape != (positions, k, k):
            raise ValueError(f"statistics of shape sum {total.shape}, outer {outer.shape} do not fit a {grid} grid "
                             f"of {k} features")
        if count < 2:
            raise PadimFitError(f"PaDiM needs at least 2 training images for a covariance, got {count}")
        mean = total / count
        cov = (outer - count * np.einsum("pi,pj->pij", mean, mean)) / (count - 1) + self.eps * np.eye(k)
        self.sufficient_statistics_ = {"count": int(count), "sum": total, "sum_outer": outer}
        self.n_train_images_ = int(count)
        self.grid_shape_ = grid
        self.mean_ = mean
        self.covariance_ = cov
        inv_cov = np.linalg.inv(cov)
        self._set_scorer(mean.astype(np.float32), inv_cov.astype(np.float32), grid)
        return self

    def _set_scorer(self, mean: np.ndarray, inv_cov: np.ndarray, grid: tuple[int, int]) -> None:
        self._scorer = MahalanobisMap(torch.from_numpy(self.channels), torch.from_numpy(mean),
                                      torch.from_numpy(inv_cov), grid)
        self.grid_shape_ = grid

    def _check_fitted(self) -> MahalanobisMap:
        if self._scorer is None:
            raise RuntimeError("this PaDiM has no Gaussians yet: call fit() or load() first")
        return self._scorer

    # ------------------------------------------------------------------ inference
    def predict(self, images: Iterable[np.ndarray], total: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image anomaly scores (n,) and anomaly maps, each float32 at its image's original size."""
        scorer = self._check_fitted()
        scores: list[float] = []
        maps: list[np.ndarray] = []
        for batch, embeddings in self._embed_batches(images, total, "scoring", scorer.grid_shape):
            distances = scorer(embeddings)
            padded = self.letterbox.padded_shape(*batch[0].shape[:2])
            upsampled = torch.nn.functional.interpolate(distances[:, None], size=padded, mode="bilinear",
                                                        align_corners=False)[:, 0]
            smoothed = gaussian_blur(upsampled, self.sigma)
            for image, smooth in zip(batch, smoothed, strict=True):
                restored = self.letterbox.restore(smooth, image.shape[:2])
                maps.append(restored)
                scores.append(float(restored.max()))
        return np.asarray(scores, dtype=np.float64), maps

    def score_samples(self, images: Iterable[np.ndarray], total: int | None = None) -> np.ndarray:
        """Image anomaly scores only (higher = more anomalous)."""
        return self.predict(images, total)[0]

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write the means and inverse covariances (safetensors) and settings (JSON); no pickle, no paths."""
        scorer = self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        params = self.get_params()
        del params["weights"]  # a model file never names a file to open; the hash identifies the weights
        config = {
            "format": MODEL_FORMAT,
            "fedinspect_version": __version__,
            "params": params,
            "weights_sha256": file_sha256(self.features.extractor.weights_path),
            "grid_shape": list(scorer.grid_shape),
            "n_train_images": getattr(self, "n_train_images_", None),
        }
        tensors = {"mean": scorer.mean.numpy(), "inv_cov": scorer.inv_cov.numpy()}
        (directory / GAUSSIANS_FILE).write_bytes(save_tensors(tensors))
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, progress: bool = False, weights: str | Path | None = None) -> Padim:
        """Read a model written by :meth:`save`, checking every file and the backbone against it (ModelFileError)."""
        directory = Path(directory)
        config_path, tensors_path = directory / CONFIG_FILE, directory / GAUSSIANS_FILE
        for path in (config_path, tensors_path):
            if not path.is_file():
                raise ModelFileError(f"{path}: missing (is {directory} a fedinspect PaDiM model folder?)")
        config = read_settings(config_path, MODEL_FORMAT)
        grid = config.get("grid_shape")
        if (not isinstance(grid, list) or len(grid) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid)):
            raise ModelFileError(f"{config_path}: grid_shape must be two positive integers, got {grid!r}")
        params = constructor_params(config, config_path)
        try:
            model = cls(**params, weights=weights, progress=progress)
            channels = model.channels
        except (TypeError, ValueError) as error:
            raise ModelFileError(f"{config_path}: invalid settings ({error})") from error
        check_weights(config, config_path, model.features.extractor.weights_path)
        positions, k = grid[0] * grid[1], len(channels)
        tensors = read_tensors(tensors_path, {"mean": ((positions, k), np.float32),
                                              "inv_cov": ((positions, k, k), np.float32)}, what="Gaussians")
        mean, inv_cov = tensors["mean"], tensors["inv_cov"]
        model._set_scorer(mean, inv_cov, (grid[0], grid[1]))
        model.n_train_images_ = config.get("n_train_images")
        return model

