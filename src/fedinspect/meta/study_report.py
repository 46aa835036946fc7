"""The meta-study's summary, tables in the seed's layout (Tables 2-5), Grad-CAM figures (Fig. 5) and report.

Reads the finished cells of :mod:`fedinspect.meta.study` (nothing is recomputed) and writes them through the one
document renderer (:mod:`fedinspect.evaluation.document`): ``report.md`` and ``report.html``. Every table is also
kept in the summary (``results.json``) as the very header and rows the report shows. Numbers are percentages with
one decimal, as in the seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fedinspect.evaluation.document import Document, Table
from fedinspect.evaluation.report import format_seconds
from fedinspect.meta.study import CELLS_DIR, VARIANTS, MetaStudySettings, shots_label, task_slug

NA = "n/a"
METRICS = (("Acc (%)", "accuracy"), ("Recall (%)", "recall"), ("Precision (%)", "precision"), ("F1 (%)", "f1"),
           ("AUROC (%)", "auroc"))
INIT_ROWS = (("random", "Random"), ("imagenet", "ImageNet (Lite0)"), ("maml", "MAML"))
PLACEMENT_ROWS = (("maml", "Low level"), ("ca-high", "High level"), ("ca-both", "Multiple"), ("ca-none", "None"))
ABLATION_ROWS = (("maml", "Ours"), ("no-sn", "Ours-SN"), ("ca-none", "Ours-CA"), ("no-sn-ca", "Ours-CA-SN"))
METRICS_BY_KEY = tuple((key, label.replace(" (%)", "")) for label, key in METRICS)
GRADCAM_DIR = "gradcam"


def percent(value: Any) -> str:
    """A fraction as a percentage with one decimal (the seed's tables); n/a when missing or not finite."""
    if value is None or not math.isfinite(float(value)):
        return NA
    return f"{100.0 * float(value):.1f}"


def _shots_suffix(shots: int | None) -> str:
    return "" if shots is None else f" ({shots}-shot)"


class _Cells:
    """The finished cells, looked up by (task, variant, shots)."""

    def __init__(self, cells: Sequence[Mapping[str, Any]]) -> None:
        self.by_key = {(c["task"], c["variant"], c["shots"]): c for c in cells}

    def get(self, task: str, variant: str, shots: int | None) -> Mapping[str, Any] | None:
        return self.by_key.get((task, variant, shots))

    def metric(self, task: str, variant: str, shots: int | None, metric: str) -> float | None:
        cell = self.get(task, variant, shots)
        return None if cell is None else cell["metrics"][metric]

    def has(self, variant: str, shots: int | None) -> bool:
        return any(key[1] == variant and key[2] == shots for key in self.by_key)


def _table(title: str, caption: str, header: list[str], rows: list[list[str]]) -> dict[str, Any]:
    return {"title": title, "caption": caption, "header": header, "rows": rows}


def _mean(values: Sequence[float | None], weights: Sequence[float] | None = None) -> float | None:
    pairs = [(v, 1.0 if weights is None else w) for v, w in zip(values, weights or [1.0] * len(values), strict=True)
             if v is not None]
    if not pairs:
        return None
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def table2(cells: _Cells, settings: MetaStudySettings, tasks: Sequence[str], sizes: Sequence[int]) -> dict[str, Any]:
    """Table 2: AUROC of each left-out task, with the average and the average weighted by the task's images."""
    columns = [(variant, shots) for shots in settings.shots for variant, _ in INIT_ROWS if cells.has(variant, shots)]
    header = ["Task", *[("MeDetection" if v == "maml" else VARIANTS[v].label) + _shots_suffix(s) for v, s in columns]]
    rows = [[task, *[percent(cells.metric(task, v, s, "auroc")) for v, s in columns]] for task in tasks]
    for label, weights in (("Avg", None), ("Weighted avg", list(sizes))):
        rows.append([label, *[percent(_mean([cells.metric(t, v, s, "auroc") for t in tasks], weights))
                              for v, s in columns]])
    return _table("Table 2: AUROC per left-out task",
                  "AUROC (%) on the left-out task's test share after fine-tuning; Weighted avg weights each task by "
                  "its number of images, as the seed does.", header, rows)


def table3(cells: _Cells, tasks: Sequence[str], shots: int | None) -> dict[str, Any]:
    """Table 3: MAML against random (and ImageNet) initialisation: epochs to converge and the five metrics."""
    header = ["Tasks", "Weights", "Epoch", *[label for label, _ in METRICS], "Avg (%)"]
    rows = []
    for task in tasks:
        first = True
        for variant, label in INIT_ROWS:
            cell = cells.get(task, variant, shots)
            if cell is None:
                continue
            values = [cell["metrics"][key] for _, key in METRICS]
            rows.append([task if first else "", label, str(cell["epochs_to_converge"]), *map(percent, values),
                         percent(_mean(values))])
            first = False
    return _table(f"Table 3: MAML against random initialisation{_shots_suffix(shots)}",
                  "Epoch: the fine-tuning epoch with the lowest validation loss (the weights kept). Metrics at "
                  "probability 0.5; Avg is the mean of the five metrics (what the seed's Avg column holds).",
                  header, rows)


def table4(cells: _Cells, tasks: Sequence[str], shots: int | None, metric: str) -> dict[str, Any]:
    """Table 4: coordinate attention placement, one metric per left-out task, with mean and variance over tasks."""
    header = ["Metrics", *tasks, "Avg", "Var"]
    rows = []
    for variant, label in PLACEMENT_ROWS:
        values = [cells.metric(task, variant, shots, metric) for task in tasks]
        if all(v is None for v in values):
            continue
        present = [100.0 * v for v in values if v is not None]
        rows.append([label, *map(percent, values), percent(_mean(values)),
                     f"{float(np.var(present)):.1f}" if present else NA])
    name = dict(METRICS_BY_KEY)[metric]
    return _table(f"Table 4: coordinate attention placement, {name}{_shots_suffix(shots)}",
                  f"{name} (%) of MAML-trained models with CA after block 1 (low), after the last block (high), "
                  "both or none; Var is the population variance over the tasks (in %²), as in the seed.",
                  header, rows)


def table5(cells: _Cells, tasks: Sequence[str], shots: int | None) -> dict[str, Any]:
    """Table 5: ablation without the Siamese difference (SN) and without coordinate attention (CA)."""
    header = ["Tasks", "Model", *[label for label, _ in METRICS]]
    rows = []
    for task in tasks:
        first = True
        for variant, label in ABLATION_ROWS:
            cell = cells.get(task, variant, shots)
            if cell is None:
                continue
            rows.append([task if first else "", label, *[percent(cell["metrics"][key]) for _, key in METRICS]])
            first = False
    return _table(f"Table 5: ablation{_shots_suffix(shots)}",
                  "Ours: Siamese difference and CA low; -SN: the test image alone; -CA: no coordinate attention. "
                  "All MAML-trained and fine-tuned alike.", header, rows)


def targets(cells: _Cells, settings: MetaStudySettings, tasks: Sequence[str]) -> dict[str, Any]:
    """The issue's targets: MAML beats random in AUROC and in epochs on a majority of tasks; meta-training time."""
    comparisons: dict[str, Any] = {}
    for shots in settings.shots:
        per_task = []
        for task in tasks:
            maml, random = cells.get(task, "maml", shots), cells.get(task, "random", shots)
            if maml is None or random is None:
                continue
            per_task.append({"task": task, "auroc_maml": maml["metrics"]["auroc"],
                             "auroc_random": random["metrics"]["auroc"],
                             "epochs_maml": maml["epochs_to_converge"], "epochs_random": random["epochs_to_converge"],
                             "auroc_better": maml["metrics"]["auroc"] > random["metrics"]["auroc"],
                             "fewer_epochs": maml["epochs_to_converge"] < random["epochs_to_converge"]})
        if per_task:
            n = len(per_task)
            better = sum(row["auroc_better"] for row in per_task)
            fewer = sum(row["fewer_epochs"] for row in per_task)
            comparisons[shots_label(shots)] = {"tasks": per_task, "auroc_better": better, "fewer_epochs": fewer,
                                               "n": n, "auroc_majority": better > n / 2,
                                               "epochs_majority": fewer > n / 2}
    seconds = {task: cell["meta_train_s"] for task in tasks
               for cell in [cells.get(task, "maml", settings.shots[0])] if cell is not None}
    longest = max(seconds.values()) if seconds else None
    return {"maml_vs_random": comparisons, "meta_train_s": seconds, "meta_train_s_max": longest,
            "meta_train_under_30_min": None if longest is None else longest < 1800.0}


def summarize(cells: Sequence[Mapping[str, Any]], settings: MetaStudySettings, tasks: Sequence[Any],
              images: Mapping[str, Any]) -> dict[str, Any]:
    """The study's summary: settings, tasks, every cell, the tables (header and rows as shown) and the targets."""
    names = [task.name for task in tasks]
    sizes = [len(images[name]) for name in names]
    lookup = _Cells(cells)
    tables: dict[str, dict[str, Any]] = {}
    if "init" in settings.experiments or cells:
        tables["table2"] = table2(lookup, settings, names, sizes)
    for shots in settings.shots:
        suffix = shots_label(shots)
        if "init" in settings.experiments:
            tables[f"table3@{suffix}"] = table3(lookup, names, shots)
        if "placement" in settings.experiments:
            tables[f"table4@{suffix}"] = table4(lookup, names, shots, "recall")
            tables[f"table4_auroc@{suffix}"] = table4(lookup, names, shots, "auroc")
        if "ablation" in settings.experiments:
            tables[f"table5@{suffix}"] = table5(lookup, names, shots)
    meta_runs = {(c["task"], c["model"]): c for c in cells if c["meta_trained"]}
    return {
        "settings": json_settings(settings),
        "tasks": [{"name": task.name, "source": task.source, "images": len(images[task.name]),
                   "good": len(task.good), "defective": len(task.defective)} for task in tasks],
        "cells": [{k: v for k, v in c.items() if k not in ("train_loss", "validation_loss")} for c in cells],
        "tables": tables,
        "targets": targets(lookup, settings, names),
        "meta_train_total_s": sum(c["meta_train_s"] for c in meta_runs.values()),
        "fine_tune_total_s": sum(c["fine_tune_s"] for c in cells),
    }


def json_settings(settings: MetaStudySettings) -> dict[str, Any]:
    values = asdict(settings)
    values["shots"] = [shots_label(s) for s in settings.shots]
    values["experiments"] = list(settings.experiments)
    return values


# --------------------------------------------------------------------------------------------------
# Grad-CAM figures


def _masks_for(task: Any, indices: Sequence[int], size: int) -> list[np.ndarray | None]:
    """The ground-truth masks (bool size x size) of a task's images, None where the task has none."""
    if task.kind != "mvtec":
        return [None] * len(indices)
    from PIL import Image

    from fedinspect.data.dataset import CategoryDataset
    from fedinspect.data.images import read_mask

    truth = {sample.image_path.resolve(): sample.ground_truth for sample in CategoryDataset(task.root).test}
    masks: list[np.ndarray | None] = []
    for index in indices:
        files = truth.get(task.paths[index].resolve(), ())
        union = np.zeros((size, size), bool)
        for file in files:
            mask = read_mask(file)
            mask = ((mask.max(axis=2) if mask.ndim == 3 else mask) != 0).astype(np.uint8) * 255
            union |= np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST)) > 0
        masks.append(union if files else None)
    return masks


def plot_gradcam(out: Path, task_images: Any, shots: int | None, cells: Sequence[Mapping[str, Any]]) -> Path | None:
    """Fig. 5: the first defective test images (ground truth outlined in white) and each variant's Grad-CAM."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from fedinspect.evaluation.plots import _gt_contour, _save, _show_image

    folder = out / CELLS_DIR / task_slug(task_images.name)
    rows = []
    for cell in cells:
        if cell.get("gradcam"):
            with np.load(folder / cell["gradcam"], allow_pickle=False) as data:
                rows.append((VARIANTS[cell["variant"]].label, data["cams"].astype(np.float32),
                             data["image_index"].astype(int), data["probability"]))
    if not rows:
        return None
    indices = rows[0][2]
    masks = _masks_for(task_images.task, indices.tolist(), task_images.image_size)
    cmap = colormaps["jet"]
    size = 1.9
    fig = Figure(figsize=(len(indices) * size + 1.0, (len(rows) + 1) * size), layout="constrained")
    axes = fig.subplots(len(rows) + 1, len(indices), squeeze=False)
    for column, index in enumerate(indices):
        image = task_images.images[index]
        height, width = _show_image(axes[0, column], image)
        if masks[column] is not None:
            _gt_contour(axes[0, column], masks[column], height, width, "white")
        axes[0, column].set_title(task_images.paths[index].name[:24], fontsize=7)
        for row, (label, cams, row_indices, probability) in enumerate(rows, start=1):
            ax = axes[row, column]
            _show_image(ax, image)
            if column < len(cams) and row_indices[column] == index:
                ax.imshow(cams[column], cmap=cmap, vmin=0.0, vmax=1.0, alpha=0.5, extent=(0, width, height, 0))
                ax.set_title(f"p(defective) {probability[column]:.2f}", fontsize=7)
            if column == 0:
                ax.set_ylabel(label, fontsize=8)
    axes[0, 0].set_ylabel("test image", fontsize=8)
    fig.suptitle(f"{task_images.name}{_shots_suffix(shots)}: Grad-CAM of 'defective'", fontsize=9)
    return _save(fig, out / GRADCAM_DIR / f"{task_slug(task_images.name)}@{shots_label(shots)}.png")


# --------------------------------------------------------------------------------------------------
# Report


def write_meta_report(out: Path, summary: Mapping[str, Any], images: Mapping[str, Any]) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` of a meta-study (and its Grad-CAM figures)."""
    settings = summary["settings"]
    doc = Document("MeDetection meta-study: leave one product task out (seed 002's protocol)")
    tasks = summary["tasks"]
    shares = " or ".join("all of it" if s == "all" else f"{s.removesuffix('shot')} images of it"
                         for s in settings["shots"])
    listed = ", ".join(f"{t['name']} ({t['good']} good, {t['defective']} defective)" for t in tasks)
    doc.paragraph(
        f"Tasks: {listed}. Each "
        "task is left out in turn: the MAML variants are meta-trained on the others only, then every variant is "
        f"fine-tuned on the left-out task's 70% share ({shares}; a fifth of it held for early stopping) and tested "
        "on its 30% share. "
        f"Images {settings['image_size']} px, backbone {settings['backbone']} (width {settings['width']}), "
        f"references: {settings['reference']} good image. MAML: {settings['meta_steps']} meta-steps at most "
        f"(patience {settings['meta_patience']}), {settings['meta_batch']} tasks per step, "
        f"{settings['n_support']} support and {settings['n_query']} query pairs, {settings['inner_steps']} inner "
        f"step(s) at {settings['inner_lr']:g}, outer lr {settings['outer_lr']:g}, "
        f"{'first' if settings['first_order'] else 'second'} order. Fine-tuning: Adam lr {settings['lr']:g}, "
        f"{settings['epochs']} epochs at most (patience {settings['patience']}), seed {settings['seed']}.")
    doc.note("the 4-conv backbone has no ImageNet weights, so the ImageNet initialisation is the same design on the "
             "frozen ImageNet-pretrained EfficientNet-Lite0 stem (stride 8), its two trainable blocks and head "
             "randomly initialised and not meta-trained.")
    target = summary["targets"]
    for label, block in target["maml_vs_random"].items():
        doc.paragraph(f"MAML against random initialisation ({label}): higher AUROC on {block['auroc_better']} of "
                      f"{block['n']} tasks, fewer epochs to converge on {block['fewer_epochs']} of {block['n']}.")
    if target["meta_train_s_max"] is not None:
        doc.paragraph(f"Longest MAML meta-training (one left-out task, the others meta-trained on): "
                      f"{format_seconds(target['meta_train_s_max'])}; all meta-trainings together "
                      f"{format_seconds(summary['meta_train_total_s'])}, all fine-tunings "
                      f"{format_seconds(summary['fine_tune_total_s'])}.")
    for table in summary["tables"].values():
        doc.heading(table["title"])
        doc.add(Table(table["header"], table["rows"], caption=table["caption"],
                      emphasize_last=table["title"].startswith("Table 2")))
    doc.heading("Cost")
    doc.add(Table(["Task", "Variant", "Shots", "Meta-trained on", "Meta-steps", "Meta-train (s)", "Epochs run",
                   "Fine-tune (s)"],
                  [[c["task"], c["variant"], shots_label(c["shots"]), ", ".join(c["meta_tasks"]) or "-",
                    str(c["meta_steps_run"] or "-"), f"{c['meta_train_s']:.1f}" if c["meta_train_s"] else "-",
                    str(c["epochs_run"]), f"{c['fine_tune_s']:.1f}"] for c in summary["cells"]],
                  caption="Meta-weights are shared by the cells of one model and left-out task (trained once)."))
    doc.heading("Grad-CAM (the seed's Fig. 5)")
    drawn = False
    for task in tasks:
        for shots_text in settings["shots"]:
            chosen = [c for c in summary["cells"]
                      if c["task"] == task["name"] and shots_label(c["shots"]) == shots_text]
            if not chosen:
                continue
            path = plot_gradcam(out, images[task["name"]], chosen[0]["shots"], chosen)
            if path is not None:
                drawn = True
                doc.figure(path.relative_to(out).as_posix(),
                           f"{task['name']} ({shots_text}): first defective test images (ground truth outlined in "
                           "white where the task has masks) and where each variant's 'defective' logit comes from")
    if not drawn:
        doc.note("no Grad-CAM figure (no finished cell with a defective test image, or --gradcam-images 0).")
    return doc.write(out)
