"""From finished cells to findings: the table over seeds, paired tests, Pareto fronts and recommendations.

Cells that differ only by seed form a *group* (one table row: mean and 95% bootstrap interval over
the seeds). Groups that differ only by their ``strategy`` level are compared with the baseline
strategy, pairing cells by seed (and by category, for per-category metrics). Fronts and advice are
given per level of the *situation* axis (by default the partition): the situation is what a
federation finds itself in, the strategy is what it chooses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedinspect.study.config import StudyConfig
from fedinspect.study.pareto import pareto_front
from fedinspect.study.statistics import bootstrap_ci, paired_permutation_test, wilcoxon_test

STRATEGY_AXIS = "strategy"
HEADLINE = "0.05"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool | None  # None: neither (a size)


METRICS: tuple[Metric, ...] = (
    Metric("image_auroc", "mean image AUROC", True),
    Metric(f"auc_spro@{HEADLINE}", f"mean AUC-sPRO@{HEADLINE}", True),
    Metric("worst_client_image_auroc", "worst client image AUROC", True),
    Metric("client_gap_image_auroc", "client gap image AUROC", False),
    Metric("client_cv_image_auroc", "client CV image AUROC", False),
    Metric("client_jain_image_auroc", "client Jain image AUROC", True),
    Metric(f"worst_client_auc_spro@{HEADLINE}", f"worst client AUC-sPRO@{HEADLINE}", True),
    Metric("worst_category_image_auroc", "worst category image AUROC", True),
    Metric("mb_sent", "MB sent", False),
    Metric("global_bank", "global bank patches", None),
    Metric("time_s", "time (s)", False),
)
PER_CATEGORY = {"image_auroc": "image AUROC", f"auc_spro@{HEADLINE}": f"AUC-sPRO@{HEADLINE}"}


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def cell_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The study's metrics of one run (NaN where undefined) from its results.json."""
    fairness = results.get("fairness", {})
    return {
        "image_auroc": _float(_get(results, "mean", "image_auroc")),
        f"auc_spro@{HEADLINE}": _float(_get(results, "mean", "auc_spro", HEADLINE)),
        "worst_client_image_auroc": _float(_get(fairness, "image_auroc", "clients", "worst")),
        "client_gap_image_auroc": _float(_get(fairness, "image_auroc", "clients", "gap")),
        "client_cv_image_auroc": _float(_get(fairness, "image_auroc", "clients", "cv")),
        "client_jain_image_auroc": _float(_get(fairness, "image_auroc", "clients", "jain")),
        f"worst_client_auc_spro@{HEADLINE}": _float(_get(fairness, "auc_spro", HEADLINE, "clients", "worst")),
        "worst_category_image_auroc": _float(_get(fairness, "image_auroc", "categories", "worst")),
        "mb_sent": sum(c.get("bytes_sent", 0) for c in results.get("clients", [])) / 1e6,
        "global_bank": _float(_get(results, "stages", "global_bank")),
        "time_s": _float(_get(results, "timing", "total_s")),
    }


def category_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per category, the metrics paired across strategies (image AUROC, AUC-sPRO@0.05)."""
    return {name: {"image_auroc": _float(entry.get("image_auroc")),
                   f"auc_spro@{HEADLINE}": _float(_get(entry, "auc_spro", HEADLINE))}
            for name, entry in results.get("categories", {}).items()}


@dataclass
class CellRecord:
    """A finished cell: where it sits in the grid and what it measured."""

    cell_id: str
    levels: dict[str, str]
    seed: int
    metrics: dict[str, float]
    categories: dict[str, dict[str, float]]


@dataclass
class Findings:
    """Everything the report shows."""

    axes: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per group
    tests: list[dict[str, Any]] = field(default_factory=list)
    fronts: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # situation -> front name -> groups
    recommendations: list[str] = field(default_factory=list)


def _group_label(levels: Mapping[str, str]) -> str:
    return " / ".join(levels.values())


def summarize_groups(records: Sequence[CellRecord], axes: Sequence[str], seed: int = 0) -> list[dict[str, Any]]:
    """One row per group: its levels, seeds, and per metric the mean over seeds and a 95% bootstrap interval."""
    groups: dict[tuple[str, ...], list[CellRecord]] = {}
    for record in records:
        groups.setdefault(tuple(record.levels[a] for a in axes), []).append(record)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = {"levels": dict(zip(axes, key, strict=True)), "label": " / ".join(key),
                               "seeds": sorted(r.seed for r in members)}
        for metric in METRICS:
            values = [r.metrics[metric.key] for r in members]
            defined = [v for v in values if math.isfinite(v)]
            low, high = bootstrap_ci(defined, seed=seed)
            row[metric.key] = {"mean": float(np.mean(defined)) if defined else math.nan, "ci_low": low,
                               "ci_high": high, "n": len(defined)}
        rows.append(row)
    return rows


def _tests(a: Sequence[float], b: Sequence[float], seed: int) -> dict[str, Any]:
    return {"wilcoxon": wilcoxon_test(a, b).to_dict(),
            "permutation": paired_permutation_test(a, b, seed=seed).to_dict()}


def compare_strategies(records: Sequence[CellRecord], axes: Sequence[str], baseline: str,
                       situation: str | None, seed: int = 0) -> list[dict[str, Any]]:
    """Paired tests of every strategy against ``baseline``: within each context and pooled over situations."""
    if STRATEGY_AXIS not in axes:
        return []
    context_axes = [a for a in axes if a != STRATEGY_AXIS]
    by_key = {(tuple(r.levels[a] for a in context_axes), r.levels[STRATEGY_AXIS], r.seed): r for r in records}
    contexts = list(dict.fromkeys(k[0] for k in by_key))  # in grid order
    strategies = list(dict.fromkeys(r.levels[STRATEGY_AXIS] for r in records))
    tests = []
    pooled: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for strategy in strategies:
        if strategy == baseline:
            continue
        for context in contexts:
            seeds = sorted(k[2] for k in by_key if k[0] == context and k[1] == strategy
                           and (context, baseline, k[2]) in by_key)
            if not seeds:
                continue
            pairs = [(by_key[(context, strategy, s)], by_key[(context, baseline, s)]) for s in seeds]
            where = dict(zip(context_axes, context, strict=True))
            for key, label in PER_CATEGORY.items():
                a, b = [], []
                for mine, base in pairs:
                    for category in sorted(set(mine.categories) & set(base.categories)):
                        a.append(mine.categories[category][key])
                        b.append(base.categories[category][key])
                tests.append({"strategy": strategy, "baseline": baseline, "context": where,
                              "metric": f"per-category {label}", "pairs": "seeds x categories",
                              **_tests(a, b, seed)})
            for key in ("worst_client_image_auroc", "image_auroc"):
                a = [mine.metrics[key] for mine, _ in pairs]
                b = [base.metrics[key] for _, base in pairs]
                pooled.setdefault(strategy, {}).setdefault(key, []).extend(zip(a, b, strict=True))
                if key == "worst_client_image_auroc":
                    tests.append({"strategy": strategy, "baseline": baseline, "context": where,
                                  "metric": "worst client image AUROC", "pairs": "seeds", **_tests(a, b, seed)})
    if situation is not None and len(contexts) > 1:
        for strategy, per_metric in pooled.items():
            for key, pairs in per_metric.items():
                label = {"worst_client_image_auroc": "worst client image AUROC", "image_auroc": "mean image AUROC"}[key]
                tests.append({"strategy": strategy, "baseline": baseline, "context": {"all": "pooled"},
                              "metric": label, "pairs": "contexts x seeds",
                              **_tests([p[0] for p in pairs], [p[1] for p in pairs], seed)})
    return tests


FRONTS = {
    "accuracy vs worst client": ("image_auroc", "worst_client_image_auroc", (True, True)),
    "accuracy vs MB sent": ("image_auroc", "mb_sent", (True, False)),
    "accuracy vs bank size": ("image_auroc", "global_bank", (True, False)),
}


def pareto_fronts(rows: Sequence[Mapping[str, Any]], situation: str | None) -> dict[str, dict[str, list[str]]]:
    """Per situation level, the labels of the groups on each front (means over seeds)."""
    by_situation: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_situation.setdefault(row["levels"][situation] if situation else "all", []).append(row)
    fronts: dict[str, dict[str, list[str]]] = {}
    for level, members in by_situation.items():
        fronts[level] = {}
        for name, (x_key, y_key, maximize) in FRONTS.items():
            points = [[m[x_key]["mean"], m[y_key]["mean"]] for m in members]
            fronts[level][name] = [members[i]["label"] for i in pareto_front(points, maximize)]
    return fronts


def _points(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:+.1f} points"


def _p(test: Mapping[str, Any]) -> str:
    w, perm = test["wilcoxon"], test["permutation"]
    wp = "n/a" if w["p_value"] is None else f"{w['p_value']:.3g}"
    pp = "n/a" if perm["p_value"] is None else f"{perm['p_value']:.3g}"
    return f"Wilcoxon p = {wp}, permutation p = {pp}, n = {w['n']}"


def _bank_note(row: Mapping[str, Any], base: Sequence[Mapping[str, Any]]) -> str:
    """", with a bank N times the baseline's" when the row's global bank is much larger than the baseline's."""
    if not base:
        return ""
    ratio = row["global_bank"]["mean"] / base[0]["global_bank"]["mean"]
    return f", with a global bank {ratio:.1f}x the baseline's" if ratio > 1.2 else ""


def _best(rows: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The row with the highest mean of ``key`` (undefined means count as lowest; first row wins ties)."""
    return max(rows, key=lambda row: -math.inf if math.isnan(row[key]["mean"]) else row[key]["mean"])


def recommend(findings: Findings, study: StudyConfig) -> list[str]:
    """Short advice per situation from the numbers: best accuracy, best worst client, and how sure we are."""
    lines = []
    situation = study.situation
    if STRATEGY_AXIS not in findings.axes:
        return ["The grid has no strategy axis: no strategy to recommend."]
    by_situation: dict[str, list[dict[str, Any]]] = {}
    for row in findings.rows:
        by_situation.setdefault(row["levels"][situation] if situation else "all", []).append(row)
    for level, rows in by_situation.items():
        accurate, fair = _best(rows, "image_auroc"), _best(rows, "worst_client_image_auroc")
        base = [r for r in rows if r["levels"][STRATEGY_AXIS] == study.baseline]
        where = f"{situation} = {level}" if situation else "all cells"
        text = (f"**{where}**: for accuracy use {accurate['label']} (mean image AUROC "
                f"{accurate['image_auroc']['mean']:.3f}{_bank_note(accurate, base)}); for the worst-off client use "
                f"{fair['label']} (worst client {fair['worst_client_image_auroc']['mean']:.3f}"
                f"{_bank_note(fair, base)})")
        if base and fair is not base[0]:
            gain = fair["worst_client_image_auroc"]["mean"] - base[0]["worst_client_image_auroc"]["mean"]
            test = next((t for t in findings.tests if t["strategy"] == fair["levels"][STRATEGY_AXIS]
                         and t["metric"] == "worst client image AUROC" and t["pairs"] == "seeds"
                         and all(fair["levels"].get(a) == v for a, v in t["context"].items())), None)
            text += f", {_points(gain)} over {study.baseline}"
            if test is not None:
                significant = (test["permutation"]["p_value"] or 1.0) < 0.05
                text += f" ({_p(test)}; {'significant' if significant else 'not significant'} at 5%)"
        elif base:
            text += f"; the baseline {study.baseline} is already the fairest here"
        if base:  # the same choice under the baseline's memory budget (bank size)
            budget = [r for r in rows if r["global_bank"]["mean"] <= 1.2 * base[0]["global_bank"]["mean"]]
            if len(budget) < len(rows):
                text += (f". Within the baseline's bank size: for accuracy {_best(budget, 'image_auroc')['label']}, "
                         f"for the worst client {_best(budget, 'worst_client_image_auroc')['label']}")
        front = findings.fronts.get(level, {}).get("accuracy vs worst client", [])
        text += f". Pareto-efficient (accuracy vs worst client): {', '.join(front) or 'none'}."
        lines.append(text)
    for test in findings.tests:
        if test["context"] == {"all": "pooled"} and test["metric"] == "worst client image AUROC":
            mean = test["wilcoxon"]["mean_difference"]
            lines.append(f"**Over all situations**, {test['strategy']} minus {study.baseline} on the worst client: "
                         f"{_points(_float(mean))} on average ({_p(test)}).")
    bytes_sent = {round(r["mb_sent"]["mean"], 3) for r in findings.rows if math.isfinite(r["mb_sent"]["mean"])}
    if len(bytes_sent) == 1:
        lines.append("Traffic does not depend on the strategy (clients send the same local coresets; the server "
                     "decides what to keep), so the choice of strategy costs no bytes.")
    return lines


def analyze(records: Sequence[CellRecord], study: StudyConfig, seed: int = 0) -> Findings:
    """Rows, tests, fronts and recommendations of a study's finished cells."""
    axes = list(study.axes)
    findings = Findings(axes=axes)
    if not records:
        findings.recommendations = ["No cell finished: nothing to analyse."]
        return findings
    findings.rows = summarize_groups(records, axes, seed)
    baseline = next((label for label, options in study.axes.get(STRATEGY_AXIS, [])
                     if label == study.baseline or options.get("strategy") == study.baseline), study.baseline)
    findings.tests = compare_strategies(records, axes, baseline, study.situation, seed)
    findings.fronts = pareto_fronts(findings.rows, study.situation)
    findings.recommendations = recommend(findings, study)
    return findings
