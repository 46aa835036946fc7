"""The report of a detector federation (``federate --detector NAME``), from its results.json alone.

Rounds (global image AUROC, loss, time and traffic per round, with a figure), the global model of every
category against the centralized one, and the clients; through the one document renderer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedinspect.evaluation.document import Document, Image, KeyValues, Note, Paragraph
from fedinspect.evaluation.report import format_megabytes, format_metric, format_seconds

ROUNDS_FIGURE = "rounds.png"


def plot_rounds(results: Mapping[str, Any], path: Path) -> Path:
    """Image AUROC of the global model per round and category; the centralized model's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = results["history"]
    centralized = (results.get("centralized") or {}).get("categories", {})
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for index, name in enumerate(results["categories"]):
        points = [(r["round"], r["image_auroc"].get(name)) for r in history
                  if (r.get("image_auroc") or {}).get(name) is not None]
        if not points:
            continue
        color = f"C{index % 10}"
        ax.plot(*zip(*points, strict=True), marker="o", color=color, label=name)
        reference = (centralized.get(name) or {}).get("image_auroc")
        if reference is not None:
            ax.axhline(reference, color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("round")
    ax.set_ylabel("image AUROC (all test images)")
    ax.set_title(f"{results['config']['detector']}: global model per round (dashed: centralized)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rounds_to(results: Mapping[str, Any], category: str) -> str:
    """The round the global model came within 1 point of the centralized one, "not reached", or "" (no reference)."""
    reached = results.get("rounds_to_centralized") or {}
    if category not in reached:
        return ""
    return "not reached" if reached[category] is None else str(reached[category])


def write_detector_federation_report(out_dir: Path, results: Mapping[str, Any]) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` (and ``rounds.png``) in ``out_dir``."""
    config = results["config"]
    doc = Document(f"Federated {config['detector']}: {config['clients']} clients, {config['partition']}")
    how = ("one round of summed statistics" if results["aggregation"] == "sum"
           else f"FedAvg over {config['rounds']} rounds of {config['local_epochs']} local epoch(s)"
                + (f", FedProx mu {config['proximal_mu']:g}" if config["proximal_mu"] else ""))
    doc.add(KeyValues([("detector", config["detector"]), ("aggregation", how), ("engine", results["engine"]),
                       ("dataset", results["dataset"]), ("seed", str(config["seed"])),
                       ("clients' images", ", ".join(str(n) for n in results["partition"]["sizes"]))]))
    for block in results.get("privacy_notes", []):
        doc.note(block)
    if results["missing_clients"]:
        doc.note("missing: " + "; ".join(f"{m['client']} (round {m['round']}): {m['reason']}"
                                         for m in results["missing_clients"]))

    doc.heading("Global model per category")
    centralized = (results.get("centralized") or {}).get("categories", {})
    rows = []
    for name, entry in results["categories"].items():
        if "skipped" in entry:
            rows.append([name, entry["skipped"], "", "", "", "", ""])
            continue
        reference = centralized.get(name) or {}
        rows.append([name, format_metric(entry.get("image_auroc")), format_metric(reference.get("image_auroc")),
                     format_metric(entry.get("pixel_auroc")), format_metric((entry.get("auc_spro") or {}).get("0.05")),
                     format_metric((entry.get("auc_spro") or {}).get("0.3")),
                     _rounds_to(results, name)])
    doc.table(["category", "image AUROC", "centralized", "pixel AUROC", "AUC-sPRO@0.05", "AUC-sPRO@0.3",
               "rounds to within 1 point"], rows)
    doc.paragraph("Each category's folder holds its full evaluation (thresholds T1-T3, report); `models/` the "
                  "global models, loadable with `fedinspect evaluate --model`.")
    if results.get("local_only"):
        names = list(results["categories"])
        doc.heading("Each client alone (trained on its own images only)")
        blocks = [(f"{client} alone", block["categories"]) for client, block in results["local_only"].items()]
        blocks.append(("federated", results["categories"]))
        if results.get("centralized"):
            blocks.append(("centralized", results["centralized"]["categories"]))
        doc.table(["model", *[f"{name} image AUROC" for name in names]],
                  [[label, *[format_metric((categories.get(name) or {}).get("image_auroc")) for name in names]]
                   for label, categories in blocks])
        doc.paragraph("A client's model on a product it never saw is seed 004's cross-dataset test; the federated "
                      "model is what the factories gain by training together without pooling their images.")
    if results.get("privacy"):
        privacy = results["privacy"]
        doc.heading("Differential privacy")
        doc.add(KeyValues([("protects", privacy["protects"]), ("epsilon", f"{privacy['epsilon']:.3g} at delta "
                                                                           f"{privacy['delta']:g}"),
                           ("noise", f"{privacy['mode']}: {privacy.get('assumes', '')}"),
                           ("clip norm", f"{privacy['clip_norm']:g}"), ("scope", privacy["scope"])]))
    if results.get("secure_aggregation"):
        secure = results["secure_aggregation"]
        doc.heading("Secure aggregation")
        doc.add(KeyValues([("protocol", secure["protocol"]),
                           ("contributors", ", ".join(secure["contributors"])),
                           ("threshold", f"{secure['reconstruction_threshold']} of {secure['num_shares']} shares"),
                           ("quantization", f"{secure['quantization_range']} levels; entries clipped: "
                                            f"{secure['entries_clipped']}"),
                           ("traffic", f"{format_megabytes(secure['bytes_per_client'])} per client"),
                           ("time", format_seconds(secure["wall_s"]))]))

    doc.heading("Rounds")
    history = results["history"]
    if len(history) > 1:
        plot_rounds(results, out_dir / ROUNDS_FIGURE)
        doc.add(Image(ROUNDS_FIGURE, "image AUROC of the global model after each round"))
    doc.table(["round", "clients", "mean image AUROC", "train loss", "time", "sent per client"],
              [[str(r["round"]), str(r["clients"]), format_metric(r.get("mean_image_auroc")),
                format_metric(r.get("train_loss"), 4), format_seconds(r["seconds"]),
                format_megabytes(max(r["bytes_per_client"].values()) if r["bytes_per_client"] else None)]
               for r in history])
    if not history:
        doc.add(Note("no round finished"))
    doc.add(Paragraph(f"Total {format_seconds(results['timing']['total_s'])} for the rounds, "
                      f"{format_seconds(results['timing']['conclusion_s'])} for the final evaluation; peak memory "
                      f"{results['peak_memory_mb']:.0f} MB."))
    return doc.write(out_dir)
