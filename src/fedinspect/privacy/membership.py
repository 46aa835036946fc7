"""Membership inference against a memory bank: was this image used to build it?

A bank holds real (or noisy) patch embeddings of its training images, so a training image tends
to have a patch very close to some bank entry. The attack scores every candidate image by minus
its smallest patch-to-bank distance and reports the AUC of telling training images (members)
from held-out good images of the same kind (non-members): 0.5 is chance, 1.0 total leakage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedinspect.detectors.nearest_neighbours import NearestNeighbours
from fedinspect.evaluation.metrics import image_auroc


def membership_scores(bank: np.ndarray, images: Sequence[np.ndarray]) -> np.ndarray:
    """Per image: minus the smallest distance from any of its patch embeddings (n_i, D) to the bank."""
    index = NearestNeighbours(bank, method="exact")  # an attack measured at full strength, no search misses
    return np.array([-float(index.search(rows, 1)[0].min()) for rows in images])


def membership_auc(bank: np.ndarray, members: Sequence[np.ndarray], non_members: Sequence[np.ndarray]) -> float:
    """AUC of the attack (members positive); needs at least one image on each side."""
    if not members or not non_members:
        raise ValueError("membership inference needs at least one member and one non-member image")
    scores = membership_scores(bank, [*members, *non_members])
    labels = np.r_[np.ones(len(members), int), np.zeros(len(non_members), int)]
    return float(image_auroc(labels, scores))


def score_membership_auc(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> float:
    """AUC of the black-box attack on any detector: a training image (member) tends to look *less* anomalous
    to the model than an unseen good image, so the attack ranks images by minus their anomaly score.

    Needs only the released model's image scores (e.g. a federated PaDiM or autoencoder, whatever its
    update was); 0.5 is chance, 1.0 total leakage.
    """
    if len(member_scores) == 0 or len(non_member_scores) == 0:
        raise ValueError("membership inference needs at least one member and one non-member image")
    labels = np.r_[np.ones(len(member_scores), int), np.zeros(len(non_member_scores), int)]
    scores = -np.r_[np.asarray(member_scores, dtype=np.float64), np.asarray(non_member_scores, dtype=np.float64)]
    return float(image_auroc(labels, scores))
