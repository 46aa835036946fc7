"""The seed's detection metrics from image scores: average precision, precision, recall, F1, image AUROC.

Average precision is scikit-learn's (step-wise, no interpolation), threshold-free like the AUROC; precision,
recall and F1 count an image as defective when its score exceeds ``threshold`` (0.5 for the supervised
detector's probabilities, as the seed's classifier decides).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def detection_scores(labels: Sequence[int], scores: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """AP, precision, recall, F1 (at ``score > threshold``) and image AUROC of defective (1) against good (0)."""
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

    from fedinspect.evaluation.metrics import image_auroc

    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    auroc = image_auroc(y, s)  # checks lengths, binary labels, both classes, finite scores
    predicted = (s > threshold).astype(np.int64)
    return {
        "ap": float(average_precision_score(y, s)),
        "precision": float(precision_score(y, predicted, zero_division=0)),
        "recall": float(recall_score(y, predicted, zero_division=0)),
        "f1": float(f1_score(y, predicted, zero_division=0)),
        "auroc": auroc,
        "threshold": float(threshold),
        "n_defective": int(y.sum()),
        "n_good": int(len(y) - y.sum()),
    }
