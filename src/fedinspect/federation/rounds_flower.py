"""Federated rounds on Flower: one ``ServerApp`` and one ``ClientApp`` for every :class:`FederatedTask`.

Flower only carries the messages; the work is :mod:`fedinspect.federation.rounds`'s, so the
Simulation Engine gives the in-process numbers for the same task and seed (with the same torch
thread count), and a deployment (TLS, authenticated SuperNodes, each factory with its own data) runs
the same code. Messages (message API, ``Grid.send_and_receive``):

1. ``query.identify``, once: each SuperNode says who it is (its node config: ``partition-id`` in
   simulation; in a deployment ``client-id`` and ``data-dir``, its own images, and optionally
   ``partition-id``). The server gives each node its client index: its ``partition-id``, else the
   free indices in the order of the nodes' names. A node that does not answer is missing.
2. ``train``, one per client per round: ``arrays`` (the global state, an ``ArrayRecord``) and
   ``config``: the round, the client's index, the task's spec and secrets (JSON; the ClientApp
   rebuilds the task from a fixed registry of kinds, :data:`rounds.TASKS`), the torch thread count.
   The reply: ``arrays`` (the client's update), ``metrics`` and ``info`` (examples per group, the
   client's memory, JSON). The memory (its DP accountant history) also stays in ``context.state``.

Faults: a client that fails answers with an error reply and is recorded as missing with the
reason, as is one whose answer does not fit the round (:meth:`FederatedTask.check_update`) or that
does not answer within ``round-timeout``; the round goes on with the others if at least the task's
``min_clients`` answered. A SuperNode that dies mid-round is noticed before ``round-timeout``:
Flower 1.41's SuperNode sends a heartbeat every 30 s and the SuperLink, after 2 missed intervals,
answers the pending message with a "Node Unavailable" error reply, recorded as that client's reason.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedinspect.errors import FedinspectError
from fedinspect.federation.rounds import (
    ClientResult,
    FederatedTask,
    RoundRecorder,
    RoundsOutcome,
    aggregate,
    client_id,
    client_order,
    task_from_spec,
)

PROTOCOL = "fedinspect.rounds/1"
IDENTIFY = "query.identify"
CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
_MEMORY = "fedinspect-memory"


# ---------------------------------------------------------------- client side
TaskBuilder = Callable[[Mapping[str, Any], Mapping[str, Any]], FederatedTask]


def node_identity(context: Context) -> dict[str, Any]:
    """What this SuperNode's node config says about it: a name given by its operator (``client-id``, else
    its ``data-dir``'s name; "" for a simulated partition), its ``partition-id`` (-1: none) and whether it
    holds its own data."""
    node = context.node_config
    partition = int(node["partition-id"]) if "partition-id" in node else -1
    if "client-id" in node:
        name = str(node["client-id"])
    elif "data-dir" in node:
        name = Path(str(node["data-dir"])).resolve().name
    else:
        name = ""
    return {"client": name, "partition-id": partition, "own-data": "data-dir" in node}


def handle_identify(message: Message, context: Context) -> Message:
    """``query.identify``: reply with what the node config says about this node (imports nothing heavy)."""
    return Message(RecordDict({"identity": ConfigRecord({**node_identity(context), "protocol": PROTOCOL})}),
                   reply_to=message)


def handle_round(message: Message, context: Context, task_for: Callable[[str, str, str], FederatedTask]) -> Message:
    """Compute this node's update from the global state of the message (``task_for(spec, secrets, data_dir)``)."""
    import torch

    request = message.content["config"]
    index = int(request["index"])
    name = client_id(index)
    threads = int(request.get("threads", 0))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    memory = json.loads(str(context.state[_MEMORY]["memory"])) if _MEMORY in context.state else {}
    try:
        task = task_for(str(request["task"]), str(request["secrets"]), str(context.node_config.get("data-dir", "")))
        if not 0 <= index < task.n_clients:
            raise FedinspectError(f"{name}: index {index} is not in a {task.n_clients}-client task")
        state = message.content["arrays"].to_torch_state_dict()
        result = task.client_update(index, state, int(request["round"]), memory)
    except FedinspectError as error:
        return Message(Error(code=CLIENT_ERROR, reason=str(error)), reply_to=message)
    context.state[_MEMORY] = ConfigRecord({"memory": json.dumps(result.memory)})
    content = RecordDict({
        "arrays": ArrayRecord(result.arrays),
        "metrics": MetricRecord({k: float(v) for k, v in result.metrics.items()}),
        "info": ConfigRecord({"client": name, "examples": json.dumps(result.examples),
                              "memory": json.dumps(result.memory)}),
    })
    return Message(content, reply_to=message)


class _TaskCache:
    """``(spec, secrets, data-dir) -> task``, built once per process: a simulated actor serves several clients
    and rounds; a deployed node with its own ``data-dir`` gets :meth:`FederatedTask.with_own_data`."""

    def __init__(self, build: TaskBuilder) -> None:
        self.build = build
        self.tasks: dict[tuple[str, str, str], FederatedTask] = {}

    def __call__(self, spec: str, secrets: str, data_dir: str = "") -> FederatedTask:
        key = (spec, secrets, data_dir)
        if key not in self.tasks:
            self.tasks.clear()
            task = self.build(json.loads(spec), json.loads(secrets))
            self.tasks[key] = task.with_own_data(Path(data_dir)) if data_dir else task
        return self.tasks[key]

    def __getstate__(self) -> dict[str, Any]:  # Ray ships the ClientApp to its actors: never the built tasks
        return {"build": self.build, "tasks": {}}


def make_client_app(build: TaskBuilder = task_from_spec) -> ClientApp:
    """The ClientApp of every task; ``build`` rebuilds a task from its spec (default: the fixed registry)."""
    app = ClientApp()
    app.query("identify")(handle_identify)
    app.train()(functools.partial(handle_round, task_for=_TaskCache(build)))
    return app


# ---------------------------------------------------------------- transport helpers
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


def exchange(grid: Grid, asks: list[Message], timeout: float) -> list[tuple[int, Message]]:
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


def _log(text: str, progress: bool) -> None:
    if progress:
        print(f"[flower server] {text}", file=sys.stderr)


# ---------------------------------------------------------------- server side
@dataclass(frozen=True)
class Member:
    """A SuperNode taking part: its client index, its operator's name for it and whether it has its own data."""

    index: int
    node_name: str
    own_data: bool

    @property
    def name(self) -> str:
        return client_id(self.index)


def identify_nodes(grid: Grid, n_clients: int, options: Mapping[str, Any]) -> tuple[dict[int, Member], str]:
    """Ask every connected SuperNode who it is and give it a client index; returns the members by node id
    and the reason to record for a client no node took."""
    progress = bool(options.get("progress", False))
    timeout = float(options.get("connect-timeout", 600.0))
    nodes = wait_for_nodes(grid, n_clients, timeout, progress)
    content = RecordDict({"identify": ConfigRecord({"protocol": PROTOCOL})})
    asks = [Message(content, node, IDENTIFY, group_id="identify", ttl=timeout + 60) for node in nodes]
    identities: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}  # nodes whose ClientApp could not even say who it is
    for node, reply in exchange(grid, asks, timeout):
        if reply.has_error():
            failed[node] = error_reason(reply.error.reason or f"error code {reply.error.code}")
            _log(f"node {node} failed to identify: {failed[node]}", progress)
        else:
            identities[node] = dict(reply.content["identity"])
    names = [str(i["client"]) for i in identities.values() if i["client"]]
    partitions = [int(i["partition-id"]) for i in identities.values() if int(i["partition-id"]) >= 0]
    for label, values in (("client id", names), ("partition-id", partitions)):
        if duplicates := sorted({v for v in values if values.count(v) > 1}):
            raise FedinspectError(f"several SuperNodes claim the same {label}: {duplicates}")
    members: dict[int, Member] = {}
    for node, info in identities.items():
        if 0 <= int(info["partition-id"]) < n_clients:
            members[node] = Member(int(info["partition-id"]), str(info["client"]), bool(info["own-data"]))
        elif int(info["partition-id"]) >= n_clients or not info["own-data"]:
            _log(f"node {node} ({info['client']}) holds no partition of a {n_clients}-client task; left out", progress)
    free = iter(sorted(set(range(n_clients)) - {m.index for m in members.values()}))
    for node, info in sorted(identities.items(), key=lambda item: client_order(str(item[1]["client"]))):
        if int(info["partition-id"]) < 0 and info["own-data"]:
            index = next(free, None)
            if index is None:
                _log(f"node {node} ({info['client']}): the task has {n_clients} clients already; left out", progress)
                continue
            members[node] = Member(index, str(info["client"]), True)
    absent = f"not connected or no answer within {timeout:g} s"
    if failed:  # which client a failed node was is unknown: every absent client gets the errors
        absent = f"no identification: {'; '.join(sorted(set(failed.values())))}"
    _log(f"{len(members)} client(s): {sorted((m.name, m.node_name) for m in members.values())}", progress)
    return members, absent


def serve_rounds(grid: Grid, task: FederatedTask, options: Mapping[str, Any]) -> RoundsOutcome:
    """Every round of ``task`` over Flower (as :func:`rounds.run_rounds` does in process)."""
    progress = bool(options.get("progress", False))
    timeout = float(options.get("round-timeout", 3600.0))
    members, absent = identify_nodes(grid, task.n_clients, options)
    if not members:
        raise FedinspectError(f"no Flower SuperNode took part: {absent}")
    task.own_data_clients = frozenset(m.name for m in members.values() if m.own_data)
    recorder = RoundRecorder(task)
    state = task.initial_state()
    memories: dict[str, dict[str, Any]] = {}
    spec, secrets = json.dumps(task.spec()), json.dumps(task.secrets())
    for round_number in range(1, task.rounds + 1):
        started = time.perf_counter()
        messages = [Message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({
            "round": round_number, "index": member.index, "task": spec, "secrets": secrets,
            "threads": int(options.get("client-threads", 0))})}), node, "train",
            group_id=f"round-{round_number}", ttl=timeout + 60) for node, member in members.items()]
        results: dict[str, ClientResult] = {}
        bytes_sent: dict[str, int] = {}
        for node, reply in exchange(grid, messages, timeout):
            if node not in members:
                continue
            name = members[node].name
            if reply.has_error():
                recorder.drop(name, round_number, error_reason(reply.error.reason or f"error code {reply.error.code}"))
                continue
            try:
                if name in results:
                    raise FedinspectError("a second update from the same client")
                info = reply.content["info"]
                if str(info["client"]) != name:
                    raise FedinspectError(f"it says it is {str(info['client'])!r}")
                result = ClientResult(reply.content["arrays"].to_torch_state_dict(), json.loads(str(info["examples"])),
                                      dict(reply.content["metrics"]), json.loads(str(info["memory"])))
                task.check_update(name, result, state)
            except (FedinspectError, KeyError, ValueError, TypeError) as error:  # a malformed reply: dropped, named
                reason = str(error) if str(error).startswith(name) else f"update refused: {error}"
                recorder.drop(name, round_number, reason)
                continue
            results[name] = result
            memories[name] = result.memory
            bytes_sent[name] = result.n_bytes
        taking_part = {m.name for m in members.values()}
        for index in range(task.n_clients):  # a client no node took, or whose node never answered
            name = client_id(index)
            if name not in results and not any(m["client"] == name and m["round"] == round_number
                                               for m in recorder.missing):
                recorder.drop(name, round_number, f"no answer within {timeout:g} s" if name in taking_part else absent)
        recorder.check_quorum(round_number, results)
        state = aggregate(task, results)
        record = recorder.close_round(round_number, state, results, started, bytes_sent)
        _log(f"round {round_number}: {len(results)} client(s); {record}", progress)
    outcome = recorder.outcome(state, memories)
    for member in members.values():  # a deployed factory's own name for itself
        if member.node_name and member.node_name != member.name and member.name in outcome.clients:
            outcome.clients[member.name]["node"] = member.node_name
    return outcome


ServerSetup = Callable[[Context], tuple[FederatedTask, Path, dict[str, Any]]]


def make_server_app(setup: ServerSetup, engine: str, sink: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp that runs the task ``setup(context)`` gives (with its output folder and options) and
    concludes it; ``sink`` (a dict) receives results.json's dict, or the error raised, for a caller in the
    same process."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            task, out_dir, options = setup(context)
            outcome = serve_rounds(grid, task, options)
            results = task.conclude(outcome, out_dir, engine=engine)
            if sink is not None:
                sink["results"] = results
        except BaseException as error:
            if sink is not None:
                sink["error"] = error
            raise

    return app


# ---------------------------------------------------------------- secure aggregation (simulation)
class _SecureCompute:
    """A client's arrays for the secure sum, from the task its spec describes (picklable for Ray's actors)."""

    def __init__(self, spec: str, secrets: str, build: TaskBuilder = task_from_spec) -> None:
        self.tasks = _TaskCache(build)
        self.spec, self.secrets = spec, secrets

    def __call__(self, partition: int, config: dict[str, Any]) -> list[Any]:
        return self.tasks(self.spec, self.secrets).secure_arrays(partition, config)


def run_secure_sum(task: FederatedTask, progress: bool = True, build: TaskBuilder = task_from_spec) -> RoundsOutcome:
    """A one-round statistic whose sum the server learns through SecAgg+ only (:mod:`secure_sum`): no client's
    update is ever seen, so the round's record has the sum's evaluation, traffic and protocol, not per-client
    answers. A client that fails before its key shares are out halts the round (flwr 1.41); a partial sum is
    refused (every client must contribute)."""
    from fedinspect.federation.secure_sum import secure_sum_simulation

    if task.aggregation != "sum" or task.rounds != 1:
        raise FedinspectError(f"secure aggregation sums one round of statistics; {task.kind} averages over rounds")
    recorder = RoundRecorder(task)
    started = time.perf_counter()
    settings = task.secure_settings()
    result = secure_sum_simulation(_SecureCompute(json.dumps(task.spec()), json.dumps(task.secrets()), build),
                                   task.n_clients, settings, progress=progress)
    state = task.state_from_sum(result.sum)
    record: dict[str, Any] = {"round": 1, "clients": len(result.contributors)}
    record.update(task.evaluate(state, 1))
    record["seconds"] = time.perf_counter() - started
    sent = round(sum(result.bytes_up.values()) / max(1, len(result.bytes_up)))  # nodes are anonymous here
    record["bytes_per_client"] = {client_id(i): sent for i in result.contributors}
    recorder.history.append(record)
    outcome = recorder.outcome(state, {})
    outcome.clients = {client_id(i): {"examples": {}, "bytes_sent": [record["bytes_per_client"][client_id(i)]]}
                       for i in result.contributors}
    bound = dict(zip([s.name for s in settings.specs], result.error_bound, strict=True))
    outcome.secure_aggregation = {
        "protocol": "SecAgg+ (flwr SecAggPlusWorkflow)", **result.protocol,
        "contributors": [client_id(i) for i in result.contributors], "dropped": result.dropped,
        "entries_clipped": result.out_of_range, "error_bound": bound, "aggregation_s": result.aggregation_s,
        "wall_s": result.wall_s, "exchange_s": result.exchange_s,
        "bytes_per_client": result.bytes_per_client, "bytes_down": sum(result.bytes_down.values()),
        "bytes_up": sum(result.bytes_up.values())}
    return outcome


def run_simulation(task: FederatedTask, out_dir: str | Path, progress: bool = True, *,
                   client_app: ClientApp | None = None, round_timeout: float = 3600.0,
                   connect_timeout: float = 600.0, client_threads: int | None = None,
                   cpus_per_client: float | None = None) -> dict[str, Any]:
    """Every round of ``task`` on Flower's Simulation Engine (Ray), one virtual SuperNode per client.

    Each ClientApp computes with ``client_threads`` torch threads (default: this process's, so the numbers
    match the in-process engine, bit for bit) and reserves ``cpus_per_client`` (default: as many) of Ray's
    CPUs, so the clients never oversubscribe the cores. ``client_threads=0, cpus_per_client=1`` runs one
    single-threaded client per core: faster on a busy machine, but the numbers then differ from the
    in-process ones at float rounding level (oneDNN splits convolutions by thread). ``client_app`` replaces
    the ClientApp (fault drills); ``connect_timeout`` bounds the wait for every virtual SuperNode's
    ClientApp to start and identify itself (60 s was too short on 2 busy cores).
    """
    import torch

    if getattr(task, "secure", False):
        return task.conclude(run_secure_sum(task, progress), out_dir, engine="flower-sim, SecAgg+")
    threads = torch.get_num_threads() if client_threads is None else client_threads
    options = {"progress": progress, "round-timeout": round_timeout, "connect-timeout": connect_timeout,
               "client-threads": threads}
    sink: dict[str, Any] = {}
    server = make_server_app(lambda context: (task, Path(out_dir), options), "flower-sim", sink)
    return simulate(server, client_app or make_client_app(), task.n_clients,
                    simulation_backend(task.n_clients, cpus_per_client or max(1, threads)), sink, progress)


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


def simulate(server: ServerApp, client_app: ClientApp, num_supernodes: int, backend_config: dict[str, Any],
             sink: dict[str, Any], progress: bool) -> Any:
    """Run a ServerApp and a ClientApp on the Simulation Engine; returns the ``results`` the ServerApp left in
    ``sink``. An error the ServerApp recorded (``sink["error"]``) is raised here, with its own type and
    message, rather than Ray's wrapper."""
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
