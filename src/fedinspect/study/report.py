"""The study's outputs: ``table.csv``, ``table.md``, and ``report.md`` / ``report.html`` with figures.

The report has the table (mean over seeds and 95% bootstrap interval per group), the paired tests
against the baseline (test, n, p-values), the Pareto fronts of accuracy against the worst client and
against bytes sent (figures per situation), and the recommendations generated from the numbers. It is
rendered with the shared document model (fedinspect.evaluation.document), like every report.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fedinspect.evaluation.document import (
    Document,
    Heading,
    Image,
    KeyValues,
    Note,
    Paragraph,
    Table,
    render_markdown_table,
)
from fedinspect.study.analysis import FRONTS, METRICS, STRATEGY_AXIS, Findings
from fedinspect.study.pareto import pareto_front

TABLE_METRICS = ("image_auroc", "auc_spro@0.05", "worst_client_image_auroc", "client_gap_image_auroc",
                 "client_jain_image_auroc", "worst_category_image_auroc", "mb_sent")
_LABELS = {m.key: m.label for m in METRICS}


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _cell(stat: Mapping[str, float], digits: int = 3) -> str:
    if not math.isfinite(stat["mean"]):
        return "n/a"
    return f"{_fmt(stat['mean'], digits)} [{_fmt(stat['ci_low'], digits)}, {_fmt(stat['ci_high'], digits)}]"


def write_tables(out_dir: Path, findings: Findings) -> tuple[Path, Path]:
    """``table.csv`` (every metric: mean, ci_low, ci_high, n) and ``table.md`` (the headline metrics)."""
    csv_path, md_path = out_dir / "table.csv", out_dir / "table.md"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = [*findings.axes, "seeds"]
        for metric in METRICS:
            header += [metric.key, f"{metric.key}_ci_low", f"{metric.key}_ci_high", f"{metric.key}_n"]
        writer.writerow(header)
        for row in findings.rows:
            line = [row["levels"][a] for a in findings.axes] + [" ".join(map(str, row["seeds"]))]
            for metric in METRICS:
                stat = row[metric.key]
                line += [f"{stat['mean']:.6g}", f"{stat['ci_low']:.6g}", f"{stat['ci_high']:.6g}", stat["n"]]
            writer.writerow(line)
    md_path.write_text(_markdown_table(findings) + "\n", encoding="utf-8")
    return csv_path, md_path


def _table_block(findings: Findings) -> Table:
    header = [*findings.axes, "n", *[_LABELS[k] for k in TABLE_METRICS]]
    rows = [[*[row["levels"][a] for a in findings.axes], str(len(row["seeds"])),
             *[_cell(row[k], 2 if k == "mb_sent" else 3) for k in TABLE_METRICS]] for row in findings.rows]
    return Table(header, rows, [False] * len(findings.axes) + [True] * (1 + len(TABLE_METRICS)))


def _markdown_table(findings: Findings) -> str:
    return "\n".join(render_markdown_table(_table_block(findings)))


def _points(difference: float | None) -> str:
    """A mean difference in points, signed; 0.00 without a sign (no "-0.00" beside "+0.00")."""
    if difference is None:
        return "n/a"
    text = f"{100 * difference:+.2f}"
    return "0.00" if float(text) == 0 else text


def _p(test: Mapping[str, Any]) -> str:
    return "n/a" if test["p_value"] is None else f"{test['p_value']:.3g}"


def _tests_block(tests: Sequence[Mapping[str, Any]]) -> Table:
    header = ["strategy", "vs", "where", "metric", "pairs", "n", "mean Δ (points)", "Wilcoxon p",
              "permutation p", "note"]
    rows = []
    for test in tests:
        w, perm = test["wilcoxon"], test["permutation"]
        where = ", ".join(f"{k}={v}" for k, v in test["context"].items()) or "-"
        mean = w["mean_difference"]
        rows.append([test["strategy"], test["baseline"], where, test["metric"], test["pairs"], str(w["n"]),
                     _points(mean), _p(w), _p(perm),
                     "; ".join(n for n in (w["note"], perm["note"]) if n)])
    return Table(header, rows, [False] * 5 + [True] * 4 + [False])


def _colors(labels: Sequence[str]) -> dict[str, str]:
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    return {label: palette[i % len(palette)] for i, label in enumerate(dict.fromkeys(labels))}


def plot_fronts(rows: Sequence[Mapping[str, Any]], situation: str | None, path: Path) -> Path:
    """One panel per (situation level, front): group means with their intervals, the front joined by a line."""
    levels = list(dict.fromkeys(r["levels"][situation] if situation else "all" for r in rows))
    strategies = [r["levels"].get(STRATEGY_AXIS, r["label"]) for r in rows]
    colors = _colors(strategies)
    fig = Figure(figsize=(4.2 * len(FRONTS), 3.4 * len(levels)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(levels), len(FRONTS), squeeze=False))
    for i, level in enumerate(levels):
        members = [r for r in rows if (r["levels"][situation] if situation else "all") == level]
        for j, (name, (x_key, y_key, maximize)) in enumerate(FRONTS.items()):
            ax = axes[i, j]
            for row in members:
                strategy = row["levels"].get(STRATEGY_AXIS, row["label"])
                x, y = row[x_key], row[y_key]
                ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["ci_low"]], [x["ci_high"] - x["mean"]]],
                            yerr=[[y["mean"] - y["ci_low"]], [y["ci_high"] - y["mean"]]], fmt="o",
                            color=colors[strategy], label=strategy, capsize=2, markersize=5)
            points = np.array([[r[x_key]["mean"], r[y_key]["mean"]] for r in members])
            front = pareto_front(points, maximize)
            if front.size:
                ordered = points[front][np.argsort(points[front][:, 0])]
                ax.plot(ordered[:, 0], ordered[:, 1], "--", color="0.4", linewidth=1, label="Pareto front")
            if not maximize[1]:  # a cost (bytes, patches): show it from 0, without an offset
                ax.set_ylim(bottom=0, top=1.15 * max(1e-9, float(np.nanmax(points[:, 1]))))
                ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_xlabel(_LABELS[x_key], fontsize=8)
            ax.set_ylabel(_LABELS[y_key], fontsize=8)
            ax.set_title(f"{level}: {name}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles, strict=True))
            ax.legend(unique.values(), unique.keys(), fontsize=6, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return path


def plot_worst_client(rows: Sequence[Mapping[str, Any]], situation: str | None, path: Path) -> Path:
    """Worst client's image AUROC per situation and strategy, mean over seeds with the 95% interval."""
    levels = list(dict.fromkeys(r["levels"][situation] if situation else "all" for r in rows))
    strategies = list(dict.fromkeys(r["levels"].get(STRATEGY_AXIS, r["label"]) for r in rows))
    colors = _colors(strategies)
    width = 0.8 / max(len(strategies), 1)
    fig = Figure(figsize=(max(6.0, 1.6 * len(levels) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    for k, strategy in enumerate(strategies):
        for i, level in enumerate(levels):
            match = [r for r in rows if r["levels"].get(STRATEGY_AXIS, r["label"]) == strategy
                     and (r["levels"][situation] if situation else "all") == level]
            if not match or not math.isfinite(match[0]["worst_client_image_auroc"]["mean"]):
                continue
            stat = match[0]["worst_client_image_auroc"]
            x = i + (k - (len(strategies) - 1) / 2) * width
            ax.bar(x, stat["mean"], width * 0.95, color=colors[strategy], label=strategy if i == 0 else None,
                   yerr=[[stat["mean"] - stat["ci_low"]], [stat["ci_high"] - stat["mean"]]], capsize=2)
    ax.set_xticks(range(len(levels)), levels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("worst client image AUROC", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return path


def write_study_report(out_dir: Path, summary: Mapping[str, Any], findings: Findings) -> tuple[Path, Path]:
    """Write the tables and ``report.md`` / ``report.html`` (figures under ``figures/``)."""
    write_tables(out_dir, findings)
    cells = summary["cells"]
    doc = Document(f"Study: {summary['study']}")
    doc.add(Heading(2, "Set-up"), KeyValues([
        ("config", summary["config_file"]), ("data", summary["data"]), ("seeds", str(summary["seeds"])),
        ("axes", "; ".join(f"{a}: {', '.join(levels)}" for a, levels in summary["axes"].items())),
        ("baseline", summary["baseline"]), ("situation axis", str(summary["situation"])),
        ("cells", f"{cells['total']} ({cells['ran']} run now, {cells['reused']} done before, "
                  f"{cells['failed']} failed)"),
        ("time", f"{summary['wall_s']:.0f} s wall time in this call; the cells' own run times add up to "
                 f"{summary['cells_time_s']:.0f} s"),
    ]))
    for failure in summary["failed"]:
        doc.add(Note(f"failed: {failure['cell']}: {failure['error']}"))
    doc.add(Heading(2, "Recommendations"))
    doc.add(KeyValues([(f"{i}", text.replace("**", "")) for i, text in enumerate(findings.recommendations, 1)]))
    doc.add(Heading(2, "Results"), Paragraph(
        "Mean over seeds [95% percentile bootstrap interval of the mean, 10,000 resamples, seeded]. Worst client, "
        "gap and Jain's index are over the clients' own test shares; worst category over the categories."),
        _table_block(findings))
    doc.add(Heading(2, "Paired tests against the baseline"), Paragraph(
        "Each strategy against the baseline on the same partition and seed (per-category metrics also paired by "
        "category). Two-sided Wilcoxon signed-rank test (scipy, zero differences dropped) and sign-flip permutation "
        "test of the mean difference (exact up to 16 pairs). Δ in points (0.01)."), _tests_block(findings.tests))
    doc.add(Heading(2, "Pareto fronts"))
    for level, fronts in findings.fronts.items():
        doc.add(Paragraph(f"{level}: " + "; ".join(f"{name}: {', '.join(labels) or 'none'}"
                                                   for name, labels in fronts.items())))
    if findings.rows:
        figures = out_dir / "figures"
        path = plot_fronts(findings.rows, summary["situation"], figures / "pareto.png")
        doc.add(Image(path.relative_to(out_dir).as_posix(),
                       "Group means over seeds with 95% intervals; dashed: the Pareto front per situation."))
        path = plot_worst_client(findings.rows, summary["situation"], figures / "worst_client.png")
        doc.add(Image(path.relative_to(out_dir).as_posix(),
                       "Worst client's image AUROC per situation and strategy (mean over seeds, 95% interval)."))
    return doc.write(out_dir)
