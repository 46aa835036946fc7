"""Plain-text tables of per-category results, as printed by the command line and written to reports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedinspect.evaluation.metrics import FPR_LIMITS

COLUMNS = ["image_auroc", "pixel_auroc", *[f"spro@{limit:g}" for limit in FPR_LIMITS]]


def metric_row(results: Mapping[str, Any]) -> dict[str, float | None]:
    """Flatten one category's results into the table's columns (None where undefined)."""
    spro = results.get("auc_spro") or {}
    row: dict[str, float | None] = {
        "image_auroc": results.get("image_auroc"),
        "pixel_auroc": results.get("pixel_auroc"),
    }
    for limit in FPR_LIMITS:
        row[f"spro@{limit:g}"] = spro.get(str(limit))
    return row


def mean_row(rows: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """Mean over categories of each column, ignoring undefined entries."""
    mean: dict[str, float | None] = {}
    for column in COLUMNS:
        values = [r[column] for r in rows.values() if r.get(column) is not None]
        mean[column] = float(np.mean(values)) if values else None
    return mean


def results_table(per_category: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table: one row per category, the mean over categories last."""
    rows = {name: metric_row(results) for name, results in per_category.items()}
    if len(rows) > 1:
        rows["mean"] = mean_row(rows)
    width = max([len("category"), *map(len, rows)])
    header = f"| {'category':<{width}} | " + " | ".join(f"{c:>11}" for c in COLUMNS) + " |"
    rule = f"|{'-' * (width + 2)}|" + "|".join("-" * 12 + ":" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for name, row in rows.items():
        cells = " | ".join(f"{'n/a':>11}" if row[c] is None else f"{row[c]:>11.4f}" for c in COLUMNS)
        lines.append(f"| {name:<{width}} | {cells} |")
    return "\n".join(lines)
