"""Federated PatchCore on Flower: a ``ServerApp`` and a ``ClientApp`` over the existing roles.

No second copy of the logic: the ServerApp plans the round with :func:`runner.plan_round`, tells
every SuperNode the :class:`RoundSettings` and which data to use, and ends with
:func:`runner.conclude_round`; the ClientApp runs :class:`FederatedClient` on its own images and
replies with the update bytes of :meth:`ClientUpdate.to_bytes`. Flower only carries messages.

One round, two message exchanges (Flower's message API, ``Grid.send_and_receive``):

1. ``query.identify``: each SuperNode says who it is (``client_<partition-id>`` in simulation;
   node config ``client-id``, ``partition-id`` or its ``data-dir`` name in deployment) and whether
   it holds its own data. A node that does not answer is recorded as missing.
2. ``train.fit``: the round settings (``RoundSettings.to_dict()`` as JSON) and, for a simulated
   node, its image paths from the plan; a deployed SuperNode uses the dataset under its node config
   ``data-dir`` (one subfolder per category with ``train/good/*.png``). The reply holds the update
   bytes (one ``ArrayRecord`` with one uint8 array, which Flower streams in chunks) and the
   client's timings (``MetricRecord``).

Faults: the server waits up to ``round-timeout`` seconds; a client whose ClientApp raised (or whose
data is bad), whose update does not fit the round (:mod:`fedinspect.federation.validation`, checked
in :func:`runner.conclude_round` as for the in-process runner) or that did not answer in time is
listed in results.json ``missing_clients`` with the reason, and the round goes on if at least
``min-clients`` answered (else a clear :class:`FedinspectError`). A SuperNode that dies mid-round is
noticed before ``round-timeout``: Flower 1.41's SuperNode sends a heartbeat every 30 s (fixed in
its code, no option changes it) and the SuperLink, after 2 missed intervals (60 s), answers the
pending message with a "Node Unavailable" error reply, recorded as that client's reason.

Entry points: :data:`server_app` / :data:`client_app` (read by ``flwr run`` and the SuperNodes,
see ``[tool.flwr.app]`` in pyproject.toml), and :func:`run_flower_simulation` (Flower's Simulation
Engine in this process, used by ``fedinspect federate --engine flower-sim``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedinspect.errors import DataError, FedinspectError

if TYPE_CHECKING:
    from fedinspect.detectors.patchcore import PatchCore
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.runner import ClientReply, FederationConfig, RoundPlan

# fedinspect's roles (and torch) are imported where used: a SuperNode starts a fresh ClientApp process
# per message, and the ``query.identify`` one needs none of them.

PROTOCOL = "fedinspect.flower/1"
IDENTIFY = "query.identify"
FIT = "train.fit"
GROUP = "round-1"
CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION

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
# Optional values have no TOML "None": these stand for it.
_NONE = {"global_ratio": 0.0, "layers": ""}


# ---------------------------------------------------------------- configuration
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
    merged = {**DEFAULT_OPTIONS, **{_key(k): v for k, v in options.items()}}
    values.update({k: (str(v) if isinstance(v, Path) else v) for k, v in merged.items()})
    return values


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


# ---------------------------------------------------------------- client side
@functools.lru_cache(maxsize=2)
def _detector(settings: RoundSettings) -> PatchCore:
    """One loaded backbone per process and settings (a simulated actor serves many clients)."""
    return settings.detector(progress=False)


def own_images(data_dir: str | Path) -> dict[str, list[Path]]:
    """A factory's training images: ``{category: sorted train/good images}`` of its own dataset folder.

    The folder has the dataset layout (one subfolder per category, or a single category folder);
    only ``train/good`` is needed on a client.
    """
    from fedinspect.data.dataset import find_categories
    from fedinspect.data.images import list_images

    images: dict[str, list[Path]] = {}
    for root in find_categories(data_dir):
        folder = root / "train" / "good"
        paths = list_images(folder) if folder.is_dir() else []
        if paths:
            images[root.name] = paths
    if not images:
        raise DataError(data_dir, "no training image in any category's train/good")
    return images


def node_identity(context: Context) -> dict[str, Any]:
    """What this SuperNode's node config says about it: a name given by its operator (``client-id``,
    else its ``data-dir``'s name; "" when it is a simulated partition), its ``partition-id`` (-1: none)
    and whether it holds its own data."""
    node = context.node_config
    partition = int(node["partition-id"]) if "partition-id" in node else -1
    if "client-id" in node:
        name = str(node["client-id"])
    elif "data-dir" in node:
        name = Path(str(node["data-dir"])).resolve().name
    else:
        name = ""
    return {"client": name, "partition-id": partition, "own-data": "data-dir" in node}


def client_name(info: Mapping[str, Any], node_id: int) -> str:
    """The client id of a node: its own name, else ``client_<partition-id>`` (the in-process runner's)."""
    from fedinspect.federation.runner import client_id

    if info["client"]:
        return str(info["client"])
    return client_id(int(info["partition-id"])) if int(info["partition-id"]) >= 0 else f"node_{node_id}"


def identity(context: Context) -> dict[str, Any]:
    """Who this SuperNode is: :func:`node_identity` with the client id filled in."""
    info = node_identity(context)
    return {**info, "client": client_name(info, context.node_id)}


def handle_identify(message: Message, context: Context) -> Message:
    """``query.identify``: reply with what the node config says about this node (imports nothing heavy)."""
    return Message(RecordDict({"identity": ConfigRecord({**node_identity(context), "protocol": PROTOCOL})}),
                   reply_to=message)


def handle_fit(message: Message, context: Context) -> Message:
    """``train.fit``: load this client's images, run :class:`FederatedClient`, reply with the update bytes.

    A data problem (an unreadable image, an empty folder) is answered with an error reply carrying
    the reason, as the in-process runner records it; any other exception is left to Flower, which
    answers with an error reply too.
    """
    import torch

    from fedinspect.data.images import read_image
    from fedinspect.federation.client import FederatedClient, RoundSettings

    request = message.content["fit"]
    me = identity(context)
    name = str(request["client"])
    if name != me["client"]:
        raise RuntimeError(f"message for {name} reached {me['client']}")
    settings = RoundSettings.from_dict(json.loads(str(request["settings"])))
    threads = int(request.get("threads", 0))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        if me["own-data"]:
            images = own_images(str(context.node_config["data-dir"]))
        else:
            listed = json.loads(str(request["images"]))
            if not listed:
                raise FedinspectError(f"{name}: the server sent no images and the node has no data-dir")
            images = {category: [Path(p) for p in paths] for category, paths in listed.items()}
        update, stats = FederatedClient(name, images, read_image).fit(settings, _detector(settings))
    except FedinspectError as error:
        return Message(Error(code=CLIENT_ERROR, reason=str(error)), reply_to=message)
    start = time.perf_counter()
    payload = update.to_bytes(settings.precision)
    timing = {"feature_extraction_s": stats.feature_extraction_s, "local_coreset_s": stats.local_coreset_s,
              "serialization_s": time.perf_counter() - start}
    content = RecordDict({
        "update": ArrayRecord({"update": Array(np.frombuffer(payload, dtype=np.uint8))}),
        "timing": MetricRecord(timing),
        "info": ConfigRecord({"client": name}),
    })
    return Message(content, reply_to=message)


def make_client_app() -> ClientApp:
    app = ClientApp()
    app.query("identify")(handle_identify)
    app.train("fit")(handle_fit)
    return app


client_app = make_client_app()


# ---------------------------------------------------------------- server side
def _reason(message: Message) -> str:
    return error_reason(message.error.reason or f"error code {message.error.code}")


def error_reason(reason: str) -> str:
    """An error reply's reason, readable: the exception the ClientApp raised, not Flower's or Ray's wrapping."""
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    # Ray's wrapping (simulation) keeps the original traceback: its last line names the exception
    raised = re.search(r"^(\w+(?:Error|Exception|Exit|Interrupt)): (.+)$", reason, flags=re.MULTILINE)
    if "Traceback" in reason or "ray::" in reason:
        if raised:
            return f"{raised.group(1)}: {raised.group(2).strip()}"
    # Flower's wrapping (deployment): "<class 'X'>:<'text'>"
    match = re.fullmatch(r"<class '([\w.]+)'>:<'(.*)'>", reason, flags=re.DOTALL)
    return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}" if match else reason[:1000]


def _order(name: str) -> tuple[int, str]:
    match = re.fullmatch(r"client_(\d+)", name)
    return (int(match.group(1)) if match else sys.maxsize, name)


def _exchange(grid: Grid, asks: list[Message], timeout: float) -> list[tuple[int, Message]]:
    """Send ``asks``, gather the replies, each with the node it answers for.

    That node is found through the reply's ``reply_to_message_id``, not its source: when a node stops
    sending heartbeats, the SuperLink answers for it with an error reply whose source is the SuperLink.
    """
    replies = list(grid.send_and_receive(asks, timeout=timeout))
    node_of = {ask.metadata.message_id: ask.metadata.dst_node_id for ask in asks}  # ids set when pushed
    return [(node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id), reply)
            for reply in replies]


def wait_for_nodes(grid: Grid, expected: int, timeout: float, progress: bool) -> list[int]:
    """The SuperNodes connected once ``expected`` are or ``timeout`` s have passed (shared by every ServerApp)."""
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = sorted(grid.get_node_ids())
    _log(f"{len(nodes)} SuperNode(s) connected (expected {expected})", progress)
    return nodes


def _log(message: str, progress: bool) -> None:
    if progress:
        print(f"[flower server] {message}", file=sys.stderr)


def collect_over_flower(grid: Grid, plan: RoundPlan, config: FederationConfig, options: Mapping[str, Any]
                        ) -> tuple[list[ClientReply], list[dict[str, str]]]:
    """The Flower transport: identify the SuperNodes, send the round, gather the updates and who is missing."""
    from fedinspect.federation.runner import ClientReply, client_id

    progress = bool(options["progress"])
    connect_timeout = float(options["connect-timeout"])
    round_timeout = float(options["round-timeout"])
    expected = [client_id(i) for i in range(config.clients)]
    missing: list[dict[str, str]] = []

    nodes = wait_for_nodes(grid, config.clients, connect_timeout, progress)
    content = RecordDict({"identify": ConfigRecord({"protocol": PROTOCOL})})
    asks = [Message(content, node, IDENTIFY, group_id=GROUP, ttl=connect_timeout + 60) for node in nodes]
    members: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}  # nodes whose ClientApp could not even say who they are
    for node, reply in _exchange(grid, asks, connect_timeout):
        if reply.has_error():
            failed[node] = _reason(reply)
            _log(f"node {node} failed to identify: {failed[node]}", progress)
            continue
        info = dict(reply.content["identity"])
        info["client"] = client_name(info, node)
        if not info["own-data"] and not 0 <= int(info["partition-id"]) < config.clients:
            _log(f"node {node} ({info['client']}) holds no partition of a {config.clients}-client plan; "
                 "left out", progress)
            continue
        members[node] = info
    names = [info["client"] for info in members.values()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FedinspectError(f"several SuperNodes claim the same client id: {duplicates}")
    absent = f"not connected or no answer within {connect_timeout:g} s"
    if failed:  # which client a failed node was is unknown: every absent client gets the errors
        absent = f"no identification: {'; '.join(sorted(set(failed.values())))}"
        if len(failed) + len(members) < len(expected):
            absent += f" (or not connected within {connect_timeout:g} s)"
    if set(names) <= set(expected):
        missing.extend({"client": name, "reason": absent} for name in expected if name not in names)
    else:  # SuperNodes named by their operators: only the shortfall is known
        missing.extend({"client": f"unidentified_{k}", "reason": absent}
                       for k in range(max(0, config.clients - len(members))))

    asks, sent = [], {}
    for node, info in sorted(members.items(), key=lambda item: _order(item[1]["client"])):
        images = {} if info["own-data"] else plan.client_images(int(info["partition-id"]))
        request = ConfigRecord({
            "client": info["client"],
            "settings": json.dumps(config.settings.to_dict()),
            "images": json.dumps({category: [str(p) for p in paths] for category, paths in images.items()}),
            "threads": int(options["client-threads"]),
        })
        message = Message(RecordDict({"fit": request}), node, FIT, group_id=GROUP, ttl=round_timeout + 60)
        asks.append(message)
        sent[node] = info["client"]
    _log(f"round sent to {len(asks)} client(s); waiting up to {round_timeout:g} s", progress)
    replies: list[ClientReply] = []
    answered: set[int] = set()
    for node, reply in _exchange(grid, asks, round_timeout):
        if node not in sent or node in answered:
            continue
        answered.add(node)
        name = sent[node]
        if reply.has_error():
            reason = _reason(reply)
            print(f"warning: {name} dropped out: {reason}", file=sys.stderr)
            missing.append({"client": name, "reason": reason})
            continue
        payload = reply.content["update"]["update"].numpy().tobytes()
        timing = {key: float(value) for key, value in reply.content["timing"].items()}
        # the counts of a node fed by the plan must be the plan's; a node with its own data-dir is checked by bounds
        info = members[node]
        replies.append(ClientReply(name, payload, timing,
                                   partition=None if info["own-data"] else int(info["partition-id"])))
    for node, name in sent.items():
        if node not in answered:
            print(f"warning: {name} dropped out: no reply within {round_timeout:g} s", file=sys.stderr)
            missing.append({"client": name, "reason": f"no reply within {round_timeout:g} s"})
    replies.sort(key=lambda r: _order(r.client_id))  # the in-process order: the strategies see the same pool
    missing.sort(key=lambda m: _order(m["client"]))
    _log(f"{len(replies)} update(s) received, {len(missing)} client(s) missing", progress)
    return replies, missing


def serve_round(grid: Grid, data_dir: str | Path, out_dir: str | Path, config: FederationConfig,
                options: Mapping[str, Any]) -> dict[str, Any]:
    """The whole server side over Flower: plan, collect, then :func:`conclude_round` (results.json, report).

    ``out_dir`` is locked and written all at once (:func:`staged_output`): a failed round leaves it untouched.
    """
    from fedinspect.federation.runner import conclude_round, plan_round
    from fedinspect.run_folder import staged_output

    if config.poisoning().active:
        raise FedinspectError("poisoning (poison, poisoned-clients) is a drill of the in-process runner; "
                              "Flower clients are not poisoned: unset it")
    started = time.perf_counter()
    with staged_output(out_dir, inputs=[data_dir, *([config.attack_data] if config.attack_data else [])]) as staging:
        plan = plan_round(data_dir, config, staging)
        replies, missing = collect_over_flower(grid, plan, config, options)
        return conclude_round(plan, replies, missing, config, staging, started=started,
                              progress=bool(options["progress"]))


def make_server_app(config: FederationConfig | None = None, options: Mapping[str, Any] | None = None,
                    sink: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp; without ``config`` it reads everything from the run config (``flwr run``).

    ``sink`` (a dict) receives ``results`` or the ``error`` raised, for a caller in the same process.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            if config is None:
                run_config, run_options = config_from_run_config(context.run_config)
                run_options.update(options or {})
            else:
                run_config, run_options = config, {**DEFAULT_OPTIONS, **(options or {})}
            if not run_options["data-dir"]:
                raise FedinspectError("the ServerApp needs run config data-dir (the dataset it evaluates on)")
            results = serve_round(grid, run_options["data-dir"], run_options["out-dir"], run_config, run_options)
            if sink is not None:
                sink["results"] = results
        except BaseException as error:
            if sink is not None:
                sink["error"] = error
            raise

    return app


server_app = make_server_app()


# ---------------------------------------------------------------- Simulation Engine
def simulation_backend(num_supernodes: int, cpus_per_client: float = 1.0) -> dict[str, Any]:
    """Ray settings for this machine: ``cpus_per_client`` per ClientApp (Ray runs cores / cpus_per_client
    of them at a time), no dashboard, a small object store."""
    cpus = max(1, min(int(num_supernodes * cpus_per_client + 0.999), os.cpu_count() or 1))
    return {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
            "object_store_memory": 256 * 1024 * 1024, "logging_level": "ERROR", "log_to_driver": False,
        },
    }


def run_flower_simulation(data_dir: str | Path, out_dir: str | Path, config: FederationConfig | None = None,
                          progress: bool = True, *, client_app: ClientApp | None = None,
                          num_supernodes: int | None = None, round_timeout: float = 3600.0,
                          connect_timeout: float = 600.0, client_threads: int | None = None,
                          cpus_per_client: float | None = None,
                          backend_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """One federated round on Flower's Simulation Engine (Ray): one virtual SuperNode per client.

    Same results as :func:`runner.run_federation` for the same config and seed, bit for bit; returns
    the results dict written to ``out_dir/results.json``. ``client_threads`` (default: this process's
    torch threads, as the in-process runner computes) is what each ClientApp computes with, and each
    reserves ``cpus_per_client`` (default: that many) of Ray's CPUs, so the clients never
    oversubscribe the cores. ``client_threads=0, cpus_per_client=1`` runs one single-threaded client
    per core: faster on a busy machine, but the embeddings then differ from the in-process ones at
    float rounding level (oneDNN splits convolutions by thread), and so may the metrics (~1e-8).
    ``client_app`` replaces the ClientApp (fault drills); ``round_timeout`` bounds the wait for updates,
    ``connect_timeout`` the wait for every virtual SuperNode's ClientApp to start and identify itself: the
    nodes always exist, so it only has to outlast a busy machine (60 s did not: on 2 cores shared with a
    training job, three ClientApps starting one after the other took longer).
    """
    import torch

    from fedinspect.federation.runner import FederationConfig

    config = config or FederationConfig()
    num_supernodes = num_supernodes or config.clients
    client_threads = torch.get_num_threads() if client_threads is None else client_threads
    cpus_per_client = cpus_per_client or max(1, client_threads)
    sink: dict[str, Any] = {}
    options = {"data-dir": str(data_dir), "out-dir": str(out_dir), "round-timeout": round_timeout,
               "connect-timeout": connect_timeout, "progress": progress,
               "client-threads": client_threads}
    server = make_server_app(config, options, sink)
    return simulate(server, client_app or make_client_app(), num_supernodes,
                    backend_config or simulation_backend(num_supernodes, cpus_per_client), sink, progress)


def simulate(server: ServerApp, client_app: ClientApp, num_supernodes: int, backend_config: dict[str, Any],
             sink: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Run a ServerApp and a ClientApp on the Simulation Engine; returns the ``results`` the ServerApp left in ``sink``.

    An error the ServerApp recorded (``sink["error"]``) is raised here, with its own type and message,
    rather than Ray's wrapper.
    """
    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not progress:
        flwr_logger.setLevel(logging.ERROR)  # also run_simulation's deprecation notice (flwr run is the CLI way)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU only: silences Ray's FutureWarning
    try:
        run_simulation(server_app=server, client_app=client_app, num_supernodes=num_supernodes,
                       backend_config=backend_config)
    except Exception:
        if "error" not in sink:
            raise
    finally:
        flwr_logger.setLevel(level)
    if "error" in sink:
        raise sink["error"]
    if "results" not in sink:
        raise FedinspectError("the Flower simulation ended without results (see the log above)")
    return sink["results"]


# ---------------------------------------------------------------- deployment helpers
def write_client_folders(plan: RoundPlan, root: str | Path, n_clients: int) -> list[Path]:
    """Give each client its own data folder (``root/client_<i>/<category>/train/good``), as a factory holds it.

    The images are copied under their own names, so a client sees them in the plan's order.
    """
    from fedinspect.federation.runner import client_id

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
