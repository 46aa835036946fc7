"""Federated defect classification: the run's config, the models' inputs, and the two ways to run it.

:func:`run_classification` (in this process) and :func:`run_flower_simulation` (on Flower) drive a
:class:`~fedinspect.classification.task.ClassificationTask` with the shared round engine
(:mod:`fedinspect.federation.rounds`), so both give the same numbers for the same config and seed.

Inputs: images resized to ``image_size`` and obfuscated with the federation's key. For a transfer
model with a frozen backbone (the default) the backbone is a fixed public function, so each client
turns its images into pooled backbone features once and the rounds only train the head; the
features are cached per (image, obfuscation, backbone) in an :class:`InputCache`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fedinspect.classification.data import (
    PARTITIONS,
    LabelledView,
    Split,
    image_tensor,
    label_tensor,
    labelled_view,
    split_view,
)
from fedinspect.classification.models import (
    MODELS,
    TRANSFER_MODELS,
    ClassifierHead,
    PooledBackbone,
    SmallCNN,
    TransferClassifier,
    load_backbone,
)
from fedinspect.classification.training import TrainSettings
from fedinspect.errors import DataError
from fedinspect.privacy.obfuscation import Obfuscation, parse_methods


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything that defines a classification run (``obfuscation_key`` is a secret, never written)."""

    model: str = "cnn"
    clients: int = 3
    rounds: int = 5
    partition: str = "iid"
    alpha: float = 0.5
    image_size: int = 96
    obfuscate: tuple[str, ...] = ()
    obfuscation_key: int = 0
    fine_tune: bool = False
    weights: str | None = None
    test_fraction: float = 0.2
    seed: int = 0
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "obfuscate", parse_methods(self.obfuscate))
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {list(MODELS)}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"unknown partition {self.partition!r}; choose from {list(PARTITIONS)}")
        if self.clients < 1 or self.rounds < 1:
            raise ValueError(f"clients and rounds must be >= 1, got {self.clients} and {self.rounds}")
        if self.image_size < 16:
            raise ValueError(f"image size must be >= 16 px, got {self.image_size}")

    @property
    def obfuscation(self) -> Obfuscation:
        return Obfuscation(self.obfuscate, key=self.obfuscation_key)

    @property
    def frozen_backbone(self) -> bool:
        return self.model in TRANSFER_MODELS and not self.fine_tune

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        del values["obfuscation_key"]
        values["obfuscate"] = list(self.obfuscate)
        values["train"] = self.train.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], obfuscation_key: int = 0) -> ClassifyConfig:
        values = dict(values)
        values["train"] = TrainSettings(**values.get("train", {}))
        values["obfuscate"] = tuple(values.get("obfuscate", ()))
        return cls(**values, obfuscation_key=obfuscation_key)


def client_id(index: int) -> str:
    return f"client_{index}"


def client_seed(seed: int, round_number: int, client_index: int) -> int:
    """The seed of one client's local training in one round."""
    return int(np.random.SeedSequence([seed, round_number, client_index]).generate_state(1)[0])


# ---------------------------------------------------------------- inputs
class InputCache:
    """Resized images and backbone features kept across runs of one process (an experiment, a Flower actor)."""

    def __init__(self) -> None:
        self.images: dict[tuple[Path, int], np.ndarray] = {}
        self.backbones: dict[tuple[str, str | None], PooledBackbone] = {}
        self.features: dict[tuple, torch.Tensor] = {}

    def backbone(self, model: str, weights: str | None) -> PooledBackbone:
        key = (model, weights)
        if key not in self.backbones:
            self.backbones[key] = load_backbone(model, weights).freeze()
        return self.backbones[key]


@torch.no_grad()
def pooled_features(backbone: PooledBackbone, images: torch.Tensor, batch_size: int = 32,
                    progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Pooled backbone features (N, D) of float images (N, 3, S, S)."""
    parts = [backbone(images[i:i + batch_size]) for i in
             tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False)]
    return torch.cat(parts) if parts else torch.empty(0, backbone.out_features)


def model_inputs(view: LabelledView, config: ClassifyConfig, cache: InputCache, *, progress: bool = False,
                 desc: str = "images") -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a view for this config: obfuscated images, or their pooled features (frozen backbone)."""
    obfuscation = config.obfuscation
    if not config.frozen_backbone:
        return image_tensor(view, config.image_size, obfuscation, cache=cache.images, progress=progress,
                            desc=desc), label_tensor(view)
    key = (config.model, config.weights, config.image_size, obfuscation.name, config.obfuscation_key,
           tuple(item.path for item in view.items))
    if key not in cache.features:
        images = image_tensor(view, config.image_size, obfuscation, cache=cache.images, progress=progress,
                              desc=desc)
        backbone = cache.backbone(config.model, config.weights)
        cache.features[key] = pooled_features(backbone, images, progress=progress, desc=f"{desc} features")
    return cache.features[key], label_tensor(view)


def build_model(config: ClassifyConfig, n_classes: int, cache: InputCache) -> nn.Module:
    """The trainable (and federated) model: the CNN, the head alone (frozen backbone), or the whole
    transfer model (``fine_tune``; BatchNorm replaced by GroupNorm via Opacus's ModuleValidator under DP)."""
    if config.model == "cnn":
        return SmallCNN(n_classes, config.image_size)
    backbone = cache.backbone(config.model, config.weights)
    if config.frozen_backbone:
        return ClassifierHead(backbone.out_features, n_classes)
    model: nn.Module = TransferClassifier(copy.deepcopy(backbone), n_classes)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if config.train.dp:
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    return model


# ---------------------------------------------------------------- runs
def prepare_split(data_dir: str | Path, config: ClassifyConfig) -> Split:
    view = labelled_view(data_dir)
    try:
        return split_view(view, config.clients, config.partition, config.seed, config.alpha, config.test_fraction)
    except ValueError as error:
        raise DataError(view.root, f"cannot split {len(view.items)} images into {config.clients} clients: {error}"
                        ) from error


def run_classification(data_dir: str | Path, out_dir: str | Path, config: ClassifyConfig | None = None,
                       progress: bool = True, cache: InputCache | None = None, write_report: bool = True,
                       on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Federated training of ``config.rounds`` FedAvg rounds in this process; returns results.json's dict.

    The shared round engine (:func:`fedinspect.federation.rounds.run_rounds`) drives a
    :class:`~fedinspect.classification.task.ClassificationTask`; ``on_round`` gets each round's record.
    """
    from fedinspect.classification.task import ClassificationTask
    from fedinspect.federation.rounds import run_rounds

    task = ClassificationTask(config or ClassifyConfig(), data_dir, cache=cache, write_report=write_report,
                              progress=progress)
    task.prepare()
    outcome = run_rounds(task, progress=progress, on_round=on_round)
    return task.conclude(outcome, out_dir, engine="in-process")


def run_flower_simulation(data_dir: str | Path, out_dir: str | Path, config: ClassifyConfig | None = None,
                          progress: bool = True, *, client_app: Any = None, round_timeout: float = 3600.0,
                          client_threads: int | None = None) -> dict[str, Any]:
    """The same run on Flower's Simulation Engine, one virtual SuperNode per client; returns results.json's dict.

    :func:`fedinspect.federation.rounds_flower.run_simulation` drives the task; each ClientApp rebuilds it
    from its spec and computes only its own client's inputs.
    """
    from fedinspect.classification.task import ClassificationTask
    from fedinspect.federation.rounds_flower import run_simulation

    task = ClassificationTask(config or ClassifyConfig(), data_dir, progress=progress)
    task.test_inputs()  # the server's part of the preparation, before the clients start
    return run_simulation(task, out_dir, progress, client_app=client_app, round_timeout=round_timeout,
                          client_threads=client_threads)


def with_noise(config: ClassifyConfig, noise_multiplier: float | None) -> ClassifyConfig:
    """The same config with another DP noise multiplier (``None``: no DP-SGD)."""
    return replace(config, train=replace(config.train, noise_multiplier=noise_multiplier))
