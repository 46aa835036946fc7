"""The server role: turn client updates into global memory banks, one per category or one shared.

The server never sees an image. It decides how large each global bank is, calls the chosen
aggregation strategy, and hands the banks to detectors for evaluation. The same code runs
in-process and inside a Flower ``ServerApp``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedinspect.federation.strategies import CoresetSettings, get_strategy
from fedinspect.federation.update import CategoryUpdate, ClientUpdate

SHARED = "*"
BANK_MODES = ("per_category", "shared")


def allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder; each >= 1)."""
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights.tolist()}")
    if total < len(weights):
        raise ValueError(f"cannot give each of {len(weights)} banks at least one patch out of {total}")
    exact = weights / weights.sum() * total
    counts = np.maximum(np.floor(exact).astype(int), 1)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    for i in order[: max(0, total - counts.sum())]:
        counts[i] += 1
    while counts.sum() > total:  # only when the minimum of 1 pushed us over
        counts[int(np.argmax(counts))] -= 1
    return counts.tolist()


@dataclass
class FederatedServer:
    """Aggregates one round of client updates with a named strategy.

    ``global_size`` is the total number of patches kept (the seed's 10,000); per-category banks
    share it in proportion to each category's raw patch count. ``global_ratio``, if given,
    replaces it by a fraction of the raw patches of each bank.
    """

    strategy: str = "federated_coreset"
    global_size: int = 10_000
    global_ratio: float | None = None
    bank: str = "per_category"
    coreset: CoresetSettings = field(default_factory=CoresetSettings)
    strategy_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_strategy(self.strategy)  # fail early on an unknown name
        if self.bank not in BANK_MODES:
            raise ValueError(f"bank must be one of {BANK_MODES}, got {self.bank!r}")
        if self.global_ratio is not None and not 0 < self.global_ratio <= 1:
            raise ValueError(f"global_ratio must be in (0, 1], got {self.global_ratio}")
        if self.global_size < 1:
            raise ValueError(f"global_size must be positive, got {self.global_size}")

    def group(self, updates: Sequence[ClientUpdate]) -> dict[str, list[CategoryUpdate]]:
        """Client contributions per bank: per category, or all categories of a client pooled."""
        if not updates:
            raise ValueError("no client update to aggregate")
        groups: dict[str, list[CategoryUpdate]] = {}
        if self.bank == "shared":
            for update in updates:
                parts = list(update.categories.values())
                groups.setdefault(SHARED, []).append(CategoryUpdate(
                    np.concatenate([p.embeddings for p in parts]),
                    n_samples=sum(p.n_samples for p in parts), n_patches=sum(p.n_patches for p in parts)))
            return groups
        for update in updates:
            for category, part in update.categories.items():
                groups.setdefault(category, []).append(part)
        return dict(sorted(groups.items()))

    def targets(self, groups: dict[str, list[CategoryUpdate]]) -> dict[str, int]:
        """Global bank size for every group."""
        raw = {name: sum(p.n_patches for p in parts) for name, parts in groups.items()}
        if self.global_ratio is not None:
            return {name: max(1, round(self.global_ratio * count)) for name, count in raw.items()}
        sizes = allocate(self.global_size, list(raw.values()))
        return dict(zip(raw, sizes, strict=True))

    def aggregate(self, updates: Sequence[ClientUpdate]) -> dict[str, np.ndarray]:
        """Global memory bank per category (key ``"*"`` for a shared bank)."""
        strategy = get_strategy(self.strategy)
        groups = self.group(updates)
        targets = self.targets(groups)
        return {
            name: strategy(parts, targets[name], self.coreset, **self.strategy_options).astype(np.float32)
            for name, parts in groups.items()
        }
