"""Federated rounds on Flower: one ``ServerApp`` and one ``ClientApp`` for every :class:`FederatedTask`.

Flower only carries the messages; the work is :mod:`fedinspect.federation.rounds`'s, so the
Simulation Engine gives the in-process numbers for the same task and seed (with the same torch
thread count). Messages (message API, ``Grid.send_and_receive``), one per client per round:

- ``train`` to the client: ``arrays`` (the global state, an ``ArrayRecord``) and ``config``: the round,
  the task's spec and secrets (JSON; the ClientApp rebuilds the task from a fixed registry of kinds,
  :data:`rounds.TASKS`), the torch thread count. The node's ``partition-id`` says which client it is.
- the reply: ``arrays`` (the client's update), ``metrics`` and ``info`` (client name, examples per
  group, JSON). The client's memory (its DP accountant history) stays in ``context.state``.

A client that fails answers with an error reply: it is recorded as missing and the round goes on.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Mapping
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
    task_from_spec,
)

CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
_MEMORY = "fedinspect-memory"


# ---------------------------------------------------------------- client side
TaskBuilder = Callable[[Mapping[str, Any], Mapping[str, Any]], FederatedTask]


def handle_round(message: Message, context: Context, task_for: Callable[[str, str], FederatedTask]) -> Message:
    """Compute this node's update from the global state of the message (``task_for(spec, secrets)``)."""
    import torch

    request = message.content["config"]
    index = int(context.node_config["partition-id"])
    name = client_id(index)
    threads = int(request.get("threads", 0))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    memory = json.loads(str(context.state[_MEMORY]["memory"])) if _MEMORY in context.state else {}
    try:
        task = task_for(str(request["task"]), str(request["secrets"]))
        if index >= task.n_clients:
            raise FedinspectError(f"{name}: partition {index} is not in a {task.n_clients}-client task")
        state = message.content["arrays"].to_torch_state_dict()
        result = task.client_update(index, state, int(request["round"]), memory)
    except FedinspectError as error:
        reason = str(error) if str(error).startswith(name) else f"{name}: {error}"
        return Message(Error(code=CLIENT_ERROR, reason=reason), reply_to=message)
    context.state[_MEMORY] = ConfigRecord({"memory": json.dumps(result.memory)})
    content = RecordDict({
        "arrays": ArrayRecord(result.arrays),
        "metrics": MetricRecord({k: float(v) for k, v in result.metrics.items()}),
        "info": ConfigRecord({"client": name, "examples": json.dumps(result.examples),
                              "memory": json.dumps(result.memory)}),
    })
    return Message(content, reply_to=message)


class _TaskCache:
    """``(spec, secrets) -> task``, built once per process: a simulated actor serves several clients and rounds."""

    def __init__(self, build: TaskBuilder) -> None:
        self.build = build
        self.tasks: dict[tuple[str, str], FederatedTask] = {}

    def __call__(self, spec: str, secrets: str) -> FederatedTask:
        if (spec, secrets) not in self.tasks:
            self.tasks.clear()
            self.tasks[spec, secrets] = self.build(json.loads(spec), json.loads(secrets))
        return self.tasks[spec, secrets]

    def __getstate__(self) -> dict[str, Any]:  # Ray ships the ClientApp to its actors: never the built tasks
        return {"build": self.build, "tasks": {}}


def make_client_app(build: TaskBuilder = task_from_spec) -> ClientApp:
    """The ClientApp of every task; ``build`` rebuilds a task from its spec (default: the fixed registry)."""
    app = ClientApp()
    app.train()(functools.partial(handle_round, task_for=_TaskCache(build)))
    return app


client_app = make_client_app()


# ---------------------------------------------------------------- server side
def _log(text: str, progress: bool) -> None:
    if progress:
        print(f"[flower server] {text}", file=sys.stderr)


def serve_rounds(grid: Grid, task: FederatedTask, options: dict[str, Any]) -> RoundsOutcome:
    """Every round of ``task`` over Flower (as :func:`rounds.run_rounds` does in process)."""
    from fedinspect.federation.flower_app import error_reason, wait_for_nodes

    progress = bool(options.get("progress", False))
    timeout = float(options.get("round-timeout", 3600.0))
    nodes = wait_for_nodes(grid, task.n_clients, float(options.get("connect-timeout", 600.0)), progress)
    if not nodes:
        raise FedinspectError(f"no Flower SuperNode connected within {options.get('connect-timeout', 600.0)} s")
    recorder = RoundRecorder(task)
    state = task.initial_state()
    memories: dict[str, dict[str, Any]] = {}
    spec, secrets = json.dumps(task.spec()), json.dumps(task.secrets())
    expected = {client_id(i) for i in range(task.n_clients)}
    for round_number in range(1, task.rounds + 1):
        started = time.perf_counter()
        request = ConfigRecord({"round": round_number, "task": spec, "secrets": secrets,
                                "threads": int(options.get("client-threads", 0))})
        messages = [Message(RecordDict({"arrays": ArrayRecord(state), "config": request}), node, "train",
                            group_id=f"round-{round_number}", ttl=timeout + 60) for node in nodes]
        results: dict[str, ClientResult] = {}
        bytes_sent: dict[str, int] = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                reason = error_reason(reply.error.reason or f"error code {reply.error.code}")
                name = reason.split(":", 1)[0] if reason.startswith("client_") else f"node_{reply.metadata.src_node_id}"
                recorder.drop(name, round_number, reason)
                continue
            name = f"node_{reply.metadata.src_node_id}"
            try:
                info = reply.content["info"]
                claimed = str(info["client"])
                if claimed not in expected:
                    raise FedinspectError(f"claims to be {claimed!r}, not one of the {task.n_clients} clients")
                name = claimed
                if name in results:
                    raise FedinspectError("a second update from the same client")
                result = ClientResult(reply.content["arrays"].to_torch_state_dict(), json.loads(str(info["examples"])),
                                      dict(reply.content["metrics"]), json.loads(str(info["memory"])))
                task.check_update(name, result, state)
            except (FedinspectError, KeyError, ValueError, TypeError) as error:  # a malformed reply: dropped, named
                recorder.drop(name, round_number, f"update refused: {error}")
                continue
            results[name] = result
            memories[name] = result.memory
            bytes_sent[name] = result.n_bytes
        for index in range(task.n_clients):  # a node that never answered (timeout) is missing too
            name = client_id(index)
            if name not in results and not any(m["client"] == name and m["round"] == round_number
                                               for m in recorder.missing):
                recorder.drop(name, round_number, f"no answer within {timeout:g} s")
        if results:
            state = aggregate(task, results)
        record = recorder.close_round(round_number, state, results, started, bytes_sent)
        _log(f"round {round_number}: {len(results)} client(s); {record}", progress)
    return recorder.outcome(state, memories)


def make_server_app(task: FederatedTask, out_dir: str | Path, options: dict[str, Any], sink: dict[str, Any]
                    ) -> ServerApp:
    """A ServerApp that runs ``task`` and leaves results.json's dict (or its error) in ``sink``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome = serve_rounds(grid, task, options)
            sink["results"] = task.conclude(outcome, out_dir, engine="flower-sim")
        except BaseException as error:
            sink["error"] = error
            raise

    return app


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
                   connect_timeout: float = 600.0, client_threads: int | None = None) -> dict[str, Any]:
    """Every round of ``task`` on Flower's Simulation Engine (Ray), one virtual SuperNode per client.

    Each ClientApp computes with ``client_threads`` torch threads (default: this process's, so the numbers
    match the in-process engine) and reserves as many of Ray's CPUs.
    """
    import torch

    from fedinspect.federation.flower_app import simulate, simulation_backend

    if getattr(task, "secure", False):
        return task.conclude(run_secure_sum(task, progress), out_dir, engine="flower-sim, SecAgg+")
    threads = torch.get_num_threads() if client_threads is None else client_threads
    options = {"progress": progress, "round-timeout": round_timeout, "connect-timeout": connect_timeout,
               "client-threads": threads}
    sink: dict[str, Any] = {}
    server = make_server_app(task, out_dir, options, sink)
    return simulate(server, client_app or make_client_app(), task.n_clients,
                    simulation_backend(task.n_clients, max(1, threads)), sink, progress)
