"""Figures of a run report: FPR-sPRO curves, ROC curves, metric bars and a grid of example heatmaps.

One function per figure; each takes plain data and an output path, writes a PNG and returns the path.
Figures are built on :class:`matplotlib.figure.Figure` objects directly, never through ``pyplot``: no
global figure registry, no GUI backend (``savefig`` renders PNG with Agg whatever backend is selected),
nothing to leak between calls. PNG files carry no software version string, so the same data gives the
same bytes with the same matplotlib and fonts.

The inputs are the report's data classes (:class:`fedinspect.evaluation.report.Curves` and
:class:`fedinspect.evaluation.report.Example`); any object with the same attributes works.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from fedinspect.evaluation.summary import metric_row

if TYPE_CHECKING:
    from fedinspect.evaluation.report import Curves, Example

__all__ = [
    "DPI",
    "SPRO_LIMITS",
    "heatmap_ranges",
    "model_label",
    "plot_examples",
    "plot_metric_bars",
    "plot_roc_curves",
    "plot_spro_curves",
    "plot_thresholds",
    "roc_available",
]

DPI = 110
SPRO_LIMITS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3)
"""FPR limits marked on the FPR-sPRO plots (the region that AUC-sPRO integrates over)."""

_MODEL_COLORS = {"federated": "#1f77b4", "centralized": "#ff7f0e", "shared_bank": "#2ca02c"}
_EXTRA_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_MODEL_LABELS = {"federated": "federated", "centralized": "centralized", "shared_bank": "shared bank"}
# Each model its own line style and width, so that where two curves coincide both stay visible:
# the wide solid federated line shows on both sides of the dashed, marked centralized one.
_MODEL_STYLES = {
    "federated": {"ls": "-", "lw": 3.0, "alpha": 0.75},
    "centralized": {"ls": "--", "lw": 1.4, "marker": "o", "markersize": 3.0, "markevery": 0.1},
    "shared_bank": {"ls": "-.", "lw": 1.4, "marker": "^", "markersize": 3.0, "markevery": 0.1},
}
_EXTRA_STYLES = ({"ls": (0, (5, 1, 1, 1)), "lw": 1.4, "marker": "s", "markersize": 3.0, "markevery": 0.1},)
_STYLE_WORDS = {"federated": "wide solid line", "centralized": "dashed with dots",
                "shared_bank": "dash-dot with triangles"}


def line_style_note(models: Sequence[str]) -> str:
    """How the curve figures tell ``models`` apart, for their captions ("" for a single model)."""
    if len(models) < 2:
        return ""
    words = [f"{model_label(m)}: {_STYLE_WORDS.get(m, 'dash-dot-dot with squares')}" for m in models]
    return "; ".join(words).capitalize() + ". Where two curves coincide, the thinner one runs inside the wide one."

_HEATMAP_CMAP = "jet"
_HEATMAP_ALPHA = 0.5


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def model_label(model: str) -> str:
    """Display name of a model key ("shared_bank" -> "shared bank")."""
    return _MODEL_LABELS.get(model, model.replace("_", " "))


def _model_color(model: str, index: int) -> str:
    return _MODEL_COLORS.get(model, _EXTRA_COLORS[index % len(_EXTRA_COLORS)])


def _model_style(model: str) -> dict[str, Any]:
    return dict(_MODEL_STYLES.get(model, _EXTRA_STYLES[0]))


def _save(fig: Figure, path: Path | str) -> Path:
    """Write ``fig`` as PNG (parents created) without a version string, then drop its contents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    fig.clear()
    return path


def _grid(n_panels: int, max_cols: int = 3) -> tuple[int, int]:
    n_cols = max(1, min(max_cols, n_panels))
    return math.ceil(max(n_panels, 1) / n_cols), n_cols


def _valid_curve(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The curve as two finite float arrays of equal length >= 2, or None when unusable."""
    if x is None or y is None:
        return None
    xs = np.asarray(x, dtype=np.float64).ravel()
    ys = np.asarray(y, dtype=np.float64).ravel()
    if xs.size < 2 or xs.shape != ys.shape:
        return None
    finite = np.isfinite(xs) & np.isfinite(ys)
    if finite.sum() < 2:
        return None
    return xs[finite], ys[finite]


def roc_available(curves: Curves | None) -> bool:
    """Whether ``curves`` holds a usable image-level ROC curve (absent with a single test class)."""
    return curves is not None and _valid_curve(curves.roc_fpr, curves.roc_tpr) is not None


def _categories(curves: Mapping[str, Mapping[str, Any]], categories: Sequence[str] | None) -> list[str]:
    if categories is not None:
        return list(categories)
    names: list[str] = []
    for per_category in curves.values():
        names.extend(name for name in per_category if name not in names)
    return names


def _placeholder(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.35", wrap=True)


def _hide_unused(axes: np.ndarray, used: int) -> None:
    for ax in axes.ravel()[used:]:
        ax.set_visible(False)


# ----------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------


def plot_spro_curves(
    curves: Mapping[str, Mapping[str, Curves]],
    path: Path | str,
    categories: Sequence[str] | None = None,
    max_fpr: float = 0.3,
    limits: Sequence[float] = SPRO_LIMITS,
) -> Path:
    """FPR-sPRO curves: one subplot per category, one line per model, FPR from 0 to ``max_fpr``.

    Args:
        curves: ``curves[model][category]`` (models such as "federated", "centralized").
        path: output PNG.
        categories: subplot order (default: every category of ``curves``, first seen first).
        max_fpr: right end of the FPR axis (0.3: the largest limit of the AutoVI protocol's table).
        limits: FPR limits drawn as vertical dotted lines.
    """
    names = _categories(curves, categories)
    n_rows, n_cols = _grid(len(names))
    fig = Figure(figsize=(4.0 * n_cols, 3.3 * n_rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False))
    for ax, category in zip(axes.ravel(), names, strict=False):
        drawn = 0
        for index, (model, per_category) in enumerate(curves.items()):
            curve = per_category.get(category)
            points = None if curve is None else _valid_curve(curve.spro_fpr, curve.spro)
            if points is None:
                continue
            fpr, spro = points
            # Keep the points up to the first one past max_fpr: the line still reaches the frame edge.
            end = min(int(np.searchsorted(fpr, max_fpr, side="right")) + 1, fpr.size)
            ax.plot(fpr[:end], spro[:end], color=_model_color(model, index), label=model_label(model),
                    **_model_style(model))
            drawn += 1
        for limit in limits:
            if limit <= max_fpr:
                ax.axvline(limit, color="0.45", ls=":", lw=1.0)
        ax.set_xlim(0.0, max_fpr * 1.02)
        ax.set_ylim(0.0, 1.02)
        ax.set_title(category, fontsize=10)
        ax.set_xlabel("pixel FPR", fontsize=9)
        ax.set_ylabel("sPRO", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
        if drawn and len(curves) > 1:
            ax.legend(loc="lower right", fontsize=8)
        elif not drawn:
            _placeholder(ax, "no sPRO curve\n(no defect region in the test split)")
    _hide_unused(axes, len(names))
    if not names:
        _placeholder(axes.ravel()[0], "no curves")
        axes.ravel()[0].set_visible(True)
    marks = ", ".join(f"{limit:g}" for limit in limits if limit <= max_fpr)
    fig.suptitle(f"FPR-sPRO curves (dotted lines: FPR limits {marks})", fontsize=11)
    return _save(fig, path)


def _trapezoid_auc(x: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)


def plot_roc_curves(
    curves: Mapping[str, Mapping[str, Curves]],
    path: Path | str,
    categories: Sequence[str] | None = None,
    aurocs: Mapping[str, Mapping[str, float | None]] | None = None,
) -> Path:
    """Image-level ROC curves: one subplot per category, one line per model, AUROC in the legend.

    ``aurocs[model][category]`` gives the AUROC printed in the legend (the value of results.json);
    where it is missing the area under the given curve is printed instead. A category without any ROC
    curve (a test split with a single class) gets a panel that says so.
    """
    names = _categories(curves, categories)
    n_rows, n_cols = _grid(len(names))
    fig = Figure(figsize=(3.6 * n_cols, 3.6 * n_rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False))
    for ax, category in zip(axes.ravel(), names, strict=False):
        drawn = 0
        for index, (model, per_category) in enumerate(curves.items()):
            curve = per_category.get(category)
            points = None if curve is None else _valid_curve(curve.roc_fpr, curve.roc_tpr)
            if points is None:
                continue
            fpr, tpr = points
            value = (aurocs or {}).get(model, {}).get(category)
            if value is None or not math.isfinite(value):
                value = _trapezoid_auc(fpr, tpr)
            label = f"{model_label(model)} (AUROC {value:.3f})"
            ax.plot(fpr, tpr, color=_model_color(model, index), label=label, **_model_style(model))
            drawn += 1
        ax.set_title(category, fontsize=10)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("FPR (good images)", fontsize=9)
        ax.set_ylabel("TPR (defective images)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
        if drawn:
            ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8)
            ax.legend(loc="lower right", fontsize=8)
        else:
            _placeholder(ax, "ROC undefined\n(single test class)")
    _hide_unused(axes, len(names))
    if not names:
        _placeholder(axes.ravel()[0], "no curves")
        axes.ravel()[0].set_visible(True)
    fig.suptitle("Image-level ROC curves", fontsize=11)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Metric bars
# ----------------------------------------------------------------------------------------------

BAR_METRICS: tuple[tuple[str, str], ...] = (("image_auroc", "Image AUROC"), ("spro@0.05", "AUC-sPRO@0.05"))


def plot_metric_bars(
    per_model: Mapping[str, Mapping[str, Mapping[str, Any]]],
    path: Path | str,
    categories: Sequence[str] | None = None,
    metrics: Sequence[tuple[str, str]] = BAR_METRICS,
    title: str = "Per-category results",
) -> Path:
    """Grouped bars per category (one bar per model), one subplot per metric (``per_model`` may hold clients).

    Args:
        per_model: ``per_model[model][category]`` is a category block of results.json
            (``image_auroc``, ``pixel_auroc``, ``auc_spro``); a "mean" entry is drawn like a category.
        path: output PNG.
        categories: group order (default: every category of ``per_model``, first seen first).
        metrics: ``(column, label)`` pairs, columns as :func:`fedinspect.evaluation.summary.metric_row`
            names them ("image_auroc", "pixel_auroc", "spro@0.05", ...).
    Undefined values (None) get no bar but an "n/a" mark.
    """
    names = _categories(per_model, categories)
    models = list(per_model)
    n_models = max(len(models), 1)
    width = 0.8 / n_models
    fig_width = min(max(6.0, 0.9 * len(names) * max(1.0, n_models / 2) + 1.5), 22.0)
    fig = Figure(figsize=(fig_width, 3.2 * len(metrics) + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(metrics), 1, squeeze=False)).ravel()
    x = np.arange(len(names), dtype=np.float64)
    for ax, (column, label) in zip(axes, metrics, strict=True):
        for index, model in enumerate(models):
            offsets = x + (index - (n_models - 1) / 2) * width
            values = []
            for category in names:
                block = per_model[model].get(category)
                value = None if block is None else metric_row(block).get(column)
                values.append(None if value is None or not math.isfinite(value) else float(value))
            heights = [0.0 if v is None else v for v in values]
            ax.bar(offsets, heights, width * 0.95, color=_model_color(model, index), label=model_label(model))
            for offset, value in zip(offsets, values, strict=True):
                if value is None:
                    ax.text(offset, 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=7, color="0.3")
        ax.set_xticks(x, names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
        ax.set_ylim(0.0, 1.0)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_title(label, fontsize=10)
        if len(models) > 1:  # a single model's bars need no legend: the title names them
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Example heatmaps
# ----------------------------------------------------------------------------------------------


def heatmap_ranges(examples: Sequence[Example]) -> dict[str, tuple[float, float]]:
    """Colour scale ``(vmin, vmax)`` of each category: min and max over all its examples' anomaly maps.

    Every heatmap of a category is drawn on this one scale, so that its examples can be compared.
    Non-finite scores are ignored; a category whose maps are constant (or wholly non-finite) gets a
    scale of width 1 around the value (0 when there is none), so that ``vmin < vmax`` always holds.
    """
    bounds: dict[str, list[float]] = {}
    for example in examples:
        values = np.asarray(example.anomaly_map, dtype=np.float64)
        values = values[np.isfinite(values)]
        low, high = bounds.setdefault(example.category, [math.inf, -math.inf])
        if values.size:
            bounds[example.category] = [min(low, float(values.min())), max(high, float(values.max()))]
    ranges: dict[str, tuple[float, float]] = {}
    for category, (low, high) in bounds.items():
        if not math.isfinite(low):
            low = high = 0.0
        if high <= low:
            low, high = low - 0.5, high + 0.5
        ranges[category] = (low, high)
    return ranges


_GT_CMAP = ListedColormap(["#ff2020"])


def _show_image(ax: Axes, image: np.ndarray) -> tuple[int, int]:
    array = np.asarray(image)
    height, width = array.shape[:2]
    if array.ndim == 2:
        ax.imshow(array, cmap="gray", extent=(0, width, height, 0), interpolation="antialiased")
    else:
        ax.imshow(array, extent=(0, width, height, 0), interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    return height, width


def _gt_contour(ax: Axes, mask: np.ndarray, height: int, width: int, color: str) -> None:
    if mask.any() and not mask.all():
        rows, cols = mask.shape
        # Pixel centres in the image's coordinates (the image may have another size than the mask).
        xs = (np.arange(cols) + 0.5) * width / cols
        ys = (np.arange(rows) + 0.5) * height / rows
        ax.contour(xs, ys, mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.2)


def plot_examples(
    examples: Sequence[Example],
    path: Path | str,
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """A grid of test images: one row per example; columns: image, heatmap overlay, ground truth.

    The heatmap (jet, semi-transparent over the image) uses one colour scale per category, from
    ``ranges`` (default: :func:`heatmap_ranges` of ``examples``); pass ranges computed over more
    examples to keep scales equal across several figures. The ground-truth contour is drawn on the
    heatmap too. Titles give category / defect / file name and the image score.
    """
    if ranges is None:
        ranges = heatmap_ranges(examples)
    else:
        missing = [e for e in examples if e.category not in ranges]
        ranges = {**heatmap_ranges(missing), **ranges}
    col_width = 2.9
    heights = []
    for example in examples:
        h, w = np.asarray(example.image).shape[:2]
        heights.append(col_width * min(max(h / max(w, 1), 0.3), 2.0) + 0.55)
    if not heights:
        heights = [1.0]
    fig = Figure(figsize=(3 * col_width + 0.9, sum(heights) + 0.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(heights), 3, squeeze=False, gridspec_kw={"height_ratios": heights}))
    cmap = colormaps[_HEATMAP_CMAP]
    for row, example in zip(axes, examples, strict=False):
        ax_image, ax_heat, ax_gt = row
        height, width = _show_image(ax_image, example.image)
        ax_image.set_title(f"{example.category} / {example.defect}\n{example.name}", fontsize=8.5)

        _show_image(ax_heat, example.image)
        vmin, vmax = ranges[example.category]
        scores = np.asarray(example.anomaly_map, dtype=np.float64)
        heat = ax_heat.imshow(
            scores, cmap=cmap, vmin=vmin, vmax=vmax, alpha=_HEATMAP_ALPHA, extent=(0, width, height, 0)
        )
        mask = np.asarray(example.ground_truth).astype(bool)
        _gt_contour(ax_heat, mask, height, width, "white")
        ax_heat.set_xlim(0, width)
        ax_heat.set_ylim(height, 0)
        finite = scores[np.isfinite(scores)]
        peak = f"{finite.max():.3f}" if finite.size else "n/a"
        ax_heat.set_title(f"anomaly map (max {peak})\nimage score {example.score:.3f}", fontsize=8.5)
        colorbar = fig.colorbar(heat, ax=ax_heat, fraction=0.05, pad=0.02)
        colorbar.ax.tick_params(labelsize=7)

        _show_image(ax_gt, example.image)
        if mask.any():
            overlay = np.ma.masked_where(~mask, np.ones(mask.shape, dtype=np.float32))
            ax_gt.imshow(overlay, cmap=_GT_CMAP, alpha=0.45, extent=(0, width, height, 0), interpolation="nearest")
            _gt_contour(ax_gt, mask, height, width, "#ff2020")
            ax_gt.set_title("ground truth", fontsize=8.5)
        else:
            ax_gt.set_title("ground truth: none (good)", fontsize=8.5)
        ax_gt.set_xlim(0, width)
        ax_gt.set_ylim(height, 0)
    if not examples:
        for ax in axes.ravel():
            ax.set_visible(False)
        axes.ravel()[0].set_visible(True)
        _placeholder(axes.ravel()[0], "no examples")
    return _save(fig, path)


_THRESHOLD_COLORS = {"T1": "#ff8c00", "T2": "#d62728", "T3": "#9467bd"}


def plot_thresholds(examples: Sequence[Example], thresholds: Mapping[str, float], path: Path | str) -> Path:
    """The seed's threshold figure: per test image, its score map and the masks at T1, T2 and T3.

    One row per example: the image with the ground-truth outline, the anomaly map (its own colour scale
    across the figure), then for each threshold the pixels ``>= threshold`` in colour over the image, with
    the ground-truth outline and the share of the image they cover in the title.
    """
    names = list(thresholds)
    n_cols = 2 + len(names)
    col_width = 2.4
    heights = [col_width * min(max(np.asarray(e.image).shape[0] / max(np.asarray(e.image).shape[1], 1), 0.3), 2.0)
               + 0.55 for e in examples] or [1.0]
    fig = Figure(figsize=(n_cols * col_width + 0.6, sum(heights) + 0.3), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(heights), n_cols, squeeze=False, gridspec_kw={"height_ratios": heights}))
    finite = [np.asarray(e.anomaly_map, dtype=np.float64) for e in examples]
    values = np.concatenate([m[np.isfinite(m)].ravel() for m in finite]) if finite else np.zeros(1)
    vmin, vmax = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    cmap = colormaps[_HEATMAP_CMAP]
    for row, example, scores in zip(axes, examples, finite, strict=False):
        mask = np.asarray(example.ground_truth).astype(bool)
        height, width = _show_image(row[0], example.image)
        _gt_contour(row[0], mask, height, width, "#00ff00")
        row[0].set_title(f"{example.defect} / {example.name}", fontsize=8)
        _show_image(row[1], example.image)
        heat = row[1].imshow(scores, cmap=cmap, vmin=vmin, vmax=vmax, alpha=_HEATMAP_ALPHA,
                             extent=(0, width, height, 0))
        fig.colorbar(heat, ax=row[1], fraction=0.05, pad=0.02).ax.tick_params(labelsize=6)
        row[1].set_title(f"score map (image {example.score:.3g})", fontsize=8)
        for ax, name in zip(row[2:], names, strict=True):
            _show_image(ax, example.image)
            predicted = scores >= thresholds[name]
            overlay = np.ma.masked_where(~predicted, np.ones(predicted.shape, dtype=np.float32))
            ax.imshow(overlay, cmap=ListedColormap([_THRESHOLD_COLORS.get(name, "#d62728")]), alpha=0.55,
                      extent=(0, width, height, 0), interpolation="nearest")
            _gt_contour(ax, mask, height, width, "#00ff00")
            ax.set_title(f"{name} = {thresholds[name]:.3g}: {100 * predicted.mean():.1f}% of pixels", fontsize=8)
        for ax in row:
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
    if not examples:
        for ax in axes.ravel()[1:]:
            ax.set_visible(False)
        _placeholder(axes.ravel()[0], "no examples")
    return _save(fig, path)
