"""The seed's Tables I and III on our data, as one resumable experiment.

- Table I: accuracy and loss of each model, plain and with obfuscation (each method alone and the three
  combined), without DP-SGD.
- Table III: each model with the three obfuscations and DP-SGD at the seed's noise multipliers (0.01,
  0.05) and at noise multipliers that give a meaningful epsilon (about 10 and 1 by default), with the
  epsilon each client spends over all rounds.

Every run writes ``runs/<name>/results.json`` and its report; a run whose results.json already holds
the same config is read back instead of recomputed (resume by running the command again). One
:class:`InputCache` serves all runs, so images are read once and backbone features are computed once
per (backbone, obfuscation).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedinspect.classification.models import TRANSFER_MODELS
from fedinspect.classification.report import Document, fmt, fmt_epsilon
from fedinspect.classification.runner import (
    ClassifyConfig,
    InputCache,
    client_id,
    noise_for_epsilon,
    prepare_split,
    run_classification,
    with_noise,
)
from fedinspect.privacy.obfuscation import parse_methods

ALL_METHODS = "average,shuffle,switch_row"
SEED_NOISE = (0.01, 0.05)


@dataclass(frozen=True)
class ExperimentPlan:
    """Which runs make up the tables. ``base`` holds every other setting (clients, rounds, training, seed)."""

    base: ClassifyConfig = field(default_factory=ClassifyConfig)
    # settings of the transfer models' DP-SGD runs (Table III; the CNN keeps ``base``'s); None: ``base``
    dp_base: ClassifyConfig | None = None
    models: tuple[str, ...] = ("cnn", "mobile", "large")
    obfuscations: tuple[str, ...] = ("none", "average", "shuffle", "switch_row", ALL_METHODS)
    transfer_obfuscations: tuple[str, ...] = ("none", ALL_METHODS)
    noise_multipliers: tuple[float, ...] = SEED_NOISE
    target_epsilons: tuple[float, ...] = (10.0, 1.0)
    dp_obfuscation: str = ALL_METHODS
    image_sizes: dict[str, int] = field(default_factory=lambda: {"cnn": 64})

    def config(self, model: str, obfuscation: str, noise: float | None = None) -> ClassifyConfig:
        transfer = model in TRANSFER_MODELS
        base = self.base if noise is None or self.dp_base is None or not transfer else self.dp_base
        size = self.image_sizes.get(model, base.image_size)
        changes: dict = {"model": model, "obfuscate": parse_methods(obfuscation), "image_size": size}
        if not transfer:  # the feature transforms and heads of a frozen backbone do not apply
            changes.update(views=1, project=0, head="linear" if base.head == "centered" else base.head)
        return with_noise(replace(base, **changes), noise)


def run_name(config: ClassifyConfig) -> str:
    obfuscation = "+".join(config.obfuscate) or "plain"
    noise = config.train.noise_multiplier
    return f"{config.model}-{obfuscation}" + ("" if noise is None else f"-noise{noise:.4g}")


def _load_done(out: Path, config: ClassifyConfig) -> dict | None:
    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return results if results.get("config") == json.loads(json.dumps(config.to_dict())) else None


def _row(table: str, name: str, config: ClassifyConfig, results: dict, target: float | None) -> dict[str, Any]:
    eps = results.get("epsilon", {})
    values = [math.inf if v == "inf" else float(v) for v in eps.values()]
    return {
        "table": table, "run": name, "model": config.model, "obfuscation": "+".join(config.obfuscate) or "none",
        "image_size": config.image_size, "noise_multiplier": config.train.noise_multiplier,
        "target_epsilon": target, "epsilon_max": max(values) if values else None,
        "epsilon_min": min(values) if values else None,
        "accuracy": results["accuracy"], "macro_f1": results["macro_f1"], "loss": results["loss"],
        "seconds": results["timing"]["total_s"], "train_seconds": results["timing"]["train_s"],
    }


def run_experiment(data_dir: str | Path, out_dir: str | Path, plan: ExperimentPlan | None = None,
                   progress: bool = True, cache: InputCache | None = None) -> dict[str, Any]:
    """All runs of the plan (skipping those already done), then experiment.json and the report. ``cache``: the
    images and features of earlier runs in this process (a benchmark's), reused."""
    plan = plan or ExperimentPlan()
    out_dir = Path(out_dir)
    started = time.perf_counter()
    jobs: list[tuple[str, ClassifyConfig, float | None]] = []
    for model in plan.models:
        for obfuscation in (plan.obfuscations if model == "cnn" else plan.transfer_obfuscations):
            jobs.append(("I", plan.config(model, obfuscation), None))
    client_sizes = [len(v.items) for v in prepare_split(data_dir, plan.config(plan.models[0], "none")).clients]
    for model in plan.models:
        reference = plan.config(model, plan.dp_obfuscation, 1.0)
        for noise in plan.noise_multipliers:
            jobs.append(("III", with_noise(reference, noise), None))
        for target in plan.target_epsilons:
            noise = noise_for_epsilon(reference, client_sizes, target)
            jobs.append(("III", replace(with_noise(reference, noise), dp_epsilon=target), target))
    cache = cache if cache is not None else InputCache()
    rows = []
    for table, config, target in tqdm(jobs, desc="experiment runs", disable=not progress):
        name = run_name(config)
        run_dir = out_dir / "runs" / name
        results = _load_done(run_dir, config)
        if results is None:
            results = run_classification(data_dir, run_dir, config, progress=False, cache=cache)
        rows.append(_row(table, name, config, results, target))
        if progress:
            tqdm.write(f"{name}: accuracy {results['accuracy']:.3f}, macro-F1 {results['macro_f1']:.3f}, "
                       f"{results['timing']['total_s']:.0f} s")
    summary = {"dataset": str(data_dir), "base_config": plan.base.to_dict(), "image_sizes": plan.image_sizes,
               "client_sizes": {client_id(i): n for i, n in enumerate(client_sizes)},
               "rows": rows, "total_s": time.perf_counter() - started}
    (out_dir / "experiment.json").write_text(json.dumps(summary, indent=2, default=str))
    write_experiment_report(summary, out_dir)
    return summary


def write_experiment_report(summary: dict[str, Any], out_dir: Path) -> Path:
    """report.md / report.html with Tables I and III and a plain statement of the seed's epsilon."""
    base = summary["base_config"]
    train = base["train"]
    doc = Document(f"Tables I and III of seed 000 on {Path(summary['dataset']).name}")
    doc.paragraph(
        f"{base['clients']} clients ({base['partition']}), {base['rounds']} FedAvg rounds, {train['local_epochs']} "
        f"local epoch(s) per round, {train['optimizer']} lr {train['lr']}, logical batch "
        f"{train['batch_size'] * train['accumulation_steps']} ({train['batch_size']} x {train['accumulation_steps']} "
        f"accumulation steps), seed {base['seed']}; image size {base['image_size']} px "
        f"(overrides: {summary['image_sizes']}); client sizes {summary['client_sizes']}. "
        f"Transfer models: frozen ImageNet backbone, trained head. Times include reading the images and "
        f"computing backbone features unless these were cached by an earlier run of the experiment.")
    rows = [r for r in summary["rows"] if r["table"] == "I"]
    doc.heading("Table I: accuracy and loss for each model, plain and with obfuscation (no DP)")
    doc.table(["model", "obfuscation", "image px", "accuracy", "macro-F1", "loss", "time (s)"],
              [[r["model"], r["obfuscation"], r["image_size"], fmt(r["accuracy"]), fmt(r["macro_f1"]), fmt(r["loss"]),
                fmt(r["seconds"], 1)] for r in rows])
    rows = [r for r in summary["rows"] if r["table"] == "III"]
    doc.heading("Table III: DP-SGD noise multipliers, with the epsilon each client spends over all rounds")
    doc.table(["model", "obfuscation", "noise multiplier", "target eps", "eps (max over clients)",
               "eps (min)", "accuracy", "macro-F1", "loss", "time (s)"],
              [[r["model"], r["obfuscation"], f"{r['noise_multiplier']:.4g}", fmt(r["target_epsilon"], 1),
                fmt_epsilon(r["epsilon_max"]), fmt_epsilon(r["epsilon_min"]), fmt(r["accuracy"]),
                fmt(r["macro_f1"]), fmt(r["loss"]), fmt(r["seconds"], 1)] for r in rows])
    seed_rows = [r for r in rows if r["noise_multiplier"] in SEED_NOISE]
    if seed_rows:
        worst = {noise: max(r["epsilon_max"] for r in seed_rows if r["noise_multiplier"] == noise)
                 for noise in SEED_NOISE if any(r["noise_multiplier"] == noise for r in seed_rows)}
        doc.paragraph(
            "The seed's noise multipliers give no meaningful privacy: epsilon (delta = 1e-5, RDP accountant) of "
            + ", ".join(f"{fmt_epsilon(eps)} for noise {noise}" for noise, eps in worst.items())
            + ". A guarantee e^epsilon that large bounds nothing; the RDP bound there is also limited by the "
            "accountant's largest usable order, so the true figure is no better. Epsilon of about 1 to 10 needs "
            "a noise multiplier near 1 or above (rows with a target epsilon).")
    doc.paragraph(f"Total time of this invocation: {summary['total_s']:.0f} s. Per-run reports: runs/<name>/report.md.")
    doc.write(out_dir)
    return out_dir / "report.md"
