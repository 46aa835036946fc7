"""Meta-learned few-shot defect classification (seed 002, MeDetection).

A Siamese network keeps the absolute difference of a good reference's and a test image's features
(:class:`MeDetectionNet`), coordinate attention reweights it, MAML (:mod:`fedinspect.meta.maml`,
written with ``torch.func``) learns an initialisation across product tasks, :func:`fine_tune` adapts it to
a new product and :func:`grad_cam` shows where the "defective" answer comes from. Product tasks, their
70/30 split, episodes and a left-out target's sets come from :mod:`fedinspect.meta.tasks`, as
:class:`PairBatch` pairs of a good reference and an image under test.

:func:`run_meta_study` (:mod:`fedinspect.meta.study`) runs the seed's experiments as one resumable study.
The names are imported on first use, so that the command line (which imports :mod:`fedinspect.meta.commands`
to build its parser) does not pay for torch at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "grad_cam": "gradcam",
    "FineTuneResult": "maml",
    "MetaTrainResult": "maml",
    "adapt": "maml",
    "fine_tune": "maml",
    "meta_loss": "maml",
    "meta_train": "maml",
    "pair_loss": "maml",
    "ATTENTIONS": "model",
    "BACKBONES": "model",
    "CoordinateAttention": "model",
    "MeDetectionNet": "model",
    "count_parameters": "model",
    "PairBatch": "pairs",
    "make_pairs": "pairs",
    "DEFAULT_REFERENCE": "tasks",
    "Episode": "tasks",
    "MetaTask": "tasks",
    "TargetSplit": "tasks",
    "TaskImages": "tasks",
    "TaskSplit": "tasks",
    "leave_one_out": "tasks",
    "load_task": "tasks",
    "load_tasks": "tasks",
    "sample_episode": "tasks",
    "split_task": "tasks",
    "target_split": "tasks",
    "task_from_category": "tasks",
    "task_from_folder": "tasks",
    "tasks_from_dirs": "tasks",
    "tasks_from_file": "tasks",
    "MetaStudySettings": "study",
    "run_meta_study": "study",
}
__all__ = [
    "ATTENTIONS",
    "BACKBONES",
    "DEFAULT_REFERENCE",
    "CoordinateAttention",
    "Episode",
    "FineTuneResult",
    "MeDetectionNet",
    "MetaStudySettings",
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
    "run_meta_study",
    "sample_episode",
    "split_task",
    "target_split",
    "task_from_category",
    "task_from_folder",
    "tasks_from_dirs",
    "tasks_from_file",
]

if TYPE_CHECKING:
    from fedinspect.meta.gradcam import (
        grad_cam,
    )
    from fedinspect.meta.maml import (
        FineTuneResult,
        MetaTrainResult,
        adapt,
        fine_tune,
        meta_loss,
        meta_train,
        pair_loss,
    )
    from fedinspect.meta.model import (
        ATTENTIONS,
        BACKBONES,
        CoordinateAttention,
        MeDetectionNet,
        count_parameters,
    )
    from fedinspect.meta.pairs import (
        PairBatch,
        make_pairs,
    )
    from fedinspect.meta.study import (
        MetaStudySettings,
        run_meta_study,
    )
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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
