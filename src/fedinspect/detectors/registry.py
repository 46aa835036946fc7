"""The one-class detectors by name, the protocol they share, and loading a saved one by its format.

Importing this module is cheap (no torch): a detector's module is imported when its class is first
asked for, so the command line can list names and descriptions without loading a backbone.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedinspect.detectors.model_files import read_json
from fedinspect.errors import ModelFileError, SettingsError


class Detector(Protocol):
    """What the pipeline needs of a detector: fit on good images, score test images, save and load."""

    progress: bool

    def fit(self, images: Iterable[np.ndarray], total: int | None = None) -> Detector: ...

    def predict(self, images: Iterable[np.ndarray],
                total: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]: ...

    def save(self, directory: str | Path) -> Path: ...

    def get_params(self) -> dict[str, Any]: ...


# name -> (module, class, settings file, model format, one-line description)
_ENTRIES: dict[str, tuple[str, str, str, str, str]] = {
    "patchcore": ("fedinspect.detectors.patchcore", "PatchCore", "patchcore.json", "fedinspect.patchcore/1",
                  "memory bank of patch features, nearest-neighbour distance (Roth et al., CVPR 2022)"),
    "padim": ("fedinspect.detectors.padim", "Padim", "padim.json", "fedinspect.padim/1",
              "one Gaussian per patch position, Mahalanobis distance (Defard et al., ICPR 2021)"),
    "ae_mse": ("fedinspect.detectors.autoencoder", "AutoencoderMSE", "ae_mse.json", "fedinspect.ae_mse/1",
               "convolutional autoencoder, squared reconstruction error (Bergmann et al., VISAPP 2019)"),
    "ae_ssim": ("fedinspect.detectors.autoencoder", "AutoencoderSSIM", "ae_ssim.json", "fedinspect.ae_ssim/1",
                "convolutional autoencoder, SSIM reconstruction error (Bergmann et al., VISAPP 2019)"),
    "stfpm": ("fedinspect.detectors.stfpm", "Stfpm", "stfpm.json", "fedinspect.stfpm/1",
              "student-teacher feature pyramid matching (Wang et al., BMVC 2021)"),
    "reverse_distillation": ("fedinspect.detectors.reverse_distillation", "ReverseDistillation",
                             "reverse_distillation.json", "fedinspect.reverse_distillation/1",
                             "teacher encoder, one-class bottleneck, student decoder (Deng & Li, CVPR 2022)"),
    "draem": ("fedinspect.detectors.draem", "Draem", "draem.json", "fedinspect.draem/1",
              "reconstructive + discriminative networks on simulated anomalies (Zavrtanik et al., ICCV 2021)"),
    "cflow": ("fedinspect.detectors.cflow", "Cflow", "cflow.json", "fedinspect.cflow/1",
              "conditional normalizing flows on multi-scale features (Gudovskiy et al., WACV 2022)"),
}

TRAINED = ("ae_mse", "ae_ssim", "stfpm", "reverse_distillation", "draem", "cflow")
"""Detectors trained by gradient descent (:class:`~fedinspect.detectors.trained_detector.TrainedDetector`)."""

WITH_RUNTIME = ("patchcore", "padim", "stfpm", "reverse_distillation", "cflow")
"""Detectors with a frozen pretrained backbone and a ``runtime`` parameter choosing what runs it
(:data:`fedinspect.backbones.RUNTIMES`): PatchCore's and PaDiM's backbone, STFPM's and reverse
distillation's teacher, CFLOW's encoder. A test checks it against the constructors."""

DESCRIPTIONS: dict[str, str] = {name: entry[4] for name, entry in _ENTRIES.items()}
SETTINGS_FILES: tuple[str, ...] = tuple(entry[2] for entry in _ENTRIES.values())


class _Classes(Mapping[str, type]):
    """name -> detector class, importing the class's module on first use."""

    def __getitem__(self, name: str) -> type:
        module, cls = _ENTRIES[name][:2]
        return getattr(importlib.import_module(module), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(_ENTRIES)

    def __len__(self) -> int:
        return len(_ENTRIES)


DETECTORS: Mapping[str, type] = _Classes()


def get_detector(name: str, **params: Any) -> Detector:
    """A new detector ``name`` with these constructor parameters (SettingsError for an unknown name)."""
    if name not in _ENTRIES:
        raise SettingsError(f"unknown detector {name!r}: choose from {', '.join(_ENTRIES)}")
    return DETECTORS[name](**params)


def detector_parameters(name: str) -> dict[str, Any]:
    """Constructor parameters of detector ``name`` and their defaults (imports its module)."""
    import inspect

    signature = inspect.signature(DETECTORS[name].__init__)
    return {key: p.default for key, p in signature.parameters.items() if key not in ("self", "progress")}


def detector_name(model: Detector) -> str:
    """The registry name of a detector instance."""
    for name, (module, cls) in ((n, e[:2]) for n, e in _ENTRIES.items()):
        if type(model).__module__ == module and type(model).__name__ == cls:
            return name
    raise KeyError(f"{type(model).__name__} is not a registered detector")


def load_detector(directory: str | Path, weights: str | Path | None = None, progress: bool = False,
                  runtime: str | None = None) -> Detector:
    """Load a saved model of any registered detector, chosen by the ``format`` of its settings file.

    Exactly one detector settings file must be in ``directory``; an unknown format is a ModelFileError
    naming the file (the detector's own ``load`` then checks everything else). ``runtime`` replaces the
    backbone runtime of a detector that has one (:data:`WITH_RUNTIME`); for another it is a SettingsError.
    """
    directory = Path(directory)
    found = [directory / entry[2] for entry in _ENTRIES.values() if (directory / entry[2]).is_file()]
    if not found:
        expected = " or ".join(entry[2] for entry in _ENTRIES.values())
        raise ModelFileError(f"{directory}: no detector settings file ({expected}): is it a model folder "
                             "written by 'fedinspect fit'?")
    if len(found) > 1:
        raise ModelFileError(f"{directory}: holds several detectors' settings ({', '.join(p.name for p in found)}): "
                             "one model per folder")
    path = found[0]
    config = read_json(path)
    fmt = config.get("format") if isinstance(config, dict) else None
    for name, entry in _ENTRIES.items():
        if entry[3] == fmt:
            if runtime is None:
                return DETECTORS[name].load(directory, progress=progress, weights=weights)
            if name not in WITH_RUNTIME:
                raise SettingsError(f"{directory}: a {name} model has no frozen backbone runtime to choose "
                                    f"(those that do: {', '.join(WITH_RUNTIME)})")
            return DETECTORS[name].load(directory, progress=progress, weights=weights, runtime=runtime)
    known = ", ".join(entry[3] for entry in _ENTRIES.values())
    raise ModelFileError(f"{path}: unknown model format {fmt!r} (this fedinspect reads {known})")


def set_device(model: Detector, device: str) -> Detector:
    """Train and score ``model`` on ``device`` (``"auto"``, ``"cpu"`` or ``"cuda"``; see
    :func:`~fedinspect.detectors.trained_detector.resolve_device`). Only the trained detectors have a device:
    PatchCore and PaDiM run their frozen backbone with their ``runtime`` (on the CPU), so anything but
    ``"auto"`` is refused for them."""
    from fedinspect.detectors.trained_detector import TrainedDetector, resolve_device

    if isinstance(model, TrainedDetector):
        resolve_device(device)  # checked now, before any work
        model.device = device
    elif device != "auto":
        raise SettingsError(f"device {device!r}: {detector_name(model)} has no device to choose (its frozen "
                            "backbone runs with its runtime, on the CPU); only the trained detectors do")
    return model
