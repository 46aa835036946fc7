"""Meta-learned few-shot defect classification (seed 002, MeDetection).

A Siamese network keeps the absolute difference of a good reference's and a test image's features
(:class:`MeDetectionNet`), coordinate attention reweights it, MAML (:mod:`fedinspect.meta.maml`,
written with ``torch.func``) learns an initialisation across product tasks, :func:`fine_tune` adapts it to
a new product and :func:`grad_cam` shows where the "defective" answer comes from.
"""

from fedinspect.meta.gradcam import grad_cam
from fedinspect.meta.maml import FineTuneResult, MetaTrainResult, adapt, fine_tune, meta_loss, meta_train, pair_loss
from fedinspect.meta.model import ATTENTIONS, BACKBONES, CoordinateAttention, MeDetectionNet, count_parameters

__all__ = [
    "ATTENTIONS",
    "BACKBONES",
    "CoordinateAttention",
    "FineTuneResult",
    "MeDetectionNet",
    "MetaTrainResult",
    "adapt",
    "count_parameters",
    "fine_tune",
    "grad_cam",
    "meta_loss",
    "meta_train",
    "pair_loss",
]
