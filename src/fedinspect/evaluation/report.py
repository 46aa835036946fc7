"""The report of a federated PatchCore run: ``report.md`` and ``report.html`` with their figures.

:func:`write_report` takes plain data (the content of ``results.json``, the curves of each model on each
category and a few example images) and writes, under the run directory::

    report.md            Markdown (GitHub flavour: pipe tables, image links)
    report.html          one page, inline CSS, no JavaScript, no external resource
    figures/*.png        referenced by relative paths from both files

Both files are rendered from the same list of blocks, so they hold the same sections, tables, notes and
figures in the same order:

1. title, one-paragraph summary, configuration;
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

import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from fedinspect.evaluation import plots
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
    """A difference of two metrics in points (0.01 = 1 point), signed, "n/a" when undefined."""
    number = _number(value)
    return NA if number is None else f"{100.0 * number:+.1f}"


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


def _difference(a: Any, b: Any) -> float | None:
    x, y = _number(a), _number(b)
    return None if x is None or y is None else x - y


def _spro_column(limit: float) -> str:
    return f"spro@{limit:g}"


# ----------------------------------------------------------------------------------------------
# Document blocks, rendered to Markdown and HTML
# ----------------------------------------------------------------------------------------------


@dataclass
class _Heading:
    level: int
    text: str


@dataclass
class _Paragraph:
    text: str


@dataclass
class _Note:
    text: str


@dataclass
class _List:
    items: list[tuple[str, str]]  # (key, value)


@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool]  # right-aligned columns
    emphasize_last: bool = False  # a Total / Mean row
    caption: str | None = None


@dataclass
class _Image:
    src: str  # relative to the run directory
    caption: str


@dataclass
class _Document:
    title: str
    blocks: list[Any] = field(default_factory=list)

    def add(self, *blocks: Any) -> None:
        self.blocks.extend(blocks)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_markdown(doc: _Document) -> str:
    lines: list[str] = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, _Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, _Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, _Note):
            lines += [f"> Note: {block.text}", ""]
        elif isinstance(block, _List):
            lines += [f"- **{key}**: {value}" for key, value in block.items] + [""]
        elif isinstance(block, _Table):
            if block.caption:
                lines += [f"*{block.caption}*", ""]
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "|".join("---:" if num else ":---" for num in block.numeric) + "|")
            for index, row in enumerate(block.rows):
                cells = [_md_cell(c) for c in row]
                if block.emphasize_last and index == len(block.rows) - 1:
                    cells[0] = f"**{cells[0]}**"
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        elif isinstance(block, _Image):
            alt = block.caption.replace("[", "\\[").replace("]", "\\]")
            lines += [f"![{alt}]({block.src})", "", f"*{block.caption}*", ""]
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown block {block!r}")
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328; margin: 0;
       background: #f6f8fa; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; background: #ffffff; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: 8px; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 36px; }
h3 { margin-top: 24px; }
table { border-collapse: collapse; margin: 8px 0 18px; font-size: 14px; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 4px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f0f3f6; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; background: #f6f8fa; }
p.note { color: #57606a; font-style: italic; border-left: 3px solid #d0d7de; padding-left: 10px; }
figure { margin: 12px 0 28px; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 14px; }
ul.config { columns: 2; }
""".strip()


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _render_html(doc: _Document) -> str:
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8" />',
        '<meta name="viewport" content="width=device-width, initial-scale=1" />',
        f"<title>{_e(doc.title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{_e(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        if isinstance(block, _Heading):
            out.append(f"<h{block.level}>{_e(block.text)}</h{block.level}>")
        elif isinstance(block, _Paragraph):
            out.append(f"<p>{_e(block.text)}</p>")
        elif isinstance(block, _Note):
            out.append(f'<p class="note">Note: {_e(block.text)}</p>')
        elif isinstance(block, _List):
            out.append('<ul class="config">')
            out += [f"<li><strong>{_e(key)}</strong>: {_e(value)}</li>" for key, value in block.items]
            out.append("</ul>")
        elif isinstance(block, _Table):
            out.append("<table>")
            if block.caption:
                out.append(f"<caption>{_e(block.caption)}</caption>")
            out.append("<thead>")
            cells = "".join(
                f'<th class="num">{_e(h)}</th>' if num else f"<th>{_e(h)}</th>"
                for h, num in zip(block.header, block.numeric, strict=True)
            )
            out.append(f"<tr>{cells}</tr>")
            out.append("</thead>")
            out.append("<tbody>")
            for index, row in enumerate(block.rows):
                total = block.emphasize_last and index == len(block.rows) - 1
                cells = "".join(
                    f'<td class="num">{_e(c)}</td>' if num else f"<td>{_e(c)}</td>"
                    for c, num in zip(row, block.numeric, strict=True)
                )
                out.append(f'<tr class="total">{cells}</tr>' if total else f"<tr>{cells}</tr>")
            out.append("</tbody>")
            out.append("</table>")
        elif isinstance(block, _Image):
            out.append("<figure>")
            out.append(f'<img src="{_e(block.src)}" alt="{_e(block.caption)}" />')
            out.append(f"<figcaption>{_e(block.caption)}</figcaption>")
            out.append("</figure>")
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown block {block!r}")
    out += ["</main>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


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
        sentences.append(
            f"Compression: {chain} patches, a {format_percent(1.0 - bank / raw)} reduction "
            f"({raw / bank:,.1f}× fewer patches in the global bank than extracted)."
        )
    return " ".join(sentences)


def _config_items(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    items = []
    for key, value in config.items():
        if isinstance(value, (Mapping, list, tuple)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        items.append((str(key), text))
    return items


def _client_sections(doc: _Document, results: Mapping[str, Any], categories: Sequence[str]) -> None:
    doc.add(_Heading(2, "Clients"))
    clients = [c for c in results.get("clients") or [] if isinstance(c, Mapping)]
    if not clients:
        doc.add(_Note("no client statistics in results.json; section skipped."))
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
        _Paragraph(
            "Training images, extracted patch embeddings and local coreset size of each client, its weight in "
            "the aggregation and the bytes it sent to the server (MB = 10^6 bytes). The last row sums the "
            "columns (the weights sum to 1)."
        ),
        _Table(header, rows, [False, True, True, True, True, True], emphasize_last=True),
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
            _Table(
                header,
                rows,
                [False, *([True] * (len(names) + 1))],
                emphasize_last=True,
                caption="Training images per client and category (the data partition).",
            )
        )


def _compression_section(doc: _Document, results: Mapping[str, Any]) -> None:
    doc.add(_Heading(2, "Compression"))
    stages = _mapping(results.get("stages"))
    if not stages:
        doc.add(_Note("no stage counts in results.json; section skipped."))
        return
    rows = [
        [label, format_count(count), format_percent(fraction)] for label, count, fraction in compression_rows(stages)
    ]
    doc.add(
        _Paragraph(
            "Patch embeddings at each stage: extracted on the clients, kept in their local coresets (sent to the "
            "server), kept in the global memory bank. Kept is relative to the raw extraction."
        ),
        _Table(["Stage", "Patches", "Kept"], rows, [False, True, True]),
    )


def _model_table(block: Mapping[str, Any], categories: Sequence[str], with_counts: bool) -> _Table:
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
    return _Table(header, rows, [False, *([True] * (len(header) - 1))], emphasize_last=True)


def _comparison_table(
    first: Mapping[str, Any], second: Mapping[str, Any], names: tuple[str, str], categories: Sequence[str]
) -> _Table:
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
    return _Table(header, rows, [False, *([True] * 6)], emphasize_last=True)


def _results_sections(doc: _Document, results: Mapping[str, Any], categories: Sequence[str]) -> None:
    doc.add(_Heading(2, "Results per category"))
    limits = ", ".join(f"{limit:g}" for limit in TABLE_LIMITS)
    doc.add(
        _Paragraph(
            f"AutoVI protocol: AUC-sPRO normalized to [0, 1] at the pixel-FPR limits {limits}; image AUROC "
            "(good versus defective images); pixel AUROC. n/a: undefined (e.g. a test split with a single class)."
        )
    )
    doc.add(_Heading(3, "Federated model"))
    if _categories_of(results):
        doc.add(_model_table(results, categories, with_counts=True))
    else:
        doc.add(_Note("no per-category results in results.json."))

    central = results.get("centralized")
    doc.add(_Heading(3, "Centralized baseline"))
    if isinstance(central, Mapping) and _categories_of(central):
        doc.add(_model_table(central, categories, with_counts=False))
        doc.add(_Heading(3, "Federated versus centralized"))
        doc.add(_Paragraph("Δ: federated minus centralized, in points (0.01 of a metric)."))
        doc.add(_comparison_table(results, central, ("fed.", "central."), categories))
    else:
        doc.add(_Note("no centralized baseline in results.json; the comparison with it is skipped."))

    shared = results.get("shared_bank")
    if isinstance(shared, Mapping) and _categories_of(shared):
        doc.add(_Heading(3, "Per-category bank versus shared bank"))
        doc.add(
            _Paragraph(
                "The same federation with one memory bank per category (the model above) and with one bank "
                "shared by all categories. Δ: per-category minus shared, in points."
            )
        )
        doc.add(_comparison_table(results, shared, ("per-cat.", "shared"), categories))


def _client_results_section(doc: _Document, run_dir: Path, results: Mapping[str, Any]) -> None:
    """Each client's metrics on its own test share, the fairness block, and a bar chart per client."""
    clients = [c for c in results.get("clients") or [] if isinstance(c, Mapping) and "test_counts" in c]
    if not clients:
        return
    spro_key = str(HEADLINE_LIMIT)
    doc.add(_Heading(2, "Results per client"))
    doc.add(_Paragraph(
        "Each client evaluates the global model on its share of the test split, taken by the rule that gave it "
        "its training images (per category, in proportion to its training images of that category); its metric "
        "is the mean over its categories. n/a: undefined, with the reason in the last column."
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
    doc.add(_Table(["Client", "Categories", "Test images (good / defective)", "Image AUROC",
                    f"AUC-sPRO@{HEADLINE_LIMIT:g}", "Note"], rows, [False, False, True, True, True, False]))
    fairness = _mapping(results.get("fairness"))
    if fairness:
        doc.add(_Paragraph(
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
        doc.add(_Table(["Metric", "Over", "Worst (who)", "Best", "Gap", "CV", "Jain"], rows,
                       [False, False, True, True, True, True, True]))
    per_client = {_client_label(c, i): c for i, c in enumerate(clients)}
    path = plots.plot_metric_bars({"federated": per_client}, run_dir / "figures" / "metrics_per_client.png",
                                  categories=list(per_client), title="Per-client results (own test share)")
    doc.add(_Image(path.relative_to(run_dir).as_posix(),
                   f"Image AUROC and AUC-sPRO@{HEADLINE_LIMIT:g} of the global model on each client's test share."))


def _timing_section(doc: _Document, results: Mapping[str, Any]) -> None:
    fed = _mapping(results.get("timing"))
    central = _mapping(_mapping(results.get("centralized")).get("timing"))
    if not fed and not central:
        return
    doc.add(_Heading(2, "Timing"))
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
    doc.add(_Table(header, rows, [False, *([True] * (len(header) - 1))], emphasize_last="total_s" in keys))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "category"


def _single_class(results: Mapping[str, Any], category: str) -> bool:
    counts = _mapping(_categories_of(results).get(category, {}).get("counts"))
    good, defective = _number(counts.get("test_good")), _number(counts.get("test_defective"))
    return good == 0 or defective == 0


def _figure_sections(
    doc: _Document,
    run_dir: Path,
    results: Mapping[str, Any],
    curves: Mapping[str, Mapping[str, Curves]],
    examples: Sequence[Example],
    categories: Sequence[str],
) -> None:
    doc.add(_Heading(2, "Figures"))
    figures = run_dir / "figures"

    def add_image(path: Path, caption: str) -> None:
        doc.add(_Image(path.relative_to(run_dir).as_posix(), caption))

    curve_categories = [c for c in categories if any(c in per_cat for per_cat in curves.values())]
    doc.add(_Heading(3, "FPR-sPRO curves"))
    if curve_categories:
        path = plots.plot_spro_curves(curves, figures / "spro_curves.png", categories=curve_categories)
        add_image(
            path,
            "FPR-sPRO curves per category, pixel FPR from 0 to 0.3; dotted lines at the AUC-sPRO limits "
            "0.01, 0.05, 0.1 and 0.3.",
        )
    else:
        doc.add(_Note("no curves were given; figure skipped."))

    doc.add(_Heading(3, "ROC curves"))
    if curve_categories:
        skipped = [
            c
            for c in curve_categories
            if _single_class(results, c) or not any(plots.roc_available(per.get(c)) for per in curves.values())
        ]
        if skipped:
            doc.add(_Note(f"ROC skipped for {', '.join(skipped)}: a single test class (or no ROC curve given)."))
        if len(skipped) < len(curve_categories):
            aurocs = {
                model: {c: metric_row(r)["image_auroc"] for c, r in _categories_of(block).items()}
                for model, block in _model_blocks(results).items()
            }
            plottable = {model: {c: cv for c, cv in per.items() if c not in skipped} for model, per in curves.items()}
            shown = [c for c in curve_categories if c not in skipped]
            path = plots.plot_roc_curves(plottable, figures / "roc_curves.png", categories=shown, aurocs=aurocs)
            add_image(path, "Image-level ROC curves per category (AUROC in the legend).")
    else:
        doc.add(_Note("no curves were given; figure skipped."))

    doc.add(_Heading(3, "Image AUROC and AUC-sPRO per category"))
    blocks = {model: _categories_of(block) for model, block in _model_blocks(results).items()}
    blocks = {model: per for model, per in blocks.items() if per}
    if blocks:
        path = plots.plot_metric_bars(blocks, figures / "metrics_per_category.png", categories=categories)
        titles = ", ".join(plots.model_label(m) for m in blocks)
        add_image(path, f"Image AUROC and AUC-sPRO@{HEADLINE_LIMIT:g} per category ({titles}).")
    else:
        doc.add(_Note("no per-category results; figure skipped."))

    doc.add(_Heading(3, "Examples"))
    if not examples:
        doc.add(_Note("no example images were given; figure skipped."))
        return
    doc.add(
        _Paragraph(
            "Per row: the test image, its anomaly map over it (one colour scale per category, from the lowest "
            "to the highest score of that category's examples; white contour: ground truth) and the ground "
            "truth in red."
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
        add_image(path, f"Examples of {category} (heatmap scale {vmin:.3g} to {vmax:.3g}).")


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

    doc = _Document(title)
    doc.add(_Heading(2, "Summary"), _Paragraph(_summary(results, list(_categories_of(results)))))
    config = _mapping(results.get("config"))
    doc.add(_Heading(2, "Configuration"))
    if config:
        doc.add(_List(_config_items(config)))
    else:
        doc.add(_Note("no configuration in results.json."))
    _client_sections(doc, results, categories)
    _compression_section(doc, results)
    _results_sections(doc, results, categories)
    _client_results_section(doc, run_dir, results)
    _timing_section(doc, results)
    _figure_sections(doc, run_dir, results, curves, examples, categories)

    markdown_path = run_dir / "report.md"
    html_path = run_dir / "report.html"
    markdown_path.write_text(_render_markdown(doc), encoding="utf-8")
    html_path.write_text(_render_html(doc), encoding="utf-8")
    return markdown_path, html_path
