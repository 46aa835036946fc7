"""Measure what a client's update leaks, with the attacks of :mod:`inversion` and :mod:`membership`.

The evaluator plays both sides: it holds the client's true images (to score reconstructions) and
the attacker's decoder. Nothing here runs in a real client or server; it is measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedinspect.detectors.nearest_neighbours import NearestNeighbours
from fedinspect.detectors.patchcore import PatchCore
from fedinspect.privacy.inversion import InversionAttack, cell_patches, similarity
from fedinspect.privacy.membership import membership_auc


@dataclass
class InversionResult:
    """Mean PSNR (dB) and SSIM of the reconstructions, and of two references that reveal no single image.

    ``chance``: the attacker's own mean embedding decoded for every row (knowing the kind of product).
    ``aggregate``: the mean of the client's embeddings decoded for every row (the product's average
    appearance, which differential privacy does not hide: it protects individual images, not
    population statistics). Leakage of individual patches is the margin above ``aggregate``.
    """

    psnr: float
    ssim: float
    chance_psnr: float
    chance_ssim: float
    aggregate_psnr: float
    aggregate_ssim: float


@dataclass
class ClientData:
    """One client's images of one category: the originals and the embeddings its detector computed."""

    originals: Sequence[np.ndarray]
    embeddings: Sequence[np.ndarray]  # per image, (cells, D), from the (possibly obfuscated) images


def inversion_leakage(attack: InversionAttack, detector: PatchCore, sent: np.ndarray, client: ClientData,
                      patch_size: int = 16, max_rows: int = 400, seed: int = 0) -> InversionResult:
    """Mean PSNR and SSIM of the decoder's reconstructions of ``sent`` rows against true patches.

    Each sent row is matched to the client's own embedding nearest to it (itself, when sent in
    clear); the truth is the original, un-obfuscated image patch of that embedding's grid cell.
    At most ``max_rows`` rows (drawn with ``seed``) are scored.
    """
    sent = np.asarray(sent, np.float32)
    if not len(sent):
        raise ValueError("nothing was sent: no row to invert")
    if len(sent) > max_rows:
        sent = sent[np.sort(np.random.default_rng(seed).choice(len(sent), max_rows, replace=False))]
    owner = np.concatenate([np.full(len(rows), i) for i, rows in enumerate(client.embeddings)])
    cell = np.concatenate([np.arange(len(rows)) for rows in client.embeddings])
    _, nearest = NearestNeighbours(np.concatenate(client.embeddings), method="exact").search(sent, 1)
    nearest = nearest[:, 0]
    truth = np.empty((len(sent), patch_size, patch_size, 3), np.float32)
    for image in np.unique(owner[nearest]):
        rows = np.flatnonzero(owner[nearest] == image)
        truth[rows] = cell_patches(detector, client.originals[image], patch_size)[cell[nearest[rows]]]
    chance = attack.reconstruct(np.repeat(attack.mean_.numpy()[None], len(sent), axis=0))
    average = np.concatenate(client.embeddings).mean(axis=0, keepdims=True)
    aggregate = attack.reconstruct(np.repeat(average, len(sent), axis=0))
    return InversionResult(*similarity(attack.reconstruct(sent), truth), *similarity(chance, truth),
                           *similarity(aggregate, truth))


def membership_leakage(bank: np.ndarray, members: Sequence[np.ndarray], non_members: Sequence[np.ndarray],
                       max_images: int = 50, seed: int = 0) -> float:
    """Membership AUC on at most ``max_images`` members and non-members each (drawn with ``seed``)."""
    rng = np.random.default_rng(seed)

    def draw(items: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(items) <= max_images:
            return list(items)
        return [items[i] for i in np.sort(rng.choice(len(items), max_images, replace=False))]

    return membership_auc(bank, draw(members), draw(non_members))
