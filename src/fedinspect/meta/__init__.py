"""Meta-learned few-shot defect classification (seed 002, MeDetection).

A Siamese network keeps the absolute difference of a good reference's and a test image's features
(:class:`MeDetectionNet`), coordinate attention reweights it, MAML (:mod:`fedinspect.meta.maml`,
written with ``torch.func``) learns an initialisation across product tasks, :func:`fine_tune` adapts it to
a new product and :func:`grad_cam` shows where the "defective" answer comes from. Product tasks, their
70/30 split, episodes and a left-out target's sets come from :mod:`fedinspect.meta.tasks`, as
:class:`PairBatch` pairs of a good reference and an image under test.
"""

from fedinspect.meta.gradcam import grad_cam
from fedinspect.meta.maml import FineTuneResult, MetaTrainResult, adapt, fine_tune, meta_loss, meta_train, pair_loss
from fedinspect.meta.model import ATTENTIONS, BACKBONES, CoordinateAttention, MeDetectionNet, count_parameters
from fedinspect.meta.pairs import PairBatch, make_pairs
from fedinspect.meta.tasks import (
    DEFAULT_REFERENCE,
    Episode,
    MetaTask,
    TargetSplit,
    TaskImages,
    TaskSplit,
    leave_one_out,
    load_task,
    load_tasks,
    sample_episode,
    split_task,
    target_split,
    task_from_category,
    task_from_folder,
    tasks_from_dirs,
    tasks_from_file,
)

__all__ = [
    "ATTENTIONS",
    "BACKBONES",
    "DEFAULT_REFERENCE",
    "CoordinateAttention",
    "Episode",
    "FineTuneResult",
    "MeDetectionNet",
    "MetaTask",
    "MetaTrainResult",
    "PairBatch",
    "TargetSplit",
    "TaskImages",
    "TaskSplit",
    "adapt",
    "count_parameters",
    "fine_tune",
    "grad_cam",
    "leave_one_out",
    "load_task",
    "load_tasks",
    "make_pairs",
    "meta_loss",
    "meta_train",
    "pair_loss",
    "sample_episode",
    "split_task",
    "target_split",
    "task_from_category",
    "task_from_folder",
    "tasks_from_dirs",
    "tasks_from_file",
]
