"""Differential privacy for PaDiM's one-round federated statistics, per training image.

Federated PaDiM is one round: every client sends, per category, the count ``n``, the sum ``S``
(P, k) and the sum of outer products ``Q`` (P, k, k) of its images' selected features
(:class:`~fedinspect.detectors.padim.PadimStatistics`), and the server adds them. This module is the
Gaussian mechanism for that release.

Unit and sensitivity
    Neighbouring datasets differ by one training image of one client, added or removed. Every image's
    (P, k) block of selected features ``x`` (all positions together, flattened) is clipped to L2 norm
    ``C`` (:meth:`Padim.statistics` with ``clip_norm``). Then one image changes

    - ``S`` by ``x``: L2 norm ``<= C``;
    - ``Q`` by the block-diagonal ``x_p x_p^T`` (one block per position p): Frobenius norm
      ``sqrt(sum_p |x_p|^4) <= sum_p |x_p|^2 <= C^2``;
    - ``n`` by 1. The count is released with noise too (not treated as public): under add/remove
      adjacency an exact count would differ between neighbours and void the guarantee.

Symmetric noise on ``Q``
    ``Q`` is symmetric, so the noise is too: the diagonal gets N(0, (z C^2)^2), each entry above the
    diagonal N(0, (z C^2)^2 / 2), mirrored below. Why half the variance off the diagonal: the map
    ``T(M) = (M_ii, sqrt(2) M_ij for i < j)`` is a bijection of symmetric matrices onto vectors with
    ``|T(M)|_2 = |M|_F`` (each off-diagonal entry appears twice in the Frobenius norm). Releasing
    ``Q + E`` is releasing ``T(Q) + T(E)``, and ``T(E)`` is i.i.d. N(0, (z C^2)^2) in every coordinate,
    while ``T(Q)`` changes by at most ``C^2`` in L2: a Gaussian mechanism with multiplier ``z``. (Noising
    the upper triangle with the full ``z C^2`` and mirroring would also be private, with 2x the needed
    variance off the diagonal; noising all k^2 entries independently would not give a symmetric matrix.)

One mechanism for three parts
    Each part ``f_i`` (S, T(Q), n) gets noise ``z * Delta_i`` with its own sensitivity ``Delta_i``
    (``C``, ``C^2``, 1). Dividing each part by its ``Delta_i`` is a bijection, so the release is equivalent
    to ``g(D) + N(0, z^2 I)`` with ``g = (f_1 / Delta_1, f_2 / Delta_2, f_3 / Delta_3)``, whose L2
    sensitivity is ``sqrt(sum_i (|change_i| / Delta_i)^2) <= sqrt(3)``: one Gaussian mechanism with noise
    multiplier ``z / sqrt(3)`` (in general ``z / sqrt(r)`` for r parts). The bound is attained (an image
    whose features sit at one position with norm C), so it is not loose. Epsilon is that of one
    release (sample rate 1, one step) of multiplier ``z / sqrt(3)`` by
    :mod:`fedinspect.privacy.accounting`; :meth:`StatisticsPrivacy.resolved_noise_multiplier` is ``z``.

Where the noise is added (``mode``), both with the same guarantee for what the server learns:
    ``"distributed"``: each of the ``m`` clients adds 1/h of the variance, ``h = ceil(min_honest * m)``,
    so the noise of ``h`` clients sums to that of one release. The guarantee then holds **for the sum
    only**: the server must see nothing but the sum (secure aggregation), and it holds only if at least
    ``h`` clients add their noise honestly (noise of clients that collude with the server, or drop out
    after adding it, is subtracted or missing). ``min_honest = 1`` (default) gives the least noise but
    no margin; ``min_honest = t < 1`` tolerates ``m - h`` dishonest or missing clients at the price of
    ``1/t`` times the variance in the sum when everyone is honest. A share seen in clear carries only
    ``1/h`` of the variance, a much weaker guarantee (``report()["epsilon_of_one_share"]``).
    ``"local"``: each client adds the full variance; its statistics are private even if sent in clear
    and whatever the others do, and the sum carries ``m`` times the variance (disjoint clients: the
    sum keeps each client's guarantee, by post-processing).

Post-processing (no privacy cost): noisy counts are floored at 2, and the noisy covariance
``(Q - n mu mu^T) / (n - 1)``, which need not be positive definite, is projected onto the positive
semi-definite matrices (symmetric eigen-decomposition, negative eigenvalues set to 0) before PaDiM's
``eps * I`` is added: together, eigenvalues floored at ``eps`` (:func:`project_covariance`).

Left to the caller: the grid shape and the channel selection are public (they follow from the images'
aspect ratio and the seed); how many images were clipped is never sent. Floating-point sampling is
NumPy's (no defence against Mironov's 2012 floating-point attack).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedinspect.detectors.padim import PadimFitError, PadimStatistics
from fedinspect.privacy.accounting import ACCOUNTANTS, DEFAULT_DELTA, epsilon, noise_multiplier_for

if TYPE_CHECKING:
    from collections.abc import Iterable

    from fedinspect.detectors.padim import Padim

MODES = ("distributed", "local")
PARTS = 3  # the sum, the sum of outer products and the count: one Gaussian mechanism of multiplier z / sqrt(3)
MIN_COUNT = 2.0


@dataclass(frozen=True)
class StatisticsPrivacy:
    """The Gaussian mechanism one client applies to its PaDiM statistics of one category.

    Give either ``epsilon`` (the per-part noise multiplier ``z`` is solved for it) or ``noise_multiplier``
    (``z``, epsilon is computed from it). ``clip_norm``: ``C``, the L2 bound on each image's (P, k) block.
    """

    clip_norm: float
    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = DEFAULT_DELTA
    mode: str = "distributed"
    min_honest: float = 1.0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not isinstance(self.clip_norm, int | float) or not math.isfinite(self.clip_norm) or not self.clip_norm > 0:
            raise ValueError(f"clip norm must be a positive number, got {self.clip_norm!r}")
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of epsilon and noise_multiplier")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be a positive finite number, got {self.epsilon}")
        z = self.noise_multiplier
        if z is not None and not (z > 0 and math.isfinite(z)):
            raise ValueError(f"noise multiplier must be a positive finite number, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.mode not in MODES:
            raise ValueError(f"unknown noise mode {self.mode!r}; choose from {list(MODES)}")
        if not 0 < self.min_honest <= 1:
            raise ValueError(f"min_honest must be a fraction of the clients in (0, 1], got {self.min_honest}")
        if self.mode == "local" and self.min_honest != 1:
            raise ValueError("min_honest applies to distributed noise only (local noise needs no other client)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; choose from {list(ACCOUNTANTS)}")

    def resolved_noise_multiplier(self) -> float:
        """``z``: the noise standard deviation of each part of the summed release over that part's sensitivity."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        return noise_multiplier_for(self.epsilon, self.delta, accountant=self.accountant) * math.sqrt(PARTS)

    def resolved_epsilon(self) -> float:
        """Epsilon at ``delta`` of the summed release (one Gaussian mechanism of multiplier z / sqrt(3))."""
        return epsilon(self.resolved_noise_multiplier() / math.sqrt(PARTS), self.delta, accountant=self.accountant)

    def noise_std(self) -> dict[str, float]:
        """Noise standard deviations of one release (what the sum carries in ``distributed`` mode)."""
        z, c = self.resolved_noise_multiplier(), float(self.clip_norm)
        return {"sum": z * c, "sum_outer_diagonal": z * c * c, "sum_outer_off_diagonal": z * c * c / math.sqrt(2),
                "count": z}

    def honest_clients_needed(self, clients: int) -> int:
        """``h``: how many of ``clients`` must add their noise for the guarantee (all ``clients`` in local mode)."""
        if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
            raise ValueError(f"clients must be a positive integer, got {clients!r}")
        if self.mode == "local":
            return 1
        return max(1, math.ceil(round(self.min_honest * clients, 9)))

    def client_variance_fraction(self, clients: int) -> float:
        """The share of one release's noise variance each client adds: 1/h (distributed) or 1 (local)."""
        return 1.0 / self.honest_clients_needed(clients)

    def report(self, clients: int) -> dict[str, Any]:
        """The ``privacy`` block of results.json for a round of ``clients`` clients."""
        z = self.resolved_noise_multiplier()
        fraction = self.client_variance_fraction(clients)
        honest = self.honest_clients_needed(clients)
        block: dict[str, Any] = {
            "mechanism": "gaussian_sufficient_statistics",
            "unit": "image",
            "protects": "one training image of one client, added or removed (all its feature-grid positions)",
            "epsilon": self.resolved_epsilon(),
            "target_epsilon": self.epsilon,
            "delta": self.delta,
            "noise_multiplier": z,
            "joint_noise_multiplier": z / math.sqrt(PARTS),
            "clip_norm": self.clip_norm,
            "accountant": self.accountant,
            "releases": 1,
            "count": "noisy (N(0, z^2)); floored at 2 after aggregation",
            "mode": self.mode,
            "clients": clients,
            "noise_std": self.noise_std(),
            "client_variance_fraction": fraction,
            "sum_noise_variance_in_releases": clients * fraction,  # all clients add theirs
            "scope": "each category's release: a separate guarantee per category",
        }
        if self.mode == "distributed":
            block.update(
                min_honest=self.min_honest, honest_clients_needed=honest,
                assumes=(f"secure aggregation (the server sees only the sum) and at least {honest} of {clients} "
                         "clients adding their noise honestly"),
                epsilon_of_one_share=epsilon(z * math.sqrt(fraction) / math.sqrt(PARTS), self.delta,
                                             accountant=self.accountant))
        else:
            block.update(assumes="nothing of the other clients or the server: each client's statistics are private")
        return block

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StatisticsPrivacy:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown privacy settings: {sorted(unknown)}")
        return cls(**data)


def symmetric_noise(rng: np.random.Generator, positions: int, k: int, std: float) -> np.ndarray:
    """(positions, k, k) symmetric Gaussian noise: N(0, std^2) on the diagonal, N(0, std^2 / 2) off it (mirrored)."""
    draws = rng.normal(0.0, std, size=(positions, k, k))
    upper = np.triu(draws, 1) / math.sqrt(2.0)
    diagonal = np.einsum("pii->pi", draws)
    noise = upper + upper.transpose(0, 2, 1)
    noise[:, np.arange(k), np.arange(k)] = diagonal
    return noise


def add_noise(stats: PadimStatistics, privacy: StatisticsPrivacy, clients: int, seed: int) -> PadimStatistics:
    """One client's noisy statistics: its share (``distributed``) or all (``local``) of the release's noise.

    ``stats`` must come from :meth:`Padim.statistics` with ``clip_norm = privacy.clip_norm``.
    """
    if stats.noisy:
        raise ValueError("these statistics already carry noise")
    if stats.clip_norm is None or stats.clip_norm > privacy.clip_norm:
        raise ValueError(f"statistics clipped at {stats.clip_norm}, but the mechanism is calibrated for clip norm "
                         f"{privacy.clip_norm}: compute them with Padim.statistics(..., clip_norm={privacy.clip_norm})")
    scale = math.sqrt(privacy.client_variance_fraction(clients))
    std = {key: value * scale for key, value in privacy.noise_std().items()}
    rng = np.random.default_rng(seed)
    positions, k = stats.sum.shape
    return PadimStatistics(
        stats.count + rng.normal(0.0, std["count"]),
        stats.sum + rng.normal(0.0, std["sum"], size=stats.sum.shape),
        stats.sum_outer + symmetric_noise(rng, positions, k, std["sum_outer_diagonal"]),
        stats.grid_shape, stats.clipped, noisy=True, clip_norm=stats.clip_norm)


def private_statistics(detector: Padim, images: Iterable[np.ndarray], privacy: StatisticsPrivacy, clients: int,
                       seed: int, total: int | None = None) -> PadimStatistics:
    """A client's release: its images' statistics clipped at ``privacy.clip_norm``, then :func:`add_noise`."""
    stats = detector.statistics(images, total, clip_norm=privacy.clip_norm)
    return add_noise(stats, privacy, clients, seed)


def project_covariance(covariance: np.ndarray, floor: float) -> np.ndarray:
    """Symmetric matrices (..., k, k) with every eigenvalue below ``floor`` raised to it (eigen-decomposition).

    The nearest matrix (Frobenius) whose eigenvalues are all >= ``floor``; one that already is is returned
    unchanged up to rounding. The input is symmetrised first.
    """
    if not floor >= 0:
        raise ValueError(f"eigenvalue floor must be >= 0, got {floor}")
    cov = np.asarray(covariance, dtype=np.float64)
    cov = (cov + np.swapaxes(cov, -1, -2)) / 2
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.maximum(values, floor)[..., None, :]) @ np.swapaxes(vectors, -1, -2)


def noisy_gaussians(stats: PadimStatistics, eps: float, min_count: float = MIN_COUNT,
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """Means (P, k), covariances (P, k, k) and count from noisy summed statistics; post-processing only.

    The count is floored at ``min_count`` (>= 2); covariance = projection of ``(Q - n mu mu^T) / (n - 1)``
    onto the PSD matrices, plus ``eps * I`` (eigenvalues >= ``eps``). On noiseless statistics this is
    exactly :meth:`Padim.set_statistics`' covariance (up to rounding).
    """
    if not min_count >= 2:
        raise ValueError(f"the count floor must be >= 2 (a covariance needs two images), got {min_count}")
    count = max(float(stats.count), float(min_count))
    mean = stats.sum / count
    raw = (stats.sum_outer - count * np.einsum("pi,pj->pij", mean, mean)) / (count - 1)
    k = mean.shape[1]
    return mean, project_covariance(raw, 0.0) + eps * np.eye(k), count


def set_noisy_statistics(detector: Padim, stats: PadimStatistics, min_count: float = MIN_COUNT,
                         clip_norm: float | None = None) -> Padim:
    """Give ``detector`` the Gaussians of (noisy) summed statistics, through :func:`noisy_gaussians`.

    ``clip_norm`` (default: the statistics' own, which statistics read from the wire do not carry): the
    detector clips test images at it too (:meth:`Padim.set_gaussians`); pass ``privacy.clip_norm``.
    """
    if stats.n_features != detector.n_features:
        raise PadimFitError(f"statistics of {stats.n_features} features for a PaDiM of {detector.n_features}")
    mean, covariance, count = noisy_gaussians(stats, detector.eps, min_count)
    clip = clip_norm if clip_norm is not None else stats.clip_norm
    return detector.set_gaussians(mean, covariance, stats.grid_shape, count, clip)
