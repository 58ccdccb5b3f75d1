"""The SuperLink's control plane is the operator's alone (issue 11, attack ``control_api``).

The attack: every device holds ``ca.crt`` and the SuperLink's address. When Flower's Control API
listened on the devices' port, such a client registered a SuperNode key of its own
(``flwr supernode register``) and started a ServerApp of its own (``flwr run``) that read the
release-signing key. Now devices reach only the Fleet API (``serforget.deploy.superlink``); the Control and
Runtime APIs are on a loopback port of their own, and the state and keys are private files.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from serforget.deploy.local import (
    CONNECTION,
    Deployment,
    create_pki,
    down,
    flwr,
    free_port,
    register_supernode,
    start_superlink,
    unregister_supernode,
    write_connection,
)
from serforget.deploy.pki import create_node_auth_key
from serforget.deploy.superlink import FleetOnlySocket, fleet_paths

APP = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _attacker_home(deployment: Deployment, home: Path) -> Path:
    """A device's view: ``ca.crt`` and the address it dials (the Fleet API), nothing else."""
    home.mkdir(parents=True)
    ca = home / "ca.crt"
    ca.write_bytes(deployment.tls.ca_cert.read_bytes())
    (home / "config.toml").write_text(
        "\n".join(
            [
                "[superlink]",
                f'default = "{CONNECTION}"',
                "",
                f"[superlink.{CONNECTION}]",
                f'address = "{deployment.address}"',
                f'root-certificates = "{ca}"',
                "",
            ]
        )
    )
    return home


def _flwr_as(deployment: Deployment, home: Path, args: list[str]) -> subprocess.CompletedProcess:
    """The ``flwr`` CLI with another FLWR_HOME (the attacker's)."""
    env = {**deployment.env(), "FLWR_HOME": str(home)}
    return subprocess.run(
        [shutil.which("flwr", path=env["PATH"]), *args],
        env=env,
        text=True,
        capture_output=True,
        check=False,
        timeout=180,
    )


def _json(out) -> dict:
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"success": False, "raw": out.stdout + out.stderr}


@pytest.mark.slow
def test_control_api_is_not_reachable_with_only_the_ca_certificate(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path / "run", port=free_port(), control_port=free_port())
    try:
        create_pki(deployment, hosts=[deployment.host, "localhost"])
        write_connection(deployment)
        deployment.server.init()
        start_superlink(deployment)
        home = _attacker_home(deployment, tmp_path / "attacker-home")
        evil = create_node_auth_key(out_dir=tmp_path / "evil")

        # the attacker: register a SuperNode key, then start a ServerApp of its own
        reply = _json(
            _flwr_as(deployment, home, ["supernode", "register", str(evil.public), CONNECTION, "--format", "json"])
        )
        assert reply.get("success") is not True and "node-id" not in reply, reply
        reply = _json(_flwr_as(deployment, home, ["run", str(APP), CONNECTION, "--format", "json"]))
        assert reply.get("success") is not True and "run-id" not in reply, reply

        # nothing of it reached the SuperLink: no node, no run (asked by the operator)
        nodes = _json(flwr(deployment, ["supernode", "list", CONNECTION, "--format", "json"], timeout=60))
        assert nodes.get("nodes") == [], nodes
        runs = _json(flwr(deployment, ["list", CONNECTION, "--format", "json"], timeout=60))
        assert runs.get("runs") == [], runs

        # the operator, on the local Control API, can do both
        operator_key = create_node_auth_key(out_dir=tmp_path / "device-keys")
        flower_id = register_supernode(deployment, public_key=operator_key.public)
        assert flower_id > 0
        started = _json(
            flwr(
                deployment,
                [
                    "run",
                    str(APP),
                    CONNECTION,
                    "--format",
                    "json",
                    "--run-config",
                    "mode='deployment' num-rounds=0 round-timeout=1.0",
                ],
                timeout=180,
            )
        )
        assert started.get("success") is True and int(started["run-id"]) > 0, started
        flwr(deployment, ["stop", str(started["run-id"]), CONNECTION], timeout=60)

        # revoke (serforget keys revoke --deployment): the operator unregisters the device's SuperNode key
        assert unregister_supernode(deployment, public_key=operator_key.public) == flower_id
        listed = _json(flwr(deployment, ["supernode", "list", CONNECTION, "--format", "json"], timeout=60))
        assert [n["status"] for n in listed["nodes"] if int(n["node-id"]) == flower_id] == ["unregistered"], listed
        assert unregister_supernode(deployment, public_key=operator_key.public) is None  # no longer registered here

        # what a run could read if it were started by someone else: private files in private folders
        keys = deployment.server.keys_dir
        assert _mode(keys) == 0o700
        for name in ("sign.key", "hpke.key"):
            assert _mode(keys / name) == 0o600
        assert _mode(deployment.state_db) == 0o600 and _mode(deployment.state_db.parent) == 0o700
        assert _mode(deployment.root / "logs") == 0o700 and _mode(deployment.root / "logs" / "superlink.log") == 0o600
        assert _mode(deployment.pki_dir / "superlink.key") == 0o600
    finally:
        down(deployment)


# ---------------------------------------------------------------- the socket filter itself (fast)


def _call(app, *, port: int, path: str, kind: str = "http") -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": kind, "path": path, "server": ("127.0.0.1", port), "method": "POST", "headers": []}
    asyncio.run(app(scope, receive, send))
    return sent


def test_control_api_paths_are_refused_on_the_fleet_socket_only() -> None:
    reached: list[str] = []

    async def flower(scope, receive, send) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    allowed = fleet_paths()
    assert "/v1/fleet/pull-messages" in allowed and not any(p.startswith("/v1/control") for p in allowed)
    app = FleetOnlySocket(flower, fleet_port=9092, allowed=allowed)
    for path in (
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/runtime/pull-messages",
        "/docs",
        "/v1/fleet/../control/start-run",
        "/v1/fleet/pull-messages/",
        "/v1/fleet-x",
    ):
        assert _call(app, port=9092, path=path)[0]["status"] == 404, path
    assert _call(app, port=9092, path="/v1/control/x", kind="websocket")[0]["type"] == "websocket.close"
    assert reached == []
    assert _call(app, port=9092, path="/v1/fleet/pull-messages")[0]["status"] == 200
    assert _call(app, port=9093, path="/v1/control/start-run")[0]["status"] == 200
    assert reached == ["/v1/fleet/pull-messages", "/v1/control/start-run"]


def test_control_api_port_must_differ_from_the_fleet_port(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must differ"):
        Deployment(tmp_path, port=9092, control_port=9092)


def test_control_api_launcher_finds_the_flower_internals_it_builds_on() -> None:
    """``serforget.deploy.superlink`` reuses flwr 1.41's parser, lifespan and app factory: an upgrade that moves them fails here."""
    import importlib

    from flwr.superlink.main import create_app

    module = importlib.import_module("flwr.superlink.cli.flower_superlink")
    assert callable(module._parse_superlink_lifespan_config) and isinstance(module.SuperLinkLifespan, type)
    assert callable(create_app)
