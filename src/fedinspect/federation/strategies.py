"""Server-side aggregation of client memory banks into one global bank (one round).

A strategy sees only embeddings and counts: it knows nothing of images or backbones.

- ``federated_coreset``: each client is weighted by its sample count; from each client's bank
  the server keeps ``oversample`` times its share of the target by greedy coreset (the most
  diverse part), then a global greedy coreset reduces the union to the target size.
- ``concatenate``: the union of the client banks, nothing dropped.
- ``diversity_preserving``: every client is guaranteed ``min_per_client`` patches (its most
  diverse ones); the rest of the target is filled by the weighted draw and a global greedy
  coreset that extends the guaranteed set, so small clients keep a voice.
- ``fair_coreset``: fairness-aware. Tempered weights ``w_i = n_i^power / sum_j n_j^power`` (``power``
  0.5: a client with 4x the images gets 2x the weight, not 4x; 1 is ``federated_coreset``'s, 0 equal)
  and a floor: every client is guaranteed ``floor * target / n_clients`` patches (its most diverse
  ones, or its whole bank if smaller), a fraction of an equal share rather than an absolute count, so
  it scales with the bank. The rest of the target is drawn by the tempered weights with oversampling
  and a global greedy coreset that extends the guaranteed set. With ``power=1`` and ``floor=0`` it
  is exactly ``federated_coreset``.
- ``robust_coreset``: screens out poisoned contributions before ``federated_coreset``. Each row of
  client i is scored by its nearest-neighbour distance to every OTHER client's bank separately; the
  score is the lower median of those distances (the ``ceil((n-1)/2)``-th smallest), so up to
  ``floor((n-1)/2)`` colluding clients can neither vouch for each other's rows nor, by being far from
  everyone, make honest rows look odd. A row is outlying when its log score lies more than
  ``threshold`` robust spreads above the clients' typical score. Every client has a few outlying rows
  (its rarest normal patches, which the detector needs), so only a suspect client, one with several
  times the typical share of outlying rows (e.g. slipped-in embeddings of defects), is dropped, whole:
  the rows it slipped in that look only mildly odd pass any row threshold, and its normal rows are the
  ones the other clients already vouch for. A client whose median row is outlying (noise, scaling) is
  dropped whole too. With fewer than 3 clients there is nothing to compare and every row is kept.
  :func:`screen_updates` says what was dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedinspect.detectors.coreset import greedy_coreset
from fedinspect.detectors.nearest_neighbours import NearestNeighbours
from fedinspect.federation.update import CategoryUpdate


@dataclass(frozen=True)
class CoresetSettings:
    """How the server runs greedy coresets (the same algorithm the clients use)."""

    projection_dim: int = 64
    chunk_size: int = 16384
    seed: int = 0


def client_weights(updates: Sequence[CategoryUpdate]) -> np.ndarray:
    """Each client's share of the training images (sample counts normalized to sum to 1)."""
    samples = np.array([u.n_samples for u in updates], dtype=np.float64)
    if (samples < 0).any() or samples.sum() <= 0:
        raise ValueError(f"sample counts must be non-negative with a positive total, got {samples.tolist()}")
    return samples / samples.sum()


def _most_diverse(embeddings: np.ndarray, count: int, settings: CoresetSettings, salt: int) -> np.ndarray:
    """The ``count`` rows of ``embeddings`` a greedy coreset keeps (all of them if there are fewer)."""
    if count >= len(embeddings):
        return embeddings
    if count <= 0:
        return embeddings[:0]
    chosen = greedy_coreset(embeddings, count, settings.projection_dim, settings.seed + salt, settings.chunk_size)
    return embeddings[chosen]


def _weighted_draw(updates: Sequence[CategoryUpdate], target: int, oversample: float,
                   settings: CoresetSettings) -> list[np.ndarray]:
    weights = client_weights(updates)
    return [
        _most_diverse(u.embeddings, math.ceil(oversample * w * target), settings, salt=i)
        for i, (u, w) in enumerate(zip(updates, weights, strict=True))
    ]


def federated_coreset(updates: Sequence[CategoryUpdate], target: int, settings: CoresetSettings = CoresetSettings(),
                      oversample: float = 2.0) -> np.ndarray:
    """Weighted 2x oversampling from each client, then a global greedy coreset down to ``target``."""
    pool = np.concatenate(_weighted_draw(updates, target, oversample, settings))
    return _most_diverse(pool, target, settings, salt=10_007)


def concatenate(updates: Sequence[CategoryUpdate], target: int | None = None,
                settings: CoresetSettings = CoresetSettings()) -> np.ndarray:
    """The union of all client banks (``target`` is ignored)."""
    return np.concatenate([u.embeddings for u in updates])


def diversity_preserving(updates: Sequence[CategoryUpdate], target: int,
                         settings: CoresetSettings = CoresetSettings(), min_per_client: int = 100,
                         oversample: float = 2.0) -> np.ndarray:
    """A guaranteed ``min_per_client`` patches from every client, the rest by weight and global coreset."""
    guaranteed = [_most_diverse(u.embeddings, min_per_client, settings, salt=i) for i, u in enumerate(updates)]
    pinned = np.concatenate(guaranteed)
    remaining = target - len(pinned)
    if remaining <= 0:
        return pinned
    candidates = np.concatenate(_weighted_draw(updates, remaining, oversample, settings))
    if remaining >= len(candidates):
        return np.concatenate([pinned, candidates])
    chosen = greedy_coreset(candidates, remaining, settings.projection_dim, settings.seed + 10_009,
                            settings.chunk_size, covered=pinned)
    return np.concatenate([pinned, candidates[chosen]])


def tempered_weights(updates: Sequence[CategoryUpdate], power: float) -> np.ndarray:
    """Client weights proportional to ``n_samples ** power`` (1: by sample count, 0: equal), summing to 1."""
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"power must be in [0, 1], got {power}")
    shares = client_weights(updates)
    tempered = np.zeros_like(shares)
    tempered[shares > 0] = shares[shares > 0] ** power  # a client without images keeps weight 0, even at power 0
    return tempered / tempered.sum()


def fair_coreset(updates: Sequence[CategoryUpdate], target: int, settings: CoresetSettings = CoresetSettings(),
                 power: float = 0.5, floor: float = 0.5, oversample: float = 2.0) -> np.ndarray:
    """Tempered weights ``n_i^power`` and a guaranteed ``floor`` of an equal share per client, then global coreset.

    Every client keeps at least ``min(floor(floor * target / n_clients), its bank size)`` patches in the
    global bank (its most diverse ones). ``power=1, floor=0`` gives :func:`federated_coreset` exactly.
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    weights = tempered_weights(updates, power)
    guarantee = math.floor(floor * target / len(updates))
    if guarantee == 0:
        pool = np.concatenate([_most_diverse(u.embeddings, math.ceil(oversample * w * target), settings, salt=i)
                               for i, (u, w) in enumerate(zip(updates, weights, strict=True))])
        return _most_diverse(pool, target, settings, salt=10_007)
    pinned = np.concatenate([_most_diverse(u.embeddings, guarantee, settings, salt=i) for i, u in enumerate(updates)])
    remaining = target - len(pinned)
    if remaining <= 0:
        return pinned
    candidates = np.concatenate([
        _most_diverse(u.embeddings, math.ceil(oversample * w * remaining), settings, salt=i)
        for i, (u, w) in enumerate(zip(updates, weights, strict=True))
    ])
    if remaining >= len(candidates):
        return np.concatenate([pinned, candidates])
    chosen = greedy_coreset(candidates, remaining, settings.projection_dim, settings.seed + 10_009,
                            settings.chunk_size, covered=pinned)
    return np.concatenate([pinned, candidates[chosen]])


@dataclass
class Screening:
    """What :func:`screen_updates` kept of each client's rows (in the order of the updates), and why."""

    kept: list[np.ndarray]  # boolean mask over each client's rows
    dropped_clients: list[int] = field(default_factory=list)
    row_scores: list[np.ndarray] = field(default_factory=list)  # each row's lower-median distance to the others
    client_scores: list[float] = field(default_factory=list)  # each client's median row score
    note: str = ""
    cut: float | None = None  # the score above which a row is outlying (None: nothing compared)
    suspects: list[int] = field(default_factory=list)  # clients with an excess of outlying rows (dropped too)

    @property
    def dropped_rows(self) -> list[int]:
        """Rows dropped per client (a dropped client's rows all count)."""
        return [int((~mask).sum()) for mask in self.kept]

    def apply(self, updates: Sequence[CategoryUpdate]) -> list[CategoryUpdate]:
        """The updates with the dropped rows removed (clients left with no row are left out)."""
        return [CategoryUpdate(u.embeddings[mask], u.n_samples, u.n_patches)
                for u, mask in zip(updates, self.kept, strict=True) if mask.any()]

    def to_dict(self) -> dict[str, object]:
        return {"dropped_clients": self.dropped_clients, "dropped_rows": self.dropped_rows,
                "rows": [len(mask) for mask in self.kept], "client_scores": self.client_scores, "cut": self.cut,
                "suspects": self.suspects, "note": self.note}


def leave_one_out_scores(updates: Sequence[CategoryUpdate]) -> list[np.ndarray]:
    """Each row's lower median, over the other clients, of its nearest-neighbour distance to their bank."""
    # exact: a row must not look outlying because an approximate index missed its neighbour
    indexes = [NearestNeighbours(u.embeddings, method="exact") if len(u.embeddings) else None for u in updates]
    scores = []
    for i, update in enumerate(updates):
        others = [index for j, index in enumerate(indexes) if j != i and index is not None]
        if not len(update.embeddings) or not others:
            scores.append(np.zeros(len(update.embeddings)))
            continue
        distances = np.stack([index.search(update.embeddings, 1)[0][:, 0] for index in others], axis=1)
        rank = math.ceil(len(others) / 2) - 1  # lower median: robust to floor((n-1)/2) colluders either way
        scores.append(np.partition(distances, rank, axis=1)[:, rank].astype(np.float64))
    return scores


MIN_OUTLYING_SHARE = 0.005  # the smallest typical share of outlying rows a client is compared against


def screen_updates(updates: Sequence[CategoryUpdate], threshold: float = 3.0, suspicion: float = 4.0) -> Screening:
    """Find the clients and rows the other clients do not vouch for (see ``robust_coreset`` above).

    Scores are compared on a log scale against a reference no minority of clients can move: the
    median over clients of each client's median log score, and the median over clients of each
    client's robust spread (1.4826 MAD). A row is outlying when its log score exceeds the reference
    by more than ``threshold`` spreads. Every client has a few outlying rows (its rarest normal
    patches, which the detector needs), so no row is dropped for being outlying alone: a suspect
    client, one whose share of outlying rows exceeds ``suspicion`` times the clients' median share (at
    least :data:`MIN_OUTLYING_SHARE`), is dropped whole, and so is a client whose median row is outlying.
    (Dropping only a suspect's outlying rows was measured too: on the magnetic tiles it let about two
    thirds of the injected defect rows through, README "Poisoned clients and robust aggregation".)
    """
    if not threshold > 0 or not suspicion >= 1:
        raise ValueError(f"threshold must be positive and suspicion at least 1, got {threshold}, {suspicion}")
    kept = [np.ones(len(u.embeddings), dtype=bool) for u in updates]
    if sum(len(u.embeddings) > 0 for u in updates) < 3:
        return Screening(kept, note=f"{len(updates)} client(s) with rows: nothing to compare, every row kept")
    scores = leave_one_out_scores(updates)
    logs = [np.log(np.maximum(s, 1e-12)) for s in scores]
    present = [row_logs for row_logs in logs if len(row_logs)]
    centre = float(np.median([np.median(row_logs) for row_logs in present]))
    spread = float(np.median([1.4826 * np.median(np.abs(row_logs - np.median(row_logs))) for row_logs in present]))
    cut = centre + threshold * spread
    shares = [float((row_logs > cut).mean()) if len(row_logs) else 0.0 for row_logs in logs]
    typical = max(float(np.median([share for share, row_logs in zip(shares, logs, strict=True) if len(row_logs)])),
                  MIN_OUTLYING_SHARE)
    suspects = [i for i, share in enumerate(shares) if share > suspicion * typical]
    outliers = [i for i, row_logs in enumerate(logs) if len(row_logs) and np.median(row_logs) > cut]
    dropped = sorted({*suspects, *outliers})
    for i in dropped:
        kept[i][:] = False
    client_scores = [float(np.median(s)) if len(s) else 0.0 for s in scores]
    note = (f"dropped {len(dropped)} client(s) and {sum(int((~k).sum()) for k in kept)} row(s) in all; "
            f"suspect clients {suspects}")
    return Screening(kept, dropped, scores, client_scores, note, cut=float(np.exp(cut)), suspects=suspects)


def robust_coreset(updates: Sequence[CategoryUpdate], target: int, settings: CoresetSettings = CoresetSettings(),
                   threshold: float = 3.0, suspicion: float = 4.0, oversample: float = 2.0,
                   screening: list[Screening] | None = None) -> np.ndarray:
    """:func:`federated_coreset` on what :func:`screen_updates` keeps; ``screening`` (a list) receives the decision."""
    decision = screen_updates(updates, threshold, suspicion)
    if screening is not None:
        screening.append(decision)
    return federated_coreset(decision.apply(updates), target, settings, oversample)


Strategy = Callable[..., np.ndarray]
STRATEGIES: dict[str, Strategy] = {
    "federated_coreset": federated_coreset,
    "concatenate": concatenate,
    "diversity_preserving": diversity_preserving,
    "fair_coreset": fair_coreset,
    "robust_coreset": robust_coreset,
}


def get_strategy(name: str) -> Strategy:
    """The aggregation function called ``name``."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; available: {sorted(STRATEGIES)}") from None
