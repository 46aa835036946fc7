"""Federated defect classification: the run's config, the models' inputs, and the two ways to run it.

:func:`run_classification` (in this process) and :func:`run_flower_simulation` (on Flower) drive a
:class:`~fedinspect.classification.task.ClassificationTask` with the shared round engine
(:mod:`fedinspect.federation.rounds`), so both give the same numbers for the same config and seed.

Inputs: images resized to ``image_size`` and obfuscated with the federation's key. For a transfer
model with a frozen backbone (the default) the backbone is a fixed public function, so each client
turns its images into pooled backbone features once and the rounds only train the head; the
features are cached per (image, obfuscation, backbone) in an :class:`InputCache`.

Feature transforms of the frozen backbone (:mod:`fedinspect.classification.features`, all per image):
``views`` averages the features of each image's dihedral views, ``project`` maps them to that many
dimensions with a fixed random orthogonal matrix and scales them to unit norm. The ``centered`` head
(the DP recipe's) adds a first round in which each client sends its DP feature mean
(:func:`planned_history`, :func:`center_noise`).

``dp_epsilon`` asks for the noise multiplier that spends that epsilon over the whole training
(:func:`noise_for_epsilon`: a bisection with the same accountant over the history each client will have,
the DP mean included); :func:`resolve_epsilon` fills it in once the client shares are known.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedinspect.classification.data import (
    PARTITIONS,
    RESIZES,
    LabelledView,
    Split,
    image_tensor,
    label_tensor,
    labelled_view,
    split_view,
)
from fedinspect.classification.features import (
    VIEW_COUNTS,
    pooled_features,
    random_projection,
    to_sphere,
    view_averaged_features,
)
from fedinspect.classification.models import (
    HEADS,
    MODELS,
    POOLINGS,
    TRANSFER_MODELS,
    PooledBackbone,
    SmallCNN,
    TransferClassifier,
    load_backbone,
    make_head,
)
from fedinspect.classification.training import TrainSettings
from fedinspect.errors import DataError
from fedinspect.privacy.dp_sgd import smallest_noise
from fedinspect.privacy.obfuscation import Obfuscation, parse_methods


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything that defines a classification run (``obfuscation_key`` is a secret, never written).

    Transfer models: ``resize`` (squash / letterbox), ``pooling`` of the backbone's last map (avg /
    avgmax / blocks), ``head`` (mlp / linear / centered), ``flip_augment`` (the training images' horizontal
    mirrors are added as more training samples; without DP only, as DP-SGD's unit is one image). With a
    frozen backbone: ``views`` (1, 2, 4 or 8 dihedral views averaged per image), ``project`` (0: none; else
    a seeded random orthogonal projection to that many dimensions, then unit norm). The ``centered`` head
    needs ``project`` and spends ``center_share`` of the privacy budget on the DP feature mean of its first
    round. ``dp_epsilon``: the epsilon to spend over all rounds (the noise multiplier is derived by
    :func:`resolve_epsilon`). ``rounds`` counts the training rounds; the centered head's mean round is
    one more. ``validation``: for tuning, the test split is set aside unread and the run is trained on 80 % of
    the training images and evaluated on the other 20 % (stratified, seeded), :func:`prepare_split`.
    ``split_seed`` (default: ``seed``) seeds the train/test split alone, so that runs of several seeds
    (validation splits, initialisations, noise) share one test split. ``train_fraction``: for learning curves,
    the clients are dealt only this stratified fraction of the training images (seeded by ``seed``); the test
    split does not change.
    """

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
    resize: str = "squash"
    pooling: str = "avg"
    head: str = "mlp"
    flip_augment: bool = False
    views: int = 1
    project: int = 0
    center_share: float = 0.05
    validation: bool = False
    split_seed: int | None = None
    train_fraction: float = 1.0
    dp_epsilon: float | None = None
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
        for name, value, choices in (("resize", self.resize, RESIZES), ("pooling", self.pooling, POOLINGS),
                                     ("head", self.head, HEADS)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose from {list(choices)}")
        if self.pooling == "blocks" and self.model in ("resnet50", "mobilenet_v2"):
            raise ValueError(f"pooling 'blocks' needs an EfficientNet-Lite model (mobile, large), not {self.model}: "
                             f"use pooling avg or avgmax (--pooling)")
        if self.dp_epsilon is not None and not (0 < self.dp_epsilon < math.inf):
            raise ValueError(f"dp_epsilon must be a positive finite number, got {self.dp_epsilon}")
        if self.flip_augment and self.dp:
            raise ValueError("flip_augment makes each training image two samples, which DP-SGD's per-image "
                             "accounting does not cover: use it without DP")
        if self.views not in VIEW_COUNTS:
            raise ValueError(f"views must be one of {list(VIEW_COUNTS)}, got {self.views!r}")
        if isinstance(self.project, bool) or not isinstance(self.project, int) or self.project < 0:
            raise ValueError(f"project must be a whole number >= 0 (0: no projection), got {self.project!r}")
        if (self.views > 1 or self.project or self.head == "centered") and not self.frozen_backbone:
            raise ValueError(f"views, project and the centered head transform a frozen backbone's features: not "
                             f"for model {self.model}{' with fine_tune' if self.fine_tune else ''}")
        if self.views > 1 and self.flip_augment:
            raise ValueError("flip_augment adds nothing to features averaged over the image's views (a mirror has "
                             "the same views): use one of them")
        if self.head == "centered" and not self.project:
            raise ValueError("the centered head needs unit-norm features (their DP mean has sensitivity 1): set "
                             "project, e.g. 256")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if not 0 < self.center_share < 1:
            raise ValueError(f"center_share must be in (0, 1), got {self.center_share}")

    @property
    def dp(self) -> bool:
        """DP-SGD is on: a noise multiplier, or a target epsilon (to be resolved into one)."""
        return self.train.dp or self.dp_epsilon is not None

    @property
    def centered(self) -> bool:
        """The head is centred on the federation's feature mean, released by the clients in a first round."""
        return self.head == "centered"

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


# The best measured recipes on the magnetic tiles (benchmarks/bench_classification.py; the README's
# classification section): EfficientNet-Lite0 frozen at 224 px (squashed).
# Without DP: the averages of its last stride-16 and stride-32 blocks (432 features), each feature vector
# standardized, the seed's dense-128 head, 5 FedAvg rounds of 20 local epochs of Adam (lr 3e-3), batches of 32.
# With DP: the average and maximum of the last map (2560 features) averaged over the image's 8 dihedral views,
# projected to 512 dimensions and unit norm; a first round in which the clients send their DP feature means
# (5 % of the budget); then a zero-initialised linear head trained by full-batch DP gradient descent (logical
# batches of 512 >= a client's images, so every step sees them all), plain SGD at lr 80 with clipping at 0.25,
# 10 rounds x 5 local steps. Tied for the best of 24 settings by accuracy at epsilon 8 on validation splits of the
# training images (benchmarks/bench_classification_dp_search.py); smaller epsilons preferred smaller steps there
# (dp_tuning).
RECIPE: dict[str, Any] = {"model": "mobile", "image_size": 224, "resize": "squash", "pooling": "blocks",
                          "head": "mlp", "rounds": 5}
RECIPE_TRAIN: dict[str, Any] = {"local_epochs": 20, "batch_size": 32, "accumulation_steps": 1, "lr": 3e-3,
                                "optimizer": "adam"}
DP_RECIPE: dict[str, Any] = {**RECIPE, "pooling": "avgmax", "head": "centered", "views": 8, "project": 512,
                             "rounds": 10}
DP_TRAIN: dict[str, Any] = {"local_epochs": 5, "batch_size": 64, "accumulation_steps": 8, "lr": 80.0,
                            "optimizer": "sgd", "momentum": 0.0, "max_grad_norm": 0.25}
# The seed's small CNN, trained from the images at 64 px: without DP-SGD it is the default on obfuscated images,
# where it beats the frozen pretrained features by 11 points (3 seeds, bench_classification_models.py): obfuscation
# destroys the natural-image statistics those features rely on.
CNN_RECIPE: dict[str, Any] = {"model": "cnn", "image_size": 64}
# The small CNN trains its whole network from the images: DP-SGD with Adam (lr 1e-2) in Poisson-sampled logical
# batches of 128 (32 x 4), clipping at 1 (the DP recipe before the one above).
CNN_DP_TRAIN: dict[str, Any] = {"local_epochs": 10, "batch_size": 32, "accumulation_steps": 4, "lr": 1e-2,
                                "optimizer": "adam", "max_grad_norm": 1.0}


def dp_tuning(epsilon: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ClassifyConfig, TrainSettings) changes of the DP recipe at a target ``epsilon``, chosen on validation splits
    like the recipe: lr 20 below epsilon 8, and a projection to 128 dimensions as well at epsilon 1 and below
    (none at epsilon 8 and above, or for a noise multiplier given without an epsilon)."""
    if epsilon is None or epsilon >= 8:
        return {}, {}
    if epsilon > 1:
        return {}, {"lr": 20.0}
    return {"project": 128}, {"lr": 20.0}


def recipe(dp: bool = False, train: dict[str, Any] | None = None, **overrides: Any) -> ClassifyConfig:
    """The best measured config with ``overrides`` (ClassifyConfig fields) and ``train`` (TrainSettings fields) on
    top: :data:`RECIPE` (Lite0), or :data:`CNN_RECIPE` on obfuscated images; under DP-SGD :data:`DP_RECIPE` with
    :func:`dp_tuning` (the CNN under DP-SGD, if asked for: :data:`CNN_RECIPE` with :data:`CNN_DP_TRAIN`, as the DP
    recipe's feature transforms need a frozen backbone). ``dp`` is implied by a ``dp_epsilon`` override or a
    ``noise_multiplier`` in ``train``."""
    train = dict(train or {})
    dp = dp or overrides.get("dp_epsilon") is not None or train.get("noise_multiplier") is not None
    model = overrides.get("model") or ("cnn" if overrides.get("obfuscate") and not dp else RECIPE["model"])
    transfer = model in TRANSFER_MODELS
    tuned, tuned_train = dp_tuning(overrides.get("dp_epsilon")) if dp and transfer else ({}, {})
    base = (DP_RECIPE if dp else RECIPE) if transfer else {**RECIPE, **CNN_RECIPE}
    values = {**base, **tuned, **overrides, "model": model}
    defaults = (DP_TRAIN if transfer else CNN_DP_TRAIN) if dp else RECIPE_TRAIN
    settings = TrainSettings(**{**defaults, **tuned_train, **train})
    return ClassifyConfig(**values, train=settings)


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
        self.features: dict[tuple, torch.Tensor] = {}  # (settings, image path) -> one image's features

    def backbone(self, model: str, weights: str | None) -> PooledBackbone:
        key = (model, weights)
        if key not in self.backbones:
            self.backbones[key] = load_backbone(model, weights).freeze()
        return self.backbones[key]


def model_inputs(view: LabelledView, config: ClassifyConfig, cache: InputCache, *, progress: bool = False,
                 desc: str = "images", training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a view for this config: obfuscated images, or their pooled features (frozen backbone).

    ``training`` with ``config.flip_augment``: the horizontally mirrored images (or their features) follow
    the originals, with the same labels.
    """
    x = _inputs(view, config, cache, progress, desc, flip=False)
    y = label_tensor(view)
    if training and config.flip_augment:
        x = torch.cat([x, _inputs(view, config, cache, progress, f"{desc} (mirrored)", flip=True)])
        y = torch.cat([y, y])
    return x, y


def _inputs(view: LabelledView, config: ClassifyConfig, cache: InputCache, progress: bool, desc: str,
            flip: bool) -> torch.Tensor:
    obfuscation = config.obfuscation

    def images(part: LabelledView) -> torch.Tensor:
        tensor = image_tensor(part, config.image_size, obfuscation, cache=cache.images, progress=progress, desc=desc,
                              resize=config.resize)
        return tensor.flip(3) if flip else tensor

    if not config.frozen_backbone:
        return images(view)
    transformed = config.views > 1 or bool(config.project)  # standardized per view (and averaged)
    settings = (config.model, config.weights, config.image_size, config.resize, config.pooling, transformed,
                config.views, flip, obfuscation.name, config.obfuscation_key)
    backbone = cache.backbone(config.model, config.weights).with_pooling(config.pooling)
    missing = [i for i, item in enumerate(view.items) if (settings, item.path) not in cache.features]
    if missing:  # each image's features once per setting, whichever split or share it is in
        part = view.subset(missing)
        if transformed:
            computed = view_averaged_features(backbone, images(part), config.views, progress=progress,
                                              desc=f"{desc} features")
        else:
            computed = pooled_features(backbone, images(part), progress=progress, desc=f"{desc} features")
        for i, row in zip(missing, computed, strict=True):
            cache.features[(settings, view.items[i].path)] = row
    rows = [cache.features[(settings, item.path)] for item in view.items]
    features = torch.stack(rows) if rows else torch.empty(0, backbone.out_features)
    if not config.project:
        return features
    return to_sphere(features, random_projection(features.shape[1], config.project, config.seed))


def input_features(config: ClassifyConfig, cache: InputCache) -> int:
    """The number of features the head gets: the backbone's pooled features, or ``project``."""
    return config.project or cache.backbone(config.model, config.weights).with_pooling(config.pooling).out_features


def build_model(config: ClassifyConfig, n_classes: int, cache: InputCache) -> nn.Module:
    """The trainable (and federated) model: the CNN, the head alone (frozen backbone), or the whole
    transfer model (``fine_tune``; BatchNorm replaced by GroupNorm via Opacus's ModuleValidator under DP)."""
    if config.model == "cnn":
        return SmallCNN(n_classes, config.image_size)
    if config.frozen_backbone:
        return make_head(config.head, input_features(config, cache), n_classes)
    backbone = cache.backbone(config.model, config.weights).with_pooling(config.pooling)
    model: nn.Module = TransferClassifier(copy.deepcopy(backbone), n_classes, config.head)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if config.dp:
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    return model


def training_steps(config: ClassifyConfig, n: int) -> int:
    """DP-SGD steps of a client of ``n`` images over all rounds: ``rounds * local_epochs * ceil(n / logical
    batch)``, as :func:`~fedinspect.privacy.dp_sgd.train_dp_sgd` accounts them."""
    return config.rounds * config.train.local_epochs * config.train.steps_per_epoch(n)


def center_noise(config: ClassifyConfig, n: int, noise_multiplier: float) -> float:
    """The noise multiplier of a client's DP feature sum (the centered head's first round) next to DP-SGD's.

    A Gaussian release at noise ``s`` costs ``alpha / (2 s^2)`` of Renyi DP; ``T`` steps at noise ``sigma``
    and sample rate 1 cost ``T alpha / (2 sigma^2)``. ``s = sigma * sqrt((1 - share) / (share * T * q^2))``
    gives the mean ``center_share`` of the total: exactly at sample rate 1 (the recipe's full batches),
    roughly with subsampling (``T q^2`` then stands for the steps' cost). The accountant reports what is
    spent in either case.
    """
    rate = config.train.sample_rate(n)
    share = config.center_share
    return noise_multiplier * math.sqrt((1 - share) / (share * training_steps(config, n) * rate ** 2))


def planned_history(config: ClassifyConfig, n: int, noise_multiplier: float) -> list[tuple[float, float, int]]:
    """The accountant history a client of ``n`` images has after all rounds at this noise multiplier: the DP
    mean's release (centered head) as one Gaussian, then :func:`training_steps` at sample rate
    ``1 / ceil(n / logical batch)``."""
    history = [(float(noise_multiplier), config.train.sample_rate(n), training_steps(config, n))]
    if config.centered:
        history.insert(0, (center_noise(config, n, noise_multiplier), 1.0, 1))
    return history


def noise_for_epsilon(config: ClassifyConfig, client_sizes: Sequence[int], target_epsilon: float) -> float:
    """The smallest noise multiplier (a bisection to 0.1 % of the target) that keeps every client's epsilon
    after all rounds (:func:`planned_history`) at or below ``target_epsilon``: the client with the largest
    sample rate decides."""
    if not (0 < target_epsilon < math.inf):
        raise ValueError(f"target epsilon must be a positive finite number, got {target_epsilon}")
    settings = config.train
    return max(smallest_noise(functools.partial(planned_history, config, n), target_epsilon, settings.delta_for(n),
                              settings.accountant) for n in client_sizes)


def resolve_epsilon(config: ClassifyConfig, client_sizes: Sequence[int]) -> ClassifyConfig:
    """``config`` with the noise multiplier of its ``dp_epsilon`` (unchanged without one, or once resolved)."""
    if config.dp_epsilon is None or config.train.noise_multiplier is not None:
        return config
    return with_noise(config, noise_for_epsilon(config, client_sizes, config.dp_epsilon))


# ---------------------------------------------------------------- runs
def prepare_split(data_dir: str | Path, config: ClassifyConfig) -> Split:
    """The run's split: train (dealt to the clients) and test; with ``config.validation`` the training part
    split again the same way, its held-out part standing for the test split."""
    view = labelled_view(data_dir)
    outer = config.seed if config.split_seed is None else config.split_seed
    fraction = config.train_fraction
    try:
        if not config.validation:
            return split_view(view, config.clients, config.partition, outer, config.alpha, config.test_fraction,
                              fraction, config.seed)
        outer_split = split_view(view, config.clients, config.partition, outer, config.alpha, config.test_fraction)
        return split_view(outer_split.train, config.clients, config.partition, config.seed, config.alpha,
                          config.test_fraction, fraction, config.seed)
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
