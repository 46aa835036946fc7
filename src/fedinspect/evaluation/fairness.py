"""Fairness of a metric across clients or categories: how far the worst-off is from the rest.

For values ``x_1 .. x_n`` of one metric (e.g. the image AUROC of each client), with undefined values
(None or NaN) left out and counted separately:

- ``worst = min_i x_i`` and ``best = max_i x_i``;
- ``gap = best - worst`` (0 when all are equal);
- ``cv = s / mean``, the coefficient of variation, with the *population* standard deviation
  ``s = sqrt(sum (x_i - mean)^2 / n)`` (``ddof=0``, the default: the clients are the whole
  federation, not a sample of it) or the sample one (``ddof=1``, divides by ``n - 1``);
- ``jain = (sum x_i)^2 / (n * sum x_i^2)``, Jain's fairness index (Jain, Chiu and Hawe, 1984): 1 when
  all values are equal, ``1/n`` when one value holds everything and the others are 0; it needs
  non-negative values.

Edge cases: no defined value gives NaN everywhere; a single value gives ``gap = 0``, ``cv = 0``
(NaN with ``ddof=1``) and ``jain = 1``; a zero mean gives ``cv = NaN``; all values 0 give ``jain = 1``
(all equal). :func:`fairness_summary` writes NaN as None, so that results.json stays standard JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["FAIRNESS_KEYS", "coefficient_of_variation", "defined", "fairness_summary", "gap", "jain_index", "worst"]

FAIRNESS_KEYS = ("worst", "best", "gap", "cv", "jain")


def defined(values: Iterable[Any]) -> np.ndarray:
    """The finite values as a float array (None, NaN and infinities left out)."""
    numbers = [float(v) for v in values if v is not None and not isinstance(v, bool)]
    array = np.asarray(numbers, dtype=np.float64)
    return array[np.isfinite(array)]


def worst(values: Iterable[Any]) -> float:
    """Smallest defined value (NaN if none)."""
    x = defined(values)
    return float(x.min()) if x.size else math.nan


def gap(values: Iterable[Any]) -> float:
    """Best minus worst defined value (NaN if none, 0 for a single value)."""
    x = defined(values)
    return float(x.max() - x.min()) if x.size else math.nan


def coefficient_of_variation(values: Iterable[Any], ddof: int = 0) -> float:
    """Standard deviation over mean; ``ddof=0`` population (default), ``ddof=1`` sample standard deviation."""
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population) or 1 (sample), got {ddof!r}")
    x = defined(values)
    if x.size <= ddof:
        return math.nan
    mean = float(x.mean())
    if mean == 0.0:
        return math.nan
    return float(x.std(ddof=ddof) / abs(mean))


def jain_index(values: Iterable[Any]) -> float:
    """Jain's index ``(sum x)^2 / (n sum x^2)`` in ``[1/n, 1]``; NaN if no value, 1 if all are 0."""
    x = defined(values)
    if x.size == 0:
        return math.nan
    if (x < 0).any():
        raise ValueError(f"Jain's index needs non-negative values, got {x[x < 0][:3].tolist()}")
    squares = float(np.square(x).sum())
    if squares == 0.0:
        return 1.0
    return float(x.sum() ** 2 / (x.size * squares))


def fairness_summary(values: Iterable[Any] | Mapping[str, Any], ddof: int = 0) -> dict[str, Any]:
    """``worst``, ``best``, ``gap``, ``cv``, ``jain``, ``n`` (defined values) and ``n_undefined``; None for NaN.

    A mapping (e.g. client id -> value) also records who is worst (``worst_of``) and best (``best_of``).
    """
    names: list[str] | None = None
    if isinstance(values, Mapping):
        names = [str(k) for k in values]
        values = list(values.values())
    values = list(values)
    x = defined(values)
    summary: dict[str, Any] = {
        "worst": worst(x), "best": float(x.max()) if x.size else math.nan, "gap": gap(x),
        "cv": coefficient_of_variation(x, ddof), "jain": jain_index(x),
    }
    summary = {key: (None if math.isnan(value) else value) for key, value in summary.items()}
    summary["n"] = int(x.size)
    summary["n_undefined"] = len(values) - int(x.size)
    if names is not None and x.size:
        finite = {name: float(v) for name, v in zip(names, values, strict=True) if defined([v]).size}
        summary["worst_of"] = min(finite, key=finite.__getitem__)
        summary["best_of"] = max(finite, key=finite.__getitem__)
    return summary


def run_fairness(categories: Mapping[str, Mapping[str, Any]], clients: Iterable[Mapping[str, Any]],
                 limits: Iterable[float] | None = None) -> dict[str, Any]:
    """The ``fairness`` block of a run's results.json, over clients and over categories.

    ``{"image_auroc": {"clients": summary, "categories": summary}, "auc_spro": {"0.05": {...}, ...}}``,
    each summary as :func:`fairness_summary` gives it. ``categories`` is results.json's ``categories``;
    ``clients`` its ``clients`` rows (with ``image_auroc`` and ``auc_spro`` from the per-client evaluation).
    """
    from fedinspect.evaluation.metrics import FPR_LIMITS

    limits = [str(limit) for limit in (FPR_LIMITS if limits is None else limits)]
    clients = [c for c in clients if isinstance(c, Mapping)]
    by_client = {str(c.get("client", i)): c for i, c in enumerate(clients)}

    def spro(entry: Mapping[str, Any], limit: str) -> Any:
        return (entry.get("auc_spro") or {}).get(limit)

    block: dict[str, Any] = {"image_auroc": {
        "clients": fairness_summary({k: c.get("image_auroc") for k, c in by_client.items()}),
        "categories": fairness_summary({k: c.get("image_auroc") for k, c in categories.items()}),
    }, "auc_spro": {}}
    for limit in limits:
        block["auc_spro"][limit] = {
            "clients": fairness_summary({k: spro(c, limit) for k, c in by_client.items()}),
            "categories": fairness_summary({k: spro(c, limit) for k, c in categories.items()}),
        }
    return block
