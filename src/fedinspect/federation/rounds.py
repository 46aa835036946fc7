"""Federated rounds of any model: the one path for weight updates and one-round statistics.

A :class:`FederatedTask` says what is its own - how a client computes its update from the global
state, how the global model is evaluated, how the finished run is written - and this module (in
process) or :mod:`fedinspect.federation.rounds_flower` (on Flower) drives it, with the same
aggregation, so both engines give the same numbers for the same task and seed:

- ``aggregation = "mean"``: FedAvg over ``rounds`` rounds (FedProx when the task's local training adds
  the proximal term); the PIDS classifiers and the trained detectors.
- ``aggregation = "sum"``: one round of sufficient statistics added up (PaDiM); on Flower the sum may
  go through secure aggregation.

A client's ``memory`` (e.g. its DP accountant history) stays with that client from round to round:
in a dict here, in the ClientApp's ``context.state`` on Flower.

A client that fails with a :class:`FedinspectError` (bad data) is recorded in ``missing`` and the
round goes on with the others; a round that nobody answers stops the run with every reason.
"""

from __future__ import annotations

import importlib
import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from fedinspect.errors import FedinspectError
from fedinspect.federation.fedavg import AGGREGATIONS, aggregate_groups

State = dict[str, torch.Tensor]

# kind -> "module:class" of every task a ClientApp may be asked to run (fixed here: a message names a
# kind, it never chooses code to import)
TASKS = {
    "classify": "fedinspect.classification.task:ClassificationTask",
    "detector": "fedinspect.federation.detector_task:DetectorTask",
    "meta": "fedinspect.meta.federated:MetaLearningTask",
    "padim_statistics": "fedinspect.federation.statistics_task:StatisticsTask",
    "patchcore": "fedinspect.federation.runner:PatchCoreTask",
    "supervised": "fedinspect.federation.supervised_task:SupervisedTask",
}


def client_id(index: int) -> str:
    return f"client_{index}"


def client_order(name: str) -> tuple[int, str]:
    """Sort key of client names: ``client_<i>`` by ``i``, then any other name (a deployed factory's) by name."""
    match = re.fullmatch(r"client_(\d+)", name)
    return (int(match.group(1)) if match else sys.maxsize, name)


@dataclass
class ClientResult:
    """One client's answer in one round.

    ``examples`` counts the client's training examples per group of ``arrays`` (see
    :func:`fedavg.aggregate_groups`; ``{"": n}`` for a single model): the FedAvg weights.
    """

    arrays: State
    examples: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return int(sum(self.examples.values()))

    @property
    def n_bytes(self) -> int:
        """Bytes of the arrays sent (their raw size; the wire adds a small header per array)."""
        return int(sum(t.numel() * t.element_size() for t in self.arrays.values()))


class FederatedTask(ABC):
    """What one kind of federated model provides to the round engines."""

    kind: ClassVar[str]
    aggregation: ClassVar[str] = "mean"
    rounds: int
    n_clients: int
    min_clients: int = 1  # a round with fewer answers stops the run, naming the missing clients' reasons
    # clients that hold their own data (deployed SuperNodes with a data-dir; set by the Flower engine once it
    # knows them): the server cannot pin their image counts to its plan
    own_data_clients: frozenset[str] = frozenset()

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-ready description from which :meth:`from_spec` rebuilds this task on a ClientApp."""

    def secrets(self) -> dict[str, Any]:
        """Values the clients need but results.json must never hold (e.g. an obfuscation key)."""
        return {}

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: Mapping[str, Any], secrets: Mapping[str, Any]) -> FederatedTask:
        """The task :meth:`spec` and :meth:`secrets` describe."""

    @abstractmethod
    def initial_state(self) -> State:
        """The global model of round 0 (seeded); ``{}`` for a one-round statistic."""

    @abstractmethod
    def client_update(self, index: int, state: State, round_number: int, memory: Mapping[str, Any]) -> ClientResult:
        """Client ``index``'s work in one round, from the global ``state``; its own data, never another's."""

    def aggregate(self, results: Mapping[str, ClientResult]) -> State:
        """The new global state from the round's checked answers, given in client order: FedAvg per model
        (``aggregation = "mean"``) or their sum (``"sum"``); a task with another rule (PatchCore's coreset of
        the banks) overrides it."""
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"{type(self).__name__}.aggregation must be one of {AGGREGATIONS} or aggregate() "
                             "overridden")
        return aggregate_groups([r.arrays for r in results.values()], [r.examples for r in results.values()],
                                self.aggregation)

    def with_own_data(self, data_dir: Path) -> FederatedTask:
        """This task as run by a deployed SuperNode that holds its own images under ``data_dir`` (the dataset
        layout) instead of the server's partition of one dataset; :meth:`client_update` then reads only those.
        A kind that cannot do that says so."""
        raise FedinspectError(f"{self.kind}: a SuperNode with its own data-dir is not supported for this task")

    @abstractmethod
    def evaluate(self, state: State, round_number: int) -> dict[str, Any]:
        """Metrics of the global model after a round (recorded in the round's history)."""

    def check_update(self, name: str, result: ClientResult, state: State) -> None:
        """Refuse a client's answer that does not fit the round (untrusted input): raise a
        :class:`FedinspectError` naming the client; the engine then drops it like a client that failed.

        The default checks what aggregation needs: every array of the global ``state`` it sends, with the
        state's shape and dtype (or, for a statistic, ``state`` being empty, nothing), finite values, and
        non-negative example counts for exactly the groups it sends."""
        for group, count in result.examples.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise FedinspectError(f"{name}: examples of {group!r} must be a non-negative integer, got {count!r}")
        for key, value in result.arrays.items():
            if state and key not in state:
                raise FedinspectError(f"{name}: unexpected array {key!r}")
            if state and (value.shape != state[key].shape or value.dtype != state[key].dtype):
                raise FedinspectError(f"{name}: {key} is {value.dtype} {tuple(value.shape)}, expected "
                                      f"{state[key].dtype} {tuple(state[key].shape)}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise FedinspectError(f"{name}: {key} holds non-finite values")

    def round_metrics(self, round_number: int, results: Mapping[str, ClientResult]) -> dict[str, Any]:
        """Entries of the round's record drawn from the clients' answers (e.g. each client's epsilon from its
        accountant history); raise :class:`FedinspectError` naming a client whose answer is malformed."""
        return {}

    @abstractmethod
    def conclude(self, outcome: RoundsOutcome, out_dir: str | Path, engine: str) -> dict[str, Any]:
        """Write results.json (and the report) of a finished run; returns results.json's dict."""


def task_from_spec(spec: Mapping[str, Any], secrets: Mapping[str, Any] | None = None) -> FederatedTask:
    """Rebuild a task from its :meth:`~FederatedTask.spec` (a ClientApp's side)."""
    kind = spec.get("kind")
    if kind not in TASKS:
        raise FedinspectError(f"unknown federated task kind {kind!r}; known: {sorted(TASKS)}")
    module, name = TASKS[kind].split(":")
    task_class = getattr(importlib.import_module(module), name)
    return task_class.from_spec(spec, secrets or {})


@dataclass
class RoundsOutcome:
    """A finished run: the final global state and what every round measured."""

    state: State
    history: list[dict[str, Any]]
    memories: dict[str, dict[str, Any]]
    missing: list[dict[str, str]]
    clients: dict[str, dict[str, Any]]  # per client: examples per group, bytes sent per round
    timing: dict[str, float]
    secure_aggregation: dict[str, Any] = field(default_factory=dict)  # protocol and cost, when the sum was secure
    final_results: dict[str, ClientResult] = field(default_factory=dict)  # the last round's answers, client order


def aggregate(task: FederatedTask, results: Mapping[str, ClientResult]) -> State:
    """:meth:`FederatedTask.aggregate` of the results in client order (so every engine adds alike)."""
    return task.aggregate({name: results[name] for name in sorted(results, key=client_order)})


class RoundRecorder:
    """Collects every round's record, the clients' traffic and the missing clients (shared by both engines)."""

    def __init__(self, task: FederatedTask) -> None:
        self.task = task
        self.history: list[dict[str, Any]] = []
        self.missing: list[dict[str, str]] = []
        self.clients: dict[str, dict[str, Any]] = {}
        self.final_results: dict[str, ClientResult] = {}
        self.started = time.perf_counter()

    def drop(self, name: str, round_number: int, reason: str) -> None:
        print(f"warning: {name} dropped out of round {round_number}: {reason}", file=sys.stderr)
        self.missing.append({"client": name, "round": round_number, "reason": reason})

    def check_quorum(self, round_number: int, results: Mapping[str, ClientResult]) -> None:
        """Stop the run, with every missing client's reason, when fewer than the task's minimum answered."""
        least = max(1, int(self.task.min_clients))
        if len(results) < least:
            reasons = "; ".join(f"{m['client']}: {m['reason']}" for m in self.missing if m["round"] == round_number)
            raise FedinspectError(f"round {round_number}: only {len(results)} of {self.task.n_clients} clients "
                                  f"answered (minimum {least}): {reasons or 'no client'}")

    def close_round(self, round_number: int, state: State, results: Mapping[str, ClientResult],
                    started: float, bytes_sent: Mapping[str, int]) -> dict[str, Any]:
        aggregated = time.perf_counter()
        record: dict[str, Any] = {"round": round_number, "clients": len(results)}
        record.update(self.task.evaluate(state, round_number))
        record.update(self.task.round_metrics(round_number, results))
        total = sum(r.n_examples for r in results.values())
        losses = [(r.metrics["train_loss"], r.n_examples) for r in results.values() if "train_loss" in r.metrics]
        if losses and total:
            record["train_loss"] = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        record["seconds"] = time.perf_counter() - started
        record["evaluation_s"] = time.perf_counter() - aggregated
        record["bytes_per_client"] = {name: int(bytes_sent[name]) for name in sorted(results, key=client_order)}
        for name, result in results.items():
            entry = self.clients.setdefault(name, {"examples": result.examples, "bytes_sent": []})
            entry["examples"] = result.examples
            entry["bytes_sent"].append(int(bytes_sent[name]))
        self.history.append(record)
        self.final_results = {name: results[name] for name in sorted(results, key=client_order)}
        return record

    def outcome(self, state: State, memories: dict[str, dict[str, Any]]) -> RoundsOutcome:
        missing = sorted(self.missing, key=lambda m: (m["round"], client_order(m["client"])))  # not arrival order
        return RoundsOutcome(state, self.history, memories, missing,
                             dict(sorted(self.clients.items(), key=lambda item: client_order(item[0]))),
                             {"total_s": time.perf_counter() - self.started,
                              "round_s": [r["seconds"] for r in self.history]},
                             final_results=self.final_results)


def run_rounds(task: FederatedTask, progress: bool = True,
               on_round: Callable[[dict[str, Any]], None] | None = None) -> RoundsOutcome:
    """Every round of ``task`` with every client in this process (the reference engine)."""
    recorder = RoundRecorder(task)
    state = task.initial_state()
    memories: dict[str, dict[str, Any]] = {client_id(i): {} for i in range(task.n_clients)}
    bar = tqdm(range(1, task.rounds + 1), desc="rounds", unit="round", disable=not progress or task.rounds == 1)
    for round_number in bar:
        started = time.perf_counter()
        results: dict[str, ClientResult] = {}
        for index in tqdm(range(task.n_clients), desc="clients", unit="client", leave=False,
                          disable=not progress or task.rounds > 1):
            name = client_id(index)
            try:
                result = task.client_update(index, state, round_number, memories[name])
                task.check_update(name, result, state)
            except FedinspectError as error:  # bad data at one factory: the round goes on without it
                recorder.drop(name, round_number, str(error))
                continue
            memories[name] = dict(result.memory)
            results[name] = result
        recorder.check_quorum(round_number, results)
        state = aggregate(task, results)
        record = recorder.close_round(round_number, state, results, started,
                                      {name: r.n_bytes for name, r in results.items()})
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items()
                         if k in ("accuracy", "mean_image_auroc", "train_loss") and isinstance(v, float)})
        if on_round is not None:
            on_round(record)
    return recorder.outcome(state, memories)
