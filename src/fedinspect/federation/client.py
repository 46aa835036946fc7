"""The client role: a factory turns its own good images into a memory-bank update.

Raw images never leave the client: it extracts patch embeddings with the backbone the server
names, keeps a local greedy coreset per category, and sends only those embeddings with its
sample and patch counts. The same code runs in-process and inside a Flower ``ClientApp``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedinspect.data.images import read_image
from fedinspect.detectors.patchcore import PatchCore
from fedinspect.federation.update import CategoryUpdate, ClientUpdate

EmbeddingCache = dict[Path, np.ndarray]


@dataclass(frozen=True)
class RoundSettings:
    """What the server tells every client: the feature extractor and the local coreset to use."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None
    image_size: int = 256
    # 3% of each client's patches, sent as float16: measured to keep accuracy while cutting traffic
    # to ~17 MB for AutoVI-sized data (benchmarks/bench_federation.py; README "Traffic").
    local_coreset_ratio: float = 0.03
    projection_dim: int = 64
    coreset_chunk_size: int = 16384
    precision: str = "float16"
    seed: int = 0

    def detector(self, progress: bool = False) -> PatchCore:
        """A PatchCore configured as the server asked (used for embedding and local coresets)."""
        return PatchCore(
            backbone=self.backbone, layers=self.layers, image_size=self.image_size,
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
        update = ClientUpdate(self.client_id)
        stats = ClientStats()
        for category, paths in sorted(self.images.items()):
            start = time.perf_counter()
            patches = self._embed(detector, paths, cache)
            stats.feature_extraction_s += time.perf_counter() - start
            start = time.perf_counter()
            kept = detector.select_coreset(patches, settings.local_coreset_ratio,
                                           seed=derived_seed(settings.seed, self.client_id, category))
            stats.local_coreset_s += time.perf_counter() - start
            update.categories[category] = CategoryUpdate(kept, n_samples=len(paths), n_patches=len(patches))
            stats.per_category[category] = {"samples": len(paths), "patches": len(patches), "coreset": len(kept)}
        return update, stats

    def _embed(self, detector: PatchCore, paths: Sequence[Path], cache: EmbeddingCache | None) -> np.ndarray:
        rows = []
        missing = [p for p in paths if cache is None or p not in cache]
        if missing:
            per_image = detector.embed_per_image((self.load_image(p) for p in missing), total=len(missing))
            for path, patches in zip(missing, per_image, strict=True):
                if cache is not None:
                    cache[path] = patches
                rows.append((path, patches))
        found = dict(rows)
        return np.concatenate([found[p] if p in found else cache[p] for p in paths])
