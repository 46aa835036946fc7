"""The report of ``fedinspect evaluate``: one detector on one category, its metrics and its thresholds T1-T3.

Built from ``results.json`` alone through the one document renderer (``report.md`` and ``report.html``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedinspect.evaluation.document import Document, Heading, Image, KeyValues, Note, Paragraph, Table
from fedinspect.evaluation.metrics import FPR_LIMITS
from fedinspect.evaluation.report import format_metric, format_seconds

THRESHOLD_COLUMNS = (("IoU", "iou"), ("PRO", "pro"), ("pixel F1", "pixel_f1"), ("pixel precision", "pixel_precision"),
                     ("pixel recall", "pixel_recall"), ("image F1", "image_f1"),
                     ("image precision", "image_precision"), ("image recall", "image_recall"))


def write_category_report(out_dir: Path, results: Mapping[str, Any], figure: str | None) -> tuple[Path, Path]:
    """``report.md``/``report.html`` in ``out_dir``; ``figure``: the threshold figure's file name, if written."""
    detector = results.get("detector", "?")
    doc = Document(f"{detector} on {results.get('category', '?')}")
    counts = results.get("counts", {})
    doc.add(KeyValues([
        ("detector", str(detector)),
        ("category", f"{results.get('category')} ({results.get('layout')} layout)"),
        ("test images", f"{counts.get('test')} ({counts.get('test_good')} good, {counts.get('test_defective')} "
                        f"defective, {counts.get('regions')} defect regions)"),
        ("training images", str(counts.get("train"))),
        ("parameters", f"{counts['parameters']:,}" if counts.get("parameters") else "n/a"),
        ("inference", f"{format_metric(results.get('timings', {}).get('inference_ms_per_image'), 1)} ms per image"),
    ]))
    spro = results.get("auc_spro") or {}
    doc.add(Heading(2, "Threshold-free metrics (all test images)"),
            Table(["image AUROC", "pixel AUROC", *[f"AUC-sPRO@{limit:g}" for limit in FPR_LIMITS]],
                  [[format_metric(results.get("image_auroc")), format_metric(results.get("pixel_auroc")),
                    *[format_metric(spro.get(str(limit))) for limit in FPR_LIMITS]]]))
    block = results.get("thresholds") or {}
    doc.add(Heading(2, "Operating thresholds T1-T3 (seed 004's protocol)"))
    if "T1" not in block:
        doc.add(Note(f"no thresholds: {block.get('skipped', 'not computed')}"))
    else:
        shares = block["shares"]
        seen = "held out of fitting" if block.get("t1_held_out") else "also fitted on: fedinspect fit uses every " \
                                                                        "training image, so T1 sits low"
        synthetic = block.get("synthetic_validation")
        if synthetic:
            chosen_on = (f"T2 and T3 chosen on synthetic defects ({synthetic['method']}, seed {synthetic['seed']}): "
                         f"the {synthetic['good_images']} good images of the T1 share and their "
                         f"{synthetic['defective_images']} defective copies; no test image was used to choose them. "
                         f"Every figure below is measured on {shares['report']} test images")
        else:
            chosen_on = (f"T2 and T3 chosen on {shares['select']} test images; every figure below is measured on "
                         f"the other {shares['report']} test images")
        doc.add(Paragraph(
            f"T1 from {shares['t1']} good training images ({seen}). {chosen_on} (split seed "
            f"{block.get('split_seed')})."),
            Table(["threshold", "value", "chosen by", *[label for label, _ in THRESHOLD_COLUMNS]],
                  [[name, format_metric(block[name]["value"], 4), block[name]["chosen_by"],
                    *[format_metric(block[name].get(key)) for _, key in THRESHOLD_COLUMNS]]
                   for name in ("T1", "T2", "T3")]))
        if synthetic:
            _add_synthetic_comparison(doc, block)
        free = block.get("threshold_free") or {}
        doc.add(Paragraph(f"On the same report share: image AUROC {format_metric(free.get('image_auroc'))}, pixel "
                          f"AUROC {format_metric(free.get('pixel_auroc'))}, AUC-sPRO@0.3 "
                          f"{format_metric((free.get('auc_spro') or {}).get('0.3'))}."))
        if figure:
            doc.add(Image(figure, "score map and the pixels at or above T1, T2 and T3 over each image, ground truth "
                                  "outlined in green (the median-scoring image of each defect type and the "
                                  "highest-scoring good image of the report share)"))
    timings = results.get("timings", {})
    doc.add(Heading(2, "Time"), KeyValues([(key.removesuffix("_s").replace("_", " "), format_seconds(value))
                                           for key, value in timings.items() if key.endswith("_s")]))
    return doc.write(out_dir)


def _add_synthetic_comparison(doc: Document, block: Mapping[str, Any]) -> None:
    """T2/T3 chosen on synthetic defects beside those chosen on the real select share, on the same report share."""
    real = block.get("real_chosen")
    if "note" in block:
        doc.add(Note(block["note"]))
    if not real:
        doc.add(Note("the test images hold no real defect to choose T2/T3 on: no real-chosen thresholds to "
                     "compare with"))
        return
    doc.add(Heading(3, "Synthetic against real defects"),
            Paragraph("T2 and T3 as chosen on synthetic defects and as chosen on the real select share (15% of "
                      "the test images), each measured on the same report share."),
            Table(["threshold", "chosen on", "value", "IoU", "PRO", "pixel F1", "image F1", "good images flagged"],
                  [[name, label, format_metric(entry.get("value"), 4),
                    *[format_metric(entry.get(key)) for key in ("iou", "pro", "pixel_f1", "image_f1",
                                                                "good_images_flagged")]]
                   for name in ("T2", "T3")
                   for label, entry in (("synthetic", block[name]), ("real", real[name]))]))
