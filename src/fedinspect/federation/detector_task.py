"""Federating any detector of the registry but PatchCore, on the shared round engine.

:class:`CategoryTask` is the data and evaluation side every detector federation shares: the training
images of each category are partitioned among the clients (the same partition schemes and seed as
federated PatchCore), each client holds one model per category it has images of, and the server
evaluates the global model of every category with the AutoVI protocol and thresholds T1-T3
(:func:`pipeline.evaluate_category`), beside a centralized model fitted on all the images.

:class:`DetectorTask` federates the trained detectors (autoencoders, STFPM, reverse distillation,
DRAEM, CFLOW) by FedAvg over rounds: each round a client starts from the global weights, trains
``local_epochs`` epochs on its own images (:meth:`TrainedDetector.partial_fit`, with FedProx's proximal
term when ``proximal_mu`` > 0) and sends its weights; the server averages them per category, weighted by
the client's images of that category. Only the trained part travels: a pretrained teacher is public and
every party loads it from the same weights.

Known approximation: CFLOW keeps the largest training log-likelihood per scale in a buffer (its
calibration); FedAvg averages the clients' values instead of taking the maximum over all images.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedinspect import __version__
from fedinspect.data.dataset import CategoryDataset, find_categories, training_images
from fedinspect.data.images import read_image
from fedinspect.detectors.registry import TRAINED, detector_parameters, get_detector, set_device
from fedinspect.errors import FedinspectError, SettingsError
from fedinspect.federation.client import derived_seed
from fedinspect.federation.partition import SCHEMES, Partition, partition
from fedinspect.federation.rounds import ClientResult, FederatedTask, RoundsOutcome, State, client_id
from fedinspect.pipeline import ThresholdOptions, evaluate_category, fit_on_samples, peak_memory_mb
from fedinspect.run_folder import staged_output

RESULTS_FORMAT = "fedinspect-detector-federation/1"
SHARED = "all"  # the group of the one model of every category (model_scope "shared")
MODEL_SCOPES = ("category", "shared")
RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class DetectorFederationConfig:
    """Everything that defines a detector federation (written to results.json as ``config``).

    ``params``: the detector's constructor parameters (``image_size``, ``learning_rate``...); ``epochs``
    there is ignored: each round trains ``local_epochs``. ``centralized``: also fit the detector on all
    the training images with its own defaults, the reference the federation is measured against.
    """

    detector: str = "ae_mse"
    params: Mapping[str, Any] = field(default_factory=dict)
    clients: int = 5
    partition: str = "iid"
    alpha: float = 0.5
    rounds: int = 5
    local_epochs: int = 1
    proximal_mu: float = 0.0
    seed: int = 0
    model_scope: str = "category"
    centralized: bool = True
    local_baseline: bool = False
    write_maps: bool = False
    # Differential privacy of the updates, per training image of a client (empty: none). PaDiM: DP of its
    # statistics (privacy/statistics_dp.py, StatisticsPrivacy's fields, e.g. {"epsilon": 1, "clip_norm": 600,
    # "mode": "distributed"}); a trained detector: DP-SGD (privacy/dp_sgd.py, DPSGDSettings' fields, e.g.
    # {"noise_multiplier": 1.0, "max_grad_norm": 1.0}). ``secure``: PaDiM's sum taken by SecAgg+ on Flower
    # (federation/secure_sum.py).
    privacy: Mapping[str, Any] = field(default_factory=dict)
    secure: bool = False
    # the public bound on the L2 norm of one grid position's selected features under secure aggregation
    # (measured: <= 62 for efficientnet_lite0 on the real metal plates and magnetic tiles); an entry beyond the
    # bound it implies is clipped and counted in results.json. With DP, the clip norm is the bound.
    secure_bound: float = 100.0
    # where each party trains and scores a trained detector ("auto": CUDA when torch sees a GPU, else the CPU)
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "privacy", dict(self.privacy))
        if self.secure and self.detector != "padim":
            raise SettingsError(f"secure aggregation sums PaDiM's one round of statistics, not {self.detector}'s "
                                "weights")
        if self.privacy and self.detector == "padim":
            self.statistics_privacy()  # a bad setting fails before any work
        elif self.privacy:
            self.dp_sgd()
        if self.device != "auto" and self.detector not in TRAINED:
            raise SettingsError(f"device {self.device!r}: only the trained detectors have one, not {self.detector}")
        if self.model_scope not in MODEL_SCOPES:
            raise SettingsError(f"model scope must be one of {MODEL_SCOPES}, got {self.model_scope!r}")
        if self.partition not in SCHEMES:
            raise SettingsError(f"unknown partition {self.partition!r}; choose from {list(SCHEMES)}")
        for name in ("clients", "rounds", "local_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.proximal_mu >= 0:
            raise SettingsError(f"proximal_mu must be >= 0, got {self.proximal_mu!r}")
        if {"seed", "progress"} & set(self.params):
            raise SettingsError("give the seed as the federation's seed, not as a detector parameter")

    def statistics_privacy(self) -> Any:
        """The DP mechanism of PaDiM's statistics (None when off)."""
        if not self.privacy:
            return None
        from fedinspect.privacy.statistics_dp import StatisticsPrivacy

        try:
            return StatisticsPrivacy.from_dict(dict(self.privacy))
        except (TypeError, ValueError) as error:
            raise SettingsError(f"privacy of the statistics: {error}") from error

    def dp_sgd(self) -> Any:
        """The DP-SGD settings of a trained detector's local training (None when off)."""
        if not self.privacy:
            return None
        from fedinspect.privacy.dp_sgd import DPSGDSettings

        if self.detector not in TRAINED:
            raise SettingsError(f"DP-SGD trains the trained detectors, not {self.detector}")
        return DPSGDSettings.from_dict(dict(self.privacy))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"params": dict(self.params), "privacy": dict(self.privacy)}


class CategoryTask(FederatedTask):
    """The data and evaluation side of a detector federation (see the module docstring)."""

    def __init__(self, data_dir: str | Path, config: DetectorFederationConfig, progress: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.progress = progress
        self.n_clients = config.clients
        self.own_data: Path | None = None
        self._images: dict[tuple[int, str], list[np.ndarray]] = {}
        self._tests: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}

    @functools.cached_property
    def datasets(self) -> dict[str, CategoryDataset]:
        """The server's dataset, read on first use (a SuperNode with its own data never reads it)."""
        return {path.name: CategoryDataset(path) for path in find_categories(self.data_dir)}

    @functools.cached_property
    def items(self) -> list[tuple[str, int]]:
        return [(name, index) for name, dataset in self.datasets.items() for index in range(len(dataset.train))]

    @functools.cached_property
    def split(self) -> Partition:
        """Which client holds which training image (the federation's partition scheme and seed)."""
        return partition([name for name, _ in self.items], self.config.clients, self.config.partition,
                         seed=self.config.seed, alpha=self.config.alpha)

    def with_own_data(self, data_dir: Path) -> CategoryTask:
        """This task on a SuperNode whose images are its own ``data_dir`` (see :class:`FederatedTask`)."""
        task = copy.copy(self)
        task.own_data, task._images = Path(data_dir), {}
        return task

    # ---------------------------------------------------------------- spec
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "data_dir": str(self.data_dir), "config": self.config.to_dict()}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], secrets: Mapping[str, Any]) -> CategoryTask:
        try:
            return cls(spec["data_dir"], DetectorFederationConfig(**spec["config"]))
        except (KeyError, TypeError) as error:
            raise FedinspectError(f"a malformed {cls.__name__} spec: {error!r}") from error

    # ---------------------------------------------------------------- data
    @property
    def groups(self) -> list[str]:
        """The models of the federation: one per category, or one for all (``model_scope="shared"``)."""
        return [SHARED] if self.config.model_scope == "shared" else list(self.datasets)

    def group_of(self, category: str) -> str:
        return SHARED if self.config.model_scope == "shared" else category

    @functools.cached_property
    def _own_images(self) -> dict[str, list[Path]]:
        return training_images(self.own_data)

    def client_categories(self, index: int) -> dict[str, list[int]]:
        """Category -> indices (in the category's training list) of client ``index``'s images."""
        if self.own_data is not None:
            return {category: list(range(len(paths))) for category, paths in sorted(self._own_images.items())}
        held: dict[str, list[int]] = {}
        for item in self.split.assignments[index]:
            name, position = self.items[item]
            held.setdefault(name, []).append(position)
        return dict(sorted(held.items()))

    def client_groups(self, index: int) -> list[str]:
        """The models client ``index`` trains: those of the categories it holds images of."""
        return sorted({self.group_of(category) for category in self.client_categories(index)})

    def client_images(self, index: int, group: str) -> list[np.ndarray]:
        """Client ``index``'s training images of the model ``group`` (read once, kept for later rounds)."""
        key = (index, group)
        if key not in self._images:
            images = []
            for category, positions in self.client_categories(index).items():
                if self.group_of(category) != group:
                    continue
                if self.own_data is not None:
                    images += [read_image(self._own_images[category][i]) for i in positions]
                else:
                    dataset = self.datasets[category]
                    images += [dataset.load_image(dataset.train[i]) for i in positions]
            self._images[key] = images
        return self._images[key]

    def test_images(self, category: str) -> tuple[list[np.ndarray], np.ndarray]:
        """The server's test images and labels of ``category`` (only the server evaluates)."""
        if category not in self._tests:
            dataset = self.datasets[category]
            self._tests[category] = ([dataset.load_image(s) for s in dataset.test],
                                     np.array([s.label for s in dataset.test]))
        return self._tests[category]

    # ---------------------------------------------------------------- the model
    def detector(self, seed: int | None = None) -> Any:
        """A fresh detector with the federation's settings (``seed``: the federation's by default)."""
        return get_detector(self.config.detector, seed=self.config.seed if seed is None else seed,
                            **self.config.params)

    def global_detector(self, state: State, category: str) -> Any:
        """The global model that serves ``category`` (or the model named by a group) from ``state``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, state: State, round_number: int) -> dict[str, Any]:
        """Image AUROC of the global model of each category after the round (on all its test images)."""
        per_category = {}
        for category in self.datasets:
            if not any(key.startswith(f"{self.group_of(category)}/") for key in state):
                continue  # no client held this category this round
            images, labels = self.test_images(category)
            scores = self.global_detector(state, category).score_samples(images, total=len(images))
            per_category[category] = float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None
        known = [v for v in per_category.values() if v is not None]
        return {"image_auroc": per_category, "mean_image_auroc": float(np.mean(known)) if known else None}

    def conclude(self, outcome: RoundsOutcome, out_dir: str | Path, engine: str) -> dict[str, Any]:
        """results.json, the global models, each category's evaluation folder and the run report."""
        with staged_output(out_dir, inputs=[self.data_dir]) as staging:
            return self._conclude(outcome, staging, engine)

    def _conclude(self, outcome: RoundsOutcome, out_dir: Path, engine: str) -> dict[str, Any]:
        started = time.perf_counter()
        categories: dict[str, Any] = {}
        centralized: dict[str, Any] = {}
        models: dict[str, Any] = {}
        for group in self.groups:
            if any(key.startswith(f"{group}/") for key in outcome.state):
                models[group] = self.global_detector(outcome.state, group)
                if getattr(models[group], "n_train_images_", None) is None:  # PaDiM's comes from the summed count
                    models[group].n_train_images_ = sum(len(self.datasets[c].train) for c in self.datasets
                                                        if self.group_of(c) == group)
                models[group].save(out_dir / "models" / group)
        references = self._centralized_models() if self.config.centralized else {}
        for name in self.datasets:
            model = models.get(self.group_of(name))
            if model is None:
                categories[name] = {"skipped": "no client answered with this category"}
                continue
            categories[name] = self._evaluation(model, name, out_dir / name, self.config.write_maps)
            if name in references or self.group_of(name) in references:
                reference, fit_s = references[self.group_of(name)]
                centralized[name] = self._evaluation(reference, name, out_dir / "centralized" / name, False)
                centralized[name]["fit_s"] = fit_s
        local = self._local_only(out_dir) if self.config.local_baseline else {}
        results: dict[str, Any] = {
            "format": RESULTS_FORMAT,
            "fedinspect_version": __version__,
            "engine": engine,
            "dataset": str(self.data_dir),
            "kind": self.kind,
            "aggregation": self.aggregation,
            "config": self.config.to_dict(),
            "partition": {"sizes": self.split.sizes()},
            "clients": [{"client": name, **entry} for name, entry in outcome.clients.items()],
            "missing_clients": outcome.missing,
            "history": outcome.history,
            "categories": categories,
            "mean": _mean(categories),
        }
        if centralized:
            results["centralized"] = {"categories": centralized, "mean": _mean(centralized)}
            results["rounds_to_centralized"] = rounds_within(outcome.history, centralized, points=1.0)
        if local:
            results["local_only"] = {client: {"categories": entry, "mean": _mean(entry)}
                                     for client, entry in local.items()}
        results.update(self.extra_results(outcome))
        results["timing"] = {**outcome.timing, "conclusion_s": time.perf_counter() - started}
        results["peak_memory_mb"] = peak_memory_mb()
        (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        from fedinspect.federation.detector_report import write_detector_federation_report

        write_detector_federation_report(out_dir, results)
        return results

    def extra_results(self, outcome: RoundsOutcome) -> dict[str, Any]:
        """What a kind of federation adds to results.json (privacy, secure aggregation)."""
        return {}

    def _evaluation(self, model: Any, category: str, out_dir: Path, write_maps: bool) -> dict[str, Any]:
        """The AutoVI protocol and thresholds T1-T3 of ``model`` on ``category``'s test split."""
        return _summary(evaluate_category(model, self.datasets[category].root, out_dir, progress=False,
                                          write_maps=write_maps, thresholds=ThresholdOptions()))

    def _centralized_models(self) -> dict[str, tuple[Any, float]]:
        """Per group: the detector fitted at its own defaults on all the group's training images, and the time."""
        references = {}
        for group in self.groups:
            start = time.perf_counter()
            model = get_detector(self.config.detector, seed=self.config.seed, **self.config.params)
            parts = [(dataset, dataset.train) for name, dataset in self.datasets.items()
                     if self.group_of(name) == group]
            references[group] = (fit_on_samples(model, parts), time.perf_counter() - start)
        return references

    def _local_only(self, out_dir: Path) -> dict[str, dict[str, Any]]:
        """Each client's model trained on its own images alone, as long as the federation trained, tested on
        every category (seed 004's cross-dataset experiment: one factory's model on another's product; with
        per-category models, a category the client does not hold meets the client's first model)."""
        local: dict[str, dict[str, Any]] = {}
        for index in range(self.n_clients):
            models = {group: self.local_model(index, group) for group in self.client_groups(index)}
            if not models:
                continue
            name = client_id(index)
            local[name] = {}
            for category in self.datasets:
                group = self.group_of(category) if self.group_of(category) in models else next(iter(models))
                entry = self._evaluation(models[group], category, out_dir / "local_only" / name / category, False)
                local[name][category] = {**entry, "model_of": group}
        return local

    def local_model(self, index: int, group: str) -> Any:
        """Client ``index``'s model of ``group`` from its own images only (a subclass says how)."""
        raise NotImplementedError


def _summary(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("image_auroc", "pixel_auroc", "auc_spro", "thresholds", "counts", "timings")
    return {key: evaluation[key] for key in keep if key in evaluation}


def _mean(categories: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    rows = [c for c in categories.values() if c.get("image_auroc") is not None]
    if not rows:
        return {}
    mean: dict[str, Any] = {"image_auroc": float(np.mean([c["image_auroc"] for c in rows]))}
    pixel = [c["pixel_auroc"] for c in rows if c.get("pixel_auroc") is not None]
    mean["pixel_auroc"] = float(np.mean(pixel)) if pixel else None
    limits = rows[0].get("auc_spro", {})
    mean["auc_spro"] = {limit: float(np.mean([c["auc_spro"][limit] for c in rows])) for limit in limits}
    return mean


def rounds_within(history: list[Mapping[str, Any]], centralized: Mapping[str, Mapping[str, Any]],
                  points: float = 1.0) -> dict[str, int | None]:
    """Per category, the first round whose global image AUROC is within ``points`` (in AUROC points, 0-100)
    of the centralized model's; None if no round reached it."""
    reached: dict[str, int | None] = {}
    for name, reference in centralized.items():
        target = reference.get("image_auroc")
        reached[name] = None
        for record in history:
            value = (record.get("image_auroc") or {}).get(name)
            if target is not None and value is not None and value >= target - points / 100:
                reached[name] = int(record["round"])
                break
    return reached


class DetectorTask(CategoryTask):
    """FedAvg / FedProx of a trained detector's weights over rounds (see the module docstring)."""

    kind = "detector"
    aggregation = "mean"

    def __init__(self, data_dir: str | Path, config: DetectorFederationConfig, progress: bool = False) -> None:
        if config.detector not in TRAINED:
            raise SettingsError(f"{config.detector!r} is not trained by gradient descent; FedAvg federates "
                                f"{sorted(TRAINED)} (PaDiM goes in one round of statistics, PatchCore of banks)")
        super().__init__(data_dir, config, progress)
        self.rounds = config.rounds
        self.privacy = config.dp_sgd()

    def detector(self, seed: int | None = None) -> Any:
        """The detector with the federation's settings; under DP-SGD with GroupNorm where it has BatchNorm
        (the same on every client and the server, so the weights average)."""
        params = dict(self.config.params)
        if self.privacy is not None and "normalization" in detector_parameters(self.config.detector):
            params.setdefault("normalization", "group")
        model = get_detector(self.config.detector, seed=self.config.seed if seed is None else seed, **params)
        model.epochs = self.config.local_epochs
        return set_device(model, self.config.device)

    def initial_state(self) -> State:
        weights = self.detector().initialize().trainable_state()
        return {f"{group}/{key}": value for group in self.groups for key, value in weights.items()}

    def global_detector(self, state: State, category: str) -> Any:
        group = self.group_of(category) if category in self.datasets else category
        return self.detector().load_trainable_state(_part(state, group), source=f"global model of {group}")

    def local_model(self, index: int, group: str) -> Any:
        model = self.detector(seed=derived_seed(self.config.seed, client_id(index), group, "local"))
        model.epochs = self.config.rounds * self.config.local_epochs  # the federation's training, alone
        return model.initialize().partial_fit(self.client_images(index, group))

    def client_update(self, index: int, state: State, round_number: int, memory: Mapping[str, Any]) -> ClientResult:
        arrays: State = {}
        examples: dict[str, int] = {}
        losses: list[tuple[float, int]] = []
        name = client_id(index)
        histories = dict(memory.get("privacy_history", {}))
        for group in self.client_groups(index):
            images = self.client_images(index, group)
            model = self.detector(seed=derived_seed(self.config.seed, name, group, str(round_number)))
            model.load_trainable_state(_part(state, group), source=f"{name}: global model of {group}")
            try:
                if self.privacy is None:
                    model.partial_fit(images, proximal_mu=self.config.proximal_mu)
                else:  # the client's accountant history of this model, kept in its memory across rounds
                    model.partial_fit(images, proximal_mu=self.config.proximal_mu, privacy=self.privacy,
                                      privacy_history=histories.get(group, []))
                    histories[group] = [list(entry) for entry in model.privacy_history_]
            except FedinspectError as error:
                raise FedinspectError(f"{name}, {group}: {error}") from error
            arrays.update({f"{group}/{key}": value for key, value in model.trainable_state().items()})
            examples[group] = len(images)
            losses.append((model.history_[-1]["train_loss"], len(images)))
        loss = sum(v * n for v, n in losses) / sum(n for _, n in losses)
        if not math.isfinite(loss):
            raise FedinspectError(f"{name}: training loss {loss}")
        kept = {**memory, "privacy_history": histories} if self.privacy is not None else dict(memory)
        return ClientResult(arrays, examples, {"train_loss": loss}, kept)

    def round_metrics(self, round_number: int, results: Mapping[str, ClientResult]) -> dict[str, Any]:
        """Under DP-SGD, each client's epsilon so far (the largest over its models), recomputed by the server
        from the accountant history the client keeps."""
        if self.privacy is None:
            return {}
        return {"epsilon": {name: self._epsilon(name, result.memory, result.examples)
                            for name, result in results.items()}}

    def _epsilon(self, name: str, memory: Mapping[str, Any], examples: Mapping[str, int]) -> float:
        """The client's epsilon from its accountant history, delta from the images it trained each model on."""
        from fedinspect.privacy.dp_sgd import check_history, epsilon_of

        values = []
        for group, history in dict(memory.get("privacy_history", {})).items():
            checked = check_history(history, source=f"{name}'s privacy history of {group}")
            n = int(examples.get(group, 0))
            if n < 1:
                raise FedinspectError(f"{name}: a privacy history of {group} but no image of it")
            values.append(epsilon_of(checked, self.privacy.delta_for(n), self.privacy.accountant))
        return max(values) if values else 0.0

    def extra_results(self, outcome: RoundsOutcome) -> dict[str, Any]:
        if self.privacy is None:
            return {}
        per_client = {name: self._epsilon(name, memory, outcome.clients.get(name, {}).get("examples", {}))
                      for name, memory in outcome.memories.items() if memory}
        return {"privacy": {
            "mechanism": "DP-SGD (Opacus)", "unit": "image",
            "protects": "one training image of one client (each client's guarantee is its own, over every round "
                        "it trained in)",
            "epsilon": max(per_client.values()) if per_client else None, "epsilon_per_client": per_client,
            "delta": self.privacy.delta, "noise_multiplier": self.privacy.noise_multiplier,
            "max_grad_norm": self.privacy.max_grad_norm, "accountant": self.privacy.accountant,
            "logical_batch": self.privacy.logical_batch, "mode": "local",
            "assumes": "nothing of the server or the other clients", "clip_norm": self.privacy.max_grad_norm,
            "scope": "each model (category) a separate guarantee"}}


def _part(state: State, group: str) -> dict[str, torch.Tensor]:
    prefix = f"{group}/"
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def make_task(data_dir: str | Path, config: DetectorFederationConfig, progress: bool = False) -> CategoryTask:
    """The task that federates ``config.detector``: FedAvg rounds, or PaDiM's one round of statistics."""
    if config.detector == "padim":
        from fedinspect.federation.statistics_task import StatisticsTask

        return StatisticsTask(data_dir, config, progress)
    return DetectorTask(data_dir, config, progress)


def run_detector_federation(data_dir: str | Path, out_dir: str | Path, config: DetectorFederationConfig,
                            engine: str = "in-process", progress: bool = True) -> dict[str, Any]:
    """Federate ``config.detector`` on ``engine`` ("in-process" or "flower-sim"); returns results.json's dict.

    ``out_dir`` is written all at once when the run is over: a failed run leaves an earlier one there untouched.
    """
    from fedinspect.federation.rounds import run_rounds

    if config.secure and engine != "flower-sim":
        raise SettingsError("secure aggregation (SecAgg+) runs on Flower: use the flower-sim engine")
    task = make_task(data_dir, config, progress)
    if engine == "flower-sim":
        from fedinspect.federation.rounds_flower import run_simulation

        return run_simulation(task, out_dir, progress=progress)
    if engine != "in-process":
        raise SettingsError(f"unknown engine {engine!r}: in-process or flower-sim")
    return task.conclude(run_rounds(task, progress=progress), out_dir, engine)
