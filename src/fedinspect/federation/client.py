"""The client role: a factory turns its own good images into a memory-bank update.

Raw images never leave the client: it extracts patch embeddings with the backbone the server
names, keeps a local greedy coreset per category, and sends only those embeddings with its
sample and patch counts. The same code runs in-process and inside a Flower ``ClientApp``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedinspect.backbones import DEFAULT_RUNTIME, check_runtime
from fedinspect.data.images import read_image
from fedinspect.detectors.model_files import check_image_size
from fedinspect.detectors.nearest_neighbours import METHODS as SEARCH_METHODS
from fedinspect.detectors.patchcore import PatchCore
from fedinspect.federation.update import CategoryUpdate, ClientUpdate
from fedinspect.privacy.bank_dp import DEFAULT_CLIP_NORM, BankPrivacy, private_centres, privatize_embeddings
from fedinspect.privacy.obfuscation import Obfuscation

EmbeddingCache = MutableMapping[Path, np.ndarray]


@dataclass(frozen=True)
class RoundSettings:
    """What the server tells every client: the feature extractor and the local coreset to use."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None
    image_size: int = 256
    runtime: str = DEFAULT_RUNTIME  # what runs the backbone (fedinspect.backbones.RUNTIMES): same features
    search: str = "auto"  # nearest-neighbour search of the banks (detectors/nearest_neighbours.py)
    # 3% of each client's patches, sent as float16: measured to keep accuracy while cutting traffic
    # to ~17 MB for AutoVI-sized data (benchmarks/bench_federation.py; README "Traffic").
    local_coreset_ratio: float = 0.03
    projection_dim: int = 64
    coreset_chunk_size: int = 16384
    precision: str = "float16"
    seed: int = 0
    # Image obfuscation before feature extraction ("" = none; e.g. "average,shuffle"), with the
    # federation's secret key. The key travels to the clients with these settings and is never
    # written to results.json.
    obfuscation: str = ""
    obfuscation_key: int = 0
    # Differential privacy of the bank ("" = off; "embedding" or "image", see privacy/bank_dp.py).
    # Give dp_epsilon (> 0) or dp_noise_multiplier (> 0); 0 means "not given".
    dp_unit: str = ""
    dp_epsilon: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    dp_clip_norm: float = DEFAULT_CLIP_NORM
    dp_patches_per_image: int = 16
    dp_clusters: int = 8
    dp_iterations: int = 2

    def __post_init__(self) -> None:
        check_image_size(self.image_size)
        check_runtime(self.runtime)
        if self.search not in SEARCH_METHODS:
            raise ValueError(f"unknown search {self.search!r}; choices: {', '.join(SEARCH_METHODS)}")
        self.obfuscator()  # validate early: a bad method name or DP setting fails before any work
        self.bank_privacy()

    def obfuscator(self) -> Obfuscation | None:
        """The image obfuscation clients apply before embedding (None when off)."""
        obfuscation = Obfuscation(self.obfuscation, key=self.obfuscation_key)
        return obfuscation if obfuscation.active else None

    def bank_privacy(self) -> BankPrivacy | None:
        """The DP mechanism clients apply to their banks (None when off)."""
        if not self.dp_unit:
            return None
        return BankPrivacy(
            unit=self.dp_unit, epsilon=self.dp_epsilon or None, noise_multiplier=self.dp_noise_multiplier or None,
            delta=self.dp_delta, clip_norm=self.dp_clip_norm, patches_per_image=self.dp_patches_per_image,
            clusters=self.dp_clusters, iterations=self.dp_iterations,
        )

    def load(self, image: np.ndarray) -> np.ndarray:
        """What the detector sees of an image: the image itself, or its obfuscated, resized version."""
        obfuscation = self.obfuscator()
        return image if obfuscation is None else obfuscation.prepare(image, self.image_size)

    def detector(self, progress: bool = False) -> PatchCore:
        """A PatchCore configured as the server asked (used for embedding and local coresets)."""
        return PatchCore(
            backbone=self.backbone, layers=self.layers, image_size=self.image_size, runtime=self.runtime,
            search=self.search,
            coreset_ratio=self.local_coreset_ratio, projection_dim=self.projection_dim,
            coreset_chunk_size=self.coreset_chunk_size, seed=self.seed, progress=progress,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundSettings:
        values = dict(data)
        if values.get("layers") is not None:
            values["layers"] = tuple(values["layers"])
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown round settings: {sorted(unknown)}")
        return cls(**values)


def derived_seed(seed: int, *names: str) -> int:
    """A seed for one (client, category) pair, stable across processes and Python versions."""
    keys = [seed, *(zlib.crc32(name.encode()) for name in names)]
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


@dataclass
class ClientStats:
    """What the client measured while building its update (kept locally, not sent)."""

    feature_extraction_s: float = 0.0
    local_coreset_s: float = 0.0
    per_category: dict[str, dict[str, int]] = field(default_factory=dict)


class FederatedClient:
    """One factory: its training images per category, and the code that summarizes them."""

    def __init__(self, client_id: str, images: Mapping[str, Sequence[Path]],
                 load_image: Callable[[Path], np.ndarray] = read_image) -> None:
        if not any(images.values()):
            raise ValueError(f"client {client_id} holds no training image")
        self.client_id = str(client_id)
        self.images = {category: list(paths) for category, paths in images.items() if paths}
        self.load_image = load_image

    def fit(self, settings: RoundSettings, detector: PatchCore | None = None,
            cache: EmbeddingCache | None = None, progress: bool = False) -> tuple[ClientUpdate, ClientStats]:
        """Embed every image, keep a local coreset per category; returns the update and local stats.

        ``detector`` and ``cache`` let an in-process simulation share one loaded backbone and reuse
        embeddings across roles; they do not change the result.
        """
        detector = detector or settings.detector(progress)
        privacy = settings.bank_privacy()
        update = ClientUpdate(self.client_id)
        stats = ClientStats()
        for category, paths in sorted(self.images.items()):
            start = time.perf_counter()
            per_image = self._embed(detector, paths, cache, settings)
            patches = np.concatenate(per_image)
            stats.feature_extraction_s += time.perf_counter() - start
            start = time.perf_counter()
            seed = derived_seed(settings.seed, self.client_id, category)
            if privacy is not None and privacy.unit == "image":
                kept = private_centres(per_image, privacy, seed=derived_seed(seed, "dp"))
            else:
                if privacy is not None:  # noise first, coreset second: the selection is post-processing
                    patches = privatize_embeddings(patches, privacy, seed=derived_seed(seed, "dp"))
                kept = detector.select_coreset(patches, settings.local_coreset_ratio, seed=seed)
            stats.local_coreset_s += time.perf_counter() - start
            update.categories[category] = CategoryUpdate(kept, n_samples=len(paths), n_patches=len(patches))
            stats.per_category[category] = {"samples": len(paths), "patches": len(patches), "coreset": len(kept)}
        return update, stats

    def _embed(self, detector: PatchCore, paths: Sequence[Path], cache: EmbeddingCache | None,
               settings: RoundSettings) -> list[np.ndarray]:
        """Each image's patch embeddings, in the order of ``paths``."""
        rows = []
        missing = [p for p in paths if cache is None or p not in cache]
        if missing:
            images = (settings.load(self.load_image(p)) for p in missing)
            per_image = detector.embed_per_image(images, total=len(missing))
            for path, patches in zip(missing, per_image, strict=True):
                if cache is not None:
                    cache[path] = patches
                rows.append((path, patches))
        found = dict(rows)
        return [found[p] if p in found else cache[p] for p in paths]
