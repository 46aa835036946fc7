"""The privacy study's report: one table and the privacy-utility Pareto plots (report.md, report.html)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fedinspect.evaluation.document import Document, Image, Paragraph, Table
from fedinspect.privacy.obfuscation import Obfuscation
from fedinspect.study.pareto import pareto_front

COLUMNS = (
    ("obfuscation", "obfuscation"), ("unit", "DP unit"), ("epsilon", "ε"), ("noise_multiplier", "noise z"),
    ("image_auroc", "image AUROC"), ("auc_spro_0.05", "AUC-sPRO@0.05"), ("inversion_psnr", "inversion PSNR (dB)"),
    ("inversion_ssim", "inversion SSIM"), ("chance_psnr", "chance PSNR"),
    ("aggregate_psnr", "average-look PSNR"), ("membership_auc", "membership AUC"),
    ("mb_sent", "MB sent"), ("time_s", "time (s)"),
)


def _cell(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if key == "epsilon":
        return "∞ (no DP)" if value is None or math.isinf(value) else f"{value:.2f}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("mb_sent", "noise_multiplier", "inversion_psnr", "chance_psnr", "aggregate_psnr"):
        return f"{value:.2f}"
    if key == "time_s":
        return f"{value:.0f}"
    return f"{value:.3f}"


def privacy_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The study's rows as a Markdown table."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(key, row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def pareto_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Image AUROC against inversion PSNR and against membership AUC; Pareto-optimal runs circled."""
    figure = Figure(figsize=(11, 4.5))
    names = list(dict.fromkeys(r["obfuscation"] for r in rows))
    markers = {name: "osD^vP*X"[i % 8] for i, name in enumerate(names)}
    for axes, leak, label in zip(figure.subplots(1, 2), ("inversion_psnr", "membership_auc"),
                                 ("inversion PSNR (dB, lower = less leakage)", "membership AUC (0.5 = chance)"),
                                 strict=True):
        points = [(math.nan if r[leak] is None else r[leak], r["image_auroc"]) for r in rows]
        # an AUC below 0.5 leaks as much as its mirror image above: the front ranks |AUC - 0.5|
        leakage = [(abs(x - 0.5) if leak == "membership_auc" else x, y) for x, y in points]
        front = set(pareto_front(leakage, maximize=(False, True)).tolist())
        for i, row in enumerate(rows):
            if math.isnan(points[i][0]):
                continue
            eps = row["epsilon"]
            private = eps is not None and not math.isinf(eps)
            name = f"ε={eps:.0f}" + ("" if row["unit"] == "image" else " (patch)") if private else "no DP"
            axes.scatter(*points[i], marker=markers[row["obfuscation"]], s=60,
                         edgecolors="k" if i in front else "none", linewidths=1.5,
                         color="tab:gray" if not private else ("tab:red" if row["unit"] == "embedding"
                                                                  else "tab:blue"))
            axes.annotate(name, points[i], fontsize=7, xytext=(4, 3), textcoords="offset points")
        ordered = sorted(front, key=lambda i: leakage[i][0])
        axes.plot([points[i][0] for i in ordered], [points[i][1] for i in ordered], "k--", lw=0.8)
        axes.set_xlabel(label)
        axes.set_ylabel("mean image AUROC")
        axes.grid(alpha=0.3)
    handles = [figure.axes[0].scatter([], [], marker=m, color="tab:gray", label=n) for n, m in markers.items()]
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), title="obfuscation (marker)", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.85))
    figure.savefig(path, dpi=110)
    return path


def obfuscation_examples(image: np.ndarray, key: int, path: Path, short_side: int = 256) -> Path:
    """One image as the detector sees it under each obfuscation of seed 000 (2x2 average, 4x4 shuffle)."""
    settings = ["", "average", "shuffle", "switch_row", "average,shuffle", "average,shuffle,switch_row"]
    figure = Figure(figsize=(3.2 * len(settings), 3.6))
    for axes, methods in zip(figure.subplots(1, len(settings)), settings, strict=True):
        axes.imshow(Obfuscation(methods, key=key).prepare(image, short_side))
        axes.set_title(methods.replace(",", " + ") or "original", fontsize=9)
        axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write_privacy_report(out_dir: Path, results: Mapping[str, Any], example: np.ndarray | None = None,
                         key: int = 0) -> Path:
    """report.md and report.html of a privacy study (the shared document model); ``example``: an image to obfuscate."""
    rows = results["rows"]
    config = results["config"]
    doc = Document("Privacy-utility study")
    doc.add(
        Paragraph(
            f"{config['clients']} clients, partition {config['partition']}, strategy {config['strategy']}, "
            f"backbone {config['settings']['backbone']} at {config['settings']['image_size']} px, "
            f"local coreset {config['settings']['local_coreset_ratio']}, seed {config['seed']}. "
            f"Attacker's data: {results['study']['attacker_data']} ({results['study']['attack_images']} images). "
            f"Total time {results['time_s']:.0f} s."),
        Paragraph(
            "DP unit `image`: one training image of a client (add/remove), everything it contributes to the bank "
            "of one category. DP unit `embedding`: the value of one patch embedding (weaker: an image has "
            "hundreds). ε at δ from the Opacus accountant named in each run's `privacy` block. Inversion "
            "PSNR/SSIM: decoder reconstructions of sent rows against the true (un-obfuscated) patches; chance PSNR "
            "decodes the attacker's mean embedding instead (what knowing the product type alone gives); "
            "average-look PSNR decodes the mean of the client's embeddings (the product's average appearance, "
            "which DP does not hide: it protects individual images). Membership AUC: training versus held-out "
            "good images, from the global bank."),
        Table([title for _, title in COLUMNS], [[_cell(k, row.get(k)) for k, _ in COLUMNS] for row in rows],
              [key not in ("obfuscation", "unit") for key, _ in COLUMNS]),
    )
    doc.add(Image(pareto_plot(rows, out_dir / "privacy_pareto.png").name,
                  "Image AUROC against inversion PSNR and against membership AUC; Pareto-optimal runs circled."))
    if example is not None:
        path = obfuscation_examples(example, key, out_dir / "obfuscation_examples.png",
                                    config["settings"]["image_size"])
        doc.add(Image(path.name, "One test image as the detector sees it under each obfuscation."))
    return doc.write(out_dir)[0]
