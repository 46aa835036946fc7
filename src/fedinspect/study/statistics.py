"""Statistics over a study's seeds: bootstrap confidence intervals and paired tests between strategies.

- :func:`bootstrap_ci`: percentile bootstrap interval of the mean (Efron): draw ``n`` values with
  replacement ``n_resamples`` times (seeded), take the mean of each draw, and report the
  ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those means. With 3 seeds the
  interval is coarse (at most 10 distinct resample means): it says how much the seeds moved the
  result, not more.
- :func:`paired_permutation_test`: two-sided sign-flip test of the mean paired difference. Under the
  null (no difference) each difference is as likely negative as positive; the p-value is the share
  of the ``2^n`` sign patterns (all of them up to ``n = 16``, else ``n_resamples`` seeded draws, with
  the +1 correction) whose mean is at least as far from 0 as the observed one.
- :func:`wilcoxon_test`: :func:`scipy.stats.wilcoxon` signed-rank test of the paired differences
  (two-sided, zero differences dropped as Wilcoxon did; exact distribution for small ``n`` when there
  are no ties); undefined (None, with the reason) when every difference is 0.

Every test result states its name, the number of pairs and the p-value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

EXACT_LIMIT = 16  # up to 2^16 sign patterns are enumerated


def _paired(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Differences ``a - b`` of the pairs where both are defined."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-d and of equal length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep] - y[keep]


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the defined values; (NaN, NaN) if there are none."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


@dataclass
class PairedTest:
    """A paired comparison of ``a`` against ``b``: which test, how many pairs, the statistic and p-value."""

    test: str
    n: int
    mean_difference: float | None
    statistic: float | None
    p_value: float | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_permutation_test(a: Sequence[float], b: Sequence[float], n_resamples: int = 20_000,
                            seed: int = 0) -> PairedTest:
    """Two-sided sign-flip permutation test of mean(a - b) over the pairs where both are defined."""
    d = _paired(a, b)
    name = "paired sign-flip permutation test (two-sided, mean difference)"
    if d.size == 0:
        return PairedTest(name, 0, None, None, None, "no pair with both values defined")
    observed = float(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))
    if d.size <= EXACT_LIMIT:
        patterns = (np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1
        means = ((1 - 2 * patterns) * d).mean(axis=1)
        p = float(np.mean(np.abs(means) >= abs(observed) - tolerance))
        note = f"exact over all {2 ** d.size} sign patterns"
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_resamples, d.size))
        count = int(np.sum(np.abs((signs * d).mean(axis=1)) >= abs(observed) - tolerance))
        p = (count + 1) / (n_resamples + 1)
        note = f"{n_resamples} random sign patterns (seed {seed})"
    return PairedTest(name, int(d.size), observed, observed, min(p, 1.0), note)


def wilcoxon_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test (scipy) of the pairs where both are defined."""
    d = _paired(a, b)
    name = "Wilcoxon signed-rank test (two-sided, scipy)"
    if d.size == 0:
        return PairedTest(name, 0, None, None, None, "no pair with both values defined")
    mean = float(d.mean())
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        return PairedTest(name, int(d.size), mean, None, None, "every difference is 0: no evidence either way")
    result = stats.wilcoxon(d)
    note = f"{d.size - nonzero} zero difference(s) dropped" if nonzero < d.size else ""
    return PairedTest(name, int(d.size), mean, float(result.statistic), float(result.pvalue), note)
