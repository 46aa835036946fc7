"""The report of a federated PatchCore run: ``report.md`` and ``report.html`` with their figures.

:func:`write_report` takes plain data (the content of ``results.json``, the curves of each model on each
category and a few example images) and writes, under the run directory::

    report.md            Markdown (GitHub flavour: pipe tables, image links)
    report.html          one page, inline CSS, no JavaScript, no external resource
    figures/*.png        referenced by relative paths from both files

Both files are rendered from one :class:`fedinspect.evaluation.document.Document` (the document model and
renderer of every report), so they hold the same sections, tables, notes and figures in the same order:

1. title, one-paragraph summary, configuration (a Setting / Value table of what applies to the run);
2. clients: per-client statistics with a Total/Avg row, and the training images of each client per category;
3. compression: patches kept at each stage (raw extraction, local coresets, global bank) and bytes sent;
4. results: the federated model per category (AUC-sPRO at 0.01 / 0.05 / 0.1 / 0.3, image and pixel AUROC,
   test split sizes, mean row), the centralized baseline in the same form, federated versus centralized
   (image AUROC and AUC-sPRO@0.05 with the difference in points) and, when present, per-category bank
   versus one shared bank;
5. timing of each step;
6. figures: FPR-sPRO curves, image ROC curves, per-category bars, example heatmaps (one grid per category).

Every block of ``results.json`` is optional: a missing block skips its section with a short note, an
undefined metric (None or NaN) is written "n/a", a category whose test split has a single class gets no
ROC curve (noted), and figures are written for any number of categories (one included).

Numbers: metrics with 3 decimals, differences in points (1 point = 0.01), counts with thousands
separators, bytes in MB (10^6 bytes), percentages with 3 significant digits (100%, 10%, 3.35%).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from fedinspect.evaluation import plots
from fedinspect.evaluation.document import Document, Heading, Image, Note, Paragraph, Table
from fedinspect.evaluation.metrics import FPR_LIMITS
from fedinspect.evaluation.summary import mean_row, metric_row

__all__ = [
    "CategoryResults",
    "ClientStats",
    "Curves",
    "Example",
    "ModelResults",
    "RunResults",
    "compression_rows",
    "format_megabytes",
    "format_metric",
    "write_report",
]

# ----------------------------------------------------------------------------------------------
# Input data
# ----------------------------------------------------------------------------------------------


@dataclass
class Curves:
    """The curves of one model on one category.

    Attributes:
        spro_fpr, spro: FPR-sPRO curve, FPR ascending from 0 to 1 (as
            :func:`fedinspect.evaluation.metrics.spro_curve` returns it); None when the test split has
            no defect region (sPRO undefined).
        roc_fpr, roc_tpr: image-level ROC curve (e.g. from ``sklearn.metrics.roc_curve``); None when the
            test split has a single class (ROC undefined).
    """

    spro_fpr: np.ndarray | None = None
    spro: np.ndarray | None = None
    roc_fpr: np.ndarray | None = None
    roc_tpr: np.ndarray | None = None


@dataclass
class Example:
    """One test image for the heatmap grid.

    Attributes:
        category, defect, name: where it comes from (``defect`` is "good" for a defect-free image).
        image: uint8 RGB ``(H, W, 3)`` (a grey ``(H, W)`` image also works).
        anomaly_map: float ``(H, W)``; another size is stretched over the image.
        ground_truth: bool ``(H, W)``, the union of the defect regions (all False for a good image).
        score: image anomaly score.
    """

    category: str
    defect: str
    name: str
    image: np.ndarray
    anomaly_map: np.ndarray
    ground_truth: np.ndarray
    score: float


class CategoryResults(TypedDict, total=False):
    """One category in results.json; a metric is None where undefined (e.g. a single test class)."""

    image_auroc: float | None
    pixel_auroc: float | None
    auc_spro: dict[str, float | None]  # keys "0.01", "0.05", "0.1", "0.3", "1.0"
    counts: dict[str, int]  # "test", "test_good", "test_defective"


class ModelResults(TypedDict, total=False):
    """Results of one model (the centralized baseline, the shared-bank variant)."""

    categories: dict[str, CategoryResults]
    mean: CategoryResults
    timing: dict[str, float]


class ClientStats(TypedDict, total=False):
    """One client: training images, extracted patches, local coreset size, aggregation weight, bytes sent."""

    client: int
    samples: int
    patches: int
    coreset: int
    weight: float
    bytes_sent: int
    categories: dict[str, int]  # training images per category


class RunResults(TypedDict, total=False):
    """The content of results.json that :func:`write_report` reads (every key optional).

    ``categories``, ``mean`` and ``timing`` are those of the federated model; ``stages`` holds the patch
    counts ``raw_patches``, ``local_coreset`` and ``global_bank``; ``centralized`` is the baseline trained
    on pooled data; ``shared_bank`` is the same federation with one memory bank for all categories.
    """

    config: dict[str, Any]
    categories: dict[str, CategoryResults]
    mean: CategoryResults
    clients: list[ClientStats]
    stages: dict[str, int]
    timing: dict[str, float]
    centralized: ModelResults
    shared_bank: ModelResults


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------

NA = "n/a"
TABLE_LIMITS: tuple[float, ...] = tuple(limit for limit in FPR_LIMITS if limit < 1.0)
"""AUC-sPRO limits shown in the result tables (0.01, 0.05, 0.1, 0.3, as in the AutoVI paper)."""
HEADLINE_LIMIT = 0.05
"""The AUC-sPRO limit of the summary, the comparison tables and the bar chart."""


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (None, NaN, inf and non-numbers are undefined)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _client_label(client: Mapping[str, Any], index: int) -> str:
    """'Client 3' for a numeric id, the id itself for a named one ('client_3', 'plant_lyon')."""
    name = client.get("client", index)
    return f"Client {name}" if isinstance(name, int) else str(name)


def format_metric(value: Any, digits: int = 3) -> str:
    """A metric with ``digits`` decimals, "n/a" when undefined."""
    number = _number(value)
    return NA if number is None else f"{number:.{digits}f}"


def format_points(value: Any) -> str:
    """A difference of two metrics in points (0.01 = 1 point), signed, "n/a" when undefined; no sign on 0.0."""
    number = _number(value)
    if number is None:
        return NA
    text = f"{100.0 * number:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


def format_count(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{round(number):,}"


def format_megabytes(n_bytes: Any) -> str:
    """Bytes in MB (10^6 bytes): 2 decimals, 2 significant digits below 0.01 MB."""
    number = _number(n_bytes)
    if number is None:
        return NA
    mb = number / 1e6
    if mb == 0:
        return "0 MB"
    return f"{mb:,.2f} MB" if abs(mb) >= 0.01 else f"{mb:.2g} MB"


def format_percent(fraction: Any) -> str:
    """A fraction as a percentage with 3 significant digits: 1 -> "100%", 0.1 -> "10%", 0.0335 -> "3.35%"."""
    number = _number(fraction)
    if number is None:
        return NA
    percent = 100.0 * number
    if percent == 0:
        return "0%"
    if abs(percent) >= 1000:
        return f"{percent:,.0f}%"
    if abs(percent) < 0.001:
        return "<0.001%" if percent > 0 else ">-0.001%"
    return f"{percent:.3g}%"


def format_seconds(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{number:,.1f} s"


def scale_text(low: float, high: float) -> str:
    """A colour scale's ends in one number format: "0.250 to 3.500", "12.5 to 40.0", "1,200 to 5,400"."""
    magnitude = max(abs(low), abs(high))
    digits = 3 if magnitude < 10 else 2 if magnitude < 100 else 1 if magnitude < 1000 else 0
    if 0 < magnitude < 0.01:
        digits = 2 - math.floor(math.log10(magnitude))
    return f"{low:,.{digits}f} to {high:,.{digits}f}"


def _difference(a: Any, b: Any) -> float | None:
    x, y = _number(a), _number(b)
    return None if x is None or y is None else x - y


def _spro_column(limit: float) -> str:
    return f"spro@{limit:g}"


# ----------------------------------------------------------------------------------------------
# Reading results.json
# ----------------------------------------------------------------------------------------------


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _categories_of(block: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(k): _mapping(v) for k, v in _mapping(block.get("categories")).items()}


def _mean_of(block: Mapping[str, Any]) -> dict[str, float | None]:
    """The model's mean row: its "mean" block when given, else the mean over its categories."""
    mean = block.get("mean")
    if isinstance(mean, Mapping):
        return metric_row(mean)
    rows = {name: metric_row(r) for name, r in _categories_of(block).items()}
    return mean_row(rows) if rows else dict.fromkeys(metric_row({}))


def compression_rows(stages: Mapping[str, Any]) -> list[tuple[str, int | None, float | None]]:
    """``(stage label, patches, fraction of the raw patches kept)`` for each stage, raw extraction first.

    Known stages ("raw_patches", "local_coreset", "global_bank") come first in pipeline order, other keys
    after them in the given order. The fraction is None when the raw count is unknown or zero.
    """
    labels = {"raw_patches": "Raw extraction", "local_coreset": "Local coreset", "global_bank": "Global bank"}
    keys = [k for k in labels if k in stages] + [k for k in stages if k not in labels]
    raw = _number(stages.get("raw_patches"))
    rows = []
    for key in keys:
        count = _number(stages[key])
        fraction = None if count is None or not raw else count / raw
        label = labels.get(key, str(key).replace("_", " ").capitalize())
        rows.append((label, None if count is None else round(count), fraction))
    return rows


def all_kept_reason(stages: Mapping[str, Any], config: Mapping[str, Any]) -> str | None:
    """Why the global bank(s) hold every patch the clients sent, or None when the server subsampled.

    Equal local-coreset and global-bank counts mean the server kept everything: the strategy keeps all
    (concatenate) or the sent patches already fit in the budget (``global_size`` or ``global_ratio``).
    """
    local, bank = _number(stages.get("local_coreset")), _number(stages.get("global_bank"))
    if local is None or bank is None or round(local) != round(bank):
        return None
    if config.get("strategy") == "concatenate":
        return "the concatenate strategy keeps every patch"
    ratio = _number(config.get("global_ratio"))
    if ratio is not None:
        return f"under the budget of {ratio:g} of each bank's raw patches"
    size = _number(config.get("global_size"))
    return f"under the {format_count(size)} budget" if size is not None else "within the budget"


def describe_stages(stages: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """One console line naming each stage, e.g. "patches: 115,200 extracted -> 3,456 sent (local coresets) ->
    3,456 in the global banks (all kept: under the 10,000 budget)"."""
    banks = "global bank" if config.get("bank") == "shared" else "global banks"
    parts = []
    for key, text in (("raw_patches", "extracted"), ("local_coreset", "sent (local coresets)"),
                      ("global_bank", f"in the {banks}")):
        if _number(stages.get(key)) is not None:
            parts.append(f"{format_count(stages[key])} {text}")
    line = "patches: " + " -> ".join(parts) if parts else "patches: no stage counts"
    reason = all_kept_reason(stages, config)
    return line + (f" (all kept: {reason})" if reason else "")


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------

_MODEL_TITLES = {"federated": "Federated", "centralized": "Centralized", "shared_bank": "Shared bank"}


def _summary(results: Mapping[str, Any], categories: Sequence[str]) -> str:
    config = _mapping(results.get("config"))
    fed = _mean_of(results)
    spro_key = _spro_column(HEADLINE_LIMIT)
    sentences = []
    setup = []
    if config.get("clients") is not None:
        setup.append(f"{config['clients']} clients")
    if config.get("partition") is not None:
        setup.append(f"{config['partition']} partition")
    if config.get("strategy") is not None:
        setup.append(f"{config['strategy']} aggregation")
    setup_text = f" ({', '.join(setup)})" if setup else ""
    n = len(categories)
    if n == 0:
        sentences.append("results.json holds no per-category results.")
    else:
        sentences.append(
            f"Over {n} {'category' if n == 1 else 'categories'}, the federated model{setup_text} reaches a mean "
            f"image AUROC of {format_metric(fed['image_auroc'])} and a mean AUC-sPRO@{HEADLINE_LIMIT:g} of "
            f"{format_metric(fed[spro_key])}."
        )
    central_block = results.get("centralized")
    if isinstance(central_block, Mapping):
        central = _mean_of(central_block)
        diffs = []
        for key, name in (("image_auroc", "image AUROC"), (spro_key, f"AUC-sPRO@{HEADLINE_LIMIT:g}")):
            diff = _difference(fed[key], central[key])
            if diff is not None:
                diffs.append(f"{format_points(diff)} points of {name}")
        diff_text = f"; federated minus centralized: {' and '.join(diffs)}" if diffs else ""
        sentences.append(
            f"The centralized baseline (all training images pooled) reaches {format_metric(central['image_auroc'])} "
            f"and {format_metric(central[spro_key])}{diff_text}."
        )
    else:
        sentences.append("No centralized baseline was evaluated.")
    clients = [c for c in results.get("clients") or [] if isinstance(c, Mapping)]
    sent = [_number(c.get("bytes_sent")) for c in clients]
    if sent and all(value is not None for value in sent):
        total = sum(sent)  # type: ignore[arg-type]
        sentences.append(
            f"The {len(clients)} clients sent {format_megabytes(total)} in total "
            f"({format_megabytes(total / len(clients))} per client on average)."
        )
    stages = _mapping(results.get("stages"))
    raw, bank = _number(stages.get("raw_patches")), _number(stages.get("global_bank"))
    if raw and bank:
        local = _number(stages.get("local_coreset"))
        chain = " → ".join(format_count(v) for v in (raw, local, bank) if v is not None)
        reason = all_kept_reason(stages, config)
        kept = f"; the server kept every patch the clients sent ({reason})" if reason else ""
        sentences.append(
            f"Compression: {chain} patches, a {format_percent(1.0 - bank / raw)} reduction "
            f"({raw / bank:,.1f}× fewer patches in the global bank than extracted){kept}."
        )
    return " ".join(sentences)


_CONFIG_LABELS = {
    "clients": "Clients",
    "partition": "Partition of the training images",
    "alpha": "Dirichlet concentration α",
    "min_per_client": "Minimum patches per client (diversity preserving)",
    "strategy": "Aggregation strategy",
    "global_size": "Global bank budget (patches, all banks)",
    "global_ratio": "Global bank budget (fraction of each bank's raw patches)",
    "bank": "Memory banks",
    "min_clients": "Minimum answering clients",
    "centralized": "Centralized baseline",
    "centralized_coreset_ratio": "Centralized coreset ratio",
    "compare_shared": "Also evaluate one shared bank",
    "write_maps": "Anomaly maps written",
    "examples_per_category": "Example heatmaps per category",
    "attack_data": "Attacker's data (inversion and membership attacks)",
    "seed": "Seed",
    "backbone": "Backbone",
    "layers": "Backbone layers",
    "image_size": "Image size (px, short side)",
    "local_coreset_ratio": "Local coreset ratio",
    "projection_dim": "Coreset projection dimension",
    "coreset_chunk_size": "Coreset chunk size",
    "precision": "Precision of the sent embeddings",
    "obfuscation": "Image obfuscation",
    "dp_unit": "DP unit",
    "dp_epsilon": "DP target ε",
    "dp_noise_multiplier": "DP noise multiplier",
    "dp_delta": "DP δ",
    "dp_clip_norm": "DP clipping norm",
    "dp_patches_per_image": "DP patches per image",
    "dp_clusters": "DP clusters",
    "dp_iterations": "DP iterations",
    "poison": "Poisoning drill: attack",
    "poisoned_clients": "Poisoning drill: poisoned clients (the last ones)",
    "poison_strength": "Poisoning drill: strength (0: the attack's default)",
}


def _config_value(value: Any) -> str:
    """A setting as a reader writes it: yes/no, thousands separators, lists joined; "" when unset."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_config_value(v) for v in value)
    return str(value).strip()


def _config_applies(key: str, config: Mapping[str, Any]) -> bool:
    """Whether a setting matters for this run (alpha only for a Dirichlet partition, DP fields only with DP...)."""
    dp_on = bool(config.get("dp_unit"))
    poisoned = bool(config.get("poison")) and bool(config.get("poisoned_clients"))
    rules = {
        "alpha": config.get("partition") == "dirichlet",
        "min_per_client": config.get("strategy") == "diversity_preserving",
        "global_size": config.get("global_ratio") is None and config.get("strategy") != "concatenate",
        "global_ratio": config.get("strategy") != "concatenate",
        "centralized_coreset_ratio": config.get("centralized") is not False,
        # 0 means "not given" for the DP budget: the other of epsilon and noise multiplier was set.
        "dp_epsilon": dp_on and bool(_number(config.get("dp_epsilon"))),
        "dp_noise_multiplier": dp_on and bool(_number(config.get("dp_noise_multiplier"))),
    }
    if key in rules:
        return rules[key]
    if key.startswith("poison"):
        return poisoned
    return dp_on if key.startswith("dp_") else True


def config_table(config: Mapping[str, Any]) -> Table:
    """The run's configuration as a Setting / Value table: readable labels, only what applies, no empty values.

    The nested ``settings`` block (the round settings sent to the clients) is flattened into the same
    table; a setting given at both levels (the seed) is shown once.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key == "settings" and isinstance(value, Mapping):
            for inner, inner_value in value.items():
                flat.setdefault(str(inner), inner_value)
        else:
            flat[str(key)] = value
    rows = []
    for key, value in flat.items():
        if isinstance(value, Mapping):
            text = "; ".join(f"{k}: {_config_value(v)}" for k, v in value.items() if _config_value(v))
        else:
            text = _config_value(value)
        if text and _config_applies(key, flat):
            rows.append([_CONFIG_LABELS.get(key, key.replace("_", " ").capitalize()), text])
    return Table(["Setting", "Value"], rows, [False, False])


def _client_sections(doc: Document, results: Mapping[str, Any], categories: Sequence[str]) -> None:
    doc.add(Heading(2, "Clients"))
    clients = [c for c in results.get("clients") or [] if isinstance(c, Mapping)]
    if not clients:
        doc.add(Note("no client statistics in results.json; section skipped."))
        return
    header = ["Client", "Samples", "Patches", "Coreset", "Weight", "Bytes sent"]
    rows = []
    totals: dict[str, float | None] = {}
    for index, client in enumerate(clients):
        rows.append(
            [
                _client_label(client, index),
                format_count(client.get("samples")),
                format_count(client.get("patches")),
                format_count(client.get("coreset")),
                format_metric(client.get("weight")),
                format_megabytes(client.get("bytes_sent")),
            ]
        )
    for key in ("samples", "patches", "coreset", "weight", "bytes_sent"):
        values = [_number(c.get(key)) for c in clients]
        totals[key] = None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]
    rows.append(
        [
            "Total/Avg",
            format_count(totals["samples"]),
            format_count(totals["patches"]),
            format_count(totals["coreset"]),
            format_metric(totals["weight"]),
            format_megabytes(totals["bytes_sent"]),
        ]
    )
    doc.add(
        Paragraph(
            "Training images, extracted patch embeddings and local coreset size of each client, its weight in "
            "the aggregation and the bytes it sent to the server (MB = 10^6 bytes). The last row sums the "
            "columns (the weights sum to 1)."
        ),
        Table(header, rows, [False, True, True, True, True, True], emphasize_last=True),
    )

    per_client = [_mapping(c.get("categories")) for c in clients]
    if any(per_client):
        names = list(categories) + sorted({str(k) for m in per_client for k in m} - set(categories))
        names = [name for name in names if any(name in m for m in per_client)]
        header = ["Client", *names, "Total"]
        rows = []
        for index, (client, counts) in enumerate(zip(clients, per_client, strict=True)):
            values = [_number(counts.get(name)) or 0.0 for name in names]
            rows.append(
                [_client_label(client, index), *map(format_count, values), format_count(sum(values))]
            )
        column_sums = [sum(_number(m.get(name)) or 0.0 for m in per_client) for name in names]
        rows.append(["Total", *map(format_count, column_sums), format_count(sum(column_sums))])
        doc.add(
            Table(
                header,
                rows,
                [False, *([True] * (len(names) + 1))],
                emphasize_last=True,
                caption="Training images per client and category (the data partition).",
            )
        )


def _compression_section(doc: Document, results: Mapping[str, Any]) -> None:
    doc.add(Heading(2, "Compression"))
    stages = _mapping(results.get("stages"))
    if not stages:
        doc.add(Note("no stage counts in results.json; section skipped."))
        return
    reason = all_kept_reason(stages, _mapping(results.get("config")))
    rows = [
        [label, format_count(count), format_percent(fraction),
         f"the server kept every sent patch: {reason}" if reason and label == "Global bank" else ""]
        for label, count, fraction in compression_rows(stages)
    ]
    doc.add(
        Paragraph(
            "Patch embeddings at each stage: extracted on the clients, kept in their local coresets (sent to the "
            "server), kept in the global memory bank. Kept is relative to the raw extraction."
        ),
        Table(["Stage", "Patches", "Kept", "Note"], rows, [False, True, True, False]),
    )


def _model_table(block: Mapping[str, Any], categories: Sequence[str], with_counts: bool) -> Table:
    header = ["Category", *[f"AUC-sPRO@{limit:g}" for limit in TABLE_LIMITS], "Image AUROC", "Pixel AUROC"]
    per_category = _categories_of(block)
    show_counts = with_counts and any("counts" in r for r in per_category.values())
    if show_counts:
        header.append("Test images (good / defective)")
    rows = []
    for name in categories:
        if name not in per_category:
            continue
        row = metric_row(per_category[name])
        cells = [name, *[format_metric(row[_spro_column(limit)]) for limit in TABLE_LIMITS]]
        cells += [format_metric(row["image_auroc"]), format_metric(row["pixel_auroc"])]
        if show_counts:
            counts = _mapping(per_category[name].get("counts"))
            cells.append(
                f"{format_count(counts.get('test'))} ({format_count(counts.get('test_good'))} / "
                f"{format_count(counts.get('test_defective'))})"
                if counts
                else NA
            )
        rows.append(cells)
    mean = _mean_of(block)
    cells = ["Mean", *[format_metric(mean[_spro_column(limit)]) for limit in TABLE_LIMITS]]
    cells += [format_metric(mean["image_auroc"]), format_metric(mean["pixel_auroc"])]
    if show_counts:
        cells.append("")
    rows.append(cells)
    return Table(header, rows, [False, *([True] * (len(header) - 1))], emphasize_last=True)


def _comparison_table(
    first: Mapping[str, Any], second: Mapping[str, Any], names: tuple[str, str], categories: Sequence[str]
) -> Table:
    """Image AUROC and AUC-sPRO@0.05 of two models side by side, with first minus second in points."""
    spro_key = _spro_column(HEADLINE_LIMIT)
    a_name, b_name = names
    header = [
        "Category",
        f"Image AUROC {a_name}",
        f"Image AUROC {b_name}",
        "Δ image AUROC (points)",
        f"AUC-sPRO@{HEADLINE_LIMIT:g} {a_name}",
        f"AUC-sPRO@{HEADLINE_LIMIT:g} {b_name}",
        f"Δ AUC-sPRO@{HEADLINE_LIMIT:g} (points)",
    ]
    a_cats, b_cats = _categories_of(first), _categories_of(second)
    rows = []

    def cells(label: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
        out = [label]
        for key in ("image_auroc", spro_key):
            out += [
                format_metric(a.get(key)),
                format_metric(b.get(key)),
                format_points(_difference(a.get(key), b.get(key))),
            ]
        return out

    for name in categories:
        if name in a_cats or name in b_cats:
            rows.append(cells(name, metric_row(a_cats.get(name, {})), metric_row(b_cats.get(name, {}))))
    rows.append(cells("Mean", _mean_of(first), _mean_of(second)))
    return Table(header, rows, [False, *([True] * 6)], emphasize_last=True)


def _results_sections(doc: Document, results: Mapping[str, Any], categories: Sequence[str]) -> None:
    doc.add(Heading(2, "Results per category"))
    limits = ", ".join(f"{limit:g}" for limit in TABLE_LIMITS)
    doc.add(
        Paragraph(
            f"AutoVI protocol: AUC-sPRO normalized to [0, 1] at the pixel-FPR limits {limits}; image AUROC "
            "(good versus defective images); pixel AUROC. n/a: undefined (e.g. a test split with a single class)."
        )
    )
    doc.add(Heading(3, "Federated model"))
    if _categories_of(results):
        doc.add(_model_table(results, categories, with_counts=True))
    else:
        doc.add(Note("no per-category results in results.json."))

    central = results.get("centralized")
    doc.add(Heading(3, "Centralized baseline"))
    if isinstance(central, Mapping) and _categories_of(central):
        doc.add(_model_table(central, categories, with_counts=False))
        doc.add(Heading(3, "Federated versus centralized"))
        doc.add(Paragraph("Δ: federated minus centralized, in points (0.01 of a metric)."))
        doc.add(_comparison_table(results, central, ("fed.", "central."), categories))
    else:
        doc.add(Note("no centralized baseline in results.json; the comparison with it is skipped."))

    shared = results.get("shared_bank")
    if isinstance(shared, Mapping) and _categories_of(shared):
        doc.add(Heading(3, "Per-category bank versus shared bank"))
        doc.add(
            Paragraph(
                "The same federation with one memory bank per category (the model above) and with one bank "
                "shared by all categories. Δ: per-category minus shared, in points."
            )
        )
        doc.add(_comparison_table(results, shared, ("per-cat.", "shared"), categories))


def _client_results_section(doc: Document, run_dir: Path, results: Mapping[str, Any]) -> None:
    """Each client's metrics on its own test share, the fairness block, and a bar chart per client."""
    clients = [c for c in results.get("clients") or [] if isinstance(c, Mapping) and "test_counts" in c]
    if not clients:
        return
    spro_key = str(HEADLINE_LIMIT)
    doc.add(Heading(2, "Results per client"))
    doc.add(Paragraph(
        "Each client evaluates the global model on its share of the test split, taken by the rule that gave it "
        "its training images (per category, in proportion to its training images of that category); its metric "
        "is the mean over its categories. n/a: undefined, with the reason in a Note column."
    ))
    rows = []
    for index, client in enumerate(clients):
        counts = _mapping(client.get("test_counts"))
        notes = _mapping(client.get("notes"))
        rows.append([
            _client_label(client, index), ", ".join(_mapping(client.get("test_categories"))) or NA,
            f"{format_count(counts.get('test'))} ({format_count(counts.get('test_good'))} / "
            f"{format_count(counts.get('test_defective'))})",
            format_metric(client.get("image_auroc")), format_metric(_mapping(client.get("auc_spro")).get(spro_key)),
            "; ".join(f"{k}: {v}" for k, v in notes.items()),
        ])
    doc.add(Table(["Client", "Categories", "Test images (good / defective)", "Image AUROC",
                    f"AUC-sPRO@{HEADLINE_LIMIT:g}", "Note"], rows, [False, False, True, True, True, False]))
    fairness = _mapping(results.get("fairness"))
    if fairness:
        doc.add(Paragraph(
            "Fairness: worst and best value, gap = best - worst, CV = population standard deviation / mean, "
            "Jain's index = (sum x)^2 / (n sum x^2) (1: all equal, 1/n: one takes all)."
        ))
        metrics = [("Image AUROC", _mapping(fairness.get("image_auroc"))),
                   (f"AUC-sPRO@{HEADLINE_LIMIT:g}", _mapping(_mapping(fairness.get("auc_spro")).get(spro_key)))]
        rows = []
        for label, block in metrics:
            for over in ("clients", "categories"):
                summary = _mapping(block.get(over))
                if summary:
                    rows.append([label, over, f"{format_metric(summary.get('worst'))} ({summary.get('worst_of', NA)})",
                                 format_metric(summary.get("best")), format_metric(summary.get("gap")),
                                 format_metric(summary.get("cv")), format_metric(summary.get("jain"))])
        doc.add(Table(["Metric", "Over", "Worst (who)", "Best", "Gap", "CV", "Jain"], rows,
                       [False, False, True, True, True, True, True]))
    per_client = {_client_label(c, i): c for i, c in enumerate(clients)}
    path = plots.plot_metric_bars({"federated": per_client}, run_dir / "figures" / "metrics_per_client.png",
                                  categories=list(per_client), title="Per-client results (own test share)")
    doc.add(Image(path.relative_to(run_dir).as_posix(),
                   f"Image AUROC and AUC-sPRO@{HEADLINE_LIMIT:g} of the global model on each client's test share."))


def _timing_section(doc: Document, results: Mapping[str, Any]) -> None:
    fed = _mapping(results.get("timing"))
    central = _mapping(_mapping(results.get("centralized")).get("timing"))
    if not fed and not central:
        return
    doc.add(Heading(2, "Timing"))
    keys = list(fed) + [k for k in central if k not in fed]
    keys = [k for k in keys if k != "total_s"] + (["total_s"] if "total_s" in keys else [])
    header = ["Step", "Federated"] + (["Centralized"] if central else [])
    rows = []
    for key in keys:
        label = str(key).removesuffix("_s").replace("_", " ").capitalize()
        row = [label, format_seconds(fed.get(key))]
        if central:
            row.append(format_seconds(central.get(key)))
        rows.append(row)
    doc.add(Table(header, rows, [False, *([True] * (len(header) - 1))], emphasize_last="total_s" in keys))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "category"


def _single_class(results: Mapping[str, Any], category: str) -> bool:
    counts = _mapping(_categories_of(results).get(category, {}).get("counts"))
    good, defective = _number(counts.get("test_good")), _number(counts.get("test_defective"))
    return good == 0 or defective == 0


def _figure_sections(
    doc: Document,
    run_dir: Path,
    results: Mapping[str, Any],
    curves: Mapping[str, Mapping[str, Curves]],
    examples: Sequence[Example],
    categories: Sequence[str],
) -> None:
    doc.add(Heading(2, "Figures"))
    figures = run_dir / "figures"

    def add_image(path: Path, caption: str) -> None:
        doc.add(Image(path.relative_to(run_dir).as_posix(), caption))

    curve_categories = [c for c in categories if any(c in per_cat for per_cat in curves.values())]
    doc.add(Heading(3, "FPR-sPRO curves"))
    if curve_categories:
        path = plots.plot_spro_curves(curves, figures / "spro_curves.png", categories=curve_categories)
        add_image(
            path,
            "FPR-sPRO curves per category, pixel FPR from 0 to 0.3; dotted lines at the AUC-sPRO limits "
            f"0.01, 0.05, 0.1 and 0.3. {plots.line_style_note(list(curves))}".rstrip(),
        )
    else:
        doc.add(Note("no curves were given; figure skipped."))

    doc.add(Heading(3, "ROC curves"))
    if curve_categories:
        skipped = [
            c
            for c in curve_categories
            if _single_class(results, c) or not any(plots.roc_available(per.get(c)) for per in curves.values())
        ]
        if skipped:
            doc.add(Note(f"ROC skipped for {', '.join(skipped)}: a single test class (or no ROC curve given)."))
        if len(skipped) < len(curve_categories):
            aurocs = {
                model: {c: metric_row(r)["image_auroc"] for c, r in _categories_of(block).items()}
                for model, block in _model_blocks(results).items()
            }
            plottable = {model: {c: cv for c, cv in per.items() if c not in skipped} for model, per in curves.items()}
            shown = [c for c in curve_categories if c not in skipped]
            path = plots.plot_roc_curves(plottable, figures / "roc_curves.png", categories=shown, aurocs=aurocs)
            note = plots.line_style_note(list(plottable))
            add_image(path, f"Image-level ROC curves per category (AUROC in the legend). {note}".rstrip())
    else:
        doc.add(Note("no curves were given; figure skipped."))

    doc.add(Heading(3, "Image AUROC and AUC-sPRO per category"))
    blocks = {model: _categories_of(block) for model, block in _model_blocks(results).items()}
    blocks = {model: per for model, per in blocks.items() if per}
    if blocks:
        path = plots.plot_metric_bars(blocks, figures / "metrics_per_category.png", categories=categories)
        titles = ", ".join(plots.model_label(m) for m in blocks)
        add_image(path, f"Image AUROC and AUC-sPRO@{HEADLINE_LIMIT:g} per category ({titles}).")
    else:
        doc.add(Note("no per-category results; figure skipped."))

    doc.add(Heading(3, "Examples"))
    if not examples:
        doc.add(Note("no example images were given; figure skipped."))
        return
    doc.add(
        Paragraph(
            "Per row: the test image, its anomaly map over it (one colour scale per category, from the lowest "
            "to the highest patch score of that category's examples; white contour: ground truth) and the ground "
            "truth in red. The image score above each map is PatchCore's image anomaly score: the score of the "
            "most anomalous patch, reweighted by how isolated its nearest neighbour is in the memory bank; the "
            "map is upsampled and smoothed. So the image score can lie above the map's maximum (also printed) "
            "and above the top of the colour scale."
        )
    )
    ranges = plots.heatmap_ranges(examples)
    order = list(categories) + [c for c in dict.fromkeys(e.category for e in examples) if c not in categories]
    used_slugs: set[str] = set()
    for category in order:
        selected = [e for e in examples if e.category == category]
        if not selected:
            continue
        slug = _slug(category)
        while slug in used_slugs:
            slug += "_"
        used_slugs.add(slug)
        path = plots.plot_examples(selected, figures / f"examples_{slug}.png", ranges=ranges)
        vmin, vmax = ranges[category]
        add_image(path, f"Examples of {category} (heatmap colour scale {scale_text(vmin, vmax)}; an image score is "
                        "reweighted and can lie above the scale's top).")


def _model_blocks(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The result blocks of each model present: federated (top level), centralized, shared_bank."""
    blocks: dict[str, Mapping[str, Any]] = {"federated": results}
    for key in ("centralized", "shared_bank"):
        if isinstance(results.get(key), Mapping):
            blocks[key] = results[key]
    return blocks


def _category_order(results: Mapping[str, Any], curves: Mapping[str, Mapping[str, Any]]) -> list[str]:
    names: list[str] = list(_categories_of(results))
    for block in _model_blocks(results).values():
        names += [n for n in _categories_of(block) if n not in names]
    for per_category in curves.values():
        names += [str(n) for n in per_category if n not in names]
    return names


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def write_report(
    run_dir: Path | str,
    results: Mapping[str, Any],
    curves: Mapping[str, Mapping[str, Curves]] | None = None,
    examples: Sequence[Example] | None = None,
    title: str = "Federated PatchCore",
) -> tuple[Path, Path]:
    """Write ``RUN_DIR/report.md`` and ``RUN_DIR/report.html`` (and their PNGs under ``RUN_DIR/figures/``).

    Args:
        run_dir: the run directory (created if needed).
        results: the content of results.json (see :class:`RunResults`; every block optional).
        curves: ``curves[model][category]`` with models "federated" and "centralized" (others are drawn
            too); None or empty: no curve figures.
        examples: test images for the heatmap grids (one figure per category); None or empty: none.
        title: the report's title.

    Returns:
        ``(markdown_path, html_path)``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = _mapping(results)
    curves = {str(model): dict(per) for model, per in (curves or {}).items()}
    examples = list(examples or [])
    categories = _unique(_category_order(results, curves))

    doc = Document(title)
    doc.add(Heading(2, "Summary"), Paragraph(_summary(results, list(_categories_of(results)))))
    config = _mapping(results.get("config"))
    doc.add(Heading(2, "Configuration"))
    if config:
        doc.add(Paragraph("What was set for this run (settings that do not apply to it are left out)."),
                config_table(config))
    else:
        doc.add(Note("no configuration in results.json."))
    _client_sections(doc, results, categories)
    _compression_section(doc, results)
    _results_sections(doc, results, categories)
    _client_results_section(doc, run_dir, results)
    _timing_section(doc, results)
    _figure_sections(doc, run_dir, results, curves, examples, categories)

    return doc.write(run_dir)
