"""Figures and reports of classification runs: learning curves, confusion matrix, report.md / report.html.

Both files are rendered from one :class:`fedinspect.evaluation.document.Document` (the document model
and renderer of every report), so they hold the same content; figures are PNGs under ``figures/``
referenced by relative paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedinspect.evaluation.document import Document  # the one document model of every report

__all__ = ["Document", "fmt", "fmt_epsilon", "plot_confusion", "plot_learning_curves", "plot_obfuscation_examples",
           "write_run_report"]


# ---------------------------------------------------------------- formatting
def fmt(value: Any, digits: int = 3) -> str:
    """A metric with ``digits`` decimals; None / NaN -> "n/a"; an infinite epsilon -> "inf"."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def fmt_epsilon(value: Any) -> str:
    """Epsilon: 2 decimals up to 100, then in scientific notation (the seed's settings give ~1e5)."""
    if value is None or isinstance(value, str):
        return "inf" if value in ("inf", "Infinity") else fmt(value)
    value = float(value)
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}" if value < 100 else f"{value:.2e}"


# ---------------------------------------------------------------- figures
def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Test accuracy and macro-F1, test and training loss, and (under DP) each client's epsilon per round."""
    rounds = [h["round"] for h in history]
    with_eps = any(h.get("epsilon") for h in history)
    fig, axes = plt.subplots(1, 3 if with_eps else 2, figsize=(13 if with_eps else 9, 3.6))
    axes[0].plot(rounds, [h["accuracy"] for h in history], "o-", label="accuracy")
    axes[0].plot(rounds, [h["macro_f1"] for h in history], "s-", label="macro-F1")
    axes[0].set(xlabel="round", ylabel="test metric", ylim=(0, 1.02), title="global model on the test split")
    axes[1].plot(rounds, [h["loss"] for h in history], "o-", label="test loss")
    trained = [h for h in history if "train_loss" in h]  # not the centered head's mean round
    axes[1].plot([h["round"] for h in trained], [h["train_loss"] for h in trained], "s--",
                 label="training loss (clients)")
    axes[1].set(xlabel="round", ylabel="cross-entropy", title="loss")
    if with_eps:
        clients = sorted({c for h in history for c in h.get("epsilon", {})})
        for client in clients:
            values = [_as_float(h.get("epsilon", {}).get(client)) for h in history]
            axes[2].plot(rounds, values, "o-", label=client)
        axes[2].set(xlabel="round", ylabel="epsilon (cumulative)", title="privacy spent per client")
        axes[2].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_xticks(rounds)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "") -> Path:
    """The confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    matrix = np.asarray(matrix)
    size = 1.2 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix (test split)")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > threshold else "black", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_obfuscation_examples(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path,
                              method: str) -> Path:
    """One image per class: as resized (top row) and as the model sees it after obfuscation (bottom row)."""
    fig, axes = plt.subplots(2, len(pairs), figsize=(1.9 * len(pairs), 4.0), squeeze=False)
    for column, (name, plain, obfuscated) in enumerate(pairs):
        for row, image in enumerate((plain, obfuscated)):
            axes[row, column].imshow(image)
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[0, column].set_title(name, fontsize=9)
    axes[0, 0].set_ylabel("resized")
    axes[1, 0].set_ylabel(method)
    return _save(fig, path)


def _as_float(value: Any) -> float:
    if value is None:
        return math.nan
    return math.inf if value == "inf" else float(value)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- one run
def write_run_report(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """report.md / report.html of one ``fedinspect classify`` run, with its figures."""
    out_dir = Path(out_dir)
    config = results["config"]
    classes = results["classes"]
    obfuscation = "+".join(config["obfuscate"]) or "none"
    noise = config["train"]["noise_multiplier"]
    evaluated = ("validation images (held out of the training images; the test split was not read)"
                 if config.get("validation") else "test images")
    doc = Document(f"Defect classification: {Path(results['dataset']).name}, model {config['model']}")
    doc.paragraph(
        f"{len(classes)} classes ({', '.join(classes)}), {results['split']['train']} training images over "
        f"{config['clients']} clients ({config['partition']}), {results['split']['test']} "
        f"{evaluated}; "
        f"{config['rounds']} FedAvg rounds ({results['engine']}"
        + ("; round 1 only sends the clients' feature means, which centre the head" if config.get("head") == "centered"
           else "") + f"); obfuscation {obfuscation}; "
        + (f"DP-SGD with noise multiplier {noise}." if noise is not None else "no DP-SGD."))
    doc.heading("Result (global model after the last round)")
    doc.table(["accuracy", "macro-F1", "loss", "total time (s)"],
              [[fmt(results["accuracy"]), fmt(results["macro_f1"]), fmt(results["loss"]),
                fmt(results["timing"]["total_s"], 1)]])
    doc.table(["class", "precision", "recall", "F1", "test images"],
              [[name, fmt(m["precision"]), fmt(m["recall"]), fmt(m["f1"]), m["support"]]
               for name, m in results["per_class"].items()])
    doc.heading("Rounds")
    privacy = results.get("privacy", {})
    clients = list(privacy.get("clients", {}))
    rows = [[h["round"], fmt(h["accuracy"]), fmt(h["macro_f1"]), fmt(h["loss"]), fmt(h.get("train_loss")),
             fmt(h["seconds"], 1), *[fmt_epsilon(h["epsilon"].get(c)) for c in clients]]
            for h in results["history"]]
    doc.table(["round", "accuracy", "macro-F1", "test loss", "train loss", "s", *[f"eps {c}" for c in clients]],
              rows)
    if privacy.get("dp"):
        doc.heading("Differential privacy")
        doc.paragraph(
            f"DP-SGD (Opacus): per-sample clipping to L2 norm {privacy['max_grad_norm']}, noise multiplier "
            f"{privacy['noise_multiplier']}, logical batch {privacy['logical_batch']} (physical "
            f"{privacy['physical_batch']}, Poisson sampling: {privacy['poisson_sampling']}), accountant "
            f"{privacy['accountant']}. Unit protected: {privacy['unit']}; epsilon is cumulative over all rounds."
            + (f" The feature means of round 1 are Gaussian releases of each client's sum of unit-norm features "
               f"(sensitivity 1), given {privacy['center_share']:.0%} of the budget; steps count them as one each."
               if "center_share" in privacy else ""))
        doc.table(["client", "images", "sample rate", "steps", "delta", "epsilon"],
                  [[name, c["images"], fmt(c["sample_rate"]), c["steps"], f"{c['delta']:.0e}",
                    fmt_epsilon(c["epsilon"])] for name, c in privacy["clients"].items()])
    doc.heading("Clients")
    sent: dict[str, list[int]] = {}
    for h in results["history"]:
        for name, n_bytes in h.get("bytes_per_client", {}).items():
            sent.setdefault(name, []).append(n_bytes)
    doc.table(["client", "images", *classes, "kB sent per round"],
              [[c["client"], c["images"], *[c["counts"].get(k, 0) for k in classes],
                fmt(sum(sent[c["client"]]) / len(sent[c["client"]]) / 1e3, 1) if sent.get(c["client"]) else None]
               for c in results["split"]["clients"]])
    missing = results.get("missing_clients", [])
    if missing:
        doc.paragraph("Clients missing from a round (the round went on without them): " + "; ".join(
            f"{m['client']} in round {m.get('round', '?')}: {m['reason']}" for m in missing) + ".")
    doc.heading("Figures")
    figures = out_dir / "figures"
    plot_learning_curves(results["history"], figures / "learning_curves.png")
    plot_confusion(results["confusion_matrix"], classes, figures / "confusion_matrix.png")
    doc.figure("figures/learning_curves.png", "learning curves")
    doc.figure("figures/confusion_matrix.png", "confusion matrix of the final global model on the test split")
    if (figures / "obfuscation_examples.png").is_file():
        doc.figure("figures/obfuscation_examples.png", f"one test image per class, before and after {obfuscation}")
    doc.write(out_dir)
    return out_dir / "report.md"
