"""The zoo study's summary and report: the seed's localization and detection tables, cost, threshold figures.

Reads the finished cells of :mod:`fedinspect.study.zoo` (nothing is recomputed) and writes them through the
one document renderer (:mod:`fedinspect.evaluation.document`): ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedinspect.evaluation.document import Document, Heading, Image, Note, Paragraph, Table
from fedinspect.evaluation.report import format_metric

EXPERIMENTS = {
    "same": "Trained and tested on the same dataset (the seed's Tables 5-8)",
    "cross": "Trained on one dataset, tested on another with the training dataset's thresholds (Tables 10-13)",
    "union": "Trained on the union of the datasets, tested on each (Tables 14-17)",
}
LOCALIZATION = (("IoU T1", "iou_t1"), ("IoU T2", "iou_t2"), ("PRO T1", "pro_t1"), ("PRO T2", "pro_t2"),
                ("AUROC", "pixel_auroc"), ("AUC-sPRO@0.3", "auc_spro_0.3"), ("AUC-sPRO@0.05", "auc_spro_0.05"))
DETECTION = (("F1 T1", "f1_t1"), ("F1 T3", "f1_t3"), ("AUROC", "image_auroc"))


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cell_row(results: Mapping[str, Any]) -> dict[str, float | None]:
    """The table metrics of one test: thresholds on the report share, threshold-free metrics beside them."""
    block = results.get("thresholds") or {}
    free = block.get("threshold_free") or results
    spro = free.get("auc_spro") or {}

    def at(name: str, key: str) -> float | None:
        return (block.get(name) or {}).get(key)

    return {
        "iou_t1": at("T1", "iou"), "iou_t2": at("T2", "iou"), "pro_t1": at("T1", "pro"), "pro_t2": at("T2", "pro"),
        "f1_t1": at("T1", "image_f1"), "f1_t3": at("T3", "image_f1"),
        "pixel_f1_t1": at("T1", "pixel_f1"), "pixel_f1_t2": at("T2", "pixel_f1"),
        "pixel_auroc": free.get("pixel_auroc"), "image_auroc": free.get("image_auroc"),
        "auc_spro_0.3": spro.get("0.3"), "auc_spro_0.05": spro.get("0.05"),
        "t1": at("T1", "value"), "t2": at("T2", "value"), "t3": at("T3", "value"),
    }


def summarize(out_dir: Path, settings: Any, datasets: Sequence[str], failed: list[dict[str, str]]) -> dict[str, Any]:
    """Every finished test as a row, and the cost of each detector, from the files under ``out_dir/cells``."""
    from fedinspect.study.zoo import CELLS_DIR, FIT_FILE, UNION

    rows: list[dict[str, Any]] = []
    cost: dict[str, dict[str, Any]] = {}
    for detector in settings.detectors:
        fits: dict[str, Any] = {}
        inference: list[float] = []
        peaks: list[float] = []
        for train in [*datasets, UNION] if len(datasets) > 1 else list(datasets):
            cell = out_dir / CELLS_DIR / detector / f"train-{train}"
            fit = _read(cell / FIT_FILE)
            if fit is None:
                continue
            fits[train] = fit
            peaks.append(fit.get("peak_memory_mb") or 0.0)
            for test in datasets:
                results = _read(cell / f"test-{test}" / "results.json")
                if results is None:
                    continue
                experiment = "union" if train == UNION else "same" if train == test else "cross"
                if experiment == "same":
                    inference.append(results["timings"]["inference_ms_per_image"])
                peaks.append(results.get("peak_memory_mb") or 0.0)
                figure = cell / f"test-{test}" / "thresholds.png"
                rows.append({"detector": detector, "train": train, "test": test, "experiment": experiment,
                             **cell_row(results),
                             "figure": str(figure.relative_to(out_dir)) if figure.is_file() else None})
        if fits:
            first = next(iter(fits.values()))
            ms = sum(inference) / len(inference) if inference else None
            cost[detector] = {
                "fit_s": {train: fit["fit_s"] for train, fit in fits.items()},
                "epochs_run": {train: fit.get("epochs_run") for train, fit in fits.items()},
                "inference_ms_per_image": ms, "fps": 1000.0 / ms if ms else None,
                "parameters": first.get("parameters"), "model_mb": first.get("model_bytes", 0) / 2**20,
                "peak_memory_mb": max(peaks) if peaks else None,
            }
    return {"datasets": list(datasets), "detectors": list(settings.detectors), "rows": rows, "cost": cost,
            "failed": failed}


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], datasets: Sequence[str],
           detectors: Sequence[str], key: str) -> Table:
    """Detectors down, (dataset, metric) across, as the seed lays out its tables."""
    header = ["detector", *[f"{dataset}: {label}" for dataset in datasets for label, _ in columns]]
    body = []
    for detector in detectors:
        cells = [detector]
        for dataset in datasets:
            row = next((r for r in rows if r["detector"] == detector and r[key] == dataset), None)
            cells += [format_metric(row.get(metric)) if row else "" for _, metric in columns]
        body.append(cells)
    return Table(header, body)


def write_zoo_report(out_dir: Path, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` of a zoo study."""
    datasets, detectors, rows = summary["datasets"], summary["detectors"], summary["rows"]
    doc = Document("Detector zoo study (seed 004's protocol)")
    settings = summary.get("settings", {})
    doc.add(Paragraph(
        f"Detectors {', '.join(detectors)} on {', '.join(datasets)} at image size {settings.get('image_size')}. "
        "Training images: 70% fit, 15% validation (early stopping), 15% held out for T1; test images: 15% per "
        f"defect type choose T2 and T3, the other 85% are reported (split seed {settings.get('seed')}). "
        f"T1 = {settings.get('percentile', 99):g}th percentile of good pixels; T2 = best pixel F1; T3 = best "
        "image F1. IoU and PRO at a threshold; AUROC and AUC-sPRO need none (both on the report share)."))
    if summary.get("failed"):
        doc.add(Heading(2, "Failed cells"),
                Table(["detector", "trained on", "tested on", "error"],
                      [[f["detector"], f["train"], f.get("test") or "(training)", f["error"].splitlines()[-1][:300]]
                       for f in summary["failed"]]))
    for experiment, title in EXPERIMENTS.items():
        chosen = [r for r in rows if r["experiment"] == experiment]
        if not chosen:
            continue
        doc.add(Heading(2, title))
        if experiment == "cross":
            doc.add(Paragraph("Columns name the test dataset; the model and its thresholds come from the other."))
        key = "test"
        doc.add(Heading(3, "Localization"), _table(chosen, LOCALIZATION, datasets, detectors, key),
                Heading(3, "Detection"), _table(chosen, DETECTION, datasets, detectors, key))
    cost = summary.get("cost", {})
    trainings = [*datasets, "union"] if len(datasets) > 1 else list(datasets)
    if cost:
        doc.add(Heading(2, "Cost (the seed's Table 9)"),
                Paragraph("Training time per training set; inference per image within a dataset, maps included; "
                          "parameters of the networks (a frozen backbone included) and stored numbers (bank, "
                          "Gaussians); peak resident memory of the cell's process."),
                Table(["detector", *[f"fit {t} (s)" for t in trainings],
                       "inference (ms/img)", "FPS", "parameters", "model (MB)", "peak memory (MB)"],
                      [[name, *[format_metric(c["fit_s"].get(t), 0) for t in trainings],
                        format_metric(c["inference_ms_per_image"], 1), format_metric(c["fps"], 1),
                        f"{c['parameters']:,}" if c.get("parameters") else "", format_metric(c["model_mb"], 1),
                        format_metric(c["peak_memory_mb"], 0)] for name, c in cost.items()]))
    figures = [r for r in rows if r["experiment"] == "same" and r.get("figure")]
    if figures:
        doc.add(Heading(2, "Thresholds T1-T3 on test images"))
        for row in figures:
            doc.add(Image(row["figure"], f"{row['detector']} on {row['test']}: score map and the masks at "
                                         f"T1 = {format_metric(row['t1'])}, T2 = {format_metric(row['t2'])}, "
                                         f"T3 = {format_metric(row['t3'])} (ground truth outlined in green)"))
    else:
        doc.add(Note("no threshold figure (no finished test within a dataset)."))
    return doc.write(out_dir)
