"""The privacy-utility study: DP budget x image obfuscation, with the attacks that measure leakage.

For every obfuscation setting the clients' images are embedded once (the expensive part); every
DP budget then reuses those embeddings: each client builds its (noisy) update, the server
aggregates, the global banks are scored on the test split with the AutoVI protocol, and the
attacks run against what was sent: the inversion decoder (trained on the attacker's own images,
never obfuscated, since the attacker does not hold the key) on each client's update, and
membership inference on the global bank (each client's training images against held-out good
images of the same category).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedinspect.data.images import read_image
from fedinspect.detectors.patchcore import EmbeddedImage, PatchCore
from fedinspect.evaluation.protocol import score_predictions
from fedinspect.federation.attacks import measure_attacks, train_attacker, valid_rows
from fedinspect.federation.client import EmbeddingCache, FederatedClient, RoundSettings
from fedinspect.federation.runner import FederationConfig, RoundPlan, client_id, plan_round
from fedinspect.federation.server import SHARED
from fedinspect.federation.update import ClientUpdate
from fedinspect.pipeline import load_ground_truth, peak_memory_mb
from fedinspect.privacy.inversion import InversionAttack

STUDY_FILE = "privacy_study.json"


@dataclass(frozen=True)
class PrivacyStudy:
    """The grid: DP budgets (None = no DP) x obfuscations, at one DP unit, plus a unit comparison."""

    epsilons: tuple[float | None, ...] = (1.0, 5.0, 10.0, None)
    obfuscations: tuple[str, ...] = ("", "average,shuffle", "average,shuffle,switch_row")
    unit: str = "image"
    compare_unit_at: float | None = 1.0  # also run the other unit at this epsilon (no obfuscation)
    obfuscation_key: int = 20261122
    attack_images: int = 40  # attacker's own images used to train the decoder
    patch_size: int = 16

    def cells(self) -> list[tuple[str, str | None, float | None]]:
        """(obfuscation, unit, epsilon) of every run; unit None when DP is off."""
        cells = [(obf, self.unit if eps is not None else None, eps)
                 for obf in self.obfuscations for eps in self.epsilons]
        if self.compare_unit_at is not None:
            other = "embedding" if self.unit == "image" else "image"
            cells.append((self.obfuscations[0], other, self.compare_unit_at))
        return cells


def run_privacy_study(data_dir: str | Path, out_dir: str | Path, aux_dir: str | Path,
                      config: FederationConfig | None = None, study: PrivacyStudy | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Run the grid and write privacy_study.json, report.md and the Pareto plot to ``out_dir``."""
    config = config or FederationConfig(centralized=False, compare_shared=False, write_maps=False)
    study = study or PrivacyStudy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    plan = plan_round(data_dir, config, out_dir)
    detector = config.settings.detector(progress=False)
    attack = train_attacker(detector, Path(aux_dir), study.attack_images, study.patch_size, config.settings.seed)
    ground_truth = {name: load_ground_truth(ds, progress=False) for name, ds in plan.datasets.items()}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(study.cells()), desc="privacy study", unit="run", disable=not progress)
    for obfuscation in dict.fromkeys(obf for obf, _, _ in study.cells()):
        base = replace(config.settings, obfuscation=obfuscation, obfuscation_key=study.obfuscation_key)
        cache: EmbeddingCache = {}
        tests = {name: detector.embed_grids((base.load(read_image(s.image_path)) for s in ds.test), total=len(ds.test))
                 for name, ds in plan.datasets.items()}
        for cell_obf, unit, eps in study.cells():
            if cell_obf != obfuscation:
                continue
            settings = replace(base, dp_unit=unit or "", dp_epsilon=eps or 0.0)
            row = _run_cell(plan, replace(config, settings=settings), detector, cache, tests, ground_truth,
                            attack, study)
            rows.append(row)
            bar.update()
            (out_dir / STUDY_FILE).write_text(json.dumps({"rows": rows}, indent=2))  # partial results survive
    bar.close()
    results = {
        "config": config.to_dict(),
        "study": {"epsilons": list(study.epsilons), "obfuscations": [o or "none" for o in study.obfuscations],
                  "unit": study.unit, "compare_unit_at": study.compare_unit_at, "attack_images": study.attack_images,
                  "patch_size": study.patch_size, "attacker_data": str(aux_dir)},
        "rows": rows,
        "time_s": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(),
    }
    (out_dir / STUDY_FILE).write_text(json.dumps(results, indent=2))
    from fedinspect.evaluation.privacy_report import write_privacy_report

    first = next(iter(plan.datasets.values()))
    example = next((s for s in first.test if s.label == 1), first.test[0])
    write_privacy_report(out_dir, results, read_image(example.image_path), key=study.obfuscation_key)
    return results


def _run_cell(plan: RoundPlan, config: FederationConfig, detector: PatchCore, cache: EmbeddingCache,
              tests: dict[str, list[EmbeddedImage]], ground_truth: dict[str, tuple], attack: InversionAttack,
              study: PrivacyStudy) -> dict[str, Any]:
    settings: RoundSettings = config.settings
    start = time.perf_counter()
    updates: list[ClientUpdate] = []
    sent_bytes = 0
    for index in range(config.clients):
        update, _ = FederatedClient(client_id(index), plan.client_images(index), read_image).fit(
            settings, detector, cache)
        payload = update.to_bytes(settings.precision)
        sent_bytes += len(payload)
        updates.append(ClientUpdate.from_bytes(payload, source=update.client_id))
    banks = config.server().aggregate(updates)
    obfuscation = settings.obfuscator()
    metrics: dict[str, dict[str, Any]] = {}
    for name, dataset in plan.datasets.items():
        bank = banks.get(name, banks.get(SHARED))
        scores, maps = detector.with_memory_bank(bank).predict_embedded(tests[name])
        shapes, regions = ground_truth[name]
        if obfuscation is not None:
            maps = [obfuscation.restore_map(m, shape) for m, shape in zip(maps, shapes, strict=True)]
        labels = np.array([s.label for s in dataset.test])
        metrics[name] = score_predictions(labels, scores, maps, regions)
    held_out = {name: [valid_rows(detector, grid) for grid, s in zip(tests[name], ds.test, strict=True) if s.label == 0]
                for name, ds in plan.datasets.items()}
    attacks = measure_attacks(plan, updates, banks, detector, cache, held_out, attack, settings, study.patch_size)
    privacy = settings.bank_privacy()
    row = {
        "obfuscation": settings.obfuscation or "none",
        "unit": privacy.unit if privacy else "none",
        "target_epsilon": privacy.epsilon if privacy else None,
        "epsilon": privacy.resolved_epsilon() if privacy else None,  # None: no DP (JSON has no infinity)
        "noise_multiplier": privacy.resolved_noise_multiplier() if privacy else 0.0,
        "image_auroc": float(np.mean([m["image_auroc"] for m in metrics.values()])),
        "auc_spro_0.05": float(np.mean([m["auc_spro"]["0.05"] for m in metrics.values()])),
        **attacks,
        "mb_sent": sent_bytes / 1e6, "bank": int(sum(len(b) for b in banks.values())),
        "time_s": time.perf_counter() - start,
        "categories": metrics,
    }
    if privacy:
        row["privacy"] = privacy.report()
    return row


