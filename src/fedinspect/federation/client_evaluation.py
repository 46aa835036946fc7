"""Per-client evaluation: every factory scores the global model on its own share of the test split.

A client's test share follows the rule that gave it its training images: of each category's test
images, client ``i`` gets a share proportional to its training images of that category,
``n_ic / sum_j n_jc`` (the counts each client reports in its update). So under a ``category``
partition a factory is tested on exactly its products' test images, under ``dirichlet`` on its own
product mix, and under ``iid`` every client gets a slice of everything.

Within a category, good and defective test images are apportioned separately (largest remainder,
ties broken by a seeded client order that is the same for both, so that the clients that get a
good image also tend to get a defective one), each from a seeded shuffle. Every test image goes to
exactly one client holding the category; a category nobody holds is evaluated for nobody.

The metrics reuse the scores and maps the runner computes for the whole category (nothing is embedded
twice), fed one image at a time (:meth:`ClientEvaluation.stream`): per client and category the AutoVI
metrics of that subset, then per client the
mean over its categories (as the run's ``mean`` is over categories). A share with a single class has
no image AUROC (None) and the reason is recorded in ``notes``; it never stops the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from fedinspect.data.regions import Region
from fedinspect.evaluation.metrics import FPR_LIMITS
from fedinspect.evaluation.streaming import StreamingEvaluation
from fedinspect.federation.client import derived_seed

Shares = dict[str, dict[str, list[int]]]
"""category -> client id -> indices of the category's test images (in ``dataset.test`` order)."""


def apportion(n_items: int, weights: Sequence[float], priority: Sequence[int]) -> np.ndarray:
    """Integer counts proportional to ``weights`` summing to ``n_items`` (largest remainder).

    Ties between equal remainders go to the lowest ``priority`` first.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.size == 0 or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights.tolist()}")
    quota = weights / weights.sum() * n_items
    counts = np.floor(quota).astype(np.int64)
    order = np.lexsort((np.asarray(priority), -(quota - counts)))
    counts[order[: n_items - int(counts.sum())]] += 1
    return counts


def client_test_shares(test_labels: Mapping[str, Sequence[int]], training: Mapping[str, Mapping[str, int]],
                seed: int = 0) -> Shares:
    """Which test images each client evaluates on.

    Args:
        test_labels: category -> label of each test image (0 good, 1 defective), in test order.
        training: client id -> category -> training images it holds (its update's counts).
        seed: seeds the shuffles and the tie-break order (one stream per category).
    """
    shares: Shares = {}
    for category, labels in test_labels.items():
        holders = {client: counts.get(category, 0) for client, counts in training.items()}
        holders = {client: n for client, n in holders.items() if n > 0}
        if not holders:
            continue
        rng = np.random.default_rng(derived_seed(seed, "test-share", category))
        priority = rng.permutation(len(holders))
        names = list(holders)
        per_client: dict[str, list[int]] = {client: [] for client in names}
        labels = np.asarray(labels)
        for label in (0, 1):
            items = rng.permutation(np.flatnonzero(labels == label))
            counts = apportion(items.size, list(holders.values()), priority)
            for client, chunk in zip(names, np.split(items, np.cumsum(counts)[:-1]), strict=True):
                per_client[client].extend(int(i) for i in chunk)
        shares[category] = {client: sorted(indices) for client, indices in per_client.items()}
    return shares


def _undefined_reason(counts: Mapping[str, int]) -> str:
    if counts["test"] == 0:
        return "no test image in this client's share"
    kind = "good" if counts["test_defective"] == 0 else "defective"
    return f"single class in the test share (only {counts['test']} {kind} image(s))"


class ClientEvaluation:
    """Collects the global model's per-client metrics, one category at a time.

    The runner feeds each category's test images one at a time to :meth:`stream` (or, with every map
    in memory, :meth:`add_category`), then calls :meth:`results` for every client.
    """

    def __init__(self, shares: Shares) -> None:
        self.shares = shares
        self.per_client: dict[str, dict[str, dict[str, Any]]] = {}
        for per_category in shares.values():
            for client in per_category:
                self.per_client.setdefault(client, {})

    def add_category(self, category: str, labels: np.ndarray, scores: np.ndarray, maps: Sequence[np.ndarray],
                     regions: Sequence[Sequence[Region]]) -> None:
        """Score every client's share of ``category`` (arrays over the whole test split, in test order)."""
        with self.stream(category) as stream:
            for index, (label, score, anomaly_map, image_regions) in enumerate(
                    zip(labels, scores, maps, regions, strict=True)):
                stream.add(index, int(label), float(score), anomaly_map, image_regions)
            stream.finish()

    def stream(self, category: str) -> CategoryStream:
        """Score ``category`` one test image at a time (:class:`CategoryStream`), for a caller that makes
        its maps one at a time and drops them."""
        return CategoryStream(self, category, self.shares.get(category, {}))

    def results(self, client: str) -> dict[str, Any]:
        """``image_auroc``, ``auc_spro`` (means over the client's categories), ``test_counts``, per category, notes."""
        categories = self.per_client.get(client, {})
        auroc = [e["image_auroc"] for e in categories.values() if e["image_auroc"] is not None]
        spro: dict[str, float | None] = {}
        for limit in FPR_LIMITS:
            values = [e["auc_spro"][str(limit)] for e in categories.values() if e["auc_spro"] is not None]
            spro[str(limit)] = float(np.mean(values)) if values else None
        counts = {key: sum(e["counts"][key] for e in categories.values())
                  for key in ("test", "test_good", "test_defective")}
        notes = {}
        if not auroc:
            single_class = 0 in (counts["test_good"], counts["test_defective"])
            notes["image_auroc"] = (_undefined_reason(counts) if single_class
                                    else "each category of its test share has a single class")
        if spro["0.05"] is None:
            notes["auc_spro"] = "no defect region in its test share"
        return {
            "image_auroc": float(np.mean(auroc)) if auroc else None,
            "auc_spro": spro,
            "test_counts": counts,
            "test_categories": {name: dict(entry) for name, entry in categories.items()},
            "notes": notes,
        }

    def attach(self, rows: list[dict[str, Any]]) -> None:
        """Add each client's results to its results.json row (matched by the ``client`` id)."""
        for row in rows:
            row.update(self.results(str(row["client"])))


class CategoryStream:
    """One category of a :class:`ClientEvaluation`, fed image by image: each image goes to the
    :class:`~fedinspect.evaluation.streaming.StreamingEvaluation` of the client whose share holds it, and
    :meth:`finish` records every client's metrics. Use it in a ``with`` block (temporary files are deleted)."""

    def __init__(self, owner: ClientEvaluation, category: str, shares: Mapping[str, Sequence[int]]) -> None:
        self.owner, self.category = owner, category
        self.client_of = {int(index): client for client, indices in shares.items() for index in indices}
        self.streams = {client: StreamingEvaluation() for client in shares}

    def __enter__(self) -> CategoryStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        for stream in self.streams.values():
            stream.close()

    def add(self, index: int, label: int, score: float, anomaly_map: np.ndarray, regions: Sequence[Region]) -> None:
        """Test image ``index`` (its position in the category's test split)."""
        client = self.client_of.get(int(index))
        if client is not None:
            self.streams[client].add(label, score, anomaly_map, regions)

    def finish(self) -> None:
        """Record each client's metrics on its share."""
        for client, stream in self.streams.items():
            entry = stream.result() if len(stream) else {"image_auroc": None, "pixel_auroc": None, "auc_spro": None}
            share = stream.labels
            entry["counts"] = {"test": int(share.size), "test_good": int((share == 0).sum()),
                               "test_defective": int(share.sum())}
            if entry["image_auroc"] is None:
                entry["image_auroc_note"] = _undefined_reason(entry["counts"])
            self.owner.per_client[client][self.category] = entry
