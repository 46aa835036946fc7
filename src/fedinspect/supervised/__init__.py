"""The supervised detector (seed 003): a binary classifier on a pretrained backbone, with class-activation maps.

Names are imported on first use (no torch at ``import fedinspect.supervised``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {"SupervisedDetector": "detector", "SupervisedNet": "model", "BACKBONES": "model",
          "detection_scores": "scores"}
__all__ = ["BACKBONES", "SupervisedDetector", "SupervisedNet", "detection_scores"]

if TYPE_CHECKING:
    from fedinspect.supervised.detector import SupervisedDetector
    from fedinspect.supervised.model import BACKBONES, SupervisedNet
    from fedinspect.supervised.scores import detection_scores


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
