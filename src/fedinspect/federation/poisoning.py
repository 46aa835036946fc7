"""What a malicious client sends: its honest update, altered by a poisoning attack.

The attack is applied to a poisoned client's update after it is built and before it is
serialized, so the server sees exactly the bytes such a client would send. Attacks:

- ``noise``: Gaussian noise on every embedding, with a standard deviation of ``strength`` times the
  per-dimension spread (standard deviation) of the client's own embeddings (default 1).
- ``scale``: every embedding multiplied by ``strength`` (default 10).
- ``defects``: the client slips patch embeddings of defective images into its bank, so that those
  defects look normal to the global model. It embeds the category's defective images; a
  ``strength`` fraction (default 0.5) of the rows it sends are the most diverse of their patches (a
  greedy coreset, which takes the defects first), the rest its most diverse honest rows. Its counts
  and its number of rows stay those of its honest update, so the update passes the server's
  validation (federation/validation.py pins the rows to the counts and the counts to the plan).
  In the in-process runner the defective images are the category's own defective TEST images: the
  worst case, since the evaluation then scores exactly the defects the bank was taught to accept.
  Colluding clients with as many rows send the same defect rows (the coreset's seed depends on the
  category, not the client).

Poisoned clients are the last ``clients`` client indices (``client_{n-f}`` .. ``client_{n-1}``), so
runs with 1 and 2 poisoned clients share their first poisoned client. Every random choice is seeded
from the round's seed, the client and the category.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedinspect.data.images import read_image
from fedinspect.detectors.coreset import greedy_coreset
from fedinspect.federation.update import CategoryUpdate, ClientUpdate

if TYPE_CHECKING:
    from fedinspect.data.dataset import CategoryDataset
    from fedinspect.detectors.patchcore import PatchCore
    from fedinspect.federation.client import EmbeddingCache, RoundSettings

ATTACKS = ("noise", "scale", "defects")
DEFAULT_STRENGTH = {"noise": 1.0, "scale": 10.0, "defects": 0.5}


def add_noise(part: CategoryUpdate, strength: float, seed: int) -> CategoryUpdate:
    """``part`` with Gaussian noise of ``strength`` times each dimension's standard deviation added."""
    embeddings = np.asarray(part.embeddings, dtype=np.float32)
    spread = embeddings.std(axis=0, keepdims=True) if len(embeddings) > 1 else np.abs(embeddings)
    noise = np.random.default_rng(seed).standard_normal(embeddings.shape) * (strength * spread)
    return CategoryUpdate((embeddings + noise).astype(np.float32), part.n_samples, part.n_patches)


def scale_embeddings(part: CategoryUpdate, factor: float) -> CategoryUpdate:
    """``part`` with every embedding multiplied by ``factor``."""
    return CategoryUpdate((np.asarray(part.embeddings, dtype=np.float32) * factor).astype(np.float32),
                          part.n_samples, part.n_patches)


def mix_in_defects(part: CategoryUpdate, defect_rows: np.ndarray, seed: int,
                   projection_dim: int = 64) -> CategoryUpdate:
    """``part`` with as many of its rows as ``defect_rows`` has replaced by them; counts unchanged.

    The honest rows it keeps are its most diverse ones (a greedy coreset, seeded).
    """
    rows = len(part.embeddings)
    count = min(len(defect_rows), rows)
    if count == 0:
        return part
    honest = part.embeddings[:0]
    if rows > count:
        honest = part.embeddings[greedy_coreset(part.embeddings, rows - count, projection_dim, seed)]
    mixed = np.concatenate([honest, np.asarray(defect_rows[:count], dtype=part.embeddings.dtype)])
    return CategoryUpdate(mixed.astype(np.float32), part.n_samples, part.n_patches)


class DefectSource:
    """Defective images the attacker holds, per category: here, each category's defective test images.

    Their embeddings go into ``cache`` (keyed by image path, like the training images'), so a study
    that repeats the attack embeds them once.
    """

    def __init__(self, datasets: Mapping[str, CategoryDataset], detector: PatchCore, settings: RoundSettings,
                 cache: EmbeddingCache | None = None) -> None:
        self.datasets = datasets
        self.detector = detector
        self.settings = settings
        self.cache = {} if cache is None else cache
        self._patches: dict[str, np.ndarray] = {}
        self._rows: dict[tuple[str, int], np.ndarray] = {}

    def patches(self, category: str) -> np.ndarray:
        """Every patch embedding of ``category``'s defective images ((0, 0) when it has none)."""
        if category not in self._patches:
            dataset = self.datasets.get(category)
            paths = [s.image_path for s in dataset.test if s.label == 1] if dataset is not None else []
            missing = [p for p in paths if p not in self.cache]
            if missing:
                images = (self.settings.load(read_image(p)) for p in missing)
                self.cache.update(zip(missing, self.detector.embed_per_image(images, total=len(missing)), strict=True))
            rows = [self.cache[p] for p in paths]
            self._patches[category] = np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)
        return self._patches[category]

    def rows(self, category: str, count: int) -> np.ndarray:
        """The ``count`` most diverse defect patches of ``category`` (greedy coreset, seeded by the category).

        Greedy selection takes the patches farthest from those already taken first: the defects
        themselves, before the normal surroundings they share with good images.
        """
        from fedinspect.federation.client import derived_seed  # the client role loads torch: only when used

        patches = self.patches(category)
        count = min(count, len(patches))
        if count <= 0:
            return patches[:0]
        if (category, count) not in self._rows:
            seed = derived_seed(self.settings.seed, "poison-defects", category)
            chosen = greedy_coreset(patches, count, self.settings.projection_dim, seed,
                                    self.settings.coreset_chunk_size)
            self._rows[category, count] = patches[chosen].astype(np.float32)
        return self._rows[category, count]


@dataclass(frozen=True)
class Poisoning:
    """Which clients are malicious and what they send (inactive without an attack or poisoned clients)."""

    attack: str = ""
    clients: int = 0
    strength: float = 0.0  # 0: the attack's default (DEFAULT_STRENGTH)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attack not in ("", *ATTACKS):
            raise ValueError(f"poison must be one of {['', *ATTACKS]}, got {self.attack!r}")
        if self.clients < 0:
            raise ValueError(f"poisoned_clients must be >= 0, got {self.clients}")
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"poison_strength must be a finite number >= 0, got {self.strength}")
        if self.attack == "defects" and self.strength > 1:
            raise ValueError(f"poison_strength of the defects attack is the fraction of rows replaced by defect "
                             f"rows, in (0, 1], got {self.strength}")

    @property
    def active(self) -> bool:
        return bool(self.attack) and self.clients > 0

    @property
    def level(self) -> float:
        """The strength in use (the attack's default when ``strength`` is 0)."""
        return self.strength or DEFAULT_STRENGTH.get(self.attack, 0.0)

    def poisoned(self, n_clients: int) -> list[int]:
        """Indices of the poisoned clients: the last ``clients`` of ``n_clients``."""
        if not self.active:
            return []
        if self.clients > n_clients:
            raise ValueError(f"poisoned_clients ({self.clients}) exceeds the number of clients ({n_clients})")
        return list(range(n_clients - self.clients, n_clients))

    def apply(self, update: ClientUpdate, defects: DefectSource | None = None) -> ClientUpdate:
        """The update a poisoned client sends instead of ``update`` (which is left unchanged)."""
        from fedinspect.federation.client import derived_seed  # the client role loads torch: only when used

        if not self.active:
            return update
        if self.attack == "defects" and defects is None:
            raise ValueError("the defects attack needs a DefectSource (the attacker's defective images)")
        poisoned = ClientUpdate(update.client_id)
        for category, part in update.categories.items():
            if self.attack == "noise":
                seed = derived_seed(self.seed, update.client_id, category, "poison-noise")
                poisoned.categories[category] = add_noise(part, self.level, seed)
            elif self.attack == "scale":
                poisoned.categories[category] = scale_embeddings(part, self.level)
            else:
                rows = defects.rows(category, round(self.level * len(part.embeddings)))
                seed = derived_seed(self.seed, update.client_id, category, "poison-defects")
                poisoned.categories[category] = mix_in_defects(part, rows, seed)
        return poisoned
