"""Differential privacy for memory-bank updates, at two units of protection.

A memory bank is made of real patch embeddings: sent as is, it is the most revealing update a
client can make. Two Gaussian mechanisms protect it, each naming the unit it protects:

``unit="embedding"`` (:func:`privatize_embeddings`)
    Every patch embedding is clipped to L2 norm ``C`` and released with Gaussian noise of standard
    deviation ``z * 2C`` per coordinate; the local coreset is then chosen from the *noisy*
    embeddings (post-processing). Neighbouring datasets differ in the value of one embedding
    (replacement, sensitivity ``2C``), so epsilon is that of one Gaussian release with noise
    multiplier ``z``. This protects one patch, **not** an image: an image contributes hundreds of
    correlated patches, and a guarantee for the image as a whole would be far weaker.

``unit="image"`` (:func:`private_centres`)
    Every image contributes exactly ``m = patches_per_image`` patches at grid cells drawn by a seed,
    without looking at their values, each clipped to norm ``C``. Only noisy aggregates leave the
    client: per cluster, the sum of the patches (Gaussian noise ``z * m * C``) and their count (noise
    ``z * m``). Clusters start from a data-independent random-hyperplane hash (a first release) and
    are refined by ``iterations`` Lloyd steps, each one more release; the client sends the noisy
    centres (noisy sum / noisy count) of clusters whose noisy count reaches one noise standard
    deviation (at least the most populous cluster, so a bank is never empty). Neighbouring
    datasets differ by one whole image (add/remove), whose sums change by at most ``m*C`` and counts
    by at most ``m`` in L2 norm; releasing both with multiplier ``z`` is one Gaussian mechanism with
    multiplier ``z / sqrt(2)``, composed over ``1 + iterations`` releases by the accountant.
    Coreset selection is replaced by clustering, so the guarantee covers everything sent.

Counts of images per category are sent in clear (the server needs them for weighting); they are
treated as public. Epsilon always comes from :mod:`fedinspect.privacy.accounting`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedinspect.privacy.accounting import ACCOUNTANTS, DEFAULT_DELTA, epsilon, noise_multiplier_for

UNITS = ("embedding", "image")
# Default clip norm: a little below the median L2 norm (42) of EfficientNet-Lite0 patch embeddings (152-d) on the
# synthetic dataset, i.e. chosen on public data, never on a client's own images.
DEFAULT_CLIP_NORM = 40.0


@dataclass(frozen=True)
class BankPrivacy:
    """What DP mechanism a client applies to its bank, and at which budget.

    Give either ``epsilon`` (the noise multiplier is solved for it with the accountant) or
    ``noise_multiplier`` (epsilon is computed from it).
    """

    unit: str = "embedding"
    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = DEFAULT_DELTA
    clip_norm: float = DEFAULT_CLIP_NORM
    accountant: str = "rdp"
    patches_per_image: int = 16
    clusters: int = 8
    iterations: int = 2

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unknown DP unit {self.unit!r}; choose from {list(UNITS)}")
        if self.epsilon is None and self.noise_multiplier is None:  # RoundSettings and the CLI read 0 as "not given"
            raise ValueError("epsilon must be positive (or give a positive noise multiplier instead)")
        if self.epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("give epsilon or the noise multiplier, not both")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise multiplier must be > 0, got {self.noise_multiplier}")
        if not self.clip_norm > 0:
            raise ValueError(f"clip norm must be > 0, got {self.clip_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; choose from {list(ACCOUNTANTS)}")
        if self.patches_per_image < 1 or self.clusters < 1 or self.iterations < 0:
            raise ValueError("patches_per_image and clusters must be >= 1, iterations >= 0")

    @property
    def releases(self) -> int:
        """How many Gaussian releases the accountant composes."""
        return 1 if self.unit == "embedding" else 1 + self.iterations

    @property
    def _joint_factor(self) -> float:
        # image unit: sums and counts each get multiplier z; jointly that is one release with z / sqrt(2)
        return 1.0 if self.unit == "embedding" else math.sqrt(2.0)

    def resolved_noise_multiplier(self) -> float:
        """The multiplier ``z`` applied to each released quantity."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        effective = noise_multiplier_for(self.epsilon, self.delta, steps=self.releases, accountant=self.accountant)
        return effective * self._joint_factor

    def resolved_epsilon(self) -> float:
        """Epsilon at ``delta`` of everything one client sends for one category."""
        z = self.resolved_noise_multiplier()
        return epsilon(z / self._joint_factor, self.delta, steps=self.releases, accountant=self.accountant)

    def report(self) -> dict[str, Any]:
        """The ``privacy`` block of results.json."""
        block: dict[str, Any] = {
            "mechanism": "gaussian" if self.unit == "embedding" else "gaussian_noisy_centres",
            "unit": self.unit,
            "epsilon": self.resolved_epsilon(),
            "target_epsilon": self.epsilon,
            "delta": self.delta,
            "noise_multiplier": self.resolved_noise_multiplier(),
            "clip_norm": self.clip_norm,
            "accountant": self.accountant,
            "releases": self.releases,
            "protects": ("the value of one patch embedding (weaker than one image: an image has hundreds)"
                         if self.unit == "embedding" else "one training image, added or removed, with all its patches"),
            "scope": "each client's bank of each category: a separate guarantee per client and category",
        }
        if self.unit == "image":
            block.update(patches_per_image=self.patches_per_image, clusters=self.clusters,
                         iterations=self.iterations)
        return block

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BankPrivacy:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown privacy settings: {sorted(unknown)}")
        return cls(**data)


def clip_rows(rows: np.ndarray, clip_norm: float) -> np.ndarray:
    """Scale every row whose L2 norm exceeds ``clip_norm`` down to that norm (float64 copy)."""
    if not clip_norm > 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))


def privatize_embeddings(embeddings: np.ndarray, privacy: BankPrivacy, seed: int) -> np.ndarray:
    """Per-embedding mechanism: clip every row to ``C``, add N(0, (z * 2C)^2) to every coordinate."""
    if privacy.unit != "embedding":
        raise ValueError(f"privatize_embeddings is the per-embedding mechanism, got unit {privacy.unit!r}")
    clipped = clip_rows(embeddings, privacy.clip_norm)
    sigma = privacy.resolved_noise_multiplier() * 2.0 * privacy.clip_norm
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=clipped.shape)
    return (clipped + noise).astype(np.float32)


def sample_patches(per_image: list[np.ndarray], count: int, seed: int) -> list[np.ndarray]:
    """``count`` rows of every image, at positions drawn from the seed and the row count only."""
    rng = np.random.default_rng(seed)
    chosen = []
    for rows in per_image:
        take = min(count, len(rows))
        chosen.append(rows[np.sort(rng.choice(len(rows), size=take, replace=False))])
    return chosen


def _noisy_sums(points: np.ndarray, labels: np.ndarray, k: int, sigma_sum: float, sigma_count: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    sums = np.zeros((k, points.shape[1]))
    np.add.at(sums, labels, points)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return sums + rng.normal(0.0, sigma_sum, size=sums.shape), counts + rng.normal(0.0, sigma_count, size=k)


def private_centres(per_image: list[np.ndarray], privacy: BankPrivacy, seed: int) -> np.ndarray:
    """Image-level mechanism: noisy cluster centres from noisy sums and counts (see the module doc).

    ``per_image`` holds each training image's patch embeddings (one array per image). Returns the
    released centres, float32 of shape (<= clusters, D).
    """
    if privacy.unit != "image":
        raise ValueError(f"private_centres is the image-level mechanism, got unit {privacy.unit!r}")
    if not per_image:
        raise ValueError("no image to summarize")
    rng = np.random.default_rng(seed)
    m, c, k = privacy.patches_per_image, privacy.clip_norm, privacy.clusters
    points = clip_rows(np.concatenate(sample_patches(per_image, m, int(rng.integers(2**63)))), c)
    z = privacy.resolved_noise_multiplier()
    sigma_sum, sigma_count = z * m * c, z * m

    # First release: a random-hyperplane hash, drawn without looking at the data, groups the points.
    bits = max(1, math.ceil(math.log2(k))) if k > 1 else 0
    planes = rng.normal(size=(points.shape[1], bits))
    codes = ((points @ planes) > 0).astype(np.int64) @ (1 << np.arange(bits)) if bits else np.zeros(len(points), int)
    codes %= k
    sums, counts = _noisy_sums(points, codes, k, sigma_sum, sigma_count, rng)
    centres = _centres(sums, counts, c, max(1.0, sigma_count))
    for _ in range(privacy.iterations):
        labels = _nearest(points, centres)
        sums, counts = _noisy_sums(points, labels, len(centres), sigma_sum, sigma_count, rng)
        centres = _centres(sums, counts, c, max(1.0, sigma_count))
    return centres.astype(np.float32)


def _centres(sums: np.ndarray, counts: np.ndarray, clip_norm: float, floor: float) -> np.ndarray:
    """Noisy means of the clusters whose noisy count reaches ``floor`` (at least the most populous one).

    Post-processing of released values only: counts below ``floor`` (one noise standard deviation)
    are too unreliable to divide by; the means are kept inside the clip ball.
    """
    kept = counts >= floor
    if not kept.any():
        kept = counts == counts.max()
    return clip_rows(sums[kept] / np.maximum(counts[kept], floor)[:, None], clip_norm)


def _nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    distances = (points**2).sum(1)[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None]
    return distances.argmin(axis=1)
