"""Federated defect classification as a :class:`~fedinspect.federation.rounds.FederatedTask`.

The shared round engine drives it: :func:`fedinspect.federation.rounds.run_rounds` in this process,
:func:`fedinspect.federation.rounds_flower.run_simulation` on Flower, with the same FedAvg, so both
give the same numbers for the same config and seed. This module holds what is classification's own:

- a client's round (:meth:`ClassificationTask.client_update`): load the global model, train locally
  (DP-SGD with Opacus if a noise multiplier is set); its accountant history is the client's
  ``memory`` (``{"privacy_history": [[noise, sample rate, steps], ...]}``), so its epsilon is
  cumulative over the rounds;
- the centered head's first round (:meth:`ClassificationTask.center_update`): each client sends the
  mean of its unit-norm features, its sum made DP with the Gaussian mechanism (sensitivity 1, the noise
  of :func:`~fedinspect.classification.runner.center_noise`); FedAvg of the means weighted by the clients'
  image counts is the federation's DP mean, the head's ``center``. Training starts in round 2;
- the server's evaluation of the global model on the test split, and each client's epsilon,
  recomputed from the history the client sent;
- results.json and the report of a finished run (:meth:`ClassificationTask.conclude`).

The obfuscation key travels to the clients as a secret (:meth:`secrets`), never in the spec or results.
On a ClientApp only that client's inputs are computed; the test features are the server's, made on
first use.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedinspect.classification.data import Split, load_square
from fedinspect.classification.runner import (
    ClassifyConfig,
    InputCache,
    build_model,
    center_noise,
    client_id,
    client_seed,
    model_inputs,
    prepare_split,
    resolve_epsilon,
)
from fedinspect.classification.training import epsilon_of, evaluate, train_local
from fedinspect.errors import FedinspectError
from fedinspect.federation.rounds import ClientResult, FederatedTask, RoundsOutcome, State
from fedinspect.run_folder import staged_output

RESULTS_FORMAT = "fedinspect-classification/1"
PRIVACY_UNIT = "one training image of one client"


@functools.lru_cache(maxsize=1)
def process_cache() -> InputCache:
    """The input cache of this process: a Flower actor serves several clients, rounds and runs."""
    return InputCache()


def json_float(value: float | None) -> float | str | None:
    """Floats for results.json: an infinite epsilon is written as the string "inf"."""
    if value is None:
        return None
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def checked_privacy_history(name: str, history: Any) -> list[list[float]]:
    """A client's accountant history as ``[[noise, sample rate, steps], ...]``, checked entry by entry.

    Raises:
        FedinspectError: naming the client, for anything but a list of (noise >= 0, rate in (0, 1],
            steps >= 0) entries.
    """
    if not isinstance(history, list | tuple):
        raise FedinspectError(f"{name}: privacy history must be a list, got {type(history).__name__}")
    checked = []
    for entry in history:
        try:
            sigma, rate, steps = entry
            sigma, rate = float(sigma), float(rate)
            valid = (math.isfinite(sigma) and sigma >= 0 and 0 < rate <= 1 and not isinstance(steps, bool)
                     and int(steps) == steps and steps >= 0)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise FedinspectError(f"{name}: bad privacy history entry {entry!r} (want [noise >= 0, sample rate "
                                  f"in (0, 1], steps >= 0])")
        checked.append([sigma, rate, int(steps)])
    return checked


class ClassificationTask(FederatedTask):
    """FedAvg rounds of a PIDS classifier on one labelled category folder.

    Args:
        config: the run (model, clients, rounds, obfuscation and its key, local training, seed).
        data_dir: the category folder; every party reads it and keeps its own share of the split.
        cache: resized images and backbone features to reuse (an experiment's runs share one).
        write_report: :meth:`conclude` also writes report.md / report.html and the figures.
        progress: progress bars while inputs are computed.
    """

    kind = "classify"
    aggregation = "mean"

    def __init__(self, config: ClassifyConfig, data_dir: str | Path, *, cache: InputCache | None = None,
                 write_report: bool = True, progress: bool = False) -> None:
        started = time.perf_counter()
        self.data_dir = Path(data_dir)
        self.cache = cache if cache is not None else InputCache()
        self.write_report = write_report
        self.progress = progress
        self.rounds = config.rounds + int(config.centered)  # the centered head's mean round comes first
        self.n_clients = config.clients
        self.split: Split = prepare_split(data_dir, config)
        try:  # a target epsilon becomes the noise multiplier that spends it over all rounds
            self.config = resolve_epsilon(config, [len(view.items) for view in self.split.clients])
        except ValueError as error:
            raise FedinspectError(f"classify: --dp-epsilon {config.dp_epsilon}: {error}") from error
        if self.config.project:  # before any image is read: the projection cannot add dimensions
            pooled = self.cache.backbone(config.model, config.weights).with_pooling(config.pooling).out_features
            if self.config.project > pooled:
                raise FedinspectError(f"classify: project {self.config.project} is more than the {pooled} features "
                                      f"of {config.model} with pooling {config.pooling} (--project)")
        self.n_classes = len(self.split.view.classes)
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._final: tuple[int, dict[str, Any]] | None = None  # (round, evaluation) of the latest round
        self.prepare_s = time.perf_counter() - started

    # ------------------------------------------------------------ spec
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config.to_dict(), "data_dir": str(self.data_dir.resolve())}

    def secrets(self) -> dict[str, Any]:
        return {"obfuscation_key": self.config.obfuscation_key}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], secrets: Mapping[str, Any]) -> ClassificationTask:
        """The task of a spec (a ClientApp's side; its inputs share the process's cache).

        Raises:
            FedinspectError: a spec of another kind, without config or data folder, or with settings or an
                obfuscation key that are not valid.
        """
        if spec.get("kind") != cls.kind:
            raise FedinspectError(f"classify task: spec of kind {spec.get('kind')!r}")
        config, data_dir = spec.get("config"), spec.get("data_dir")
        if not isinstance(config, Mapping) or not isinstance(data_dir, str):
            raise FedinspectError("classify task: the spec needs a 'config' object and a 'data_dir' string")
        key = secrets.get("obfuscation_key", 0)
        if not isinstance(key, int) or isinstance(key, bool):
            raise FedinspectError(f"classify task: the obfuscation key must be an integer, got {key!r}")
        try:
            parsed = ClassifyConfig.from_dict(dict(config), obfuscation_key=key)
        except (TypeError, ValueError) as error:
            raise FedinspectError(f"classify task: invalid config in the spec: {error}") from error
        return cls(parsed, data_dir, cache=process_cache(), write_report=False)

    # ------------------------------------------------------------ inputs
    def test_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the test split, computed on first use (only the server evaluates)."""
        if self._test is None:
            started = time.perf_counter()
            self._test = model_inputs(self.split.test, self.config, self.cache, progress=self.progress,
                                      desc="test images")
            self.prepare_s += time.perf_counter() - started
        return self._test

    def client_inputs(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of client ``index``'s share, computed once."""
        if not 0 <= index < self.n_clients:
            raise FedinspectError(f"{client_id(index)}: not a client of this {self.n_clients}-client run")
        if index not in self._inputs:
            started = time.perf_counter()
            self._inputs[index] = model_inputs(self.split.clients[index], self.config, self.cache,
                                               progress=self.progress, desc=f"{client_id(index)} images",
                                               training=True)
            self.prepare_s += time.perf_counter() - started
        return self._inputs[index]

    def prepare(self) -> None:
        """Compute the test inputs and every client's before the rounds (the in-process engine), so the
        rounds' times are training and evaluation only. A client whose images cannot be read is left to the
        rounds, which record it as missing and go on with the others."""
        self.test_inputs()
        for index in range(self.n_clients):
            try:
                self.client_inputs(index)
            except FedinspectError:
                continue

    # ------------------------------------------------------------ rounds
    def initial_state(self) -> State:
        torch.manual_seed(self.config.seed)
        model = build_model(self.config, self.n_classes, self.cache)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def client_update(self, index: int, state: State, round_number: int, memory: Mapping[str, Any]) -> ClientResult:
        """Load the global model, train on this client's share (DP-SGD if configured), send the model back;
        round 1 of the centered head: :meth:`center_update` instead."""
        x, y = self.client_inputs(index)
        history = checked_privacy_history(client_id(index), memory.get("privacy_history", []))
        if self.config.centered and round_number == 1:
            return self.center_update(index, state, history)
        model = build_model(self.config, self.n_classes, self.cache)
        model.load_state_dict(state)
        settings = self.config.train
        local = train_local(model, x, y, settings, seed=client_seed(self.config.seed, round_number, index),
                            privacy_history=history, lr=settings.lr_at(self.training_round(round_number),
                                                                       self.config.rounds),
                            n_classes=self.n_classes)
        return ClientResult(local.state, {"": local.n_examples},
                            {"train_loss": float(local.train_loss), "steps": float(local.steps)},
                            {"privacy_history": [[float(s), float(q), int(n)] for s, q, n in local.privacy_history]})

    def training_round(self, round_number: int) -> int:
        """The training round (1-based) that round ``round_number`` of the engine is."""
        return round_number - int(self.config.centered)

    def center_update(self, index: int, state: State, history: list) -> ClientResult:
        """The centered head's first round on client ``index``: the global ``state`` with ``center`` set to
        this client's feature mean, its feature sum released with Gaussian noise under DP.

        The rows are scaled to norm at most 1 (they are unit-norm already), so adding or removing one image
        moves the sum by at most 1: the noise's standard deviation is the noise multiplier. The client's
        image count is sent in the clear, as FedAvg's weights always are.
        """
        name = client_id(index)
        x, _ = self.client_inputs(index)
        if not len(x):
            raise FedinspectError(f"{name}: no training image, no feature mean to send")
        if "center" not in state:
            raise FedinspectError(f"{name}: the global model has no 'center' to fill (not the centered head)")
        rows = x / x.norm(dim=1, keepdim=True).clamp_min(1.0)
        total = rows.sum(dim=0)
        settings = self.config.train
        if settings.dp:
            sigma = center_noise(self.config, len(x), float(settings.noise_multiplier))
            generator = torch.Generator().manual_seed(client_seed(self.config.seed, 1, index))
            total = total + sigma * torch.randn(total.shape, generator=generator, dtype=total.dtype)
            history = [*history, [sigma, 1.0, 1]]
        arrays = {k: v.clone() for k, v in state.items()}
        arrays["center"] = (total / len(x)).to(state["center"].dtype)
        return ClientResult(arrays, {"": len(x)}, {"steps": 0.0},
                            {"privacy_history": [[float(s), float(q), int(n)] for s, q, n in history]})

    def evaluate(self, state: State, round_number: int) -> dict[str, Any]:
        """Accuracy, macro-F1 and loss of the global model on the test split."""
        model = build_model(self.config, self.n_classes, self.cache)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise FedinspectError(f"round {round_number}: the aggregated model does not fit {self.config.model}: "
                                  f"{error}") from error
        metrics = evaluate(model, *self.test_inputs(), self.n_classes)
        self._final = (round_number, metrics)
        return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "loss": metrics["loss"]}

    def round_metrics(self, round_number: int, results: Mapping[str, ClientResult]) -> dict[str, Any]:
        """Each answering client's epsilon so far, from the accountant history it sent (``{}`` without DP)."""
        if not self.config.train.dp:
            return {"epsilon": {}}
        epsilon = {}
        for name in sorted(results, key=lambda n: int(n.rsplit("_", 1)[-1])):
            history = checked_privacy_history(name, results[name].memory.get("privacy_history"))
            epsilon[name] = epsilon_of(history, self._delta(name), self.config.train.accountant)
        return {"epsilon": epsilon}

    def _delta(self, name: str) -> float:
        index = int(name.rsplit("_", 1)[-1])
        return self.config.train.delta_for(len(self.split.clients[index].items))

    # ------------------------------------------------------------ results
    def conclude(self, outcome: RoundsOutcome, out_dir: str | Path, engine: str) -> dict[str, Any]:
        """results.json (and report.md / report.html with the plots), written all at once.

        ``out_dir`` is replaced only when everything is written (:func:`staged_output`); a failure leaves it
        untouched.
        """
        if not outcome.history:
            raise FedinspectError("classify: no round was run, nothing to conclude")
        last = outcome.history[-1]["round"]
        if self._final is None or self._final[0] != last:
            self.evaluate(outcome.state, last)
        final = self._final[1] if self._final is not None else {}
        histories = {name: checked_privacy_history(name, memory.get("privacy_history", []))
                     for name, memory in outcome.memories.items()}
        train_s = float(outcome.timing["total_s"])
        timing = {"prepare_s": self.prepare_s, "train_s": train_s, "total_s": self.prepare_s + train_s,
                  "round_s": list(outcome.timing["round_s"])}
        history = []
        for record in outcome.history:
            entry = dict(record)
            entry["epsilon"] = {k: json_float(v) for k, v in record.get("epsilon", {}).items()}
            history.append(entry)
        with staged_output(out_dir, inputs=[self.split.view.root]) as staging:
            return self._write(staging, final, history, histories, timing, engine,
                               [dict(m) for m in outcome.missing])

    def _write(self, out_dir: Path, final: dict[str, Any], history: list[dict[str, Any]],
               histories: dict[str, list], timing: dict[str, Any], engine: str,
               missing: list[dict[str, Any]]) -> dict[str, Any]:
        import opacus
        from sklearn.metrics import precision_recall_fscore_support

        from fedinspect import __version__

        config, split = self.config, self.split
        classes = list(split.view.classes)
        precision, recall, f1, support = precision_recall_fscore_support(
            split.test.labels, final["predicted"], labels=list(range(len(classes))), zero_division=0)
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
            "history": history,
            "missing_clients": missing,
            "privacy": privacy,
            "timing": timing,
            "versions": {"fedinspect": __version__, "torch": torch.__version__, "opacus": opacus.__version__,
                         "python": platform.python_version()},
        }
        if privacy["dp"]:
            results["epsilon"] = {name: c["epsilon"] for name, c in privacy["clients"].items()}
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        if self.write_report:
            self._write_report(results, out_dir)
        return results

    def _write_report(self, results: dict[str, Any], out_dir: Path) -> None:
        from fedinspect.classification.report import plot_obfuscation_examples, write_run_report

        config = self.config
        if config.obfuscation.active:
            pairs = []
            for label, name in enumerate(results["classes"]):
                item = next((i for i in self.split.test.items if i.label == label), None)
                if item is not None:
                    plain = load_square(item.path, config.image_size)
                    pairs.append((name, plain, config.obfuscation(plain)))
            plot_obfuscation_examples(pairs, out_dir / "figures" / "obfuscation_examples.png",
                                      config.obfuscation.name)
        write_run_report(results, out_dir)


def describe_split(split: Split) -> dict[str, Any]:
    """Sizes and class counts of the train and test parts and of every client's share."""
    return {
        "train": len(split.train.items), "test": len(split.test.items),
        "train_counts": split.train.counts(), "test_counts": split.test.counts(),
        "clients": [{"client": client_id(i), "images": len(v.items), "counts": v.counts()}
                    for i, v in enumerate(split.clients)],
    }


def privacy_summary(config: ClassifyConfig, split: Split, histories: Mapping[str, Sequence]) -> dict[str, Any]:
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
    center = ({"center_share": config.center_share,
               "center_noise": {client_id(i): center_noise(config, len(v.items), float(settings.noise_multiplier))
                                for i, v in enumerate(split.clients)}} if config.centered else {})
    return {"dp": True, "unit": PRIVACY_UNIT, "target_epsilon": config.dp_epsilon, **center,
            "noise_multiplier": settings.noise_multiplier,
            "max_grad_norm": settings.max_grad_norm, "accountant": settings.accountant,
            "logical_batch": settings.logical_batch, "physical_batch": settings.batch_size,
            "poisson_sampling": settings.poisson_sampling, "clients": clients}
