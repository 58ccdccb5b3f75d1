"""A whole Deployment-Engine federation: provisioning, SuperLink, SuperNodes, checked runs.

On one machine (loopback, what the tests do) every step runs here; on many hosts each step runs
on the host named in its docstring (``deploy/README.md`` walks through it). Run directory::

    RUN/pki/             ca.crt, ca.key (operator only), superlink.crt, superlink.key
    RUN/superlink/       state.db: runs and registered SuperNode keys (survives restarts)
    RUN/server/          the ServerApp's data dir (serforget.server.federation.ServerDir)
    RUN/devices/NAME/    one device's node data dir; keys/flwr_auth(.pub) = its SuperNode key
    RUN/flwr-home/       $FLWR_HOME of the CLI: config.toml with the connection (the Control API)
    RUN/registered.json  SuperNode public key -> Flower node id (format_version 1)
    RUN/pids/, RUN/logs/ see deploy.processes
    RUN/work/            the ServerApp's report (run config work-dir)

Two endpoints (see ``serforget.deploy.superlink``): devices dial the Fleet API at ``host:port``; the
operator's CLI and the ServerApp reach the Control and Runtime APIs at ``control_host:control_port``
(loopback unless the operator chooses otherwise; remote operators use an SSH tunnel). Flower
programs are started with umask 077 and the run directory's state, logs, PID files and the
server dir are 0700 directories: the SuperLink's ``state.db`` and logs, and the ServerApp's
keys, are readable by the service account only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from serforget.client.node import NodeDir, pin_server_keys, prepare_node_dir
from serforget.common.fsutil import atomic_write_json, atomic_write_text, sha256_file
from serforget.common.manifest import Utterance, by_speaker, read_manifest
from serforget.deploy.flwr_program import flwr_env, run_config_text
from serforget.deploy.pki import NodeAuthKey, ServerTLSFiles, create_ca, create_node_auth_key, issue_server_certificate
from serforget.deploy.processes import ManagedProcess, ProcessTable, private_dir
from serforget.server.federation import ServerDir
from serforget.server.simulation import node_id_for

CONNECTION = "serforget"
SUPERLINK = "superlink"
REGISTRY_FORMAT_VERSION = 1
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and where its log is."""


class SuperLinkUnavailable(DeployError):
    """The ``flwr`` CLI could not reach the SuperLink's Control API (not started, or not ready yet)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the kernel's choice), for tests on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout: float, process: ManagedProcess | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections; fail early if ``process`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.is_running():
            raise DeployError(f"{process.name} exited during start-up; see {process.log}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


@dataclass(frozen=True)
class Device:
    """One SuperNode host: its node data dir, SuperNode key and Runtime API port."""

    name: str
    data_dir: Path
    auth_key: NodeAuthKey
    port: int

    @property
    def node(self) -> NodeDir:
        return NodeDir(self.data_dir)

    @property
    def process_name(self) -> str:
        return f"supernode-{self.name}"


@dataclass(frozen=True)
class Deployment:
    """Paths and endpoints of one deployment run directory (see the module docstring)."""

    root: Path
    #: the Fleet API: the one endpoint devices reach
    host: str = "127.0.0.1"
    port: int = 9092
    #: the Control and Runtime (ServerAppIo) APIs: the operator's CLI and the ServerApp only
    control_host: str = "127.0.0.1"
    control_port: int = 9093

    def __post_init__(self) -> None:
        # Flower's connection config and node config need absolute paths
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())
        if self.port == self.control_port:
            raise ValueError(f"the Fleet port ({self.port}) and the Control API port ({self.control_port}) must differ")

    @property
    def address(self) -> str:
        """The Fleet API address devices dial."""
        return f"{self.host}:{self.port}"

    @property
    def control_address(self) -> str:
        """The Control API address of the operator's CLI (``$FLWR_HOME/config.toml``)."""
        return f"{self.control_host}:{self.control_port}"

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def tls(self) -> ServerTLSFiles:
        return ServerTLSFiles(self.pki_dir / "ca.crt", self.pki_dir / "superlink.crt", self.pki_dir / "superlink.key")

    @property
    def server(self) -> ServerDir:
        return ServerDir(self.root / "server")

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    @property
    def state_db(self) -> Path:
        return self.root / "superlink" / "state.db"

    @property
    def registry_path(self) -> Path:
        return self.root / "registered.json"

    @property
    def processes(self) -> ProcessTable:
        return _tables.setdefault(self.root, ProcessTable(self.root))

    def device(self, name: str, *, port: int) -> Device:
        data_dir = self.root / "devices" / name
        return Device(
            name, data_dir, NodeAuthKey(data_dir / "keys" / "flwr_auth", data_dir / "keys" / "flwr_auth.pub"), port
        )

    def env(self) -> dict[str, str]:
        """Environment of every Flower program: our FLWR_HOME, no telemetry, no installs."""
        return flwr_env(self.flwr_home)


#: One ProcessTable per run directory in this Python process, so exit statuses stay observable.
_tables: dict[Path, ProcessTable] = {}


# ------------------------------------------------------------------ operator host: PKI + server


def create_pki(deployment: Deployment, *, hosts: Sequence[str]) -> ServerTLSFiles:
    """Operator host: the CA and the SuperLink certificate for the names devices dial."""
    ca = create_ca(out_dir=deployment.pki_dir)
    # the CLI dials the Control API by its own address, so the certificate names it too
    names = list(dict.fromkeys([*hosts, deployment.control_host]))
    return issue_server_certificate(ca=ca, out_dir=deployment.pki_dir, hosts=names)


def write_connection(deployment: Deployment, *, name: str = CONNECTION) -> Path:
    """CLI host: ``$FLWR_HOME/config.toml`` with a TLS connection to the Control API as default.

    The Control API is not on the devices' Fleet port; from another host reach it through an SSH
    tunnel (``ssh -L 9093:127.0.0.1:9093 superlink-host``) and keep this address.
    """
    text = "\n".join(
        [
            "[superlink]",
            f'default = "{name}"',
            "",
            f"[superlink.{name}]",
            f'address = "{deployment.control_address}"',
            f'root-certificates = "{deployment.tls.ca_cert}"',
            "",
        ]
    )
    return atomic_write_text(deployment.flwr_home / "config.toml", text)


# ------------------------------------------------------------------ device provisioning


def provision_device(
    deployment: Deployment, *, name: str, speaker: str, utterances: Sequence[Utterance], port: int
) -> Device:
    """Device host: node data dir, signing key, SuperNode key; then the enrollment exchange.

    The exchange with the operator is public keys only: the device's ``keys/sign.pub`` is
    enrolled in the server's ``nodes.json``, the server's ``hpke.pub`` and ``sign.pub`` are pinned
    on the device as ``keys/server_hpke.pub`` and ``keys/server_sign.pub``, and the device's ``keys/flwr_auth.pub`` is registered with
    the SuperLink (:func:`register_supernode`).
    """
    device = deployment.device(name, port=port)
    node = prepare_node_dir(root=device.data_dir, node_id=node_id_for(speaker), speaker=speaker, utterances=utterances)
    server = deployment.server.init()
    if node.node_id not in server.node_keys():
        server.enroll(node_id=node.node_id, public_key_path=node.keys_dir / "sign.pub")
    pin_server_keys(node, server_keys_dir=server.keys_dir)
    create_node_auth_key(out_dir=node.keys_dir, name="flwr_auth")
    return device


def provision_devices(deployment: Deployment, *, manifest: Path, ports: Sequence[int]) -> list[Device]:
    """One device per speaker of ``manifest`` (in manifest order), with the given Runtime API ports."""
    speakers = by_speaker(read_manifest(manifest))
    if len(ports) != len(speakers):
        raise ValueError(f"{manifest}: {len(speakers)} speakers but {len(ports)} SuperNode ports given")
    return [
        provision_device(deployment, name=f"{i:03d}", speaker=speaker, utterances=utts, port=port)
        for i, ((speaker, utts), port) in enumerate(zip(speakers.items(), ports))
    ]


# ------------------------------------------------------------------ Flower programs


def flwr(deployment: Deployment, args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI against this deployment's FLWR_HOME (bounded)."""
    env = deployment.env()
    exe = shutil.which("flwr", path=env["PATH"])
    if exe is None:
        raise DeployError("the `flwr` program is not installed in this environment")
    try:
        return subprocess.run([exe, *args], env=env, text=True, capture_output=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DeployError(f"`flwr {' '.join(args)}` did not finish within {timeout:.0f} s") from exc


def superlink_argv(deployment: Deployment) -> list[str]:
    """Server host: the SuperLink command line (``serforget.deploy.superlink``: Fleet API alone on the devices' port)."""
    tls = deployment.tls
    return [
        sys.executable,
        "-m",
        "serforget.deploy.superlink",
        "--fleet-host",
        deployment.host,
        "--fleet-port",
        str(deployment.port),
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.cert),
        "--ssl-keyfile",
        str(tls.key),
        "--enable-supernode-auth",
        "--database",
        str(deployment.state_db),
        "--host",
        deployment.control_host,
        "--port",
        str(deployment.control_port),
        "--disable-runtime-dependency-installation",
    ]


def start_superlink(deployment: Deployment, *, timeout: float = 60.0) -> ManagedProcess:
    """Server host: the SuperLink with TLS, SuperNode authentication and a state database.

    Its state directory is 0700 and ``state.db`` 0600 (a database left 0644 by an older
    version is tightened); the process runs with umask 077 (``ProcessTable.start``).
    """
    private_dir(deployment.state_db.parent)
    if deployment.state_db.exists():
        os.chmod(deployment.state_db, 0o600)
    env = deployment.env()
    # the launcher must be this checkout's deploy package, whatever is installed
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    process = deployment.processes.start(name=SUPERLINK, argv=superlink_argv(deployment), env=env)
    deadline = time.monotonic() + timeout
    wait_for_port(deployment.control_host, deployment.control_port, timeout=timeout, process=process)
    wait_for_port(deployment.host, deployment.port, timeout=max(deadline - time.monotonic(), 1.0), process=process)
    # an open port is not a ready Control API (a restart on an existing state database takes longer)
    _poll_superlink(deployment, lambda nodes: True, deadline=deadline, what="the SuperLink's Control API to answer")
    return process


def _resolve(argv: list[str], deployment: Deployment) -> list[str]:
    exe = shutil.which(argv[0], path=deployment.env()["PATH"])
    if exe is None:
        raise DeployError(f"the `{argv[0]}` program is not installed in this environment")
    return [exe, *argv[1:]]


def _registrations(deployment: Deployment) -> dict:
    try:
        raw = json.loads(deployment.registry_path.read_text())
    except FileNotFoundError:
        return {}
    if raw.get("format_version") != REGISTRY_FORMAT_VERSION:
        raise DeployError(f"{deployment.registry_path}: unsupported format_version {raw.get('format_version')!r}")
    return dict(raw["nodes"])


def register_supernode(deployment: Deployment, *, public_key: Path, timeout: float = 60.0) -> int:
    """Operator (CLI host): ``flwr supernode register KEY.pub CONNECTION``; idempotent per key.

    Returns the Flower node id the SuperLink assigned; it is stored in ``registered.json`` under
    the key's SHA-256, because the SuperLink refuses to register the same key twice.
    """
    fingerprint = sha256_file(public_key)
    known = _registrations(deployment)
    if fingerprint in known:
        return int(known[fingerprint]["flower_node_id"])
    out = flwr(deployment, ["supernode", "register", str(public_key), CONNECTION, "--format", "json"], timeout=timeout)
    try:
        reply = json.loads(out.stdout)
        node_id = int(reply["node-id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise DeployError(f"registering {public_key} failed:\n{out.stdout}\n{out.stderr}") from None
    known[fingerprint] = {"public_key": str(public_key), "flower_node_id": node_id}
    atomic_write_json(deployment.registry_path, {"format_version": REGISTRY_FORMAT_VERSION, "nodes": known})
    return node_id


def unregister_supernode(deployment: Deployment, *, public_key: Path, timeout: float = 60.0) -> int | None:
    """Operator (CLI host): ``flwr supernode unregister ID CONNECTION`` for a registered key.

    The SuperLink then refuses that key (its SuperNode cannot connect again). Returns the Flower
    node id that was unregistered, or None if this deployment never registered the key.
    """
    fingerprint = sha256_file(public_key)
    known = _registrations(deployment)
    if fingerprint not in known:
        return None
    node_id = int(known[fingerprint]["flower_node_id"])
    out = flwr(deployment, ["supernode", "unregister", str(node_id), CONNECTION, "--format", "json"], timeout=timeout)
    try:
        ok = json.loads(out.stdout).get("success") is True
    except (json.JSONDecodeError, AttributeError):
        ok = False
    if not ok:
        raise DeployError(f"unregistering {public_key} (Flower node {node_id}) failed:\n{out.stdout}\n{out.stderr}")
    del known[fingerprint]
    atomic_write_json(deployment.registry_path, {"format_version": REGISTRY_FORMAT_VERSION, "nodes": known})
    return node_id


def device_of_node(deployment: Deployment, node_id: str) -> Device:
    """The provisioned device (``RUN/devices/NAME``) whose node data dir holds ``node_id``."""
    for data_dir in sorted((deployment.root / "devices").glob("*/")):
        if (data_dir / "node.json").exists() and NodeDir(data_dir).node_id == node_id:
            return deployment.device(data_dir.name, port=0)
    raise DeployError(f"{deployment.root / 'devices'}: no device holds node {node_id!r}")


def unregister_device(deployment: Deployment, node_id: str, *, timeout: float = 60.0) -> int | None:
    """Operator, revoking a device (``serforget keys revoke --deployment``): the SuperLink side.

    Unregisters the device's SuperNode key from the SuperLink and stops its SuperNode if this
    machine runs it (its signing key is revoked in ``nodes.json`` by ``serforget.common.keys.revoke_node``).
    Returns the Flower node id that was unregistered, or None if the key was never registered here.
    """
    device = device_of_node(deployment, node_id)
    flower_id = unregister_supernode(deployment, public_key=device.auth_key.public, timeout=timeout)
    deployment.processes.stop(device.process_name)
    return flower_id


def supernode_argv(deployment: Deployment, device: Device, *, private_key: Path | None = None) -> list[str]:
    """Device host: the ``flower-supernode`` command line of one device."""
    config = f"speaker-id='{device.node.info()['speaker']}' data-dir='{device.data_dir.resolve()}'"
    return _resolve(
        [
            "flower-supernode",
            "--superlink",
            deployment.address,
            "--root-certificates",
            str(deployment.tls.ca_cert),
            "--auth-supernode-private-key",
            str(private_key or device.auth_key.private),
            "--port",
            str(device.port),
            "--node-config",
            config,
        ],
        deployment,
    )


def start_supernode(deployment: Deployment, device: Device, *, private_key: Path | None = None) -> ManagedProcess:
    """Device host: start its SuperNode (``private_key`` overrides the device key: fault tests)."""
    return deployment.processes.start(
        name=device.process_name, argv=supernode_argv(deployment, device, private_key=private_key), env=deployment.env()
    )


def online_nodes(deployment: Deployment, *, timeout: float = 60.0) -> set[int]:
    """Flower node ids the SuperLink currently reports ``online``."""
    out = flwr(deployment, ["supernode", "list", CONNECTION, "--format", "json"], timeout=timeout)
    try:
        reply = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise DeployError(f"`flwr supernode list` failed:\n{out.stdout}\n{out.stderr}") from None
    if "nodes" not in reply:
        message = str(reply.get("error-message", ""))
        kind = SuperLinkUnavailable if "unavailable" in message.lower() else DeployError
        raise kind(f"`flwr supernode list` failed:\n{out.stdout}\n{out.stderr}")
    return {int(n["node-id"]) for n in reply["nodes"] if n.get("status") == "online"}


def _poll_superlink(deployment: Deployment, done, *, deadline: float, what: str) -> set[int]:
    """Poll ``online_nodes`` until ``done(nodes)``; an unreachable SuperLink is retried, a dead one is an error."""
    while True:
        error: DeployError | None = None
        try:
            nodes = online_nodes(deployment)
            if done(nodes):
                return nodes
        except SuperLinkUnavailable as exc:
            error = exc
            superlink = deployment.processes.get(SUPERLINK)
            if superlink is not None and not superlink.is_running():
                raise DeployError(f"the SuperLink exited; see {superlink.log}") from exc
        if time.monotonic() > deadline:
            raise DeployError(f"timed out waiting for {what}" + (f"; last error: {error}" if error else ""))
        time.sleep(1.0)


def wait_online(deployment: Deployment, node_ids: set[int], *, timeout: float) -> None:
    """Block until every node of ``node_ids`` is online (runs with num-rounds = 0 do not wait).

    A SuperLink that is still starting (port open, Control API not yet serving) is waited for.
    """
    _poll_superlink(
        deployment,
        lambda nodes: node_ids <= nodes,
        deadline=time.monotonic() + timeout,
        what=f"SuperNodes {sorted(node_ids)} to be online",
    )


# ------------------------------------------------------------------ runs


@dataclass(frozen=True)
class RunOutcome:
    """What ``flwr run`` did: the run id, the SuperLink's final status and the streamed log."""

    run_id: int
    status: str
    details: str
    log: str

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def deployment_run_config(deployment: Deployment, *, min_nodes: int, overrides: Mapping[str, object] = {}) -> dict:
    """The run config of a deployment run: server dir, report dir, how many nodes to wait for."""
    return {
        "mode": "deployment",
        "server-dir": str(deployment.server.root),
        "work-dir": str(deployment.work_dir),
        "min-nodes": min_nodes,
        **overrides,
    }


def run_status(deployment: Deployment, run_id: int) -> tuple[str, str]:
    out = flwr(deployment, ["list", CONNECTION, "--run-id", str(run_id), "--format", "json"], timeout=60.0)
    try:
        run = json.loads(out.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown", out.stdout + out.stderr
    return str(run.get("status", "unknown")), str(run.get("status-details", ""))


def submit_run(
    deployment: Deployment, *, app: Path, run_config: Mapping[str, object], timeout: float
) -> subprocess.Popen:
    """Start ``flwr run APP CONNECTION --stream`` in the background (fault tests act meanwhile)."""
    exe = shutil.which("flwr", path=deployment.env()["PATH"])
    if exe is None:
        raise DeployError("the `flwr` program is not installed in this environment")
    return subprocess.Popen(
        [exe, "run", str(app), CONNECTION, "--stream", "--run-config", run_config_text(run_config)],
        env=deployment.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_run(deployment: Deployment, submitted: subprocess.Popen, *, timeout: float) -> RunOutcome:
    """Wait (bounded) for a submitted run's stream to end, then read the SuperLink's final status.

    ``flwr run`` exits 0 even when the ServerApp raised: only the status the SuperLink records
    (``finished:completed`` vs ``finished:failed``) tells success.
    """
    try:
        log, _ = submitted.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        submitted.kill()
        log, _ = submitted.communicate()
        match = _RUN_ID.search(log or "")
        raise DeployError(
            f"run {match.group(1) if match else '?'} did not finish within {timeout:.0f} s:\n{log[-4000:]}"
        ) from None
    match = _RUN_ID.search(log)
    if match is None:
        raise DeployError(f"`flwr run` did not start a run:\n{log[-4000:]}")
    run_id = int(match.group(1))
    deadline = time.monotonic() + 60.0
    status, details = run_status(deployment, run_id)
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
        status, details = run_status(deployment, run_id)
    return RunOutcome(run_id, status, details, log)


def run_app(deployment: Deployment, *, app: Path, run_config: Mapping[str, object], timeout: float) -> RunOutcome:
    """CLI host: ``flwr run APP CONNECTION --stream`` and the run's final status."""
    return finish_run(
        deployment, submit_run(deployment, app=app, run_config=run_config, timeout=timeout), timeout=timeout
    )


# ------------------------------------------------------------------ one machine, all of it


def up(deployment: Deployment, *, manifest: Path, ports: Sequence[int], online_timeout: float = 120.0) -> list[Device]:
    """Everything on this machine: PKI, devices, SuperLink, registration, SuperNodes, connection.

    Idempotent on disk; processes already running (PID files) are an error, not a second copy.
    """
    private_dir(deployment.root)
    private_dir(deployment.server.root)
    create_pki(deployment, hosts=[deployment.host, "localhost"])
    write_connection(deployment)
    devices = provision_devices(deployment, manifest=manifest, ports=ports)
    start_superlink(deployment)
    ids = {register_supernode(deployment, public_key=d.auth_key.public) for d in devices}
    for device in devices:
        start_supernode(deployment, device)
    wait_online(deployment, ids, timeout=online_timeout)
    return devices


def down(deployment: Deployment, *, timeout: float = 15.0) -> list[str]:
    """Stop exactly the processes recorded in ``RUN/pids`` (SuperNodes first)."""
    return deployment.processes.stop_all(timeout=timeout)
