"""Federated defect classification on Flower: a ``ServerApp`` and a ``ClientApp`` over the shared roles.

The server side is :mod:`fedinspect.classification.runner`'s (:func:`initial_state`,
:func:`aggregate_round`, :func:`conclude`) and each ClientApp runs :func:`client_round`, so the
Simulation Engine gives the numbers of the in-process engine for the same config and seed (with the
same torch thread count). Flower carries the messages (message API, ``Grid.send_and_receive``):

- ``train`` (one per client per round): content ``arrays`` (the global model, an ``ArrayRecord`` of
  the state dict) and ``config`` (round, the run config as JSON, the dataset folder and the
  obfuscation key; in simulation every node reads the labelled view itself and keeps its own share,
  ``partition-id`` of its node config). The reply holds ``arrays`` (the local model), ``metrics``
  (``num-examples`` for the weighting, training loss, steps, epsilon) and ``privacy`` (the client's
  accountant history, JSON).
- The client's DP accountant history persists across rounds in ``context.state`` (a
  ``ConfigRecord``), so its epsilon is cumulative over the rounds, as in the in-process engine.

A client that fails (bad data) answers with an error reply; the round goes on with the others and
the client is listed in ``missing_clients``; if none answers, a :class:`FedinspectError` names the
reasons.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedinspect.errors import FedinspectError

CLIENT_ERROR = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
_STATE = "classification-dp"


# ---------------------------------------------------------------- client side
@functools.lru_cache(maxsize=4)
def _split(data_dir: str, config_json: str, key: int):
    from fedinspect.classification.runner import ClassifyConfig, prepare_split

    config = ClassifyConfig.from_dict(json.loads(config_json), obfuscation_key=key)
    return config, prepare_split(data_dir, config)


@functools.lru_cache(maxsize=1)
def _cache():
    from fedinspect.classification.runner import InputCache

    return InputCache()  # one per process: a simulated actor serves several clients and rounds


def handle_train(message: Message, context: Context) -> Message:
    """Train this node's share on the global model of the message; reply with the local model."""
    import torch

    from fedinspect.classification.runner import client_id, client_round, model_inputs

    request = message.content["config"]
    partition = int(context.node_config["partition-id"])
    name = client_id(partition)
    threads = int(request.get("threads", 0))
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        config, split = _split(str(request["data-dir"]), str(request["config"]), int(request["obfuscation-key"]))
        if partition >= len(split.clients):
            raise FedinspectError(f"{name}: partition {partition} is not in a {len(split.clients)}-client split")
        x, y = model_inputs(split.clients[partition], config, _cache())
    except FedinspectError as error:
        return Message(Error(code=CLIENT_ERROR, reason=f"{name}: {error}"), reply_to=message)
    history = json.loads(str(context.state[_STATE]["history"])) if _STATE in context.state else []
    global_state = message.content["arrays"].to_torch_state_dict()
    result = client_round(config, len(split.view.classes), global_state, x, y, int(request["round"]), partition,
                          history, _cache())
    context.state[_STATE] = ConfigRecord({"history": json.dumps(result.privacy_history)})
    metrics = {"num-examples": result.n_examples, "train-loss": result.train_loss, "steps": result.steps}
    if result.epsilon is not None:
        metrics["epsilon"] = result.epsilon if result.epsilon != float("inf") else -1.0
    content = RecordDict({
        "arrays": ArrayRecord(result.state),
        "metrics": MetricRecord(metrics),
        "privacy": ConfigRecord({"client": name, "history": json.dumps(result.privacy_history)}),
    })
    return Message(content, reply_to=message)


def make_client_app() -> ClientApp:
    app = ClientApp()
    app.train()(handle_train)
    return app


client_app = make_client_app()


# ---------------------------------------------------------------- server side
def _log(text: str, progress: bool) -> None:
    if progress:
        print(f"[flower server] {text}", file=sys.stderr)


def serve(grid: Grid, data_dir: str | Path, out_dir: str | Path, config: Any, options: dict[str, Any]
          ) -> dict[str, Any]:
    """All rounds over Flower, then results.json and the report (as :func:`runner.run_classification`)."""
    import math

    from fedinspect.classification.runner import (
        InputCache,
        aggregate_round,
        client_id,
        conclude,
        initial_state,
        model_inputs,
        prepare_split,
    )
    from fedinspect.classification.training import LocalResult
    from fedinspect.federation.flower_app import error_reason

    progress = bool(options.get("progress", False))
    timeout = float(options.get("round-timeout", 3600.0))
    started = time.perf_counter()
    split = prepare_split(data_dir, config)
    n_classes = len(split.view.classes)
    cache = InputCache()
    test = model_inputs(split.test, config, cache, progress=progress, desc="test images")
    state = initial_state(config, n_classes, cache)
    deadline = time.monotonic() + float(options.get("connect-timeout", 120.0))
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < config.clients and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    if not nodes:
        raise FedinspectError("no Flower SuperNode connected")
    prepared = time.perf_counter()
    history, final, histories, missing, replied = [], {}, {}, {}, set()
    config_json = json.dumps(config.to_dict())
    for round_number in range(1, config.rounds + 1):
        round_started = time.perf_counter()
        request = ConfigRecord({"round": round_number, "config": config_json, "data-dir": str(data_dir),
                                "obfuscation-key": config.obfuscation_key,
                                "threads": int(options.get("client-threads", 0))})
        messages = [Message(RecordDict({"arrays": ArrayRecord(state), "config": request}), node, "train",
                            group_id=f"round-{round_number}", ttl=timeout + 60) for node in nodes]
        replies: dict[str, LocalResult] = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                reason = error_reason(reply.error.reason or f"error code {reply.error.code}")
                missing[f"node_{reply.metadata.src_node_id} (round {round_number})"] = reason
                print(f"warning: a client dropped out in round {round_number}: {reason}", file=sys.stderr)
                continue
            name = str(reply.content["privacy"]["client"])
            metrics = reply.content["metrics"]
            privacy_history = [tuple(h) for h in json.loads(str(reply.content["privacy"]["history"]))]
            epsilon = float(metrics["epsilon"]) if "epsilon" in metrics else None
            replies[name] = LocalResult(
                state=reply.content["arrays"].to_torch_state_dict(), n_examples=int(metrics["num-examples"]),
                train_loss=float(metrics["train-loss"]), steps=int(metrics["steps"]),
                privacy_history=privacy_history,
                epsilon=math.inf if epsilon is not None and epsilon < 0 else epsilon)
            histories[name] = privacy_history
            replied.add(name)
        if not replies:
            raise FedinspectError(f"round {round_number}: no client answered ({'; '.join(missing.values())})")
        state, record, final = aggregate_round(config, n_classes, cache, replies, test, round_number, round_started)
        history.append(record)
        _log(f"round {round_number}: {len(replies)} client(s), accuracy {record.accuracy:.3f}", progress)
    finished = time.perf_counter()
    timing = {"prepare_s": prepared - started, "train_s": finished - prepared, "total_s": finished - started,
              "round_s": [r.seconds for r in history]}
    for index in range(config.clients):
        if client_id(index) not in replied:
            missing.setdefault(client_id(index), "never answered")
    return conclude(config, split, history, final, histories, out_dir, engine="flower-sim", timing=timing,
                    extra={"missing_clients": [{"client": k, "reason": v} for k, v in missing.items()]})


def make_server_app(config: Any, data_dir: str | Path, out_dir: str | Path, options: dict[str, Any],
                    sink: dict[str, Any]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            sink["results"] = serve(grid, data_dir, out_dir, config, options)
        except BaseException as error:
            sink["error"] = error
            raise

    return app


def run_flower_simulation(data_dir: str | Path, out_dir: str | Path, config: Any = None, progress: bool = True,
                          *, client_app: ClientApp | None = None, round_timeout: float = 3600.0,
                          client_threads: int | None = None) -> dict[str, Any]:
    """All rounds on Flower's Simulation Engine (Ray), one virtual SuperNode per client; returns results.json.

    Each ClientApp computes with ``client_threads`` torch threads (default: this process's, so the numbers
    match the in-process engine) and reserves as many of Ray's CPUs.
    """
    import torch

    from fedinspect.classification.runner import ClassifyConfig
    from fedinspect.federation.flower_app import simulate, simulation_backend

    config = config or ClassifyConfig()
    threads = torch.get_num_threads() if client_threads is None else client_threads
    options = {"progress": progress, "round-timeout": round_timeout, "connect-timeout": 120.0,
               "client-threads": threads}
    sink: dict[str, Any] = {}
    server = make_server_app(config, data_dir, out_dir, options, sink)
    return simulate(server, client_app or make_client_app(), config.clients,
                    simulation_backend(config.clients, max(1, threads)), sink, progress)
