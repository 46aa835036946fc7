#!/usr/bin/env python
"""A federation on Flower's Deployment Engine, every role on this machine (127.0.0.1 only).

Federated PatchCore by default; ``--detector NAME`` (with ``--rounds``, ``--local-epochs``, ... as
``fedinspect federate`` takes them) federates any other detector of the registry the same way.

What a real federation runs, in separate processes, with Flower's own components:

- a ``flower-superlink`` (the server's machine) with TLS (a CA and a server certificate made here)
  and SuperNode authentication (``--enable-supernode-auth``; each factory's public key is
  registered with ``flwr supernode register``);
- one ``flower-supernode`` per client (a factory), with its own auth key, the CA certificate and
  its OWN data folder (node config ``data-dir``), split from ``--data`` by the round's partition as
  the factories would hold it;
- ``flwr run`` of this project's app (``[tool.flwr.app]`` in pyproject.toml) against that SuperLink;
  the ServerApp evaluates on ``--data`` (the server's test data) and writes results.json, the
  report and the maps to ``--out``.

The script waits for the run to finish (bounded by ``--timeout``), prints the results and always
stops every process it started (and their children). ``--kill-client client_1`` kills that SuperNode
(and its ClientApp) 2 s (``--kill-after``) after it received the round's ``train`` message: the
SuperLink notices the missing heartbeats (Flower 1.41: within 60 s, 2 x the SuperNode's fixed 30 s
interval) and answers for it with an error, so the server records it as missing and aggregates the
others well before ``--round-timeout``.

Work folder (``--work``, default ``OUT/deployment``)::

    certs/ca.crt, ca.key          the CA; ca.crt goes to every SuperNode and to the operator's flwr CLI
    certs/server.crt, server.key  the SuperLink's certificate (SAN 127.0.0.1, localhost) and key
    keys/client_<i>, .pub         SuperNode auth keys (private key stays on the factory; .pub is registered)
    nodes/client_<i>/             each factory's own data: <category>/train/good/*.png
    flwr-home/config.toml         the operator's SuperLink connection ``fedinspect-local``
    run-config.toml               the run config given to ``flwr run``
    logs/                         superlink.log, supernode-client_<i>.log, serverapp.log

Example::

    python scripts/flower_deploy.py --data runs/demo/data --out runs/flower-deploy --clients 3

The same on real machines (what this script runs, by role; Flower 1.41 flags)::

    # server: the SuperLink (one HTTPS port serves the Fleet, Control and Runtime APIs)
    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key \\
        --enable-supernode-auth --host 0.0.0.0 --port 9093 --disable-runtime-dependency-installation
    # operator (flwr CLI; $FLWR_HOME/config.toml: [superlink.fedinspect] address = "server:9093",
    # root-certificates = "ca.crt"): register each factory's public key, then start the round
    flwr supernode register client_0.pub fedinspect
    flwr run . fedinspect --run-config 'data-dir="/srv/test-data" out-dir="/srv/runs/r1" clients=3'
    # each factory: its SuperNode with its private key, the CA certificate and its own data
    flower-supernode --superlink server:9093 --root-certificates ca.crt \\
        --auth-supernode-private-key client_0 --node-config 'client-id="client_0" data-dir="/data/images"'
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fedinspect-local"
HOST = "127.0.0.1"


# ---------------------------------------------------------------- certificates and keys
def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (EC P-256, 1 day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedinspect local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "ca_key": folder / "ca.key", "cert": folder / "server.crt",
             "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["ca_key"].write_bytes(pem_key(ca_key))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(pem_key(key))
    for name in ("ca_key", "key"):
        paths[name].chmod(0o600)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (EC P-384, OpenSSH format, as Flower reads them)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


# ---------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


TAG = "FEDINSPECT_DEPLOY_PROCESS"  # environment variable marking every process a Processes started, and its children


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a process; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _tag_of(pid: int) -> str | None:
    """The value of TAG in a process's environment (inherited by every child that keeps its environment)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{TAG}=".encode()
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


class Processes:
    """The processes this script starts, and every process they start in turn, until all are gone.

    Flower's components spawn children (the SuperLink its SuperExec, in a session of its own; a
    SuperNode its ClientApp processes) that outlive a parent killed first. So a process belongs to
    us if it descends from one we started (walking /proc) or carries our tag in its environment
    (a child that the parent's death re-parented to init); each is remembered with its start time,
    so a reused pid is never signalled. :meth:`stop` and :meth:`kill` signal, then WAIT until every
    one is gone (a zombie counts as gone: it runs nothing and holds no port), SIGKILL after a grace.
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.run = f"{os.getpid()}-{time.monotonic_ns()}"
        self.started: dict[str, subprocess.Popen] = {}
        self.known: dict[int, tuple[str, int]] = {}  # pid -> (name of the process it belongs to, start time)

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(command, env={**env, TAG: f"{self.run}/{name}"}, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                   cwd=ROOT)
        log.close()  # the child holds its own descriptor
        self.started[name] = process
        self.refresh()
        return process

    def refresh(self) -> dict[int, str]:
        """Every live process of ours now (pid -> the name of the started process it belongs to)."""
        stats = {pid: stat for pid in _pids() if (stat := _stat(pid)) is not None}
        children: dict[int, list[int]] = {}
        for pid, (_, parent, _) in stats.items():
            children.setdefault(parent, []).append(pid)
        for name, process in self.started.items():
            # a started process that was reaped may have its pid reused: its orphans are found by their tag
            todo = [process.pid] if process.poll() is None else []
            while todo:
                pid = todo.pop()
                if pid in stats and pid not in self.known:
                    self.known[pid] = (name, stats[pid][2])
                todo.extend(children.get(pid, []))
        for pid, stat in stats.items():
            tag = _tag_of(pid) if pid not in self.known else None
            if tag is not None and tag.startswith(f"{self.run}/"):
                self.known[pid] = (tag.split("/", 1)[1], stat[2])
        alive = {}
        for pid, (name, started) in list(self.known.items()):
            stat = stats.get(pid)
            if stat is None or stat[2] != started:
                del self.known[pid]  # gone (and its pid perhaps reused by a process not ours)
            elif stat[0] not in "ZX":
                alive[pid] = name
        return alive

    def kill(self, name: str, patience: float = 10.0) -> None:
        """SIGKILL one started process and all of its own, and wait until they are gone."""
        self._end({name}, [(signal.SIGKILL, patience)])

    def stop(self, grace: float = 5.0, patience: float = 10.0) -> None:
        """SIGTERM every process of ours, wait up to ``grace`` s, SIGKILL the rest; wait until all are gone."""
        left = self._end(set(self.started), [(signal.SIGTERM, grace), (signal.SIGKILL, patience)])
        if left:
            print(f"warning: processes still alive after SIGKILL: {sorted(left)}", file=sys.stderr)

    def _end(self, names: set[str], steps: list[tuple[int, float]]) -> dict[int, str]:
        alive: dict[int, str] = {}
        for sig, wait in steps:
            deadline = time.monotonic() + wait
            signalled: set[int] = set()
            while True:
                alive = {pid: name for pid, name in self.refresh().items() if name in names}
                if not alive:
                    return alive
                for pid in alive.keys() - signalled:  # new ones too: a process may spawn while stopping
                    _signal(pid, sig)
                    signalled.add(pid)
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        return alive


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_port(port: int, process: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}; see {log}")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} did not open port {port} within {timeout:g} s; see {log}")


def _flwr(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "flwr"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _json_out(result: subprocess.CompletedProcess, what: str) -> dict:
    for line in reversed(result.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    try:
        return json.loads(result.stdout[result.stdout.index("{"):])
    except (ValueError, json.JSONDecodeError):
        raise RuntimeError(f"{what} failed (code {result.returncode}):\n{result.stdout}\n{result.stderr}") from None


# ---------------------------------------------------------------- the deployment
def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def deploy(data: Path, out: Path, config, work: Path, timeout: float = 1800.0, round_timeout: float | None = None,
           kill_client: str | None = None, kill_after: float = 2.0, progress: bool = True) -> dict:
    """Run a federation (PatchCore's ``FederationConfig`` or any detector's ``DetectorFederationConfig``) on a
    local Flower deployment; returns the results (also in ``out/results.json``)."""
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.flower_app import (
        run_config_from_config,
        run_config_from_detector_config,
        write_client_folders,
    )
    from fedinspect.federation.runner import RESULTS_FILE, FederationConfig, client_id, plan_round

    patchcore = isinstance(config, FederationConfig)

    started = time.monotonic()
    deadline = started + timeout

    def say(message: str) -> None:
        if progress:
            print(f"[deploy {time.monotonic() - started:6.1f} s] {message}", file=sys.stderr)

    data, out, work = data.resolve(), out.resolve(), work.resolve()
    (out / RESULTS_FILE).unlink(missing_ok=True)
    names = [client_id(i) for i in range(config.clients)]
    if kill_client is not None and kill_client not in names:
        raise RuntimeError(f"--kill-client {kill_client}: not one of {names}")
    # the factories' folders: the partition every federation of these settings makes (same scheme and seed)
    plan = plan_round(data, config if patchcore else FederationConfig(
        clients=config.clients, partition=config.partition, alpha=config.alpha,
        settings=RoundSettings(seed=config.seed)))
    folders = write_client_folders(plan, work / "nodes", config.clients)
    say(f"each factory's data: {len(folders)} folders under {work / 'nodes'}")
    certs = make_certificates(work / "certs")
    keys = {name: make_node_key(work / "keys", name) for name in names}
    say(f"CA and SuperLink certificate in {work / 'certs'}; SuperNode keys in {work / 'keys'}")

    bin_dir = Path(sys.executable).parent
    base_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
    cli_env = {**base_env, "FLWR_HOME": str(work / "flwr-home")}
    port = free_port()
    (work / "flwr-home").mkdir(parents=True, exist_ok=True)
    (work / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{HOST}:{port}"\n'
        f'root-certificates = {json.dumps(str(certs["ca"]))}\n')
    options = {"data_dir": data, "out_dir": out, "progress": progress, "connect_timeout": min(300.0, timeout),
               "round_timeout": round_timeout if round_timeout is not None else max(60.0, timeout - 120.0)}
    run_config = (run_config_from_config(config, **options) if patchcore
                  else run_config_from_detector_config(config, **options))
    (work / "run-config.toml").write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))

    processes = Processes(work / "logs")
    try:
        superlink = processes.start("superlink", [
            str(bin_dir / "flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]),
            "--ssl-certfile", str(certs["cert"]), "--ssl-keyfile", str(certs["key"]), "--enable-supernode-auth",
            "--host", HOST, "--port", str(port), "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
        ], {**base_env, "FLWR_HOME": str(work / "superlink-home")})
        _wait_port(port, superlink, 60, "flower-superlink", work / "logs" / "superlink.log")
        say(f"SuperLink on https://{HOST}:{port} (TLS, SuperNode authentication on)")
        for name in names:
            for attempt in range(10):
                result = _flwr(cli_env, "supernode", "register", str(keys[name][1]), CONNECTION, "--name", name,
                               "--format", "json")
                if result.returncode == 0:
                    break
                time.sleep(1.0 + attempt)
            else:
                raise RuntimeError(f"flwr supernode register {name} failed:\n{result.stdout}\n{result.stderr}")
        say(f"registered {len(names)} SuperNode public keys")
        for name, folder in zip(names, folders, strict=True):
            processes.start(f"supernode-{name}", [
                str(bin_dir / "flower-supernode"), "--superlink", f"{HOST}:{port}",
                "--root-certificates", str(certs["ca"]), "--auth-supernode-private-key", str(keys[name][0]),
                "--node-config", f'client-id="{name}" data-dir="{folder}"',
                "--host", HOST, "--port", str(free_port()), "--isolation", "subprocess",
            ], {**base_env, "FLWR_HOME": str(work / "supernode-home" / name)})
        say(f"started {len(names)} SuperNodes, each with its own data folder")
        result = _flwr(cli_env, "run", str(ROOT), CONNECTION, "--run-config", str(work / "run-config.toml"),
                       "--format", "json")
        run_id = _json_out(result, "flwr run").get("run-id")
        if not run_id:
            raise RuntimeError(f"flwr run did not start a run:\n{result.stdout}\n{result.stderr}")
        say(f"flwr run: run {run_id} started")
        status, killed, fit_seen = "", False, None
        victim_log = work / "logs" / f"supernode-{kill_client}.log"
        while time.monotonic() < deadline:
            processes.refresh()
            if kill_client and not killed:
                if fit_seen is None and victim_log.is_file() and "Receiving: train" in victim_log.read_text():
                    fit_seen = time.monotonic()
                if fit_seen is not None and time.monotonic() - fit_seen >= kill_after:
                    processes.kill(f"supernode-{kill_client}")
                    killed = True
                    say(f"killed the SuperNode of {kill_client} {kill_after:g} s into its round (fault drill)")
            if superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {superlink.returncode}")
            listed = _flwr(cli_env, "list", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
            runs = _json_out(listed, "flwr list").get("runs", []) if listed.returncode == 0 else []
            status = str(runs[0].get("status", "")) if runs else status
            if status.startswith("finished"):
                break
            time.sleep(1.0 if kill_client and not killed else 3.0)
        else:
            _flwr(cli_env, "stop", str(run_id), CONNECTION, timeout=60)
            raise RuntimeError(f"run {run_id} did not finish within {timeout:g} s (status {status!r}); "
                               f"logs in {work / 'logs'}")
        logs = _flwr(cli_env, "log", str(run_id), CONNECTION, "--show", timeout=60)
        (work / "logs" / "serverapp.log").write_text(logs.stdout + logs.stderr)
        say(f"run {run_id} {status}")
        if not (out / RESULTS_FILE).is_file() or status != "finished:completed":
            tail = "\n".join((logs.stdout + logs.stderr).strip().splitlines()[-30:])
            raise RuntimeError(f"run {run_id} {status or 'ended'} without results; ServerApp log:\n{tail}")
        return json.loads((out / RESULTS_FILE).read_text())
    finally:
        processes.stop()
        say("stopped the SuperLink, the SuperNodes and their children")


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from fedinspect.cli import _federation_config, _print_federation, build_parser, detector_federation_config
    from fedinspect.errors import FedinspectError

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other option is `fedinspect federate`'s (--detector, --clients, --rounds, --image-size, ...): "
               "see `fedinspect federate --help`.")
    parser.add_argument("--data", required=True, help="dataset folder (the server's; split into the factories')")
    parser.add_argument("--out", required=True, help="run folder (results.json, report, maps)")
    parser.add_argument("--work", default=None, help="certificates, keys, node data, logs (default OUT/deployment)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="bound on the whole run (s)")
    parser.add_argument("--round-timeout", type=float, default=None, help="the server's wait for updates (s)")
    parser.add_argument("--kill-client", default=None, help="fault drill: kill this client's SuperNode mid-round")
    parser.add_argument("--kill-after", type=float, default=2.0,
                        help="--kill-client: seconds after that SuperNode received the round's message")
    parser.add_argument("--no-maps", action="store_true", help="do not write the anomaly maps")
    parser.add_argument("-q", "--quiet", action="store_true")
    args, federate_options = parser.parse_known_args(argv)
    federate = build_parser().parse_args(["federate", "--data", args.data, "--out", args.out, *federate_options])
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "deployment"
    try:
        if federate.detector == "patchcore":
            config = _federation_config(federate)
            config.write_maps = not args.no_maps
        else:
            config = dataclasses.replace(detector_federation_config(federate), write_maps=not args.no_maps)
        results = deploy(Path(args.data), out, config, work, args.timeout, args.round_timeout, args.kill_client,
                         args.kill_after, progress=not args.quiet)
    except (FedinspectError, RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"flower_deploy: error: {error}", file=sys.stderr)
        return 2
    if "format" in results:  # a detector federation's report
        print((out / "report.md").read_text(encoding="utf-8").split("## Rounds")[0].rstrip())
    else:
        _print_federation(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
