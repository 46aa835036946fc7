"""In-process federated PatchCore: partition, clients, server, evaluation, report, in one call.

Every role runs in this process, but through the same objects and the same serialized bytes a
Flower deployment would use: each client's update is turned into bytes and parsed back before
the server sees it, and the bytes are counted. A centralized baseline (all training images
pooled, same settings) and a single shared bank are evaluated beside the federated model.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedinspect import __version__
from fedinspect.data.dataset import CategoryDataset, find_categories
from fedinspect.data.images import read_image
from fedinspect.detectors.patchcore import PatchCore
from fedinspect.errors import FedinspectError
from fedinspect.evaluation.anomaly_maps import score_range, write_maps
from fedinspect.evaluation.fairness import run_fairness
from fedinspect.evaluation.metrics import FPR_LIMITS
from fedinspect.evaluation.protocol import score_with_curves, union_mask
from fedinspect.evaluation.report import Curves, Example, write_report
from fedinspect.evaluation.summary import mean_row, metric_row
from fedinspect.federation.client import EmbeddingCache, FederatedClient, RoundSettings
from fedinspect.federation.client_evaluation import ClientEvaluation, client_test_shares
from fedinspect.federation.partition import Partition, partition
from fedinspect.federation.poisoning import DefectSource, Poisoning
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


@dataclass
class ClientReply:
    """What reaches the server from one client, whatever the transport: its update bytes and timings."""

    client_id: str
    payload: bytes
    timing: dict[str, float] = field(default_factory=dict)
    partition: int | None = None  # the plan's client index when the plan chose its images (counts checked)


def client_id(index: int) -> str:
    return f"client_{index}"


def plan_round(data_dir: str | Path, config: FederationConfig, out_dir: Path | None = None) -> RoundPlan:
    """Read the dataset's layout and partition its training images; save the partition to ``out_dir``."""
    datasets = {path.name: CategoryDataset(path) for path in find_categories(data_dir)}
    items = [(name, sample.image_path) for name, dataset in datasets.items() for sample in dataset.train]
    split = partition([name for name, _ in items], config.clients, config.partition, seed=config.settings.seed,
                      alpha=config.alpha)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / PARTITION_FILE).write_text(json.dumps({
            "partition": split.to_json(),
            "items": [{"category": name, "image": str(path)} for name, path in items],
        }, indent=1))
    return RoundPlan(datasets, items, split)


def run_federation(data_dir: str | Path, out_dir: str | Path, config: FederationConfig | None = None,
                   progress: bool = True, *, cache: EmbeddingCache | None = None,
                   test_cache: dict[Path, Any] | None = None, report: bool = True) -> dict[str, Any]:
    """Run one federated round in this process and write results.json, maps and the report.

    ``cache`` (training embeddings) and ``test_cache`` (test embedding grids), keyed by image path, let
    a study reuse embeddings across runs with the same feature settings; ``report=False`` skips the report.
    ``out_dir`` is locked and written all at once (:func:`staged_output`): a failed run leaves it untouched.
    """
    config = config or FederationConfig()
    started = time.perf_counter()
    with staged_output(out_dir, inputs=[data_dir, *([config.attack_data] if config.attack_data else [])]) as staging:
        plan = plan_round(data_dir, config, staging)
        detector = config.settings.detector(progress=False)
        cache = {} if cache is None else cache
        replies, missing = collect_in_process(plan, config, detector, cache, progress)
        return conclude_round(plan, replies, missing, config, staging, detector, cache, started, progress,
                              test_cache=test_cache, report=report)


def collect_in_process(plan: RoundPlan, config: FederationConfig, detector: PatchCore, cache: EmbeddingCache,
                       progress: bool = True) -> tuple[list[ClientReply], list[dict[str, str]]]:
    """Run every client here; a client whose data fails drops out with its reason recorded."""
    replies: list[ClientReply] = []
    missing: list[dict[str, str]] = []
    poisoning = config.poisoning()
    defects = DefectSource(plan.datasets, detector, config.settings, cache)
    for index in tqdm(range(config.clients), desc="clients", unit="client", disable=not progress):
        name = client_id(index)
        try:
            update, stats = FederatedClient(name, plan.client_images(index), read_image).fit(
                config.settings, detector, cache)
            if index in poisoning.poisoned(config.clients):
                update = poisoning.apply(update, defects)
        except FedinspectError as error:  # a client with bad data drops out; the round goes on without it
            print(f"warning: {name} dropped out: {error}", file=sys.stderr)
            missing.append({"client": name, "reason": str(error)})
            continue
        start = time.perf_counter()
        payload = update.to_bytes(config.settings.precision)
        replies.append(ClientReply(name, payload, {
            "feature_extraction_s": stats.feature_extraction_s, "local_coreset_s": stats.local_coreset_s,
            "serialization_s": time.perf_counter() - start,
        }, partition=index))
    return replies, missing


def conclude_round(plan: RoundPlan, replies: list[ClientReply], missing: list[dict[str, str]],
                   config: FederationConfig, out_dir: Path, detector: PatchCore | None = None,
                   cache: EmbeddingCache | None = None, started: float | None = None,
                   progress: bool = True, test_cache: dict[Path, Any] | None = None,
                   report: bool = True) -> dict[str, Any]:
    """The server's side: parse the replies, aggregate, evaluate every category, write results and report."""
    started = time.perf_counter() if started is None else started
    detector = detector or config.settings.detector(progress=False)
    cache = {} if cache is None else cache
    timing: dict[str, float] = {"feature_extraction_s": 0.0, "local_coreset_s": 0.0, "serialization_s": 0.0}
    updates: list[ClientUpdate] = []
    rows: list[dict[str, Any]] = []
    spec = round_spec(plan, replies, config.settings, detector)
    missing = list(missing)
    for reply in replies:
        start = time.perf_counter()
        try:  # an update that does not fit the round is dropped like a client that did not answer
            if any(row["client"] == reply.client_id for row in rows):
                raise UpdateError(f"{reply.client_id}: update rejected: a second update from the same client")
            update = receive(reply.payload, reply.client_id, spec)
        except UpdateError as error:
            print(f"warning: {reply.client_id} dropped out: {error}", file=sys.stderr)
            missing.append({"client": reply.client_id, "reason": str(error)})
            continue
        timing["serialization_s"] += time.perf_counter() - start
        for key in timing:
            timing[key] += reply.timing.get(key, 0.0)
        updates.append(update)
        rows.append({
            "client": reply.client_id, "samples": update.n_samples, "patches": update.n_patches,
            "coreset": update.n_coreset, "bytes_sent": len(reply.payload),
            "categories": {name: part.n_samples for name, part in update.categories.items()},
        })
    if len(updates) < config.min_clients:
        raise FedinspectError(
            f"only {len(updates)} of {config.clients} clients answered (minimum {config.min_clients}); "
            f"missing: {missing}"
        )
    total = sum(row["samples"] for row in rows)
    for row in rows:
        row["weight"] = row["samples"] / total

    start = time.perf_counter()
    screening: list[Screening] = []
    banks = config.server(screening=screening).aggregate(updates)
    shared = config.server("shared").aggregate(updates) if config.compare_shared and config.bank != "shared" else None
    timing["aggregation_s"] = time.perf_counter() - start

    results: dict[str, Any] = {
        "fedinspect_version": __version__,
        "config": config.to_dict(),
        "partition": {"sizes": plan.split.sizes(), "file": PARTITION_FILE},
        "clients": rows,
        "missing_clients": missing,
        "stages": {
            "raw_patches": sum(row["patches"] for row in rows),
            "local_coreset": sum(row["coreset"] for row in rows),
            "global_bank": int(sum(len(b) for b in banks.values())),
        },
    }
    # Each client scores the global model on its share of the test split (same rule as its training share).
    test_labels = {name: [s.label for s in dataset.test] for name, dataset in plan.datasets.items()}
    per_client = ClientEvaluation(client_test_shares(test_labels, {row["client"]: row["categories"] for row in rows},
                                                     config.settings.seed))
    if screening:  # what robust_coreset dropped, per global bank, with the clients named
        results["screening"] = {name: _named_screening(decision, [u.client_id for u in updates
                                                                  if name == SHARED or name in u.categories])
                                for name, decision in zip(banks, screening, strict=True)}
    if (privacy := config.settings.bank_privacy()) is not None:
        results["privacy"] = privacy.report()
    if (obfuscation := config.settings.obfuscator()) is not None:
        results["obfuscation"] = obfuscation.to_dict()
    evaluation = _evaluate(plan.datasets, banks, shared, config, detector, cache, out_dir, timing, progress,
                           per_client, test_cache)
    results.update(evaluation["summary"])
    if config.attack_data:
        results["attacks"] = _attacks(plan, updates, banks, config, detector, cache, progress)
    per_client.attach(rows)
    results["fairness"] = run_fairness(results["categories"], rows)
    timing["total_s"] = time.perf_counter() - started
    results["timing"] = timing
    results["peak_memory_mb"] = peak_memory_mb()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    if report:
        write_report(out_dir, results, evaluation["curves"], evaluation["examples"],
                     title=f"Federated PatchCore: {config.clients} clients, {config.partition}, {config.strategy}")
    return results


def round_spec(plan: RoundPlan, replies: list[ClientReply], settings: RoundSettings,
               detector: PatchCore) -> UpdateSpec:
    """What the round's updates must look like; counts are pinned for clients whose images the plan chose."""
    assigned = {reply.client_id: {name: len(paths) for name, paths in plan.client_images(reply.partition).items()}
                for reply in replies if reply.partition is not None}
    return UpdateSpec.for_round(settings, detector, plan.datasets, assigned)


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
              test_cache: dict[Path, Any] | None = None) -> dict[str, Any]:
    per_model: dict[str, dict[str, Any]] = {"federated": {}, "centralized": {}, "shared_bank": {}}
    curves: dict[str, dict[str, Curves]] = {"federated": {}, "centralized": {}}
    examples: list[Example] = []
    timing.update(evaluation_s=0.0, centralized_fit_s=0.0)
    skipped: list[str] = []
    for name, dataset in datasets.items():
        _log(f"== evaluating {name}", progress)
        start = time.perf_counter()
        shapes, regions = load_ground_truth(dataset, progress=False)
        labels = np.array([s.label for s in dataset.test])
        grids = _test_grids(dataset, detector, config, {} if test_cache is None else test_cache)
        models = {"federated": banks.get(name, banks.get(SHARED))}
        if shared is not None:
            models["shared_bank"] = shared[SHARED]
        timing["evaluation_s"] += time.perf_counter() - start
        if config.centralized:
            start = time.perf_counter()
            pooled = _pooled_embeddings(dataset, detector, cache, skipped, config)
            models["centralized"] = detector.select_coreset(pooled, config.centralized_coreset_ratio)
            timing["centralized_fit_s"] += time.perf_counter() - start
        for model_name, bank in models.items():
            start = time.perf_counter()
            scores, maps = detector.with_memory_bank(bank).predict_embedded(grids)
            if (obfuscation := config.settings.obfuscator()) is not None:  # maps back to the images' own grid
                maps = [obfuscation.restore_map(m, shape) for m, shape in zip(maps, shapes, strict=True)]
            entry, category_curves = score_with_curves(labels, scores, maps, regions)
            entry["counts"] = {"test": len(labels), "test_good": int((labels == 0).sum()),
                               "test_defective": int(labels.sum()), "bank": len(bank)}
            per_model[model_name][name] = entry
            if model_name in curves:
                curves[model_name][name] = category_curves
            if model_name == "federated":
                if per_client is not None:
                    per_client.add_category(name, labels, scores, maps, regions)
                if config.write_maps:
                    low, high = score_range(maps)
                    write_maps([(out_dir / "maps" / name / sample.defect / f"{sample.stem}.png", anomaly_map)
                                for sample, anomaly_map in zip(dataset.test, maps, strict=True)], low, high)
                    entry["map_score_range"] = [low, high]
                examples.extend(_examples(dataset, labels, scores, maps, regions, shapes,
                                          config.examples_per_category))
            if model_name == "centralized":
                timing["centralized_fit_s"] += time.perf_counter() - start
            else:
                timing["evaluation_s"] += time.perf_counter() - start
    summary: dict[str, Any] = {"categories": per_model["federated"], "mean": _mean(per_model["federated"])}
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


def _examples(dataset: CategoryDataset, labels, scores, maps, regions, shapes, count: int) -> list[Example]:
    """The highest-scoring defective images and the highest-scoring good one (the hardest case)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    defective = [i for i in order if labels[i] == 1][: max(count - 1, 0)]
    good = [i for i in order if labels[i] == 0][:1]
    chosen = []
    for i in [*defective, *good]:
        sample = dataset.test[i]
        chosen.append(Example(
            category=dataset.name, defect=sample.defect, name=sample.stem, image=read_image(sample.image_path),
            anomaly_map=maps[i], ground_truth=union_mask(regions[i], shapes[i]), score=float(scores[i]),
        ))
    return chosen
