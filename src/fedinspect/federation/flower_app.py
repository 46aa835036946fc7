"""fedinspect's Flower App: the ``ServerApp`` and ``ClientApp`` that ``flwr run`` and the SuperNodes load.

Both are the round engine's (:mod:`fedinspect.federation.rounds_flower`), which serves every kind
of federated model; this module only turns a Flower run config (``[tool.flwr.app.config]`` in
pyproject.toml, overridden by ``flwr run --run-config``) into the task to run:

- ``detector = "patchcore"`` (the default): one round of memory banks
  (:class:`~fedinspect.federation.runner.PatchCoreTask`), configured by the keys of
  :class:`FederationConfig` and :class:`RoundSettings` (``clients``, ``strategy``, ``image-size``...);
- any other detector of the registry (``padim``, ``ae_mse``, ``stfpm``...): the detector federation of
  :mod:`fedinspect.federation.detector_task`, configured by ``rounds``, ``local-epochs``,
  ``proximal-mu``, ``model-scope``, ``detector-params`` and ``privacy`` (JSON objects) and the shared
  ``clients``, ``partition``, ``alpha``, ``seed``, ``centralized``, ``write-maps``.

``data-dir`` is the server's dataset (its test split for the evaluation; in simulation also the
partitioned training split); a deployed SuperNode trains on its own images, named by its node config
``data-dir`` (``flower-supernode --node-config 'client-id="plant_a" data-dir="/data/images"'``).
Entry points: :data:`server_app` / :data:`client_app`, and :func:`run_flower_simulation`
(federated PatchCore on the Simulation Engine, ``fedinspect federate --engine flower-sim``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context
from flwr.clientapp import ClientApp

from fedinspect.errors import FedinspectError, SettingsError
from fedinspect.federation.rounds_flower import make_client_app, make_server_app, run_simulation

if TYPE_CHECKING:
    from fedinspect.federation.detector_task import DetectorFederationConfig
    from fedinspect.federation.rounds import FederatedTask
    from fedinspect.federation.runner import FederationConfig, RoundPlan

# Run-config keys (``[tool.flwr.app.config]``) that are not FederationConfig / RoundSettings fields.
DEFAULT_OPTIONS: dict[str, Any] = {
    "data-dir": "",  # the server's dataset: the plan, the test split and the centralized baseline
    "out-dir": "runs/flower",
    "round-timeout": 3600.0,  # seconds the server waits for the clients' updates
    "connect-timeout": 300.0,  # seconds the server waits for the SuperNodes to connect and identify
    "progress": False,
    # torch threads a ClientApp computes with; 0 leaves the node's default. The embeddings depend on it at
    # float rounding level (oneDNN splits the convolutions by thread), so results match the in-process
    # runner bit for bit only with the same count; the simulation passes this process's count.
    "client-threads": 0,
}
# The detector federations' keys (DetectorFederationConfig fields that PatchCore's config does not have).
DETECTOR_OPTIONS: dict[str, Any] = {
    "detector": "patchcore",
    "detector-params": "{}",
    "rounds": 5,
    "local-epochs": 1,
    "proximal-mu": 0.0,
    "model-scope": "category",
    "local-baseline": False,
    "privacy": "{}",
}
# Optional values have no TOML "None": these stand for it.
_NONE = {"global_ratio": 0.0, "layers": ""}


def _key(name: str) -> str:
    return name.replace("_", "-")


def run_config_from_config(config: FederationConfig, **options: Any) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` values for ``config`` (plus ``data-dir``, ``out-dir``, ...)."""
    values: dict[str, Any] = {}
    for source in (config, config.settings):
        for item in fields(source):
            if item.name == "settings":
                continue
            value = getattr(source, item.name)
            if value is None:
                value = _NONE[item.name]
            elif item.name == "layers":
                value = ",".join(value)
            values[_key(item.name)] = value
    merged = {**DEFAULT_OPTIONS, **DETECTOR_OPTIONS, **{_key(k): v for k, v in options.items()}}
    values.update({k: (str(v) if isinstance(v, Path) else v) for k, v in merged.items()})
    return values


def run_config_from_detector_config(config: DetectorFederationConfig, **options: Any) -> dict[str, Any]:
    """The run config values of a detector federation (``detector`` and its keys; PatchCore's keys at defaults)."""
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.runner import FederationConfig

    if config.secure:
        raise SettingsError("secure aggregation runs on the Simulation Engine only: unset it for a deployment")
    shared = FederationConfig(clients=config.clients, partition=config.partition, alpha=config.alpha,
                              centralized=config.centralized, write_maps=config.write_maps,
                              settings=RoundSettings(seed=config.seed))
    return run_config_from_config(shared, **{
        "detector": config.detector, "detector_params": json.dumps(dict(config.params)), "rounds": config.rounds,
        "local_epochs": config.local_epochs, "proximal_mu": float(config.proximal_mu),
        "model_scope": config.model_scope, "local_baseline": config.local_baseline,
        "privacy": json.dumps(dict(config.privacy)), **options})


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[FederationConfig, dict[str, Any]]:
    """FederationConfig and the server options from a Flower run config (missing keys: defaults)."""
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.runner import FederationConfig

    def read(source_type: type, defaults: Any) -> dict[str, Any]:
        values = {}
        for item in fields(source_type):
            key = _key(item.name)
            if item.name == "settings" or key not in run_config:
                continue
            value, default = run_config[key], getattr(defaults, item.name)
            if item.name in _NONE and value == _NONE[item.name]:
                value = None
            elif item.name == "layers":
                value = tuple(part.strip() for part in str(value).split(",") if part.strip())
            elif isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, float):
                value = float(value)
            values[item.name] = value
        return values

    settings = RoundSettings(**read(RoundSettings, RoundSettings()))
    config = FederationConfig(**read(FederationConfig, FederationConfig()), settings=settings)
    options = {key: run_config.get(key, default) for key, default in DEFAULT_OPTIONS.items()}
    return config, options


def task_from_run_config(run_config: Mapping[str, Any]) -> tuple[FederatedTask, Path, dict[str, Any]]:
    """The task a run config describes, its output folder and the server's options (see the module docstring)."""
    config, options = config_from_run_config(run_config)
    if not options["data-dir"]:
        raise FedinspectError("the ServerApp needs run config data-dir (the dataset it evaluates on)")
    if config.poisoning().active:
        raise FedinspectError("poisoning (poison, poisoned-clients) is a drill of the in-process runner and the "
                              "simulation; a deployment's clients are not poisoned: unset it")
    detector = str(run_config.get("detector", DETECTOR_OPTIONS["detector"]))
    if detector == "patchcore":
        from fedinspect.federation.runner import PatchCoreTask

        task: FederatedTask = PatchCoreTask(options["data-dir"], config, bool(options["progress"]))
    else:
        from fedinspect.federation.detector_task import make_task

        def json_object(key: str) -> dict[str, Any]:
            try:
                value = json.loads(str(run_config.get(key, DETECTOR_OPTIONS[key])))
            except json.JSONDecodeError as error:
                raise SettingsError(f"run config {key}: not JSON ({error})") from error
            if not isinstance(value, dict):
                raise SettingsError(f"run config {key}: expected a JSON object, got {value!r}")
            return value

        try:
            settings = _detector_config(run_config, config, detector, json_object)
        except (TypeError, ValueError) as error:
            raise SettingsError(f"run config of detector {detector!r}: {error}") from error
        task = make_task(options["data-dir"], settings, bool(options["progress"]))
        if getattr(task, "secure", False):
            raise SettingsError("secure aggregation runs on the Simulation Engine only (flwr 1.41's legacy "
                                "SecAgg+ workflow); unset secure for a deployment")
    return task, Path(str(options["out-dir"])), options


def _detector_config(run_config: Mapping[str, Any], config: FederationConfig, detector: str,
                     json_object: Any) -> DetectorFederationConfig:
    """The detector federation's settings from the run config (PatchCore's shared keys included)."""
    from fedinspect.federation.detector_task import DetectorFederationConfig

    return DetectorFederationConfig(
        detector=detector, params=json_object("detector-params"), clients=config.clients,
        partition=config.partition, alpha=config.alpha, seed=config.settings.seed,
        rounds=int(run_config.get("rounds", DETECTOR_OPTIONS["rounds"])),
        local_epochs=int(run_config.get("local-epochs", DETECTOR_OPTIONS["local-epochs"])),
        proximal_mu=float(run_config.get("proximal-mu", DETECTOR_OPTIONS["proximal-mu"])),
        model_scope=str(run_config.get("model-scope", DETECTOR_OPTIONS["model-scope"])),
        centralized=config.centralized, write_maps=config.write_maps,
        local_baseline=bool(run_config.get("local-baseline", False)), privacy=json_object("privacy"))


def _setup(context: Context) -> tuple[FederatedTask, Path, dict[str, Any]]:
    return task_from_run_config(context.run_config)


server_app = make_server_app(_setup, engine="flower")
client_app = make_client_app()


def run_flower_simulation(data_dir: str | Path, out_dir: str | Path, config: FederationConfig | None = None,
                          progress: bool = True, *, client_app: ClientApp | None = None,
                          round_timeout: float = 3600.0, connect_timeout: float = 600.0,
                          client_threads: int | None = None, cpus_per_client: float | None = None) -> dict[str, Any]:
    """One round of federated PatchCore on Flower's Simulation Engine (Ray), one virtual SuperNode per client.

    Same results as :func:`runner.run_federation` for the same config and seed, bit for bit (see
    :func:`rounds_flower.run_simulation` for the threads and timeouts); returns results.json's dict.
    """
    from fedinspect.federation.runner import PatchCoreTask

    task = PatchCoreTask(data_dir, config, progress)
    return run_simulation(task, out_dir, progress, client_app=client_app, round_timeout=round_timeout,
                          connect_timeout=connect_timeout, client_threads=client_threads,
                          cpus_per_client=cpus_per_client)


def write_client_folders(plan: RoundPlan, root: str | Path, n_clients: int) -> list[Path]:
    """Give each client its own data folder (``root/client_<i>/<category>/train/good``), as a factory holds it.

    The images are copied under their own names, so a client sees them in the plan's order.
    """
    from fedinspect.federation.rounds import client_id

    root = Path(root)
    folders = []
    for index in range(n_clients):
        folder = root / client_id(index)
        if folder.exists():
            shutil.rmtree(folder)
        for category, paths in plan.client_images(index).items():
            target = folder / category / "train" / "good"
            target.mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copy2(path, target / path.name)
        folders.append(folder)
    return folders
