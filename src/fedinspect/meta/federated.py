"""Federated meta-learning across factories: FedAvg of the clients' MAML meta-updates (FedMeta, Per-FedAvg).

Each factory (client) holds its own product tasks; their images never leave it. A round of
:class:`MetaLearningTask` on the shared round engine (:func:`fedinspect.federation.rounds.run_rounds` in
process, :func:`fedinspect.federation.rounds_flower.run_simulation` on Flower):

1. every client starts from the global meta-weights and runs ``local_steps`` MAML meta-steps on its own
   tasks (the step of :func:`fedinspect.meta.maml.meta_train`: Adam on the mean query loss after
   adaptation, first order by default, second order as an option), with an Adam state of its own that
   starts afresh every round (FedAvg with a local optimiser; the moments would be the size of the model
   again and are not sent);
2. it sends its new meta-weights (only the trainable parameters; a frozen pretrained stem is public);
3. the server averages them, weighted by the client's **number of tasks** (``weighting="tasks"``, the
   default): the meta-objective (seed 002, Eq. 2) is a mean over tasks, so with one local step and plain
   SGD this average is exactly the centralized meta-step over all the tasks pooled; every task draws the
   same number of support and query pairs whatever its image count, so weighting by images
   (``weighting="images"``, available) would let one large product (973 magnetic tiles) outweigh a
   factory of several small ones without carrying more of the objective.

Where the global meta-weights are measured: each client reports the query loss of the weights it received
(its first meta-step's loss, computed anyway: the evaluation happens where the data is; the round's
``client_query_loss``). :meth:`MetaLearningTask.evaluate` adds the mean query loss and AUROC over a fixed
evaluation episode of every client's task (support pairs from its 70% share, every image of its 30%
share as a query), computed in the operator's process, which holds every factory's images in this
simulation study; in a deployment the server has no image and records only what the clients report.

The spec carries the settings and a description of each client's tasks (names and image counts), never a
path: which images a client reads is its operator's configuration, given to the ClientApp
(:func:`client_app`) or, on a deployed SuperNode, its ``data-dir`` (:meth:`MetaLearningTask.with_own_data`).

:func:`compare_federated_centralized` is the issue's comparison: centralized MAML on all the tasks pooled
against the federation, with the same number of meta-steps and the same initial weights, each then adapted
on a left-out product with only ``shots`` images (the new factory).
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedinspect.errors import DataError, FedinspectError, SettingsError
from fedinspect.federation.rounds import ClientResult, FederatedTask, RoundsOutcome, State, client_id, client_order
from fedinspect.meta.maml import (
    EpisodeSampler,
    accumulate_meta_gradient,
    adapt,
    fine_tune,
    meta_train,
    trainable_parameters,
)
from fedinspect.meta.model import ATTENTIONS, BACKBONES, MeDetectionNet
from fedinspect.meta.pairs import PairBatch
from fedinspect.meta.tasks import (
    N_QUERY,
    N_SUPPORT,
    REFERENCE_RULES,
    Episode,
    MetaTask,
    TaskImages,
    TaskSplit,
    leave_one_out,
    load_task,
    pairs_for,
    sample_episode,
    split_task,
    target_split,
    task_rng,
)
from fedinspect.run_folder import staged_output

RESULTS_FORMAT = "fedinspect-meta-federation/1"
COMPARISON_FORMAT = "fedinspect-meta-federation-comparison/1"
WEIGHTS_FILE = "meta_weights.safetensors"
WEIGHTINGS = ("tasks", "images")
ENGINES = ("in-process", "flower-sim")
TARGET_POINTS = 2.0  # the target: federated within 2 AUROC points of centralized
EVAL_BATCH = 128  # pairs per forward pass when scoring a query or test set

TaskLike = MetaTask | TaskImages


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MetaFederationSettings:
    """Everything that defines a federated meta-learning run and its comparison (written to results.json).

    Defaults are cheap (64 px, first order, 3 rounds of 4 local meta-steps); the MAML learning rates, Adam
    betas, 64 support / 20 query pairs and the 1e-4 fine-tuning rate are the seed's. ``meta_batch``: tasks per
    meta-step (None: all the client's tasks, and all the pooled tasks for centralized MAML). ``engines``: the
    federation engines :func:`compare_federated_centralized` runs (the first one's weights are adapted).
    """

    rounds: int = 3
    local_steps: int = 4
    meta_batch: int | None = None
    image_size: int = 64
    n_support: int = N_SUPPORT
    n_query: int = N_QUERY
    inner_steps: int = 1
    inner_lr: float = 1e-5
    outer_lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    first_order: bool = True
    reference: str = "nearest"
    attention: str = "low"
    backbone: str = "conv4"
    width: int = 32
    weighting: str = "tasks"
    min_clients: int = 1
    seed: int = 0
    # the new factory: adaptation of the meta-weights on a left-out product
    shots: int = 20
    fine_tune_lr: float = 1e-4
    fine_tune_epochs: int = 50
    fine_tune_patience: int | None = 10
    engines: tuple[str, ...] = ("in-process",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "engines", tuple(self.engines))
        positive = ("rounds", "local_steps", "image_size", "n_support", "n_query", "width", "min_clients", "shots",
                    "fine_tune_epochs")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"meta federation: {name} must be an integer >= 1, got {value!r}")
        for name in ("meta_batch", "fine_tune_patience"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SettingsError(f"meta federation: {name} must be None or an integer >= 1, got {value!r}")
        for name in ("inner_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettingsError(f"meta federation: {name} must be an integer >= 0, got {value!r}")
        for name in ("inner_lr", "outer_lr", "fine_tune_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise SettingsError(f"meta federation: {name} must be a finite number >= 0, got {value!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SettingsError(f"meta federation: betas must be two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.first_order, bool):
            raise SettingsError(f"meta federation: first_order must be true or false, got {self.first_order!r}")
        for name, allowed in (("reference", REFERENCE_RULES), ("attention", ATTENTIONS), ("backbone", BACKBONES),
                              ("weighting", WEIGHTINGS)):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"meta federation: {name} must be one of {', '.join(allowed)}, "
                                    f"got {getattr(self, name)!r}")
        if not self.engines or any(engine not in ENGINES for engine in self.engines):
            raise SettingsError(f"meta federation: engines must be some of {', '.join(ENGINES)}, got {self.engines!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"betas": list(self.betas), "engines": list(self.engines)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MetaFederationSettings:
        """The settings of :meth:`to_dict`'s dict; an unknown or malformed entry is a SettingsError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(f"meta federation: unknown setting(s) {', '.join(unknown)}")
        values = dict(values)
        for name in ("betas", "engines"):
            if name in values and not isinstance(values[name], list | tuple):
                raise SettingsError(f"meta federation: {name} must be a list, got {values[name]!r}")
        try:
            return cls(**values)
        except TypeError as error:
            raise SettingsError(f"meta federation: {error}") from error

    def build_model(self) -> MeDetectionNet:
        """A MeDetectionNet of these settings (weights from torch's global generator)."""
        return MeDetectionNet(attention=self.attention, backbone=self.backbone, width=self.width)


# ---------------------------------------------------------------------------------------------- helpers


def client_seed(seed: int, index: int, round_number: int) -> int:
    """The episode seed of client ``index`` in round ``round_number``: distinct per client and round."""
    return int(np.random.SeedSequence([seed, index, round_number]).generate_state(1)[0])


def episode_sampler(splits: Sequence[TaskSplit], settings: MetaFederationSettings,
                    meta_batch: int | None = None) -> EpisodeSampler:
    """A meta-batch of episodes: ``meta_batch`` of ``splits`` (None: all, in order; else drawn without
    replacement, kept in order), one :func:`sample_episode` each with the settings' pair counts and rule."""
    if not splits:
        raise ValueError("episode_sampler: no task")
    if meta_batch is not None and meta_batch < 1:
        raise ValueError(f"episode_sampler: meta_batch must be >= 1 or None, got {meta_batch!r}")

    def sample(rng: np.random.Generator) -> list[Episode]:
        chosen = range(len(splits))
        if meta_batch is not None and meta_batch < len(splits):
            chosen = sorted(rng.choice(len(splits), size=meta_batch, replace=False).tolist())
        return [sample_episode(splits[i], rng, settings.n_support, settings.n_query, settings.reference)
                for i in chosen]

    return sample


def local_meta_steps(model: torch.nn.Module, sample_episodes: EpisodeSampler, settings: MetaFederationSettings,
                     seed: int) -> list[float]:
    """``settings.local_steps`` MAML meta-steps of ``model`` in place (meta_train's step, with a fresh Adam);
    returns the query loss of each step (of the weights before its update). The last update is kept, not the
    best-looking draw: a client's round is a fixed amount of local training, as in FedAvg.

    Raises:
        FloatingPointError: a non-finite query loss.
    """
    params = trainable_parameters(model)
    optimizer = torch.optim.Adam(params.values(), lr=settings.outer_lr, betas=settings.betas)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    for step in range(settings.local_steps):
        optimizer.zero_grad(set_to_none=True)
        value = accumulate_meta_gradient(model, params, sample_episodes(rng), settings.inner_steps,
                                          settings.inner_lr, settings.first_order)
        if not math.isfinite(value):
            raise FloatingPointError(f"query loss became {value} at local meta-step {step}")
        losses.append(value)
        optimizer.step()
    return losses


def load_meta_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Load meta-weights (the model's trainable parameters, nothing else) into ``model``.

    Raises:
        FedinspectError: naming ``source`` when the names, shapes or dtypes do not fit the model.
    """
    expected = trainable_parameters(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise FedinspectError(f"{source}: meta-weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    for name, value in state.items():
        if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
            raise FedinspectError(f"{source}: {name} is {value.dtype} {tuple(value.shape)}, expected "
                                  f"{expected[name].dtype} {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, value in state.items():
            expected[name].copy_(value)
    return model


def initial_meta_state(settings: MetaFederationSettings) -> State:
    """The seeded initial meta-weights (torch's global generator left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = settings.build_model()
    return {name: p.detach().clone() for name, p in trainable_parameters(model).items()}


def _loaded(task: TaskLike, image_size: int) -> TaskImages:
    if isinstance(task, TaskImages):
        if task.image_size != image_size:
            raise SettingsError(f"task {task.name!r} was loaded at {task.image_size} px; the settings say "
                                f"{image_size}")
        return task
    if isinstance(task, MetaTask):
        return load_task(task, image_size)
    raise TypeError(f"expected a MetaTask or TaskImages, got {type(task).__name__}")


def _describe(task: TaskLike) -> dict[str, Any]:
    """What the spec says of a task: its name and image counts (never where its images are)."""
    meta = task.task if isinstance(task, TaskImages) else task
    return {"name": meta.name, "good": len(meta.good), "defective": len(meta.defective)}


def _check_descriptions(value: Any) -> list[list[dict[str, Any]]]:
    if not isinstance(value, list) or not value:
        raise FedinspectError("meta task: the spec's 'clients' must be a non-empty list (one list of tasks per client)")
    checked = []
    for number, client in enumerate(value):
        if not isinstance(client, list) or not client:
            raise FedinspectError(f"meta task: {client_id(number)} must hold a non-empty list of tasks")
        entries = []
        for entry in client:
            ok = (isinstance(entry, Mapping) and set(entry) == {"name", "good", "defective"}
                  and isinstance(entry["name"], str) and entry["name"]
                  and all(isinstance(entry[k], int) and not isinstance(entry[k], bool) and entry[k] >= 1
                          for k in ("good", "defective")))
            if not ok:
                raise FedinspectError(f"meta task: {client_id(number)} has a malformed task description {entry!r}")
            entries.append(dict(entry))
        checked.append(entries)
    names = [entry["name"] for client in checked for entry in client]
    if len(set(names)) != len(names):
        twice = sorted(n for n in set(names) if names.count(n) > 1)
        raise FedinspectError(f"meta task: a task belongs to one client; named twice: {twice}")
    return checked


def _scores(model: torch.nn.Module, params: Mapping[str, torch.Tensor] | None, batch: PairBatch) -> torch.Tensor:
    """Logits of every pair of ``batch`` (by chunks, no graph); ``params`` None: the module's own weights."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(batch), EVAL_BATCH):
            reference, test = batch.reference[start:start + EVAL_BATCH], batch.test[start:start + EVAL_BATCH]
            if params is None:
                chunks.append(model(reference, test))
            else:
                chunks.append(functional_call(model, dict(params), (reference, test)))
    return torch.cat(chunks)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from fedinspect.evaluation.metrics import image_auroc

    return image_auroc(labels, scores) if 0 < labels.sum() < len(labels) else None


# ---------------------------------------------------------------------------------------------- the task


class MetaLearningTask(FederatedTask):
    """FedAvg of MAML meta-updates over factories, each with its own product tasks (see the module docstring).

    Args:
        tasks_by_client: per client, its tasks (:class:`MetaTask`, read at ``settings.image_size`` on first
            use, or :class:`TaskImages` already read at that size); a task belongs to one client.
        settings: the run.
        progress: progress bars.

    Attributes set by :meth:`conclude`: ``final_state_`` (the global meta-weights) and ``results_``.
    """

    kind = "meta"
    aggregation = "mean"

    def __init__(self, tasks_by_client: Sequence[Sequence[TaskLike]],
                 settings: MetaFederationSettings | None = None, *, progress: bool = False) -> None:
        self.settings = settings or MetaFederationSettings()
        tasks = [list(client) for client in tasks_by_client]
        self.descriptions = _check_descriptions([[_describe(t) for t in client] for client in tasks])
        self._tasks: list[list[TaskLike]] | None = tasks
        self._init(progress)

    def _init(self, progress: bool) -> None:
        self.progress = progress
        self.rounds = self.settings.rounds
        self.n_clients = len(self.descriptions)
        self.min_clients = self.settings.min_clients
        self.own_tasks: list[TaskLike] | None = None  # a deployed SuperNode's own tasks (with_own_data)
        self._splits: dict[int, list[TaskSplit]] = {}
        self._evaluation_sets: dict[str, tuple[PairBatch, PairBatch]] | None = None
        self._final: tuple[int, dict[str, Any]] | None = None
        self.final_state_: State | None = None
        self.results_: dict[str, Any] | None = None

    @classmethod
    def described(cls, descriptions: list[list[dict[str, Any]]], settings: MetaFederationSettings,
                  progress: bool = False) -> MetaLearningTask:
        """A task that knows its clients' tasks by description only (no image): a ClientApp without data."""
        task = cls.__new__(cls)
        task.settings = settings
        task.descriptions = _check_descriptions(descriptions)
        task._tasks = None
        task._init(progress)
        return task

    # ------------------------------------------------------------------------------------------ spec
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "settings": self.settings.to_dict(),
                "clients": [[dict(entry) for entry in client] for client in self.descriptions]}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], secrets: Mapping[str, Any]) -> MetaLearningTask:
        """The task of a spec, without images (see :func:`client_app` for a ClientApp that has them).

        Raises:
            FedinspectError: a spec of another kind, or malformed settings or task descriptions.
        """
        if spec.get("kind") != cls.kind:
            raise FedinspectError(f"meta task: spec of kind {spec.get('kind')!r}")
        settings = spec.get("settings")
        if not isinstance(settings, Mapping):
            raise FedinspectError("meta task: the spec needs a 'settings' object")
        return cls.described(spec.get("clients"), MetaFederationSettings.from_dict(settings))

    def with_own_data(self, data_dir: Path) -> MetaLearningTask:
        """This task on a SuperNode whose tasks are those found in its own ``data_dir`` (categories, labelled
        folders or a task list, as :func:`fedinspect.meta.tasks.tasks_from_dirs` reads them)."""
        from fedinspect.meta.tasks import tasks_from_dirs

        task = copy.copy(self)
        task._splits = {}
        task.own_tasks = list(tasks_from_dirs([data_dir]))
        return task

    # ------------------------------------------------------------------------------------------ data
    def client_tasks(self, index: int) -> list[TaskLike]:
        """Client ``index``'s tasks (a deployed node: its own, whatever its index)."""
        name = client_id(index)
        if not 0 <= index < self.n_clients:
            raise FedinspectError(f"{name}: not a client of this {self.n_clients}-client run")
        if self.own_tasks is not None:
            return self.own_tasks
        if self._tasks is None:
            names = ", ".join(entry["name"] for entry in self.descriptions[index])
            raise FedinspectError(f"{name}: this process holds no images of its tasks ({names}); give the ClientApp "
                                  "its tasks (fedinspect.meta.federated.client_app) or the SuperNode a data-dir")
        return self._tasks[index]

    def client_splits(self, index: int) -> list[TaskSplit]:
        """Client ``index``'s tasks read and split 70/30 (seeded), once."""
        if index not in self._splits:
            name = client_id(index)
            try:
                self._splits[index] = [split_task(_loaded(t, self.settings.image_size), self.settings.seed)
                                       for t in self.client_tasks(index)]
            except (DataError, SettingsError) as error:
                raise FedinspectError(f"{name}: {error}") from error
        return self._splits[index]

    def _has_images(self) -> bool:
        return self._tasks is not None and self.own_tasks is None

    # ------------------------------------------------------------------------------------------ rounds
    def initial_state(self) -> State:
        return initial_meta_state(self.settings)

    def model(self, state: State, source: str) -> MeDetectionNet:
        """A model holding the meta-weights ``state`` (``source`` names them in an error)."""
        return load_meta_state(self.settings.build_model(), state, source)

    def client_update(self, index: int, state: State, round_number: int, memory: Mapping[str, Any]) -> ClientResult:
        """``local_steps`` meta-steps on this client's own tasks from the global meta-weights."""
        name = client_id(index)
        splits = self.client_splits(index)
        model = self.model(state, f"{name}: the global meta-weights")
        try:
            losses = local_meta_steps(model, episode_sampler(splits, self.settings, self.settings.meta_batch),
                                      self.settings, client_seed(self.settings.seed, index, round_number))
        except (FloatingPointError, ValueError) as error:
            raise FedinspectError(f"{name}: {error}") from error
        weight = len(splits) if self.settings.weighting == "tasks" else sum(len(s.images) for s in splits)
        arrays = {key: p.detach().clone() for key, p in trainable_parameters(model).items()}
        metrics = {"train_loss": float(np.mean(losses)), "global_query_loss": losses[0],
                   "meta_steps": float(len(losses)), "tasks": float(len(splits))}
        return ClientResult(arrays, {"": int(weight)}, metrics, {})

    def check_update(self, name: str, result: ClientResult, state: State) -> None:
        """The default checks (every trainable array, right shape and dtype, finite), then: one weight, equal to
        the client's number of tasks (or images) as the spec describes them unless the node holds its own data,
        and finite losses."""
        super().check_update(name, result, state)
        if set(result.arrays) != set(state):
            raise FedinspectError(f"{name}: sends {len(result.arrays)} of the {len(state)} meta-weight arrays")
        if set(result.examples) != {""}:
            raise FedinspectError(f"{name}: expected one example count (key ''), got {sorted(result.examples)}")
        index = client_order(name)[0]
        if name not in self.own_data_clients and 0 <= index < self.n_clients:
            tasks = self.descriptions[index]
            expected = (len(tasks) if self.settings.weighting == "tasks"
                        else sum(t["good"] + t["defective"] for t in tasks))
            if result.examples[""] != expected:
                raise FedinspectError(f"{name}: claims a weight of {result.examples['']}, its "
                                      f"{self.settings.weighting} count is {expected}")
        for key in ("train_loss", "global_query_loss"):
            value = result.metrics.get(key)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise FedinspectError(f"{name}: {key} must be a finite number, got {value!r}")

    def round_metrics(self, round_number: int, results: Mapping[str, ClientResult]) -> dict[str, Any]:
        """Each client's query loss of the global meta-weights it received (measured on its own tasks)."""
        return {"client_query_loss": {name: float(results[name].metrics["global_query_loss"])
                                      for name in sorted(results, key=client_order)}}

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluation_sets(self) -> dict[str, tuple[PairBatch, PairBatch]]:
        """Per task of every client: a fixed (support, query) episode; the query is every image of the task's
        30% share once. Drawn once from ``(seed, task name)``, so every round is measured on the same pairs."""
        if self._evaluation_sets is None:
            sets = {}
            for index in range(self.n_clients):
                for split in self.client_splits(index):
                    rng = task_rng(self.settings.seed, split.name, "federated-evaluation")
                    support = sample_episode(split, rng, self.settings.n_support, 1, self.settings.reference).support
                    query = pairs_for(split.images, split.holdout, split.good(split.pool), self.settings.reference, rng)
                    sets[split.name] = (support, query)
            self._evaluation_sets = sets
        return self._evaluation_sets

    def evaluate(self, state: State, round_number: int) -> dict[str, Any]:
        """Mean query loss and AUROC after adaptation (``inner_steps`` on the support) over the clients' tasks;
        ``{}`` where this process holds no image (a deployment's server)."""
        if not self._has_images():
            return {}
        model = self.model(state, f"round {round_number}: the aggregated meta-weights")
        params = trainable_parameters(model)
        per_task: dict[str, dict[str, float | None]] = {}
        for name, (support, query) in self.evaluation_sets().items():
            adapted = adapt(model, params, support, self.settings.inner_steps, self.settings.inner_lr,
                            first_order=True)
            logits = _scores(model, adapted, query)
            loss = float(F.binary_cross_entropy_with_logits(logits, query.label))
            per_task[name] = {"query_loss": loss, "query_auroc": _auroc(query.label.numpy(), logits.numpy())}
        aurocs = [v["query_auroc"] for v in per_task.values() if v["query_auroc"] is not None]
        record = {"query_loss": float(np.mean([v["query_loss"] for v in per_task.values()])),
                  "query_auroc": float(np.mean(aurocs)) if aurocs else None, "tasks": per_task}
        self._final = (round_number, record)
        return record

    # ------------------------------------------------------------------------------------------ results
    def conclude(self, outcome: RoundsOutcome, out_dir: str | Path, engine: str) -> dict[str, Any]:
        """results.json and the global meta-weights (``meta_weights.safetensors``), written all at once."""
        from safetensors.torch import save_file

        from fedinspect import __version__

        if not outcome.history:
            raise FedinspectError("meta federation: no round was run, nothing to conclude")
        last = outcome.history[-1]["round"]
        if self._has_images() and (self._final is None or self._final[0] != last):
            self.evaluate(outcome.state, last)
        final = self._final[1] if self._final is not None else {}
        results: dict[str, Any] = {
            "format": RESULTS_FORMAT,
            "kind": self.kind,
            "engine": engine,
            "settings": self.settings.to_dict(),
            "weighting": self.settings.weighting,
            "clients": [{"client": client_id(i), "tasks": self.descriptions[i],
                         **outcome.clients.get(client_id(i), {"examples": {}, "bytes_sent": []})}
                        for i in range(self.n_clients)],
            "missing_clients": [dict(m) for m in outcome.missing],
            "history": outcome.history,
            "final": final,
            "weights_file": WEIGHTS_FILE,
            "timing": dict(outcome.timing),
            "versions": {"fedinspect": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        roots = [] if self._tasks is None else [self._root(t) for client in self._tasks for t in client]
        with staged_output(out_dir, inputs=roots) as staging:
            save_file({k: v.detach().contiguous() for k, v in outcome.state.items()}, str(staging / WEIGHTS_FILE),
                      metadata={"format": RESULTS_FORMAT, "settings": json.dumps(self.settings.to_dict())})
            (staging / "results.json").write_text(json.dumps(results, indent=2))
        self.final_state_ = {k: v.detach().clone() for k, v in outcome.state.items()}
        self.results_ = results
        return results

    @staticmethod
    def _root(task: TaskLike) -> Path:
        return (task.task if isinstance(task, TaskImages) else task).root


# ---------------------------------------------------------------------------------------------- Flower


@dataclass
class ClientTasks:
    """The operator's configuration of a simulated ClientApp: which tasks each client reads.

    Called with a spec (the :data:`~fedinspect.federation.rounds_flower.TaskBuilder` of
    :func:`~fedinspect.federation.rounds_flower.make_client_app`), it rebuilds the task with these tasks,
    refusing a spec whose descriptions of them differ (another run's spec, or a tampered one).
    """

    tasks_by_client: list[list[TaskLike]] = field(default_factory=list)

    def __call__(self, spec: Mapping[str, Any], secrets: Mapping[str, Any]) -> MetaLearningTask:
        described = MetaLearningTask.from_spec(spec, secrets)
        own = [[_describe(t) for t in client] for client in self.tasks_by_client]
        if own != described.descriptions:
            raise FedinspectError("meta task: the spec describes other tasks than this ClientApp holds "
                                  f"({described.descriptions} against {own})")
        return MetaLearningTask(self.tasks_by_client, described.settings)


def client_app(tasks_by_client: Sequence[Sequence[TaskLike]]) -> Any:
    """A Flower ClientApp whose clients read ``tasks_by_client`` (one list per client index)."""
    from fedinspect.federation.rounds_flower import make_client_app

    return make_client_app(ClientTasks([list(client) for client in tasks_by_client]))


def run_federation(tasks_by_client: Sequence[Sequence[TaskLike]], out_dir: str | Path,
                   settings: MetaFederationSettings | None = None, engine: str = "in-process",
                   progress: bool = True) -> MetaLearningTask:
    """Federated meta-learning on ``engine``; returns the concluded task (``final_state_``, ``results_``)."""
    from fedinspect.federation.rounds import run_rounds

    task = MetaLearningTask(tasks_by_client, settings, progress=progress)
    if engine == "in-process":
        task.conclude(run_rounds(task, progress=progress), out_dir, engine)
    elif engine == "flower-sim":
        from fedinspect.federation.rounds_flower import run_simulation

        run_simulation(task, out_dir, progress=progress, client_app=client_app(task._tasks or []))
    else:
        raise SettingsError(f"unknown engine {engine!r}: {' or '.join(ENGINES)}")
    return task


# ---------------------------------------------------------------------------------------------- comparison


def adapt_to_target(state: State, sets: TargetSets, settings: MetaFederationSettings) -> dict[str, Any]:
    """Fine-tune a model from the meta-weights ``state`` on the target's few shots and score its test share.

    Accuracy, precision, recall and F1 at probability 0.5; AUROC of the probabilities; epochs to converge as
    :func:`fedinspect.meta.maml.fine_tune` counts them.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    model = load_meta_state(settings.build_model(), state, "meta-weights to adapt")
    started = time.perf_counter()
    result = fine_tune(model, sets.fit, sets.validation, lr=settings.fine_tune_lr, epochs=settings.fine_tune_epochs,
                       patience=settings.fine_tune_patience, betas=settings.betas, seed=settings.seed)
    seconds = time.perf_counter() - started
    probability = torch.sigmoid(_scores(model, None, sets.test)).numpy()
    labels = sets.test.label.numpy().astype(int)
    predicted = (probability >= 0.5).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="binary", zero_division=0)
    return {"auroc": _auroc(labels, probability), "accuracy": float(accuracy_score(labels, predicted)),
            "precision": float(precision), "recall": float(recall), "f1": float(f1),
            "epochs_to_converge": int(result.epochs_to_converge), "epochs_run": len(result.train_loss),
            "stopped_early": bool(result.stopped_early), "fine_tune_s": seconds}


@dataclass(frozen=True)
class TargetSets:
    """The new factory's pairs: ``fit`` and ``validation`` from its ``shots`` images, ``test`` its 30% share."""

    fit: PairBatch
    validation: PairBatch | None
    test: PairBatch
    counts: dict[str, int]

    @classmethod
    def of(cls, target: TaskImages, settings: MetaFederationSettings) -> TargetSets:
        split = split_task(target, settings.seed)
        rng = task_rng(settings.seed, target.name, "target")
        sets = target_split(split, rng, shots=settings.shots)
        fit, validation = sets.train_pairs(rng, settings.reference)
        test = sets.test_pairs(rng, settings.reference)
        counts = {"fit": len(sets.fit), "validation": len(sets.validation), "test": len(sets.test),
                  "test_defective": int(test.label.sum())}
        return cls(fit, validation if len(sets.validation) else None, test, counts)


def compare_federated_centralized(tasks_by_client: Sequence[Sequence[TaskLike]], target_task: TaskLike,
                                  settings: MetaFederationSettings | None = None, out: str | Path = "meta-federation",
                                  progress: bool = False) -> dict[str, Any]:
    """Centralized MAML on every client's tasks pooled against the federation, both adapted to a new product.

    Both start from the same seeded meta-weights and take ``rounds * local_steps`` sequential meta-steps: the
    centralized run on the pooled tasks (:func:`~fedinspect.meta.maml.meta_train`, no early stop before the
    last step, keeping its lowest-query-loss weights as meta_train does; ``meta_batch`` None: every pooled task
    each step, so both process the same episodes), the federation on ``engines`` (its final global weights).
    Each, and a random initialisation for context, is then fine-tuned on ``shots`` images of ``target_task``
    (left out of both: refused if it shares an image with a client's task) and tested on its 30% share.

    Writes ``out/results.json`` (and the federated run under ``out/<engine>/``); returns results.json's dict,
    whose ``difference_points`` is 100 * (federated AUROC - centralized AUROC) and ``within_target`` whether
    the federation is at most 2 points below.
    """
    from fedinspect import __version__
    from fedinspect.federation.rounds import run_rounds

    settings = settings or MetaFederationSettings()
    clients = [[_loaded(t, settings.image_size) for t in client] for client in tasks_by_client]
    target = _loaded(target_task, settings.image_size)
    everything = [t.task for client in clients for t in client] + [target.task]
    leave_one_out(everything, target.name)  # refuses a target image shared with a meta-training task
    sets = TargetSets.of(target, settings)
    initial = initial_meta_state(settings)
    steps = settings.rounds * settings.local_steps
    roots = [t.task.root for client in clients for t in client] + [target.task.root]

    with staged_output(out, inputs=roots) as staging:
        # centralized: all the tasks pooled in one place
        pooled = [split_task(t, settings.seed) for client in clients for t in client]
        meta_batch = None if settings.meta_batch is None else min(len(pooled), settings.meta_batch * len(clients))
        model = load_meta_state(settings.build_model(), initial, "initial meta-weights")
        started = time.perf_counter()
        central = meta_train(model, episode_sampler(pooled, settings, meta_batch), meta_steps=steps,
                             inner_steps=settings.inner_steps, inner_lr=settings.inner_lr, outer_lr=settings.outer_lr,
                             betas=settings.betas, first_order=settings.first_order, patience=None,
                             seed=settings.seed, progress=progress)
        central_s = time.perf_counter() - started
        central_state = {k: p.detach().clone() for k, p in trainable_parameters(model).items()}

        # federated, on each engine asked for
        engines: dict[str, dict[str, Any]] = {}
        states: dict[str, State] = {}
        for engine in settings.engines:
            started = time.perf_counter()
            if engine == "in-process":
                task = MetaLearningTask(clients, settings, progress=progress)
                task.conclude(run_rounds(task, progress=progress), staging / engine, engine)
            else:
                task = run_federation(clients, staging / engine, settings, engine, progress)
            assert task.final_state_ is not None and task.results_ is not None
            states[engine] = task.final_state_
            history = task.results_["history"]
            engines[engine] = {"seconds": time.perf_counter() - started,
                               "rounds_s": task.results_["timing"].get("round_s", []),
                               "query_loss": [r.get("query_loss") for r in history],
                               "query_auroc": [r.get("query_auroc") for r in history],
                               "missing_clients": task.results_["missing_clients"],
                               "bytes_per_client_per_round": history[-1]["bytes_per_client"]}
        main = settings.engines[0]
        if len(states) > 1:
            engines["max_weight_difference"] = max(float((states[e][k] - states[main][k]).abs().max())
                                                   for e in states for k in states[main])

        adapted = {"centralized": adapt_to_target(central_state, sets, settings),
                   "federated": adapt_to_target(states[main], sets, settings),
                   "random_init": adapt_to_target(_random_state(settings), sets, settings)}
        federated_auroc, central_auroc = adapted["federated"]["auroc"], adapted["centralized"]["auroc"]
        difference = None if None in (federated_auroc, central_auroc) else 100 * (federated_auroc - central_auroc)
        results = {
            "format": COMPARISON_FORMAT,
            "settings": settings.to_dict(),
            "clients": [{"client": client_id(i), "tasks": [_describe(t) for t in client]}
                        for i, client in enumerate(clients)],
            "target": {**_describe(target), **sets.counts, "shots": settings.shots},
            "meta_steps": steps,
            "centralized": {"seconds": central_s, "best_step": central.best_step,
                            "query_loss": central.history, **adapted["centralized"]},
            "federated": {"engine": main, "engines": engines, **adapted["federated"]},
            "random_init": adapted["random_init"],
            "difference_points": difference,
            "target_points": TARGET_POINTS,
            "within_target": None if difference is None else bool(difference >= -TARGET_POINTS),
            "versions": {"fedinspect": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        (staging / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _random_state(settings: MetaFederationSettings) -> State:
    """A random initialisation other than the meta-learning's (seed + 1): the no-meta-learning reference."""
    return initial_meta_state(MetaFederationSettings.from_dict({**settings.to_dict(), "seed": settings.seed + 1}))
