"""Federated PatchCore on Flower: Simulation Engine, faults, and a local TLS deployment, against in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'flwr[simulation]')")

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedinspect.data.dataset import training_images
from fedinspect.errors import FedinspectError
from fedinspect.federation import flower_app, rounds_flower
from fedinspect.federation.client import RoundSettings
from fedinspect.federation.runner import FederationConfig, plan_round, run_federation

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FAILING_PARTITION = 1


def small_config(clients: int, **changes) -> FederationConfig:
    """A quick round: small images, no baselines, no maps (the comparison needs only the federated model)."""
    options = {"clients": clients, "global_size": 1000, "centralized": False, "compare_shared": False,
               "write_maps": False, "settings": RoundSettings(image_size=128)}
    return FederationConfig(**{**options, **changes})


def same_round(expected: dict, got: dict) -> None:
    assert got["categories"] == expected["categories"]
    assert got["stages"] == expected["stages"]
    assert got["config"] == expected["config"]
    assert got["partition"] == expected["partition"]
    keys = ("client", "samples", "patches", "coreset", "bytes_sent", "categories", "weight")
    assert [{k: c[k] for k in keys} for c in got["clients"]] == [{k: c[k] for k in keys} for c in expected["clients"]]
    assert got["missing_clients"] == expected["missing_clients"] == []


@pytest.fixture(scope="module")
def in_process(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """In-process reference runs, one per client count."""
    runs: dict[int, dict] = {}

    def get(clients: int) -> dict:
        if clients not in runs:
            out = tmp_path_factory.mktemp(f"in_process_{clients}")
            runs[clients] = run_federation(tiny_dataset, out, small_config(clients), progress=False)
        return runs[clients]

    return get


# ---------------------------------------------------------------- configuration and data (fast)
def test_run_config_matches_pyproject_and_round_trips() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedinspect.federation.flower_app:server_app",
                                 "clientapp": "fedinspect.federation.flower_app:client_app"}
    assert set(app["config"]) == set(flower_app.run_config_from_config(FederationConfig()))
    assert {k: app["config"][k] for k in flower_app.DETECTOR_OPTIONS} == flower_app.DETECTOR_OPTIONS
    config, options = flower_app.config_from_run_config(app["config"])
    assert config == FederationConfig() and options == flower_app.DEFAULT_OPTIONS
    custom = FederationConfig(clients=7, partition="dirichlet", global_ratio=0.2, min_clients=3, centralized=False,
                              settings=RoundSettings(layers=("blocks.2", "blocks.4"), image_size=96, seed=4))
    values = flower_app.run_config_from_config(custom, data_dir=Path("/data"), round_timeout=12.0)
    config, options = flower_app.config_from_run_config(values)
    assert config == custom
    assert options["data-dir"] == "/data" and options["round-timeout"] == 12.0


def test_client_folders_give_each_client_its_partition(tiny_dataset: Path, tmp_path: Path) -> None:
    config = FederationConfig(clients=3)
    plan = plan_round(tiny_dataset, config)
    folders = flower_app.write_client_folders(plan, tmp_path / "nodes", config.clients)
    for index, folder in enumerate(folders):
        own = training_images(folder)
        planned = plan.client_images(index)
        assert {c: [p.name for p in paths] for c, paths in own.items()} == {
            c: [p.name for p in paths] for c, paths in planned.items()}
    with pytest.raises(FedinspectError, match="no category folder"):
        training_images(tmp_path / "nodes" / "client_0" / "engine_wiring" / "train")


def test_identity_from_node_config() -> None:
    def context(node_config: dict) -> Context:
        return Context(run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config={})

    simulated = rounds_flower.node_identity(context({"partition-id": 3, "num-partitions": 5}))
    assert simulated == {"client": "", "partition-id": 3, "own-data": False}
    deployed = rounds_flower.node_identity(context({"client-id": "factory_a", "data-dir": "/srv/images"}))
    assert deployed == {"client": "factory_a", "partition-id": -1, "own-data": True}
    assert rounds_flower.node_identity(context({"data-dir": "/srv/plant_7"}))["client"] == "plant_7"


def test_error_reasons_name_the_exception_not_the_wrapping() -> None:
    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m"
           " (pid=1)\n  File \"fit.py\", line 3, in fit\nRuntimeError: disk on fire\n\nThe above exception was the"
           " direct cause of the following exception:\nflwr.clientapp.client_app.ClientAppException: \n"
           "Exception ClientAppException occurred. Message: disk on fire'>")
    assert rounds_flower.error_reason(ray) == "RuntimeError: disk on fire"
    deployed = "<class 'fedinspect.errors.DataError'>:<'/data/a.png: cannot read image'>"
    assert rounds_flower.error_reason(deployed) == "DataError: /data/a.png: cannot read image"
    assert rounds_flower.error_reason("/data/a.png: cannot read image") == "/data/a.png: cannot read image"


def test_a_reply_the_superlink_sends_for_a_dead_node_is_that_node_s() -> None:
    """When a SuperNode stops beating, the SuperLink answers its pending message itself (source: node 0)."""
    from types import SimpleNamespace

    class Grid:
        def send_and_receive(self, asks, timeout):
            for number, ask in enumerate(asks):  # as push_messages does
                ask.metadata.message_id = f"m{number}"
            answer = SimpleNamespace(metadata=SimpleNamespace(src_node_id=11, reply_to_message_id="m0"))
            unavailable = SimpleNamespace(metadata=SimpleNamespace(src_node_id=0, reply_to_message_id="m1"))
            return iter([unavailable, answer])

    asks = [SimpleNamespace(metadata=SimpleNamespace(message_id="", dst_node_id=node)) for node in (11, 22)]
    got = rounds_flower.exchange(Grid(), asks, timeout=1.0)
    assert [(node, reply.metadata.src_node_id) for node, reply in got] == [(22, 0), (11, 11)]


def test_nodes_get_client_indices_from_their_identity(monkeypatch) -> None:
    """A partition-id is the index; deployed nodes named by their operators take the free ones in name order."""
    from types import SimpleNamespace

    def message(content, dst_node_id, message_type, **options):  # a flwr Message needs a running Grid's run id
        return SimpleNamespace(content=content, metadata=SimpleNamespace(dst_node_id=dst_node_id, message_id=""))

    monkeypatch.setattr(rounds_flower, "Message", message)

    identities = {11: {"client": "plant_b", "partition-id": -1, "own-data": True},
                  12: {"client": "plant_a", "partition-id": -1, "own-data": True},
                  13: {"client": "lab", "partition-id": 0, "own-data": True},
                  14: {"client": "plant_c", "partition-id": -1, "own-data": True}}  # one too many: left out

    class Grid:
        def __init__(self, identities: dict, failing: tuple = ()) -> None:
            self.identities, self.failing = identities, failing

        def get_node_ids(self):
            return list(self.identities) + list(self.failing)

        def send_and_receive(self, asks, timeout):
            replies = []
            for ask in asks:  # a reply whose id is unknown is its source's (here: the node asked)
                node = ask.metadata.dst_node_id
                error = SimpleNamespace(reason="<class 'RuntimeError'>:<'no disk'>", code=2)
                replies.append(SimpleNamespace(
                    metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=f"unknown-{node}"),
                    has_error=lambda node=node: node in self.failing, error=error,
                    content={"identity": self.identities.get(node)}))
            return replies

    members, absent = rounds_flower.identify_nodes(Grid(identities), 3, {"connect-timeout": 1})
    assert {node: (m.name, m.node_name) for node, m in members.items()} == {
        13: ("client_0", "lab"), 12: ("client_1", "plant_a"), 11: ("client_2", "plant_b")}
    members, absent = rounds_flower.identify_nodes(Grid({1: identities[11]}, failing=(2,)), 2, {"connect-timeout": 1})
    assert [m.name for m in members.values()] == ["client_0"] and absent == "no identification: RuntimeError: no disk"
    twins = {1: {"client": "a", "partition-id": 0, "own-data": False}, 2: {"client": "b", "partition-id": 0,
                                                                          "own-data": False}}
    with pytest.raises(FedinspectError, match=r"same partition-id: \[0\]"):
        rounds_flower.identify_nodes(Grid(twins), 2, {"connect-timeout": 1})


def test_run_config_describes_a_detector_federation(tiny_dataset: Path, tmp_path: Path) -> None:
    from fedinspect.federation.detector_task import DetectorFederationConfig, DetectorTask

    config = DetectorFederationConfig(detector="ae_mse", params={"image_size": 64}, clients=3, rounds=2,
                                      local_epochs=2, proximal_mu=0.1, seed=7, model_scope="shared",
                                      privacy={"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    values = flower_app.run_config_from_detector_config(config, data_dir=tiny_dataset, out_dir=tmp_path / "run")
    task, out, options = flower_app.task_from_run_config(values)
    assert isinstance(task, DetectorTask) and task.config == config
    assert out == tmp_path / "run" and options["data-dir"] == str(tiny_dataset)
    patchcore, _, _ = flower_app.task_from_run_config({"data-dir": str(tiny_dataset), "clients": 4})
    assert patchcore.kind == "patchcore" and patchcore.n_clients == 4
    with pytest.raises(FedinspectError, match="detector-params: expected a JSON object"):
        flower_app.task_from_run_config({**values, "detector-params": "[1]"})
    with pytest.raises(FedinspectError, match="poisoning"):
        flower_app.task_from_run_config({"data-dir": str(tiny_dataset), "poison": "noise", "poisoned-clients": 1})
    with pytest.raises(FedinspectError, match="secure aggregation"):
        flower_app.run_config_from_detector_config(DetectorFederationConfig(detector="padim", secure=True))


def test_a_node_with_its_own_data_sends_what_its_planned_share_gives(tiny_dataset: Path, tmp_path: Path,
                                                                       one_torch_thread) -> None:
    """A factory's own folder holding the plan's share of client 1 gives client 1's update, bit for bit."""
    import torch

    from fedinspect.federation.detector_task import DetectorFederationConfig, DetectorTask
    from fedinspect.federation.runner import PatchCoreTask, _payload

    config = DetectorFederationConfig(detector="ae_mse", params={"image_size": 32, "batch_size": 4}, clients=3,
                                      rounds=1, centralized=False)
    task = DetectorTask(tiny_dataset, config)
    patchcore = PatchCoreTask(tiny_dataset, small_config(3))
    folders = flower_app.write_client_folders(patchcore.plan, tmp_path / "nodes", 3)
    state = task.initial_state()
    planned, own = task.client_update(1, state, 1, {}), task.with_own_data(folders[1]).client_update(1, state, 1, {})
    assert own.examples == planned.examples
    assert all(torch.equal(own.arrays[k], planned.arrays[k]) for k in planned.arrays)
    from fedinspect.federation.update import ClientUpdate

    own_update, planned_update = (ClientUpdate.from_bytes(_payload(t.client_update(1, {}, 1, {})))
                                  for t in (patchcore.with_own_data(folders[1]), patchcore))
    assert own_update.categories.keys() == planned_update.categories.keys()
    for name, part in planned_update.categories.items():  # (the bytes' metadata order is safetensors' to choose)
        mine = own_update.categories[name]
        assert (mine.n_samples, mine.n_patches) == (part.n_samples, part.n_patches)
        np.testing.assert_array_equal(mine.embeddings, part.embeddings)
    lonely = DetectorTask(tmp_path / "nowhere", config).with_own_data(folders[2])  # never reads the server's data
    assert lonely.client_update(2, state, 1, {}).examples == task.client_update(2, state, 1, {}).examples


# ---------------------------------------------------------------- Simulation Engine
@pytest.mark.slow
def test_simulation_gives_the_in_process_results(tiny_dataset: Path, tmp_path: Path, in_process) -> None:
    results = flower_app.run_flower_simulation(tiny_dataset, tmp_path / "sim", small_config(5), progress=False)
    same_round(in_process(5), results)
    assert json.loads((tmp_path / "sim" / "results.json").read_text())["categories"] == results["categories"]
    assert (tmp_path / "sim" / "report.md").is_file()


_tasks = rounds_flower._TaskCache(rounds_flower.task_from_spec)


def _fit_or_fail(message: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == FAILING_PARTITION:
        raise RuntimeError("injected fault: this factory's ClientApp crashed")
    return rounds_flower.handle_round(message, context, _tasks)


failing_client_app = ClientApp()
failing_client_app.query("identify")(rounds_flower.handle_identify)
failing_client_app.train()(_fit_or_fail)


@pytest.mark.slow
def test_failing_clients_are_recorded_and_the_round_goes_on(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    """client_1's ClientApp raises; client_2 holds a corrupt image (a data error, answered as such)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    config = small_config(3, min_clients=1)
    corrupt = plan_round(data, config).client_images(2)["pipe_clip"][0]
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    results = flower_app.run_flower_simulation(data, tmp_path / "run", config, progress=False,
                                               client_app=failing_client_app)
    assert [c["client"] for c in results["clients"]] == ["client_0"]
    assert [m["client"] for m in results["missing_clients"]] == ["client_1", "client_2"]
    crashed, bad_data = results["missing_clients"]
    assert crashed["reason"] == "RuntimeError: injected fault: this factory's ClientApp crashed"
    assert bad_data["reason"].startswith(str(corrupt))  # the in-process runner's wording (DataError)
    err = capsys.readouterr().err
    assert "client_1 dropped out" in err and "client_2 dropped out" in err
    assert set(results["categories"]) == {"engine_wiring", "pipe_clip", "pipe_staple", "tank_screw",
                                          "underbody_pipes", "underbody_screw"}
    with pytest.raises(FedinspectError, match=r"only 1 of 2 clients answered \(minimum 2\).*injected fault"):
        flower_app.run_flower_simulation(tiny_dataset, tmp_path / "run2", small_config(2, min_clients=2),
                                         progress=False, client_app=failing_client_app)


@pytest.mark.slow
def test_fifty_simulated_clients(tmp_path: Path) -> None:
    """50 virtual SuperNodes on the 'small' synthetic set (96 training images): about 1 min on 2 cores."""
    from fedinspect.data.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "small", seed=0, size="small", progress=False)
    config = small_config(50, settings=RoundSettings(image_size=96))
    results = flower_app.run_flower_simulation(data, tmp_path / "run", config, progress=False)
    assert len(results["clients"]) == 50 and results["missing_clients"] == []
    assert sum(c["samples"] for c in results["clients"]) == 96


# ---------------------------------------------------------------- Deployment Engine (separate processes, TLS)
def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.slow
def test_local_deployment_with_tls_and_node_auth(tiny_dataset: Path, tmp_path: Path, in_process) -> None:
    out, work = tmp_path / "run", tmp_path / "work"
    command = [sys.executable, str(ROOT / "scripts" / "flower_deploy.py"), "--data", str(tiny_dataset),
               "--out", str(out), "--work", str(work), "--clients", "3", "--global-size", "1000",
               "--image-size", "128", "--no-centralized", "--no-shared-comparison", "--no-maps",
               "--timeout", "1200", "--round-timeout", "900"]  # generous: CI shares 2 cores with other jobs
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    # A client that missed the round changes every bank: say so, with its reason, before comparing numbers.
    assert results["missing_clients"] == [], results["missing_clients"]
    same_round(in_process(3), results)
    superlink_log = (work / "logs" / "superlink.log").read_text()
    assert "SuperNode authentication is disabled" not in superlink_log
    assert (work / "certs" / "ca.crt").is_file() and (work / "keys" / "client_0.pub").is_file()
    for index in range(3):  # each SuperNode held only its own partition
        node = work / "nodes" / f"client_{index}"
        assert sum(1 for _ in node.rglob("*.png")) == results["clients"][index]["samples"]
    assert _processes_mentioning(str(work)) == []


@pytest.mark.slow
def test_local_deployment_of_a_trained_detector_equals_in_process(tiny_dataset: Path, tmp_path: Path) -> None:
    """The same round engine serves FedAvg rounds of ae_mse on the TLS deployment, each node with its own folder."""
    from fedinspect.federation.detector_task import DetectorFederationConfig, run_detector_federation

    out, work = tmp_path / "run", tmp_path / "work"
    command = [sys.executable, str(ROOT / "scripts" / "flower_deploy.py"), "--data", str(tiny_dataset),
               "--out", str(out), "--work", str(work), "--detector", "ae_mse", "--clients", "2", "--rounds", "2",
               "--image-size", "32", "--no-centralized", "--no-maps", "--timeout", "1200", "--round-timeout", "900"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["missing_clients"] == [], results["missing_clients"]
    assert results["engine"] == "flower" and results["kind"] == "detector"
    config = DetectorFederationConfig(detector="ae_mse", params={"image_size": 32}, clients=2, rounds=2,
                                      centralized=False)
    expected = run_detector_federation(tiny_dataset, tmp_path / "in_process", config, progress=False)
    assert [r["image_auroc"] for r in results["history"]] == [r["image_auroc"] for r in expected["history"]]
    assert [c["examples"] for c in results["clients"]] == [c["examples"] for c in expected["clients"]]
    assert results["categories"].keys() == expected["categories"].keys()
    assert _processes_mentioning(str(work)) == []


@pytest.mark.slow
def test_deployment_goes_on_when_a_supernode_dies_mid_round(tiny_dataset: Path, tmp_path: Path) -> None:
    """client_1's SuperNode is killed as soon as it receives the round: the SuperLink misses its heartbeats
    (Flower 1.41: a SuperNode beats every 30 s, it is offline after 2 intervals) and answers the pending
    message with an error, so the server records client_1 long before ``round-timeout``."""
    import re

    out, work = tmp_path / "run", tmp_path / "work"
    round_timeout = 400
    command = [sys.executable, str(ROOT / "scripts" / "flower_deploy.py"), "--data", str(tiny_dataset),
               "--out", str(out), "--work", str(work), "--clients", "3", "--global-size", "300",
               "--image-size", "64", "--no-centralized", "--no-shared-comparison", "--no-maps", "--timeout", "900",
               "--round-timeout", str(round_timeout), "--kill-client", "client_1", "--kill-after", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    assert [c["client"] for c in results["clients"]] == ["client_0", "client_2"]
    assert [m["client"] for m in results["missing_clients"]] == ["client_1"]
    assert "Node Unavailable" in results["missing_clients"][0]["reason"]
    killed = float(re.search(r"\[deploy\s+([\d.]+) s\] killed the SuperNode of client_1", done.stderr).group(1))
    finished = float(re.search(r"\[deploy\s+([\d.]+) s\] run \d+ finished:completed", done.stderr).group(1))
    print(f"SuperNode killed at {killed:.0f} s, run finished {finished - killed:.0f} s later")
    assert finished - killed < round_timeout - 60  # the heartbeat, not the round timeout, ended the wait
    assert _processes_mentioning(str(work)) == []


def _deploy_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("flower_deploy", ROOT / "scripts" / "flower_deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ours(deploy, processes) -> list[int]:
    """Live processes (not zombies) carrying the tag of ``processes``."""
    found = []
    for pid in deploy._pids():
        tag, stat = deploy._tag_of(pid), deploy._stat(pid)
        if tag is not None and tag.startswith(f"{processes.run}/") and stat is not None and stat[0] not in "ZX":
            found.append(pid)
    return found


def test_stop_ends_every_process_of_the_group_and_waits(tmp_path: Path) -> None:
    """Children that ignore SIGTERM, and an orphan in a session of its own (as Flower's SuperExec), all end."""
    deploy = _deploy_script()
    processes = deploy.Processes(tmp_path / "logs")
    # The orphan says "orphan" only once setsid() has run, so the test never races its own set-up.
    stubborn = "trap '' TERM; (setsid sh -c 'echo orphan; exec sleep 301' &); sleep 302 & echo ready; wait"
    env = dict(os.environ)
    try:
        first = processes.start("first", ["bash", "-c", stubborn], env)
        processes.start("second", ["bash", "-c", stubborn], env)
        for name in ("first", "second"):
            log = tmp_path / "logs" / f"{name}.log"
            while not {"ready", "orphan"} <= set((log.read_text() if log.is_file() else "").split()):
                assert processes.started[name].poll() is None, log.read_text()
                time.sleep(0.05)
        ours = _ours(deploy, processes)
        assert len(ours) >= 6  # two shells, each with its sleep and its orphan
        orphans = [pid for pid in ours if deploy._stat(pid)[1] != first.pid and pid not in
                   {p.pid for p in processes.started.values()} and os.getsid(pid) == pid]
        assert len(orphans) == 2  # re-parented, own session: only the tag finds them
        processes.kill("first")
        assert first.returncode == -9
        left = _ours(deploy, processes)
        assert left and all(processes.known[pid][0] == "second" for pid in left)
        started = time.monotonic()
        processes.stop(grace=0.5)
        assert time.monotonic() - started < 15
    finally:
        processes.stop(grace=0.5)
    assert _ours(deploy, processes) == []
    assert all(process.returncode is not None for process in processes.started.values())


@pytest.mark.slow
def test_superlink_refuses_an_unregistered_supernode(tmp_path: Path) -> None:
    deploy = _deploy_script()
    certs = deploy.make_certificates(tmp_path / "certs")
    key, _ = deploy.make_node_key(tmp_path / "keys", "intruder")  # never registered
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "home"),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    port = deploy.free_port()
    processes = deploy.Processes(tmp_path / "logs")
    try:
        superlink = processes.start("superlink", [
            str(bin_dir / "flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile",
            str(certs["cert"]), "--ssl-keyfile", str(certs["key"]), "--enable-supernode-auth", "--host", "127.0.0.1",
            "--port", str(port), "--disable-runtime-dependency-installation"], env)
        deploy._wait_port(port, superlink, 180, "flower-superlink", tmp_path / "logs" / "superlink.log")
        intruder = processes.start("intruder", [
            str(bin_dir / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates",
            str(certs["ca"]), "--auth-supernode-private-key", str(key), "--port", str(deploy.free_port()),
            "--max-retries", "1"], env)
        intruder.wait(timeout=300)  # generous under load: what matters is how it ends, not how fast
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in (tmp_path / "logs" / "intruder.log").read_text()
        assert superlink.poll() is None  # the SuperLink refused it and stayed up
    finally:
        processes.stop()
    assert _processes_mentioning(str(tmp_path)) == []
    assert _ours(deploy, processes) == []
