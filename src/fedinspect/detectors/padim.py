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
(:meth:`Padim.statistics`, a :class:`PadimStatistics`; kept as :attr:`Padim.sufficient_statistics_`):
statistics of disjoint image sets add up exactly, so federated PaDiM is one round without loss
(clients send their statistics, the server adds them and calls :meth:`Padim.set_statistics`).
:mod:`fedinspect.privacy.statistics_dp` makes that round differentially private per image.
Size: the sum of outer products is float64 (P, k, k) for P grid positions, and the saved inverse
covariances float32 of the same shape (efficientnet_lite0 at image size 256: 32 x 32 positions x
100^2 features = 41 MB on disk).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as save_tensors
from torch import nn
from tqdm.auto import tqdm

from fedinspect import __version__
from fedinspect.backbones import DEFAULT_RUNTIME, check_runtime
from fedinspect.data.prefetch import prefetch
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


STATISTICS_KEYS = ("count", "sum", "sum_outer", "grid_shape")


class StatisticsError(FedinspectError, ValueError):
    """Statistics (e.g. a client's update) that are not a valid PaDiM count, sum and sum of outer products."""


@dataclass(frozen=True, eq=False)
class PadimStatistics:
    """The sufficient statistics of PaDiM's Gaussians over some images: they add up over disjoint image sets.

    ``count`` images (an integer; a real number once Gaussian noise was added, ``noisy=True``), ``sum``
    (P, k) and ``sum_outer`` (P, k, k) float64 of the selected features at each of the P = h * w
    positions of ``grid_shape``. ``clipped``: how many images :meth:`Padim.statistics` clipped, to
    ``clip_norm`` (None: not clipped); local facts about the data, never part of :meth:`to_arrays` (the
    clipped count is not covered by any DP guarantee).
    """

    count: float
    sum: np.ndarray
    sum_outer: np.ndarray
    grid_shape: tuple[int, int]
    clipped: int = 0
    noisy: bool = False
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        grid = self.grid_shape
        if (len(grid) != 2 or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0
                                      for v in grid)):
            raise StatisticsError(f"grid_shape must be two positive integers, got {grid!r}")
        object.__setattr__(self, "grid_shape", (int(grid[0]), int(grid[1])))
        count = self.count
        if isinstance(count, bool) or not isinstance(count, int | float | np.integer | np.floating):
            raise StatisticsError(f"count must be a number, got {count!r}")
        if not math.isfinite(count):
            raise StatisticsError(f"count must be finite, got {count}")
        if not self.noisy and (count < 0 or not float(count).is_integer()):
            raise StatisticsError(f"count must be a non-negative integer, got {count}")
        object.__setattr__(self, "count", int(count) if not self.noisy else float(count))
        total = np.asarray(self.sum, dtype=np.float64)
        outer = np.asarray(self.sum_outer, dtype=np.float64)
        positions = grid[0] * grid[1]
        if total.ndim != 2 or total.shape[0] != positions:
            raise StatisticsError(f"sum must have shape (positions, features) = ({positions}, k) for a "
                                  f"{grid[0]}x{grid[1]} grid, got {total.shape}")
        k = total.shape[1]
        if outer.shape != (positions, k, k):
            raise StatisticsError(f"sum_outer must have shape {(positions, k, k)} to match sum {total.shape}, "
                                  f"got {outer.shape}")
        for name, array in (("sum", total), ("sum_outer", outer)):
            if not np.isfinite(array).all():
                raise StatisticsError(f"{name} contains NaN or infinite values")
        scale = max(float(np.abs(outer).max(initial=0.0)), 1e-300)
        if np.abs(outer - outer.transpose(0, 2, 1)).max(initial=0.0) > 1e-9 * scale:
            raise StatisticsError("sum_outer is not symmetric")
        object.__setattr__(self, "sum", total)
        object.__setattr__(self, "sum_outer", outer)

    @property
    def n_features(self) -> int:
        return int(self.sum.shape[1])

    def __add__(self, other: PadimStatistics) -> PadimStatistics:
        if not isinstance(other, PadimStatistics):
            return NotImplemented
        if other.grid_shape != self.grid_shape or other.sum.shape != self.sum.shape:
            raise StatisticsError(f"cannot add statistics of a {other.grid_shape} grid of {other.n_features} features "
                                  f"to those of a {self.grid_shape} grid of {self.n_features}")
        return PadimStatistics(self.count + other.count, self.sum + other.sum, self.sum_outer + other.sum_outer,
                               self.grid_shape, self.clipped + other.clipped, self.noisy or other.noisy,
                               self.clip_norm if self.clip_norm == other.clip_norm else None)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The wire form: a flat dict of float64 arrays (``count`` 0-d, ``grid_shape`` (2,)); no ``clipped``."""
        return {"count": np.asarray(float(self.count), dtype=np.float64), "sum": self.sum.copy(),
                "sum_outer": self.sum_outer.copy(), "grid_shape": np.asarray(self.grid_shape, dtype=np.float64)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], noisy: bool = False, grid_shape: Sequence[int] | None = None,
                    n_features: int | None = None, sender: str = "statistics") -> PadimStatistics:
        """Read and validate :meth:`to_arrays`' form, e.g. a client's update (StatisticsError naming ``sender``).

        ``noisy``: accept a real-valued count (a DP release). ``grid_shape`` / ``n_features``: what the
        receiver expects (checked when given).
        """
        try:
            if not isinstance(arrays, Mapping):
                raise StatisticsError(f"expected a mapping of arrays, got {type(arrays).__name__}")
            missing, unknown = set(STATISTICS_KEYS) - set(arrays), set(arrays) - set(STATISTICS_KEYS)
            if missing or unknown:
                raise StatisticsError(f"expected keys {list(STATISTICS_KEYS)}; missing {sorted(missing)}, "
                                      f"unknown {sorted(map(str, unknown))}")
            values = {}
            for key in STATISTICS_KEYS:
                array = np.asarray(arrays[key])
                if array.dtype.kind not in "iuf":
                    raise StatisticsError(f"{key} must be real numbers, got dtype {array.dtype}")
                values[key] = array.astype(np.float64)
            count, grid = values["count"], values["grid_shape"]
            if count.shape != ():
                raise StatisticsError(f"count must be a scalar, got shape {count.shape}")
            if grid.shape != (2,) or not np.isfinite(grid).all() or not (grid == np.round(grid)).all():
                raise StatisticsError(f"grid_shape must be two integers, got {grid.tolist()}")
            stats = cls(float(count), values["sum"], values["sum_outer"], (int(grid[0]), int(grid[1])), noisy=noisy)
            if grid_shape is not None and stats.grid_shape != tuple(grid_shape):
                raise StatisticsError(f"grid {stats.grid_shape}, expected {tuple(grid_shape)}")
            if n_features is not None and stats.n_features != n_features:
                raise StatisticsError(f"{stats.n_features} features, expected {n_features}")
            return stats
        except StatisticsError as error:
            raise StatisticsError(f"{sender}: {error}") from None


def feature_statistics(features: torch.Tensor | np.ndarray, grid_shape: Sequence[int],
                       clip_norm: float | None = None) -> PadimStatistics:
    """Statistics of (n_images, P, k) selected features; ``clip_norm`` clips each image's (P, k) block in L2."""
    x = torch.as_tensor(features).double()
    if x.ndim != 3:
        raise ValueError(f"features must be (images, positions, features), got shape {tuple(x.shape)}")
    clipped = 0
    if clip_norm is not None:
        if not clip_norm > 0 or not math.isfinite(clip_norm):
            raise ValueError(f"clip norm must be a positive number, got {clip_norm}")
        norms = x.flatten(1).norm(dim=1)
        over = norms > clip_norm
        clipped = int(over.sum())
        x = x * torch.where(over, clip_norm / norms.clamp_min(1e-300), torch.ones_like(norms))[:, None, None]
    return PadimStatistics(int(x.shape[0]), x.sum(0).numpy(), torch.einsum("bpi,bpj->pij", x, x).numpy(),
                           (int(grid_shape[0]), int(grid_shape[1])), clipped, clip_norm=clip_norm)


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
    backbone, layers, weights, image_size, sigma, batch_size, seed, progress, runtime:
        As for :class:`~fedinspect.detectors.patchcore.PatchCore` (same patch features and letterbox).
    n_features:
        Channels kept, chosen at random with ``seed`` (paper: 100 of 448 for ResNet18, 550 for WRN50).
    eps:
        Regularisation added to every covariance's diagonal (paper: 0.01).
    keep_aspect_ratio:
        True (default): the letterbox keeps each image's aspect ratio, so a category must have one aspect
        ratio (one grid). False: every image is stretched to ``image_size`` x ``image_size`` (as the paper
        and anomalib do), so categories of mixed shapes (the magnetic tiles) can be modelled.
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
        keep_aspect_ratio: bool = True,
        seed: int = 0,
        progress: bool = False,
        runtime: str = DEFAULT_RUNTIME,
    ) -> None:
        self.backbone = backbone
        if not isinstance(keep_aspect_ratio, bool):
            raise SettingsError(f"keep_aspect_ratio must be true or false, got {keep_aspect_ratio!r}")
        self.keep_aspect_ratio = keep_aspect_ratio
        self.layers = tuple(layers) if layers is not None else None
        self.weights = weights
        self.runtime = check_runtime(runtime)
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
        self.clip_norm_: float | None = None

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
            "keep_aspect_ratio": self.keep_aspect_ratio,
            "seed": self.seed,
            "runtime": self.runtime,
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
                        "(use keep_aspect_ratio=False, or PatchCore, for mixed shapes)"
                    )
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
                batch.append(image)
            if batch:
                yield batch

        # one grid, but images of one grid may differ in size: the letterbox resizes each; reading and resizing
        # the next batch overlaps the backbone's work on this one
        ready = prefetch((batch, torch.stack([letterbox(image) for image in batch])) for batch in batches())
        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress) as bar:
            for batch, tensor in ready:
                yield batch, self.features(tensor)
                bar.update(len(batch))

    # ------------------------------------------------------------------ fitting
    def statistics(self, images: Iterable[np.ndarray], total: int | None = None,
                   clip_norm: float | None = None) -> PadimStatistics:
        """Count, sum and sum of outer products of the selected features of ``images``, per grid position.

        Needs no fitted Gaussians (a federated client calls it on an unfitted detector) and forms none.
        ``clip_norm``: scale every image's (P, k) block of selected features, flattened, down to this L2
        norm before it is added (the per-image clipping that bounds the sensitivity for differential
        privacy, :mod:`fedinspect.privacy.statistics_dp`); the result's ``clipped`` counts such images.
        """
        channels = torch.from_numpy(self.channels)
        result: PadimStatistics | None = None
        for _, embeddings in self._embed_batches(images, total, "fitting", None):
            selected = embeddings[:, channels].flatten(2).transpose(1, 2)  # (B, P, k)
            part = feature_statistics(selected, tuple(embeddings.shape[-2:]), clip_norm)
            result = part if result is None else result + part
        if result is None:
            raise PadimFitError("no images given")
        return result

    def fit(self, images: Iterable[np.ndarray], total: int | None = None) -> Padim:
        """Fit one Gaussian per grid position on good images (uint8 RGB, one aspect ratio)."""
        stats = self.statistics(images, total)
        return self.set_statistics(stats.count, stats.sum, stats.sum_outer, stats.grid_shape)

    def set_statistics(self, count: float, total: np.ndarray, outer: np.ndarray, grid_shape: Sequence[int],
                       clip_norm: float | None = None) -> Padim:
        """Form the Gaussians from summed statistics (e.g. of several clients): count, sum (P, k), sum x x^T (P, k, k).

        Covariances use the unbiased (n - 1) normalisation of ``np.cov``, plus ``eps * I``. ``count`` may be
        a real number (a noisy count of a differentially private release); it must be at least 2. For
        noisy statistics, whose covariance need not be positive definite, use
        :func:`fedinspect.privacy.statistics_dp.set_noisy_statistics` instead. ``clip_norm``: the statistics
        are of images clipped to this norm (:meth:`statistics`), so test images are clipped alike.
        """
        grid = (int(grid_shape[0]), int(grid_shape[1]))
        total = np.asarray(total, dtype=np.float64)
        outer = np.asarray(outer, dtype=np.float64)
        positions, k = grid[0] * grid[1], self.n_features
        if total.shape != (positions, k) or outer.shape != (positions, k, k):
            raise ValueError(f"statistics of shape sum {total.shape}, outer {outer.shape} do not fit a {grid} grid "
                             f"of {k} features")
        if not count >= 2:
            raise PadimFitError(f"PaDiM needs at least 2 training images for a covariance, got {count}")
        count = int(count) if float(count).is_integer() else float(count)
        mean = total / count
        cov = (outer - count * np.einsum("pi,pj->pij", mean, mean)) / (count - 1) + self.eps * np.eye(k)
        self.sufficient_statistics_ = {"count": count, "sum": total, "sum_outer": outer}
        return self.set_gaussians(mean, cov, grid, count, clip_norm)

    def set_gaussians(self, mean: np.ndarray, covariance: np.ndarray, grid_shape: Sequence[int],
                      n_train_images: float | None = None, clip_norm: float | None = None) -> Padim:
        """Use these per-position means (P, k) and covariances (P, k, k), which must be positive definite.

        ``clip_norm``: the Gaussians model images whose (P, k) block of selected features was clipped to
        this L2 norm; :meth:`predict` then clips every test image's block the same way before scoring
        (otherwise a test image would be compared, unclipped, with Gaussians of shrunken features).
        """
        if clip_norm is not None and not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"clip norm must be a positive number, got {clip_norm}")
        grid = (int(grid_shape[0]), int(grid_shape[1]))
        mean = np.asarray(mean, dtype=np.float64)
        cov = np.asarray(covariance, dtype=np.float64)
        positions, k = grid[0] * grid[1], self.n_features
        if mean.shape != (positions, k) or cov.shape != (positions, k, k):
            raise ValueError(f"Gaussians of shape mean {mean.shape}, covariance {cov.shape} do not fit a {grid} grid "
                             f"of {k} features")
        self.n_train_images_ = None if n_train_images is None else round(n_train_images)
        self.clip_norm_ = None if clip_norm is None else float(clip_norm)
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
            if self.clip_norm_ is not None:  # scaling all channels scales the selected ones by the same factor
                norms = embeddings[:, scorer.channels].double().flatten(1).norm(dim=1)
                factor = (self.clip_norm_ / norms.clamp_min(self.clip_norm_)).float()
                embeddings = embeddings * factor[:, None, None, None]
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
            "clip_norm": self.clip_norm_,
        }
        tensors = {"mean": scorer.mean.numpy(), "inv_cov": scorer.inv_cov.numpy()}
        (directory / GAUSSIANS_FILE).write_bytes(save_tensors(tensors))
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, progress: bool = False, weights: str | Path | None = None,
             runtime: str | None = None) -> Padim:
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
        params.setdefault("runtime", "torch")  # written before runtimes existed: torch eager
        if runtime is not None:  # the caller's choice of how to run the backbone (the features are the same)
            params["runtime"] = runtime
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
        clip = config.get("clip_norm")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or not clip > 0
                                 or not math.isfinite(clip)):
            raise ModelFileError(f"{config_path}: clip_norm must be a positive number or null, got {clip!r}")
        model.clip_norm_ = None if clip is None else float(clip)
        return model

