"""Smaller doors of issue 11: ``revoke`` a node, ``seen.json`` pruning and errors, one private-key policy (``pki``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from serforget.cli import main as serforget
from serforget.common.checkpoint import state_dict_bytes, state_sha256
from serforget.common.envelope import seal_delta
from serforget.common.keys import EnrollmentError, init_keys, load_hpke_public, load_signing_private
from serforget.deploy.pki import PKIError, create_ca, create_node_auth_key, issue_server_certificate
from serforget.server.federation import REPLAY_WINDOW_S, ServerDir, ServerStateError, open_and_check

BASE = {"w": torch.ones(3, 2), "b": torch.zeros(2)}


@pytest.fixture
def server(tmp_path: Path) -> ServerDir:
    srv = ServerDir(tmp_path / "server").init()
    keys = init_keys(key_dir=tmp_path / "bob", role="node")
    srv.enroll(node_id="bob", public_key_path=keys.sign_public)
    return srv


def _envelope(server: ServerDir, tmp_path: Path, request_id: str) -> bytes:
    return seal_delta(
        payload=state_dict_bytes({"w": torch.full((3, 2), 0.01), "b": torch.zeros(2)}),
        node_id="bob",
        request_ids=[request_id],
        base_version=1,
        base_sha256=state_sha256(BASE),
        server_hpke_public=load_hpke_public(server.keys_dir / "hpke.pub"),
        node_signing_key=load_signing_private(tmp_path / "bob" / "sign.key"),
    )


def _open(server: ServerDir, envelope: bytes):
    return open_and_check(
        envelope=envelope,
        claimed_node="bob",
        server=server,
        base_state=BASE,
        base_version=1,
        base_sha256=state_sha256(BASE),
        seen=set(),
        max_delta_ratio=0.5,
    )


# ---------------------------------------------------------------- revoke


def test_revoke_node_refuses_its_envelopes_and_its_key_forever(server: ServerDir, tmp_path: Path, capsys) -> None:
    assert _open(server, _envelope(server, tmp_path, "r1")).accepted
    assert serforget(["keys", "revoke", "--registry", str(server.nodes_registry), "--node-id", "bob"]) == 0
    assert "revoked bob" in capsys.readouterr().out
    verdict = _open(server, _envelope(server, tmp_path, "r2"))
    assert not verdict.accepted and verdict.reason.startswith("revoked"), verdict.reason
    assert server.revoked_nodes() == {"bob"} and "bob" not in server.node_keys()
    # the stolen key cannot come back, under its own name or another
    for node_id in ("bob", "bob2"):
        with pytest.raises(EnrollmentError, match="revoked"):
            server.enroll(node_id=node_id, public_key_path=tmp_path / "bob" / "sign.pub")
    # a replacement device for the same speaker enrolls with a new key
    fresh = init_keys(key_dir=tmp_path / "bob-new", role="node")
    server.enroll(node_id="bob", public_key_path=fresh.sign_public)
    assert server.revoked_nodes() == set()
    assert serforget(["keys", "revoke", "--registry", str(server.nodes_registry), "--node-id", "nobody"]) != 0


# ---------------------------------------------------------------- seen.json


def test_seen_json_entries_older_than_the_freshness_window_are_pruned(server: ServerDir) -> None:
    server.remember(["a" * 32], now=1_000.0)
    server.remember(["b" * 32], now=1_000.0 + REPLAY_WINDOW_S / 2)
    assert server.seen_ids() == {"a" * 32, "b" * 32}
    server.remember(["c" * 32], now=1_000.0 + REPLAY_WINDOW_S + 1)
    assert server.seen_ids() == {"b" * 32, "c" * 32}
    assert json.loads(server.seen_path.read_text())["format_version"] == 2


def test_seen_json_of_version_1_is_read_and_kept_one_more_window(server: ServerDir) -> None:
    server.seen_path.write_text(json.dumps({"format_version": 1, "envelope_ids": ["a" * 32]}))
    assert server.seen_ids() == {"a" * 32}
    server.remember(["b" * 32])
    assert server.seen_ids() == {"a" * 32, "b" * 32}


@pytest.mark.parametrize(
    "content",
    [
        '{"format_version": 1}',
        '{"format_version": 2, "envelopes": ["x"]}',
        '{"format_version": 2, "envelopes": {"x": "yesterday"}}',
        "[]",
        "{",
        '{"envelope_ids": []}',
    ],
)
def test_seen_json_malformed_is_a_clear_error_naming_the_file(server: ServerDir, content: str) -> None:
    server.seen_path.write_text(content)
    with pytest.raises(ServerStateError, match="seen.json"):
        server.seen_ids()
    with pytest.raises(ServerStateError, match="seen.json"):
        server.remember(["a" * 32])
    assert server.seen_path.read_text() == content  # nothing overwritten


# ---------------------------------------------------------------- one private-key policy


def test_pki_refuses_private_keys_readable_by_group_or_others(tmp_path: Path) -> None:
    ca = create_ca(out_dir=tmp_path / "pki")
    issue_server_certificate(ca=ca, out_dir=tmp_path / "pki", hosts=["127.0.0.1"])
    node = create_node_auth_key(out_dir=tmp_path / "node")
    for key in (ca.key, tmp_path / "pki" / "superlink.key", node.private):
        os.chmod(key, 0o644)
    with pytest.raises(PKIError, match="ca.key.*chmod 600"):
        create_ca(out_dir=tmp_path / "pki")
    os.chmod(ca.key, 0o600)
    with pytest.raises(PKIError, match="superlink.key.*chmod 600"):
        issue_server_certificate(ca=ca, out_dir=tmp_path / "pki", hosts=["127.0.0.1"])
    with pytest.raises(PKIError, match="flwr_auth.*chmod 600"):
        create_node_auth_key(out_dir=tmp_path / "node")


def test_revoke_with_deployment_unregisters_the_devices_supernode_key(
    tiny_corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    """``serforget keys revoke --deployment RUN``: nodes.json and the SuperLink (``flwr supernode unregister``)."""
    import subprocess

    import serforget.deploy.local as local
    from serforget.common.fsutil import atomic_write_json, sha256_file
    from serforget.common.manifest import by_speaker, read_manifest

    deployment = local.Deployment(tmp_path / "run", port=19092, control_port=19093)
    speaker, utts = next(iter(by_speaker(read_manifest(tiny_corpus)).items()))
    device = local.provision_device(deployment, name="000", speaker=speaker, utterances=utts, port=19094)
    atomic_write_json(
        deployment.registry_path,
        {
            "format_version": 1,
            "nodes": {
                sha256_file(device.auth_key.public): {"public_key": str(device.auth_key.public), "flower_node_id": 42}
            },
        },
    )
    atomic_write_json(
        deployment.root / "deployment.json",
        {
            "format_version": 1,
            "host": "127.0.0.1",
            "port": 19092,
            "control_host": "127.0.0.1",
            "control_port": 19093,
            "devices": ["000"],
        },
    )
    calls: list[list[str]] = []

    def fake_flwr(dep, args, *, timeout):
        calls.append(list(args))
        return subprocess.CompletedProcess(args, 0, stdout=json.dumps({"success": True}), stderr="")

    monkeypatch.setattr(local, "flwr", fake_flwr)
    node_id = device.node.node_id
    assert (
        serforget(
            [
                "keys",
                "revoke",
                "--registry",
                str(deployment.server.nodes_registry),
                "--node-id",
                node_id,
                "--deployment",
                str(deployment.root),
            ]
        )
        == 0
    )
    assert calls == [["supernode", "unregister", "42", local.CONNECTION, "--format", "json"]]
    assert json.loads(deployment.registry_path.read_text())["nodes"] == {}
    assert deployment.server.revoked_nodes() == {node_id}
