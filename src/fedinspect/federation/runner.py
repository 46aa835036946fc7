"""Federated PatchCore on the shared round engine: one round of memory banks.

:class:`PatchCoreTask` is PatchCore's :class:`~fedinspect.federation.rounds.FederatedTask`: each
client embeds its images and sends a local coreset per category as the bytes of
:meth:`ClientUpdate.to_bytes` (one uint8 array, checked by :mod:`fedinspect.federation.validation`
before the server uses it); the server builds the global banks with the round's strategy
(:mod:`fedinspect.federation.strategies`) and evaluates them with the AutoVI protocol beside a
centralized baseline (all training images pooled, same settings) and a single shared bank.
The engines (:func:`rounds.run_rounds` in process, :mod:`rounds_flower` on Flower) carry it as they
carry every other model, so both give the same numbers for the same seed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedinspect import __version__
from fedinspect.data.dataset import CategoryDataset, find_categories, training_images
from fedinspect.data.images import read_image
from fedinspect.data.regions import Region
from fedinspect.detectors.patchcore import PatchCore
from fedinspect.errors import FedinspectError
from fedinspect.evaluation.anomaly_maps import DeferredMaps
from fedinspect.evaluation.fairness import run_fairness
from fedinspect.evaluation.metrics import FPR_LIMITS
from fedinspect.evaluation.protocol import union_mask
from fedinspect.evaluation.report import Curves, Example, write_report
from fedinspect.evaluation.streaming import StreamingEvaluation
from fedinspect.evaluation.summary import mean_row, metric_row
from fedinspect.federation.client import EmbeddingCache, FederatedClient, RoundSettings
from fedinspect.federation.client_evaluation import CategoryStream, ClientEvaluation, client_test_shares
from fedinspect.federation.embedding_store import SpilledEmbeddings
from fedinspect.federation.partition import Partition, partition
from fedinspect.federation.poisoning import DefectSource, Poisoning
from fedinspect.federation.rounds import ClientResult, FederatedTask, RoundsOutcome, State, client_id, run_rounds
from fedinspect.federation.server import SHARED, FederatedServer
from fedinspect.federation.strategies import CoresetSettings, Screening
from fedinspect.federation.update import ClientUpdate, UpdateError
from fedinspect.federation.validation import UpdateSpec, receive
from fedinspect.pipeline import load_ground_truth, peak_memory_mb
from fedinspect.run_folder import staged_output

RESULTS_FILE = "results.json"
PARTITION_FILE = "partition.json"


@dataclass
class FederationConfig:
    """Everything that defines one federated run (written to results.json as ``config``)."""

    clients: int = 5
    partition: str = "iid"
    alpha: float = 0.5
    strategy: str = "federated_coreset"
    global_size: int = 10_000
    global_ratio: float | None = None
    bank: str = "per_category"
    min_per_client: int = 100
    min_clients: int = 1
    centralized: bool = True
    centralized_coreset_ratio: float = 0.1
    compare_shared: bool = True
    write_maps: bool = True
    examples_per_category: int = 3
    # Folder of the attacker's own images (any dataset in our layouts): when set, the inversion and
    # membership attacks run against this round and results.json gains an ``attacks`` block.
    attack_data: str = ""
    # Poisoning (federation/poisoning.py): the last `poisoned_clients` clients send updates altered by the
    # attack `poison` ("noise", "scale" or "defects"; "" = none) of strength `poison_strength` (0 = default).
    poison: str = ""
    poisoned_clients: int = 0
    poison_strength: float = 0.0
    settings: RoundSettings = field(default_factory=RoundSettings)

    def __post_init__(self) -> None:
        self.poisoning().poisoned(self.clients)  # a bad attack name, strength or count fails before any work

    def poisoning(self) -> Poisoning:
        """The poisoning attack of this run (inactive when ``poison`` or ``poisoned_clients`` is unset)."""
        return Poisoning(self.poison, self.poisoned_clients, self.poison_strength, self.settings.seed)

    def server(self, bank: str | None = None, screening: list | None = None) -> FederatedServer:
        """The server of this round; ``screening`` (a list) receives ``robust_coreset``'s decision per bank."""
        options: dict[str, Any] = {}
        if self.strategy == "diversity_preserving":
            options["min_per_client"] = self.min_per_client
        if self.strategy == "robust_coreset" and screening is not None:
            options["screening"] = screening
        return FederatedServer(
            strategy=self.strategy, global_size=self.global_size, global_ratio=self.global_ratio,
            bank=bank or self.bank, strategy_options=options,
            coreset=CoresetSettings(self.settings.projection_dim, self.settings.coreset_chunk_size, self.settings.seed),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = self.settings.to_dict()
        data["settings"].pop("obfuscation_key")  # a secret of the federation: never written out
        data["seed"] = self.settings.seed
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], obfuscation_key: int = 0) -> FederationConfig:
        """The config :meth:`to_dict` wrote (the obfuscation key, a secret, comes apart)."""
        values = {key: value for key, value in data.items() if key != "seed"}
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown federation settings: {sorted(unknown)}")
        settings = RoundSettings.from_dict({**values.pop("settings", {}), "obfuscation_key": obfuscation_key})
        return cls(**values, settings=settings)


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr)


@dataclass
class RoundPlan:
    """The data side of a round: categories, training items, and which client holds which image."""

    datasets: dict[str, CategoryDataset]
    items: list[tuple[str, Path]]
    split: Partition

    def client_images(self, index: int) -> dict[str, list[Path]]:
        """Category -> image paths of client ``index``."""
        images: dict[str, list[Path]] = {}
        for item in self.split.assignments[index]:
            name, path = self.items[item]
            images.setdefault(name, []).append(path)
        return images

    def save(self, out_dir: Path) -> None:
        """Write the partition (which client holds which image) to ``out_dir/partition.json``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / PARTITION_FILE).write_text(json.dumps({
            "partition": self.split.to_json(),
            "items": [{"category": name, "image": str(path)} for name, path in self.items],
        }, indent=1))


def plan_round(data_dir: str | Path, config: FederationConfig, out_dir: Path | None = None) -> RoundPlan:
    """Read the dataset's layout and partition its training images; save the partition to ``out_dir``."""
    datasets = {path.name: CategoryDataset(path) for path in find_categories(data_dir)}
    items = [(name, sample.image_path) for name, dataset in datasets.items() for sample in dataset.train]
    split = partition([name for name, _ in items], config.clients, config.partition, seed=config.settings.seed,
                      alpha=config.alpha)
    plan = RoundPlan(datasets, items, split)
    if out_dir is not None:
        plan.save(out_dir)
    return plan


UPDATE = "update"  # the one array of a PatchCore client's answer: its update's bytes


def _payload(result: ClientResult) -> bytes:
    return result.arrays[UPDATE].numpy().tobytes()


class PatchCoreTask(FederatedTask):
    """One round of PatchCore memory banks (see the module docstring).

    ``cache`` (training embeddings) and ``test_cache`` (test embedding grids), keyed by image path, let
    a study reuse embeddings across runs with the same feature settings; in process the clients fill
    ``cache`` and the centralized baseline reuses it (without a baseline, attacks or a caller's cache,
    no training embedding is kept: memory stays bounded). ``report=False`` skips the report.
    """

    kind = "patchcore"
    aggregation = "coreset"
    rounds = 1

    def __init__(self, data_dir: str | Path, config: FederationConfig | None = None, progress: bool = False, *,
                 cache: EmbeddingCache | None = None, test_cache: dict[Path, Any] | None = None,
                 report: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.config = config or FederationConfig()
        self.progress = progress
        self.n_clients = self.config.clients
        self.min_clients = self.config.min_clients
        self.cache: EmbeddingCache = SpilledEmbeddings() if cache is None else cache
        # the clients' training embeddings are kept only for someone who reads them again: the centralized
        # baseline, the attacks, or a caller's own cache (a study reusing them across runs); a cache of our own
        # keeps them on disk and drops them category by category once evaluated (memory stays bounded)
        self.keep_embeddings = cache is not None or self.config.centralized or bool(self.config.attack_data)
        self.own_caches = (cache is None, test_cache is None)
        self.test_cache = {} if test_cache is None else test_cache
        self.report = report
        self.own_data: Path | None = None
        self._detector: PatchCore | None = None
        self.screening_: list[Screening] = []
        self.aggregation_s_ = 0.0

    # ---------------------------------------------------------------- spec
    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "data_dir": str(self.data_dir), "config": self.config.to_dict()}

    def secrets(self) -> dict[str, Any]:
        return {"obfuscation_key": self.config.settings.obfuscation_key}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], secrets: Mapping[str, Any]) -> PatchCoreTask:
        try:
            config = FederationConfig.from_dict(spec["config"], int(secrets.get("obfuscation_key", 0)))
            return cls(spec["data_dir"], config)
        except (KeyError, TypeError, ValueError) as error:
            raise FedinspectError(f"a malformed PatchCoreTask spec: {error!r}") from error

    def with_own_data(self, data_dir: Path) -> PatchCoreTask:
        task = copy.copy(self)
        task.own_data, task.cache = Path(data_dir), {}
        return task

    # ---------------------------------------------------------------- the parties' shared pieces
    @functools.cached_property
    def plan(self) -> RoundPlan:
        """The server's dataset and partition, read on first use (a SuperNode with its own data never reads it)."""
        return plan_round(self.data_dir, self.config)

    @property
    def detector(self) -> PatchCore:
        """The PatchCore the settings describe, loaded once per process."""
        if self._detector is None:
            self._detector = self.config.settings.detector(progress=False)
        return self._detector

    def update_spec(self) -> UpdateSpec:
        """What every update must look like; image counts pinned for the clients whose images the plan chose."""
        assigned = {client_id(i): {name: len(paths) for name, paths in self.plan.client_images(i).items()}
                    for i in range(self.n_clients) if client_id(i) not in self.own_data_clients}
        return UpdateSpec.for_round(self.config.settings, self.detector, self.plan.datasets, assigned)

    def updates(self, results: Mapping[str, ClientResult]) -> list[ClientUpdate]:
        """The parsed updates of checked answers, in their order."""
        spec = self.update_spec()
        return [receive(_payload(result), name, spec) for name, result in results.items()]

    # ---------------------------------------------------------------- the round
    def initial_state(self) -> State:
        """Nothing to send; the server reads its dataset and partition before any client works."""
        self.plan.split.sizes()
        return {}

    def client_update(self, index: int, state: State, round_number: int, memory: Mapping[str, Any]) -> ClientResult:
        """Embed the client's images and send a local coreset per category (a poisoned client alters it)."""
        name = client_id(index)
        images = training_images(self.own_data) if self.own_data is not None else self.plan.client_images(index)
        update, stats = FederatedClient(name, images, read_image).fit(
            self.config.settings, self.detector, self.cache if self.keep_embeddings else None)
        poisoning = self.config.poisoning()
        if index in poisoning.poisoned(self.n_clients):
            update = poisoning.apply(update, DefectSource(self.plan.datasets, self.detector, self.config.settings,
                                                          self.cache))
        start = time.perf_counter()
        payload = update.to_bytes(self.config.settings.precision)
        timing = {"feature_extraction_s": stats.feature_extraction_s, "local_coreset_s": stats.local_coreset_s,
                  "serialization_s": time.perf_counter() - start}
        return ClientResult({UPDATE: torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())},
                            {category: part.n_samples for category, part in update.categories.items()},
                            timing, dict(memory))

    def check_update(self, name: str, result: ClientResult, state: State) -> None:
        """One uint8 array of update bytes that :mod:`validation` accepts for this round and this client."""
        arrays = result.arrays
        if set(arrays) != {UPDATE} or arrays[UPDATE].dtype != torch.uint8 or arrays[UPDATE].ndim != 1:
            shapes = {key: (str(value.dtype), tuple(value.shape)) for key, value in arrays.items()}
            raise UpdateError(f"{name}: update rejected: expected one 1-d uint8 array {UPDATE!r}, got {shapes}")
        update = receive(_payload(result), name, self.update_spec())
        sent = {category: part.n_samples for category, part in update.categories.items()}
        if result.examples != sent:
            raise UpdateError(f"{name}: update rejected: examples {result.examples} differ from its update's {sent}")

    def aggregate(self, results: Mapping[str, ClientResult]) -> State:
        """The global banks by the round's strategy; ``robust_coreset`` records its screening in ``screening_``."""
        start = time.perf_counter()
        self.screening_ = []
        banks = self.config.server(screening=self.screening_).aggregate(self.updates(results))
        self.aggregation_s_ = time.perf_counter() - start
        return {name: torch.from_numpy(np.ascontiguousarray(bank)) for name, bank in banks.items()}

    def evaluate(self, state: State, round_number: int) -> dict[str, Any]:
        """Nothing per round: the one round's banks are evaluated in full by :meth:`conclude`."""
        return {}

    # ---------------------------------------------------------------- the conclusion
    def conclude(self, outcome: RoundsOutcome, out_dir: str | Path, engine: str) -> dict[str, Any]:
        """results.json, maps and report of the round; ``out_dir`` is written all at once (:func:`staged_output`)."""
        inputs = [self.data_dir, *([self.config.attack_data] if self.config.attack_data else [])]
        with staged_output(out_dir, inputs=inputs) as staging:
            self.plan.save(staging)
            return self._conclude(outcome, staging, engine)

    def _conclude(self, outcome: RoundsOutcome, out_dir: Path, engine: str) -> dict[str, Any]:
        started = time.perf_counter()
        config, plan, detector = self.config, self.plan, self.detector
        timing: dict[str, float] = {key: sum(float(r.metrics.get(key, 0.0)) for r in outcome.final_results.values())
                                    for key in ("feature_extraction_s", "local_coreset_s", "serialization_s")}
        timing["aggregation_s"] = self.aggregation_s_
        updates = self.updates(outcome.final_results)
        rows: list[dict[str, Any]] = []
        for update, (name, result) in zip(updates, outcome.final_results.items(), strict=True):
            rows.append({
                "client": name, "samples": update.n_samples, "patches": update.n_patches,
                "coreset": update.n_coreset, "bytes_sent": result.n_bytes,
                "categories": {category: part.n_samples for category, part in update.categories.items()},
                **({"node": outcome.clients[name]["node"]} if "node" in outcome.clients.get(name, {}) else {}),
            })
        total = sum(row["samples"] for row in rows)
        for row in rows:
            row["weight"] = row["samples"] / total
        banks = {name: bank.numpy() for name, bank in outcome.state.items()}
        start = time.perf_counter()
        shared = (config.server("shared").aggregate(updates) if config.compare_shared and config.bank != "shared"
                  else None)
        timing["aggregation_s"] += time.perf_counter() - start

        results: dict[str, Any] = {
            "fedinspect_version": __version__,
            "engine": engine,
            "config": config.to_dict(),
            "partition": {"sizes": plan.split.sizes(), "file": PARTITION_FILE},
            "clients": rows,
            "missing_clients": outcome.missing,
            "stages": {
                "raw_patches": sum(row["patches"] for row in rows),
                "local_coreset": sum(row["coreset"] for row in rows),
                "global_bank": int(sum(len(b) for b in banks.values())),
            },
        }
        # Each client scores the global model on its share of the test split (same rule as its training share).
        test_labels = {name: [s.label for s in dataset.test] for name, dataset in plan.datasets.items()}
        shares = client_test_shares(test_labels, {row["client"]: row["categories"] for row in rows},
                                    config.settings.seed)
        per_client = ClientEvaluation(shares)
        if self.screening_:  # what robust_coreset dropped, per global bank, with the clients named
            results["screening"] = {name: _named_screening(decision, [u.client_id for u in updates
                                                                      if name == SHARED or name in u.categories])
                                    for name, decision in zip(banks, self.screening_, strict=True)}
        if (privacy := config.settings.bank_privacy()) is not None:
            results["privacy"] = privacy.report()
        if (obfuscation := config.settings.obfuscator()) is not None:
            results["obfuscation"] = obfuscation.to_dict()
        own_cache, own_test_cache = self.own_caches
        evaluation = _evaluate(plan.datasets, banks, shared, config, detector, self.cache, out_dir, timing,
                               self.progress, per_client, None if own_test_cache else self.test_cache,
                               release=own_cache and not config.attack_data)
        results.update(evaluation["summary"])
        if config.attack_data:
            results["attacks"] = _attacks(plan, updates, banks, config, detector, self.cache, self.progress)
        per_client.attach(rows)
        results["fairness"] = run_fairness(results["categories"], rows)
        timing["conclusion_s"] = time.perf_counter() - started
        timing["total_s"] = outcome.timing["total_s"] + timing["conclusion_s"]
        results["timing"] = timing
        results["peak_memory_mb"] = peak_memory_mb()
        (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        if self.report:
            write_report(out_dir, results, evaluation["curves"], evaluation["examples"],
                         title=f"Federated PatchCore: {config.clients} clients, {config.partition}, {config.strategy}")
        return results


def run_federation(data_dir: str | Path, out_dir: str | Path, config: FederationConfig | None = None,
                   progress: bool = True, *, cache: EmbeddingCache | None = None,
                   test_cache: dict[Path, Any] | None = None, report: bool = True) -> dict[str, Any]:
    """Run one federated round in this process and write results.json, maps and the report.

    ``cache`` and ``test_cache``: see :class:`PatchCoreTask`. ``out_dir`` is written all at once when the
    round is over: a failed run leaves an earlier one there untouched.
    """
    task = PatchCoreTask(data_dir, config, progress, cache=cache, test_cache=test_cache, report=report)
    return task.conclude(run_rounds(task, progress=progress), out_dir, engine="in-process")


def _named_screening(decision: Screening, clients: list[str]) -> dict[str, Any]:
    """A screening decision with client names instead of positions."""
    record = decision.to_dict()
    for key in ("dropped_clients", "suspects"):
        record[key] = [clients[i] for i in record[key]]
    for key in ("dropped_rows", "rows", "client_scores"):
        record[key] = dict(zip(clients, record[key], strict=True))
    return record


def _evaluate(datasets: dict[str, CategoryDataset], banks: dict[str, np.ndarray], shared: dict[str, np.ndarray] | None,
              config: FederationConfig, detector: PatchCore, cache: EmbeddingCache, out_dir: Path,
              timing: dict[str, float], progress: bool, per_client: ClientEvaluation | None = None,
              test_cache: dict[Path, Any] | None = None, release: bool = False) -> dict[str, Any]:
    """Every category's models (federated, centralized, shared) scored with the AutoVI protocol, one category
    at a time; ``test_cache=None`` keeps a category's test grids only while it is evaluated, ``release`` drops
    its training embeddings from ``cache`` once its baseline is fitted."""
    per_model: dict[str, dict[str, Any]] = {"federated": {}, "centralized": {}, "shared_bank": {}}
    curves: dict[str, dict[str, Curves]] = {"federated": {}, "centralized": {}}
    examples: list[Example] = []
    timing.update(evaluation_s=0.0, centralized_fit_s=0.0)
    skipped: list[str] = []
    not_evaluated: dict[str, str] = {}
    for name, dataset in datasets.items():
        _log(f"== evaluating {name}", progress)
        start = time.perf_counter()
        shapes, regions = load_ground_truth(dataset, progress=False)
        labels = np.array([s.label for s in dataset.test])
        federated = banks.get(name, banks.get(SHARED))
        if federated is None:  # none of the clients that answered holds this category
            print(f"warning: {name}: no global bank (no client that answered holds it); not evaluated",
                  file=sys.stderr)
            not_evaluated[name] = "no client that answered holds this category"
            continue
        grids = _test_grids(dataset, detector, config, {} if test_cache is None else test_cache)
        models = {"federated": federated}
        if shared is not None:
            models["shared_bank"] = shared[SHARED]
        timing["evaluation_s"] += time.perf_counter() - start
        if config.centralized:
            start = time.perf_counter()
            pooled = _pooled_embeddings(dataset, detector, cache, skipped, config)
            models["centralized"] = detector.select_coreset(pooled, config.centralized_coreset_ratio)
            del pooled
            if release:
                for sample in dataset.train:
                    cache.pop(sample.image_path, None)
            timing["centralized_fit_s"] += time.perf_counter() - start
        for model_name, bank in models.items():
            start = time.perf_counter()
            federated_model = model_name == "federated"
            entry, category_curves, chosen = _score_category(
                dataset, detector.with_memory_bank(bank), grids, labels, regions, shapes, config,
                clients=per_client.stream(name) if federated_model and per_client is not None else None,
                maps_dir=out_dir / "maps" / name if federated_model and config.write_maps else None,
                examples=config.examples_per_category if federated_model else None)
            entry["counts"] = {"test": len(labels), "test_good": int((labels == 0).sum()),
                               "test_defective": int(labels.sum()), "bank": len(bank)}
            per_model[model_name][name] = entry
            if model_name in curves:
                curves[model_name][name] = category_curves
            examples.extend(chosen)
            if model_name == "centralized":
                timing["centralized_fit_s"] += time.perf_counter() - start
            else:
                timing["evaluation_s"] += time.perf_counter() - start
    if not per_model["federated"]:
        raise FedinspectError(f"no category has a global bank: {not_evaluated}")
    summary: dict[str, Any] = {"categories": per_model["federated"], "mean": _mean(per_model["federated"])}
    if not_evaluated:
        summary["not_evaluated"] = not_evaluated
    if per_model["centralized"]:
        summary["centralized"] = {"categories": per_model["centralized"], "mean": _mean(per_model["centralized"]),
                                  "skipped_images": skipped}
    if per_model["shared_bank"]:
        summary["shared_bank"] = {"categories": per_model["shared_bank"], "mean": _mean(per_model["shared_bank"])}
    return {"summary": summary, "curves": curves, "examples": examples}


def _test_grids(dataset: CategoryDataset, detector: PatchCore, config: FederationConfig,
                cache: dict[Path, Any]) -> list[Any]:
    """The embedding grid of every test image, computed for those not in ``cache`` (which keeps them)."""
    todo = [s.image_path for s in dataset.test if s.image_path not in cache]
    images = (config.settings.load(read_image(path)) for path in todo)
    cache.update(zip(todo, detector.embed_grids(images, total=len(todo)), strict=True))
    return [cache[s.image_path] for s in dataset.test]


def _attacks(plan: RoundPlan, updates: list[ClientUpdate], banks: dict[str, np.ndarray], config: FederationConfig,
             detector: PatchCore, cache: EmbeddingCache, progress: bool) -> dict[str, Any]:
    """Inversion and membership attacks against this round (README 'Privacy')."""
    from fedinspect.federation.attacks import measure_attacks, train_attacker

    _log("== attacks: inversion and membership inference", progress)
    attack = train_attacker(detector, Path(config.attack_data), seed=config.settings.seed)
    held_out = {
        name: detector.embed_per_image(config.settings.load(read_image(s.image_path)) for s in dataset.test
                                       if s.label == 0)
        for name, dataset in plan.datasets.items()
    }
    block: dict[str, Any] = measure_attacks(plan, updates, banks, detector, cache, held_out, attack, config.settings)
    block["attacker_data"] = config.attack_data
    return block


def _pooled_embeddings(dataset: CategoryDataset, detector: PatchCore, cache: EmbeddingCache,
                       skipped: list[str], config: FederationConfig) -> np.ndarray:
    """The category's training embeddings for the centralized baseline (reused from the clients' pass).

    Images of clients that dropped out are embedded here; an unreadable one is left out with a warning.
    """
    rows = []
    for sample in dataset.train:
        if sample.image_path not in cache:
            try:
                cache[sample.image_path] = detector.embed([config.settings.load(read_image(sample.image_path))])
            except FedinspectError as error:
                print(f"warning: centralized baseline skips {error}", file=sys.stderr)
                skipped.append(str(sample.image_path))
                continue
        rows.append(cache[sample.image_path])
    if not rows:
        raise FedinspectError(f"{dataset.root}: no readable training image for the centralized baseline")
    return np.concatenate(rows)


def _mean(categories: dict[str, dict[str, Any]]) -> dict[str, Any]:
    row = mean_row({name: metric_row(entry) for name, entry in categories.items()})
    return {
        "image_auroc": row["image_auroc"],
        "pixel_auroc": row["pixel_auroc"],
        "auc_spro": {str(limit): row[f"spro@{limit:g}"] for limit in FPR_LIMITS},
    }


def _score_category(dataset: CategoryDataset, fitted: PatchCore, grids: list[Any], labels: np.ndarray,
                    regions: list[list[Region]], shapes: list[tuple[int, int]], config: FederationConfig, *,
                    clients: CategoryStream | None, maps_dir: Path | None, examples: int | None,
                    ) -> tuple[dict[str, Any], Curves, list[Example]]:
    """One model on one category's test split, each full-resolution map consumed as soon as it is made (so
    memory holds one batch of maps, not the category's): the AutoVI metrics and curves, the client shares'
    metrics (``clients``), the 16-bit PNG maps under ``maps_dir`` and the report's ``examples``."""
    obfuscation = config.settings.obfuscator()
    kept = _ExampleMaps(examples) if examples is not None else None
    with contextlib.ExitStack() as stack:
        evaluation = stack.enter_context(StreamingEvaluation())
        if clients is not None:
            stack.enter_context(clients)
        deferred = stack.enter_context(DeferredMaps()) if maps_dir is not None else None
        for index, (score, anomaly_map) in enumerate(fitted.iter_predict_embedded(grids)):
            if obfuscation is not None:  # the map back on the image's own grid
                anomaly_map = obfuscation.restore_map(anomaly_map, shapes[index])
            label = int(labels[index])
            evaluation.add(label, score, anomaly_map, regions[index])
            if clients is not None:
                clients.add(index, label, score, anomaly_map, regions[index])
            if deferred is not None:
                sample = dataset.test[index]
                deferred.add(maps_dir / sample.defect / f"{sample.stem}.png", anomaly_map)
            if kept is not None:
                kept.offer(index, label, score, anomaly_map)
        entry, category_curves = evaluation.result(), evaluation.curves()
        if clients is not None:
            clients.finish()
        if deferred is not None:
            entry["map_score_range"] = list(deferred.write())
    chosen = [] if kept is None else [
        Example(category=dataset.name, defect=dataset.test[i].defect, name=dataset.test[i].stem,
                image=read_image(dataset.test[i].image_path), anomaly_map=anomaly_map,
                ground_truth=union_mask(regions[i], shapes[i]), score=score)
        for i, score, anomaly_map in kept.chosen()]
    return entry, category_curves, chosen


class _ExampleMaps:
    """The report's examples, kept while a category streams by: the ``count - 1`` highest-scoring defective
    images and the highest-scoring good one (the hardest case); equal scores keep the earlier image."""

    def __init__(self, count: int) -> None:
        self.limits = {1: max(count - 1, 0), 0: 1}
        self.kept: dict[int, list[tuple[float, int, np.ndarray]]] = {1: [], 0: []}

    def offer(self, index: int, label: int, score: float, anomaly_map: np.ndarray) -> None:
        kept = self.kept[label]
        kept.append((-score, index, anomaly_map))
        kept.sort(key=lambda item: item[:2])
        del kept[self.limits[label]:]

    def chosen(self) -> list[tuple[int, float, np.ndarray]]:
        """(index, score, map) of the defective examples by decreasing score, then the good one."""
        return [(index, -negative, anomaly_map) for label in (1, 0)
                for negative, index, anomaly_map in self.kept[label]]
