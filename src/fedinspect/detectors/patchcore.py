"""PatchCore anomaly detection (Roth et al., CVPR 2022) as a scikit-learn style estimator.

``fit`` embeds good images into locally aware patch features and keeps a greedy coreset of
them as the memory bank; ``predict`` scores every patch of a test image by its distance to the
nearest bank entry, giving an anomaly map at the image's own size and an image score (the
maximum patch score, reweighted as in the paper). The detector knows nothing of federation:
a federated server simply hands it a memory bank through :meth:`PatchCore.set_memory_bank`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors
from tqdm.auto import tqdm

from fedinspect import __version__
from fedinspect.backbones import DEFAULT_RUNTIME, check_runtime
from fedinspect.data.prefetch import prefetch
from fedinspect.detectors.coreset import coreset_size, greedy_coreset
from fedinspect.detectors.feature_detector import FeatureDetector
from fedinspect.detectors.model_files import (
    check_image_size,
    check_weights,
    constructor_params,
    file_sha256,
    read_settings,
)
from fedinspect.detectors.nearest_neighbours import METHODS as SEARCH_METHODS
from fedinspect.detectors.nearest_neighbours import NearestNeighbours
from fedinspect.detectors.patch_features import PatchFeatures
from fedinspect.detectors.preprocessing import gaussian_blur
from fedinspect.errors import ModelFileError

MODEL_FORMAT = "fedinspect.patchcore/1"
CONFIG_FILE = "patchcore.json"
BANK_FILE = "memory_bank.safetensors"
@dataclass(frozen=True)
class EmbeddedImage:
    """A test image's patch embeddings on the padded grid (h, w, D) and its original (height, width)."""

    grid: np.ndarray
    image_shape: tuple[int, int]


def _as_grids(images: Sequence[np.ndarray], embeddings: torch.Tensor) -> list[EmbeddedImage]:
    """(B, D, h, w) embeddings of a batch -> one channels-last grid per image, with its original size."""
    return [EmbeddedImage(grid.permute(1, 2, 0).contiguous().numpy(), image.shape[:2])
            for image, grid in zip(images, embeddings, strict=True)]


class PatchCore(FeatureDetector):
    """PatchCore detector.

    Parameters
    ----------
    backbone, layers, weights:
        Feature extractor from :mod:`fedinspect.backbones` (default: ImageNet EfficientNet-Lite0,
        its stride-8 and stride-16 stages). ``weights`` is a local file of the user's; a saved model
        keeps only its SHA-256, never the path.
    image_size:
        Length in pixels of the image's short side after resizing (at least :data:`MIN_IMAGE_SIZE`);
        the aspect ratio is kept.
    coreset_ratio:
        Fraction of the training patches kept in the memory bank (greedy k-center coreset).
    projection_dim, coreset_chunk_size:
        Random-projection size used by the coreset, and the largest set it selects from exactly.
    num_neighbors:
        Size of the bank neighbourhood used by the image-score reweighting (1 disables it).
    sigma:
        Standard deviation, in resized-image pixels, of the Gaussian smoothing of anomaly maps.
    batch_size, seed, progress:
        Images per forward pass, seed of every random choice, and whether to show progress bars.
    runtime:
        How the frozen backbone runs: ``"openvino"`` (default, f32, the fastest on CPU), ``"onnx"``
        (onnxruntime), ``"torch"`` (eager) or ``"openvino-bf16"`` (lower precision, opt-in); every
        runtime's maps are checked against torch's (:mod:`fedinspect.backbones.runtime`).
    search:
        Nearest-neighbour search in the bank (:class:`NearestNeighbours`): ``"auto"`` (default: exact up to
        5,000 rows, IVF above, measured within 1e-3 of exact in image AUROC and AUC-sPRO), ``"exact"``,
        ``"ivf"`` or ``"hnsw"``. Under an approximate index each image's largest patch distance (its score
        before reweighting) is made exact (:meth:`NearestNeighbours.refine_maximum`).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Sequence[str] | None = None,
        weights: str | None = None,
        image_size: int = 256,
        coreset_ratio: float = 0.1,
        projection_dim: int = 64,
        coreset_chunk_size: int = 16384,
        num_neighbors: int = 9,
        sigma: float = 4.0,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = False,
        runtime: str = DEFAULT_RUNTIME,
        search: str = "auto",
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers) if layers is not None else None
        self.weights = weights
        self.runtime = check_runtime(runtime)
        if search not in SEARCH_METHODS:
            raise ValueError(f"unknown search {search!r}; choices: {', '.join(SEARCH_METHODS)}")
        self.search = search
        self.image_size = check_image_size(image_size)
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.coreset_chunk_size = coreset_chunk_size
        self.num_neighbors = num_neighbors
        self.sigma = sigma
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self._features: PatchFeatures | None = None
        self._index: NearestNeighbours | None = None

    # ------------------------------------------------------------------ parameters
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (scikit-learn convention)."""
        return {
            "backbone": self.backbone,
            "layers": list(self.layers) if self.layers is not None else None,
            "weights": self.weights,
            "image_size": self.image_size,
            "coreset_ratio": self.coreset_ratio,
            "projection_dim": self.projection_dim,
            "coreset_chunk_size": self.coreset_chunk_size,
            "num_neighbors": self.num_neighbors,
            "sigma": self.sigma,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "runtime": self.runtime,
            "search": self.search,
        }

    # ------------------------------------------------------------------ embedding
    def _batches(self, images: Iterable[np.ndarray]) -> Iterator[list[np.ndarray]]:
        """Consecutive images that share a resized shape, at most ``batch_size`` at a time."""
        batch: list[np.ndarray] = []
        shape = None
        for image in images:
            image_shape = self.letterbox.padded_shape(*image.shape[:2])
            if batch and (image_shape != shape or len(batch) == self.batch_size):
                yield batch
                batch = []
            batch.append(image)
            shape = image_shape
        if batch:
            yield batch

    def _valid_cells(self, image_shape: tuple[int, int]) -> tuple[int, int]:
        """Embedding-grid cells covering the resized image, not its padding."""
        resized_h, resized_w = self.letterbox.resized_shape(*image_shape)
        stride = self.features.stride
        return math.ceil(resized_h / stride), math.ceil(resized_w / stride)

    def _embed_batches(
        self, images: Iterable[np.ndarray], total: int | None, desc: str
    ) -> Iterator[tuple[list[np.ndarray], torch.Tensor]]:
        letterbox = self.letterbox
        # reading and resizing the next batch overlaps the backbone's work on this one
        ready = prefetch((batch, torch.stack([letterbox(image) for image in batch])) for batch in self._batches(images))
        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress) as bar:
            for batch, tensor in ready:
                yield batch, self.features(tensor)
                bar.update(len(batch))

    def embed_per_image(self, images: Iterable[np.ndarray], total: int | None = None) -> list[np.ndarray]:
        """Patch embeddings of each image, (n_patches_i, D) float32, padding cells excluded."""
        rows = []
        for batch, embeddings in self._embed_batches(images, total, "embedding"):
            for image, embedding in zip(batch, embeddings, strict=True):
                cells_h, cells_w = self._valid_cells(image.shape[:2])
                valid = embedding[:, :cells_h, :cells_w]
                rows.append(np.ascontiguousarray(valid.reshape(valid.shape[0], -1).T.numpy(), dtype=np.float32))
        return rows

    def embed(self, images: Iterable[np.ndarray], total: int | None = None) -> np.ndarray:
        """Patch embeddings (n_patches, D) of the given images, padding cells excluded."""
        rows = self.embed_per_image(images, total)
        if not rows:
            raise ValueError("no images given")
        return np.concatenate(rows)

    # ------------------------------------------------------------------ fitting
    def fit(self, images: Iterable[np.ndarray], total: int | None = None) -> PatchCore:
        """Build the memory bank from good images (uint8 RGB arrays of any size)."""
        patches = self.embed(images, total)
        self.n_train_patches_ = int(patches.shape[0])
        return self.set_memory_bank(self.select_coreset(patches), n_train_patches=self.n_train_patches_)

    def select_coreset(self, patches: np.ndarray, ratio: float | None = None, seed: int | None = None) -> np.ndarray:
        """Greedy coreset of ``patches`` keeping ``ratio`` (default: ``coreset_ratio``) of them."""
        n_select = coreset_size(len(patches), self.coreset_ratio if ratio is None else ratio)
        selected = greedy_coreset(
            patches, n_select, projection_dim=self.projection_dim, seed=self.seed if seed is None else seed,
            chunk_size=self.coreset_chunk_size, progress=self.progress,
        )
        return patches[selected]

    def set_memory_bank(self, bank: np.ndarray, n_train_patches: int | None = None) -> PatchCore:
        """Use ``bank`` (n, D) as the memory bank, e.g. one aggregated by a federated server."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty (n, d) array, got shape {bank.shape}")
        if not np.isfinite(bank).all():
            raise ValueError("memory bank contains NaN or infinite values")
        self.memory_bank_ = bank
        self.n_train_patches_ = int(n_train_patches if n_train_patches is not None else bank.shape[0])
        self._index = NearestNeighbours(bank, method=self.search, seed=self.seed)
        return self

    def with_memory_bank(self, bank: np.ndarray) -> PatchCore:
        """A detector with the same settings and loaded backbone, scoring against ``bank``."""
        other = PatchCore(**self.get_params(), progress=self.progress)
        other._features = self._features
        return other.set_memory_bank(bank)

    def _check_fitted(self) -> NearestNeighbours:
        if self._index is None:
            raise RuntimeError("this PatchCore has no memory bank yet: call fit() or load() first")
        return self._index

    # ------------------------------------------------------------------ inference
    def embed_grids(self, images: Iterable[np.ndarray], total: int | None = None) -> list[EmbeddedImage]:
        """Embedding grids of test images, to score them against one or several memory banks."""
        embedded: list[EmbeddedImage] = []
        for batch, embeddings in self._embed_batches(images, total, "embedding"):
            embedded.extend(_as_grids(batch, embeddings))
        return embedded

    def predict(
        self, images: Iterable[np.ndarray], total: int | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image anomaly scores (n,) and anomaly maps, each float32 at its image's original size."""
        self._check_fitted()
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        for batch, embeddings in self._embed_batches(images, total, "scoring"):
            batch_scores, batch_maps = self.predict_embedded(_as_grids(batch, embeddings))
            scores.append(batch_scores)
            maps.extend(batch_maps)
        return np.concatenate(scores) if scores else np.zeros(0), maps

    def predict_embedded(self, embedded: Sequence[EmbeddedImage]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Scores and maps of images already embedded by :meth:`embed_grids` (same backbone)."""
        scores: list[float] = []
        maps: list[np.ndarray] = []
        for score, anomaly_map in self.iter_predict_embedded(embedded):
            scores.append(score)
            maps.append(anomaly_map)
        return np.asarray(scores, dtype=np.float64), maps

    def iter_predict_embedded(self, embedded: Sequence[EmbeddedImage]) -> Iterator[tuple[float, np.ndarray]]:
        """(score, map) of each embedded image in order, made one batch at a time: a caller that consumes
        each map as it comes holds one batch of full-resolution maps, not all of them."""
        index = self._check_fitted()
        start = 0
        while start < len(embedded):
            stop = start + 1
            while (stop < len(embedded) and stop - start < self.batch_size
                   and embedded[stop].grid.shape == embedded[start].grid.shape
                   and embedded[stop].image_shape == embedded[start].image_shape):
                stop += 1
            batch_scores, batch_maps = self._score_batch(index, embedded[start:stop])
            yield from zip(batch_scores, batch_maps, strict=True)
            start = stop

    def _score_batch(
        self, index: NearestNeighbours, batch: Sequence[EmbeddedImage]
    ) -> tuple[list[float], list[np.ndarray]]:
        grid_h, grid_w, dim = batch[0].grid.shape
        if index.bank.shape[1] != dim:
            raise ValueError(
                f"memory bank has {index.bank.shape[1]}-d embeddings but the images were embedded as {dim}-d "
                f"(backbone {self.backbone})"
            )
        features = np.stack([e.grid for e in batch]).astype(np.float32, copy=False)
        distances, nearest = index.search(features.reshape(-1, dim), k=1)
        patch_scores = distances[:, 0].reshape(len(batch), grid_h, grid_w)
        nearest = nearest[:, 0].reshape(len(batch), grid_h, grid_w)
        image_shape = batch[0].image_shape
        cells_h, cells_w = self._valid_cells(image_shape)
        if index.method != "exact":  # the image score is the largest patch distance: make it exact
            for i in range(len(batch)):
                valid = np.s_[i, :cells_h, :cells_w]
                refined_d, refined_i = index.refine_maximum(
                    features[valid].reshape(-1, dim), patch_scores[valid].reshape(-1, 1),
                    nearest[valid].reshape(-1, 1), chunk=8)
                patch_scores[valid] = refined_d.reshape(cells_h, cells_w)
                nearest[valid] = refined_i.reshape(cells_h, cells_w)
        padded = self.letterbox.padded_shape(*image_shape)
        upsampled = torch.nn.functional.interpolate(
            torch.from_numpy(patch_scores)[:, None], size=padded, mode="bilinear", align_corners=False
        )[:, 0]
        smoothed = gaussian_blur(upsampled, self.sigma)
        scores, maps = [], []
        for i in range(len(batch)):
            scores.append(self._image_score(
                patch_scores[i, :cells_h, :cells_w], nearest[i, :cells_h, :cells_w], features[i, :cells_h, :cells_w]
            ))
            maps.append(self.letterbox.restore(smoothed[i], image_shape))
        return scores, maps

    def score_samples(self, images: Iterable[np.ndarray], total: int | None = None) -> np.ndarray:
        """Image anomaly scores only (higher = more anomalous)."""
        return self.predict(images, total)[0]

    def _image_score(self, patch_scores: np.ndarray, nearest: np.ndarray, features: np.ndarray) -> float:
        """Maximum patch score, reweighted by how isolated its nearest bank entry is (PatchCore eq. 7)."""
        flat = int(np.argmax(patch_scores))
        top = float(patch_scores.reshape(-1)[flat])
        if self.num_neighbors <= 1:
            return top
        index = self._check_fitted()
        anchor = index.bank[int(nearest.reshape(-1)[flat])]
        _, support = index.search(anchor[None], k=self.num_neighbors, exact=True)  # one query: exact is cheap
        test_feature = features.reshape(-1, features.shape[-1])[flat]
        distances = np.linalg.norm(index.bank[support[0]] - test_feature, axis=1)
        # 1 - softmax(distances)[nearest entry]; shifted by the max for numerical stability.
        weights = np.exp(distances - distances.max())
        return float((1.0 - weights[0] / weights.sum()) * top)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write the memory bank (safetensors) and settings (JSON) to ``directory``; no pickle."""
        index = self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        params = self.get_params()
        del params["weights"]  # a model file never names a file to open; the hash identifies the weights
        config = {
            "format": MODEL_FORMAT,
            "fedinspect_version": __version__,
            "params": params,
            "weights_sha256": file_sha256(self.features.extractor.weights_path),
            "memory_bank_shape": list(index.bank.shape),
            "n_train_patches": self.n_train_patches_,
        }
        # Both files through Python's open(): the same mode (the umask's default) for the bank and the JSON.
        (directory / BANK_FILE).write_bytes(save_tensors({"memory_bank": index.bank}))
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, progress: bool = False, weights: str | Path | None = None,
             runtime: str | None = None) -> PatchCore:
        """Read a model written by :meth:`save`, checking every file and the backbone against it.

        A model folder is untrusted: it names no file to open. ``weights`` (the user's own file, else
        the backbone's usual search) must hash to the SHA-256 recorded at fitting time, and the bank's
        width must be the backbone's feature dimension; every mismatch is a ModelFileError.
        """
        directory = Path(directory)
        config_path, bank_path = directory / CONFIG_FILE, directory / BANK_FILE
        for path in (config_path, bank_path):
            if not path.is_file():
                raise ModelFileError(f"{path}: missing (is {directory} a fedinspect PatchCore model folder?)")
        config = read_settings(config_path, MODEL_FORMAT)
        bank = _read_bank(bank_path)
        if list(bank.shape) != config.get("memory_bank_shape"):
            raise ModelFileError(
                f"{bank_path}: memory bank shape {list(bank.shape)} does not match "
                f"{config.get('memory_bank_shape')} recorded in {config_path}"
            )
        params = constructor_params(config, config_path)
        params.setdefault("runtime", "torch")  # written before runtimes existed: torch eager
        params.setdefault("search", "exact")  # written before approximate search existed
        if runtime is not None:  # the caller's choice of how to run the backbone (the features are the same)
            params["runtime"] = runtime
        try:
            model = cls(**params, weights=weights, progress=progress)
        except (TypeError, ValueError) as error:
            raise ModelFileError(f"{config_path}: invalid settings ({error})") from error
        if bank.shape[1] != model.features.dim:
            raise ModelFileError(
                f"{bank_path}: memory bank has {bank.shape[1]}-d embeddings but backbone {model.backbone} "
                f"(layers {list(model.features.extractor.layers)}) gives {model.features.dim}-d: "
                f"{config_path} does not describe the model that made this bank"
            )
        check_weights(config, config_path, model.features.extractor.weights_path)
        return model.set_memory_bank(bank, n_train_patches=config.get("n_train_patches"))


def _read_bank(path: Path) -> np.ndarray:
    """The memory bank: a non-empty, finite float32 (n, d) array, exactly as written (never cast)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read memory bank ({error.strerror})") from error
    try:
        bank = load_tensors(data)["memory_bank"]
    except (SafetensorError, KeyError, ValueError) as error:
        raise ModelFileError(f"{path}: corrupt memory bank ({type(error).__name__}: {error})") from error
    if bank.dtype != np.float32:
        raise ModelFileError(f"{path}: memory bank is {bank.dtype}, expected float32")
    if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise ModelFileError(f"{path}: memory bank must be a non-empty (n, d) array, got shape {list(bank.shape)}")
    if not np.isfinite(bank).all():
        raise ModelFileError(f"{path}: memory bank contains NaN or infinite values")
    return bank
