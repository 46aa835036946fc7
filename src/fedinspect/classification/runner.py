"""Federated defect classification in this process: FedAvg over rounds, clients with local (DP-)SGD.

The server side (:func:`initial_state`, :func:`aggregate_round`, :func:`conclude`) and the client
side (:func:`client_round`) are shared with the Flower app, which only carries the messages, so both
engines give the same numbers for the same config and seed.

Inputs: images resized to ``image_size`` and obfuscated with the federation's key. For a transfer
model with a frozen backbone (the default) the backbone is a fixed public function, so each client
turns its images into pooled backbone features once and the rounds only train the head; the
features are cached per (image, obfuscation, backbone) in an :class:`InputCache`.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
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
    load_square,
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
from fedinspect.classification.training import LocalResult, TrainSettings, epsilon_of, evaluate, train_local
from fedinspect.errors import DataError, FedinspectError
from fedinspect.federation.fedavg import fedavg
from fedinspect.privacy.obfuscation import Obfuscation, parse_methods
from fedinspect.run_folder import staged_output

RESULTS_FORMAT = "fedinspect-classification/1"
PRIVACY_UNIT = "one training image of one client"


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


def initial_state(config: ClassifyConfig, n_classes: int, cache: InputCache) -> dict[str, torch.Tensor]:
    """The global model of round 0, seeded."""
    torch.manual_seed(config.seed)
    return {k: v.detach().clone() for k, v in build_model(config, n_classes, cache).state_dict().items()}


# ---------------------------------------------------------------- client side
def client_round(config: ClassifyConfig, n_classes: int, global_state: dict[str, torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, round_number: int, client_index: int,
                 privacy_history: Sequence[Sequence[float]], cache: InputCache) -> LocalResult:
    """One client's work in one round: load the global model, train locally, return the result."""
    model = build_model(config, n_classes, cache)
    model.load_state_dict(global_state)
    return train_local(model, x, y, config.train, seed=client_seed(config.seed, round_number, client_index),
                       privacy_history=privacy_history)


# ---------------------------------------------------------------- server side
@dataclass
class RoundRecord:
    """The metrics of the global model after one round."""

    round: int
    accuracy: float
    macro_f1: float
    loss: float
    train_loss: float
    seconds: float
    epsilon: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["epsilon"] = {k: json_float(v) for k, v in self.epsilon.items()}
        return values


def json_float(value: float | None) -> float | str | None:
    """Floats for results.json: an infinite epsilon is written as the string "inf"."""
    if value is None:
        return None
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def aggregate_round(config: ClassifyConfig, n_classes: int, cache: InputCache, replies: dict[str, LocalResult],
                    test: tuple[torch.Tensor, torch.Tensor], round_number: int, started: float
                    ) -> tuple[dict[str, torch.Tensor], RoundRecord, dict]:
    """FedAvg of the replies (weighted by their images), evaluated on the test split."""
    names = sorted(replies, key=lambda name: int(name.rsplit("_", 1)[-1]))
    state = fedavg([replies[n].state for n in names], [replies[n].n_examples for n in names])
    model = build_model(config, n_classes, cache)
    model.load_state_dict(state)
    metrics = evaluate(model, *test, n_classes)
    total = sum(replies[n].n_examples for n in names)
    train_loss = sum(replies[n].train_loss * replies[n].n_examples for n in names) / total
    epsilon = {n: float(replies[n].epsilon) for n in names if replies[n].epsilon is not None}
    record = RoundRecord(round_number, metrics["accuracy"], metrics["macro_f1"], metrics["loss"], train_loss,
                         time.perf_counter() - started, epsilon)
    return state, record, metrics


def describe_split(split: Split) -> dict[str, Any]:
    return {
        "train": len(split.train.items), "test": len(split.test.items),
        "train_counts": split.train.counts(), "test_counts": split.test.counts(),
        "clients": [{"client": client_id(i), "images": len(v.items), "counts": v.counts()}
                    for i, v in enumerate(split.clients)],
    }


def privacy_summary(config: ClassifyConfig, split: Split, histories: dict[str, list]) -> dict[str, Any]:
    """Per-client epsilon (cumulative over rounds) recomputed from each client's accountant history."""
    settings = config.train
    if not settings.dp:
        return {"dp": False}
    clients = {}
    for index, view in enumerate(split.clients):
        name = client_id(index)
        n = len(view.items)
        history = histories.get(name, [])
        delta = settings.delta_for(n)
        clients[name] = {
            "images": n, "sample_rate": settings.sample_rate(n), "steps": int(sum(h[2] for h in history)),
            "delta": delta, "epsilon": json_float(epsilon_of(history, delta, settings.accountant)),
            "accountant_history": [list(h) for h in history],
        }
    return {"dp": True, "unit": PRIVACY_UNIT, "noise_multiplier": settings.noise_multiplier,
            "max_grad_norm": settings.max_grad_norm, "accountant": settings.accountant,
            "logical_batch": settings.logical_batch, "physical_batch": settings.batch_size,
            "poisson_sampling": settings.poisson_sampling, "clients": clients}


def conclude(config: ClassifyConfig, split: Split, history: list[RoundRecord], final: dict,
             histories: dict[str, list], out_dir: str | Path, *, engine: str, timing: dict[str, float],
             write_report: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.json (and report.md / report.html with the plots) of a finished run, written all at once.

    ``out_dir`` is replaced only when everything is written (:func:`staged_output`); a failure leaves it untouched.
    """
    with staged_output(out_dir, inputs=[split.view.root]) as staging:
        return _conclude(config, split, history, final, histories, staging, engine=engine, timing=timing,
                         write_report=write_report, extra=extra)


def _conclude(config: ClassifyConfig, split: Split, history: list[RoundRecord], final: dict,
              histories: dict[str, list], out_dir: Path, *, engine: str, timing: dict[str, float],
              write_report: bool, extra: dict[str, Any] | None) -> dict[str, Any]:
    import opacus

    from fedinspect import __version__

    classes = list(split.view.classes)
    from sklearn.metrics import precision_recall_fscore_support

    truth = split.test.labels
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, final["predicted"], labels=list(range(len(classes))), zero_division=0)
    privacy = privacy_summary(config, split, histories)
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "dataset": str(split.view.root),
        "classes": classes,
        "class_counts": split.view.counts(),
        "split": describe_split(split),
        "engine": engine,
        "config": config.to_dict(),
        "obfuscation": config.obfuscation.to_dict(),
        "accuracy": final["accuracy"],
        "macro_f1": final["macro_f1"],
        "loss": final["loss"],
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(classes)},
        "confusion_matrix": final["confusion_matrix"],
        "history": [record.to_dict() for record in history],
        "privacy": privacy,
        "timing": timing,
        "versions": {"fedinspect": __version__, "torch": torch.__version__, "opacus": opacus.__version__,
                     "python": platform.python_version()},
    }
    results.update(extra or {})
    if privacy["dp"]:
        results["epsilon"] = {name: c["epsilon"] for name, c in privacy["clients"].items()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    if write_report:
        from fedinspect.classification.report import plot_obfuscation_examples, write_run_report

        if config.obfuscation.active:
            pairs = []
            for label, name in enumerate(classes):
                item = next((i for i in split.test.items if i.label == label), None)
                if item is not None:
                    plain = load_square(item.path, config.image_size)
                    pairs.append((name, plain, config.obfuscation(plain)))
            plot_obfuscation_examples(pairs, out_dir / "figures" / "obfuscation_examples.png",
                                      config.obfuscation.name)
        write_run_report(results, out_dir)
    return results


# ---------------------------------------------------------------- the in-process engine
def prepare_split(data_dir: str | Path, config: ClassifyConfig) -> Split:
    view = labelled_view(data_dir)
    try:
        return split_view(view, config.clients, config.partition, config.seed, config.alpha, config.test_fraction)
    except ValueError as error:
        raise DataError(view.root, f"cannot split {len(view.items)} images into {config.clients} clients: {error}"
                        ) from error


def run_classification(data_dir: str | Path, out_dir: str | Path, config: ClassifyConfig | None = None,
                       progress: bool = True, cache: InputCache | None = None, write_report: bool = True,
                       on_round: Callable[[RoundRecord], None] | None = None) -> dict[str, Any]:
    """Federated training of ``config.rounds`` FedAvg rounds in this process; returns results.json's dict."""
    config = config or ClassifyConfig()
    cache = cache or InputCache()
    started = time.perf_counter()
    split = prepare_split(data_dir, config)
    n_classes = len(split.view.classes)
    test = model_inputs(split.test, config, cache, progress=progress, desc="test images")
    clients = []
    for index, view in enumerate(split.clients):
        try:
            clients.append(model_inputs(view, config, cache, progress=progress, desc=f"{client_id(index)} images"))
        except DataError as error:
            raise FedinspectError(f"{client_id(index)}: {error}") from error
    prepared = time.perf_counter()
    state = initial_state(config, n_classes, cache)
    histories: dict[str, list] = {client_id(i): [] for i in range(config.clients)}
    history: list[RoundRecord] = []
    final: dict = {}
    bar = tqdm(range(1, config.rounds + 1), desc="rounds", disable=not progress)
    for round_number in bar:
        round_started = time.perf_counter()
        replies = {}
        for index, (x, y) in enumerate(clients):
            name = client_id(index)
            reply = client_round(config, n_classes, state, x, y, round_number, index, histories[name], cache)
            histories[name] = reply.privacy_history
            replies[name] = reply
        state, record, final = aggregate_round(config, n_classes, cache, replies, test, round_number, round_started)
        history.append(record)
        bar.set_postfix(accuracy=f"{record.accuracy:.3f}", loss=f"{record.loss:.3f}")
        if on_round is not None:
            on_round(record)
    finished = time.perf_counter()
    timing = {"prepare_s": prepared - started, "train_s": finished - prepared, "total_s": finished - started,
              "round_s": [r.seconds for r in history]}
    return conclude(config, split, history, final, histories, out_dir, engine="in-process", timing=timing,
                    write_report=write_report)


def with_noise(config: ClassifyConfig, noise_multiplier: float | None) -> ClassifyConfig:
    """The same config with another DP noise multiplier (``None``: no DP-SGD)."""
    return replace(config, train=replace(config.train, noise_multiplier=noise_multiplier))
