"""Federated PatchCore on Flower: Simulation Engine, faults, and a local TLS deployment, against in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'flwr[simulation]')")

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedinspect.errors import FedinspectError
from fedinspect.federation import flower_app
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
        own = flower_app.own_images(folder)
        planned = plan.client_images(index)
        assert {c: [p.name for p in paths] for c, paths in own.items()} == {
            c: [p.name for p in paths] for c, paths in planned.items()}
    with pytest.raises(FedinspectError, match="no category folder"):
        flower_app.own_images(tmp_path / "nodes" / "client_0" / "engine_wiring" / "train")


def test_identity_from_node_config() -> None:
    def context(node_config: dict) -> Context:
        return Context(run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config={})

    assert flower_app.identity(context({"partition-id": 3, "num-partitions": 5}))["client"] == "client_3"
    deployed = flower_app.identity(context({"client-id": "factory_a", "data-dir": "/srv/images"}))
    assert deployed == {"client": "factory_a", "partition-id": -1, "own-data": True}
    assert flower_app.identity(context({"data-dir": "/srv/plant_7"}))["client"] == "plant_7"


# ---------------------------------------------------------------- Simulation Engine
@pytest.mark.slow
def test_simulation_gives_the_in_process_results(tiny_dataset: Path, tmp_path: Path, in_process) -> None:
    results = flower_app.run_flower_simulation(tiny_dataset, tmp_path / "sim", small_config(5), progress=False)
    same_round(in_process(5), results)
    assert json.loads((tmp_path / "sim" / "results.json").read_text())["categories"] == results["categories"]
    assert (tmp_path / "sim" / "report.md").is_file()


def _fit_or_fail(message: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == FAILING_PARTITION:
        raise RuntimeError("injected fault: this factory's ClientApp crashed")
    return flower_app.handle_fit(message, context)


failing_client_app = ClientApp()
failing_client_app.query("identify")(flower_app.handle_identify)
failing_client_app.train("fit")(_fit_or_fail)


@pytest.mark.slow
def test_a_failing_client_is_recorded_and_the_round_goes_on(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    results = flower_app.run_flower_simulation(tiny_dataset, tmp_path / "run", small_config(3, min_clients=2),
                                               progress=False, client_app=failing_client_app)
    assert [c["client"] for c in results["clients"]] == ["client_0", "client_2"]
    assert len(results["missing_clients"]) == 1
    missing = results["missing_clients"][0]
    assert missing["client"] == "client_1" and "injected fault" in missing["reason"]
    assert "client_1 dropped out" in capsys.readouterr().err
    assert set(results["categories"]) == {"engine_wiring", "pipe_clip", "pipe_staple", "tank_screw",
                                          "underbody_pipes", "underbody_screw"}
    with pytest.raises(FedinspectError, match=r"only 1 of 2 clients answered \(minimum 2\).*injected fault"):
        flower_app.run_flower_simulation(tiny_dataset, tmp_path / "run2", small_config(2, min_clients=2),
                                         progress=False, client_app=failing_client_app)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FEDINSPECT_FLOWER_50") != "1",
                    reason="50 simulated clients take several minutes; set FEDINSPECT_FLOWER_50=1")
def test_fifty_simulated_clients(tmp_path: Path) -> None:
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
               "--image-size", "128", "--no-centralized", "--no-shared-comparison", "--no-maps", "--timeout", "400"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    same_round(in_process(3), results)
    superlink_log = (work / "logs" / "superlink.log").read_text()
    assert "SuperNode authentication is disabled" not in superlink_log
    assert (work / "certs" / "ca.crt").is_file() and (work / "keys" / "client_0.pub").is_file()
    for index in range(3):  # each SuperNode held only its own partition
        node = work / "nodes" / f"client_{index}"
        assert sum(1 for _ in node.rglob("*.png")) == results["clients"][index]["samples"]
    assert _processes_mentioning(str(work)) == []
