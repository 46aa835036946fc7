"""Measure leakage of a federated round: the glue between a round's objects and the attacks of ``privacy``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedinspect.data.dataset import CategoryDataset, find_categories
from fedinspect.data.images import read_image
from fedinspect.detectors.patchcore import EmbeddedImage, PatchCore
from fedinspect.federation.client import EmbeddingCache, RoundSettings
from fedinspect.federation.server import SHARED
from fedinspect.federation.update import ClientUpdate
from fedinspect.privacy.inversion import InversionAttack, patch_pairs
from fedinspect.privacy.leakage import ClientData, InversionResult, inversion_leakage, membership_leakage

if TYPE_CHECKING:
    from fedinspect.federation.runner import RoundPlan


def train_attacker(detector: PatchCore, aux_dir: Path, count: int = 40, patch_size: int = 16,
                   seed: int = 0) -> InversionAttack:
    """The inversion decoder, trained on ``count`` training images of the attacker's own dataset."""
    paths = sorted(p.image_path for d in find_categories(aux_dir) for p in CategoryDataset(d).train)
    if not paths:
        raise FileNotFoundError(f"{aux_dir}: the attacker's data holds no training image")
    chosen = [paths[i] for i in np.sort(np.random.default_rng(seed).choice(len(paths), min(count, len(paths)),
                                                                           replace=False))]
    return InversionAttack(seed=seed).fit(patch_pairs(detector, (read_image(p) for p in chosen), patch_size,
                                                      per_image=256, seed=seed))


def measure_attacks(plan: RoundPlan, updates: Sequence[ClientUpdate], banks: dict[str, np.ndarray],
                    detector: PatchCore, cache: EmbeddingCache, held_out: dict[str, list[np.ndarray]],
                    attack: InversionAttack, settings: RoundSettings, patch_size: int = 16) -> dict[str, float | None]:
    """The ``attacks`` block: inversion of every client's update, membership inference on the global banks.

    ``held_out``: per category, embeddings of good images no client trained on (the non-members).
    Client embeddings are taken from ``cache`` or computed from the client's images.
    """
    inversions: list[InversionResult] = []
    aucs: list[float] = []
    for index, update in enumerate(updates):
        images = plan.client_images(index)
        for name, part in update.categories.items():
            paths = images[name]
            originals = [read_image(p) for p in paths]
            for path, image in zip(paths, originals, strict=True):
                if path not in cache:
                    cache[path] = detector.embed([settings.load(image)])
            client = ClientData(originals, [cache[p] for p in paths])
            if len(part.embeddings):
                inversions.append(inversion_leakage(attack, detector, part.embeddings, client, patch_size,
                                                    max_rows=200, seed=index))
            if held_out.get(name):
                aucs.append(membership_leakage(banks.get(name, banks.get(SHARED)), client.embeddings, held_out[name],
                                               seed=index))
    def mean(values: list[float]) -> float | None:  # None: nothing to attack (standard JSON has no NaN)
        return float(np.mean(values)) if values else None

    return {
        "inversion_psnr": mean([r.psnr for r in inversions]), "inversion_ssim": mean([r.ssim for r in inversions]),
        "chance_psnr": mean([r.chance_psnr for r in inversions]),
        "chance_ssim": mean([r.chance_ssim for r in inversions]),
        "aggregate_psnr": mean([r.aggregate_psnr for r in inversions]),
        "aggregate_ssim": mean([r.aggregate_ssim for r in inversions]), "membership_auc": mean(aucs),
    }


def valid_rows(detector: PatchCore, embedded: EmbeddedImage) -> np.ndarray:
    """The embeddings of an image's grid cells that cover the image (padding left out), (cells, D)."""
    cells_h, cells_w = detector._valid_cells(embedded.image_shape)
    return embedded.grid[:cells_h, :cells_w].reshape(-1, embedded.grid.shape[-1])
