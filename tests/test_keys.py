"""Key files and node enrollment: round trips, strict loading, no silent overwrites."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from serforget.common import keys
from serforget.common.keys import (
    EnrollmentError,
    KeyFileError,
    UnsupportedSuiteError,
    enroll_node,
    fingerprint,
    generate_signing_key,
    init_keys,
    load_enrolled_nodes,
    load_hpke_private,
    load_hpke_public,
    load_signing_private,
    load_signing_public,
    public_key_file_fingerprint,
    save_private_key,
    save_public_key,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _raw(key: ed25519.Ed25519PublicKey | x25519.X25519PublicKey) -> bytes:
    return key.public_bytes_raw()


# --------------------------------------------------------------------------- save / load


def test_signing_key_round_trip_and_file_modes(tmp_path: Path) -> None:
    key = generate_signing_key()
    private_path = save_private_key(tmp_path / "k" / "sign.key", key)
    public_path = save_public_key(tmp_path / "k" / "sign.pub", key.public_key())
    assert _mode(private_path) == 0o600
    assert _mode(public_path) == 0o644
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    loaded = load_signing_private(private_path)
    assert _raw(loaded.public_key()) == _raw(key.public_key())
    assert _raw(load_signing_public(public_path)) == _raw(key.public_key())


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"nope\.key: key file not found"):
        load_signing_private(tmp_path / "nope.key")


def test_load_garbage_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sign.pub"
    path.write_bytes(b"not a key\n")
    with pytest.raises(KeyFileError, match=str(path)):
        load_signing_public(path)


def test_load_corrupted_pem_body_is_key_file_error(tmp_path: Path) -> None:
    path = tmp_path / "sign.key"
    save_private_key(path, generate_signing_key())
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="PEM block 1"):
        load_signing_private(path)


def test_load_rejects_content_outside_pem(tmp_path: Path) -> None:
    path = tmp_path / "sign.pub"
    save_public_key(path, generate_signing_key().public_key())
    path.write_bytes(path.read_bytes() + b"trailing junk\n")
    with pytest.raises(KeyFileError, match="outside the PEM blocks"):
        load_signing_public(path)


def test_load_wrong_key_type_is_rejected(tmp_path: Path) -> None:
    path = save_private_key(tmp_path / "hpke.key", x25519.X25519PrivateKey.generate())
    with pytest.raises(KeyFileError, match="expected one Ed25519 private key, found X25519PrivateKey"):
        load_signing_private(path)
    signing = save_private_key(tmp_path / "sign.key", generate_signing_key())
    with pytest.raises(KeyFileError, match="expected an X25519 private key"):
        load_hpke_private(signing)


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = save_private_key(tmp_path / "sign.key", generate_signing_key())
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_private(path)


def test_save_refuses_unserializable_hybrid_object(tmp_path: Path) -> None:
    if not keys.pq_hybrid_available():
        pytest.skip("ML-KEM hybrid not offered by this cryptography build")
    paths = init_keys(key_dir=tmp_path, role="server", suite="mlkem768-x25519")
    with pytest.raises(TypeError, match="cannot save"):
        save_private_key(tmp_path / "x.key", load_hpke_private(paths.hpke_private))


def test_fingerprint_is_first_16_hex_of_sha256_of_raw_bytes() -> None:
    public = generate_signing_key().public_key()
    assert fingerprint(public) == hashlib.sha256(_raw(public)).hexdigest()[:16]
    assert fingerprint(public) != fingerprint(generate_signing_key().public_key())


# --------------------------------------------------------------------------- init_keys


def test_init_keys_server_writes_all_files(tmp_path: Path) -> None:
    paths = init_keys(key_dir=tmp_path, role="server")
    assert paths.sign_private == tmp_path / "sign.key" and paths.hpke_public == tmp_path / "hpke.pub"
    assert paths.hpke_private is not None and paths.hpke_public is not None
    assert _mode(paths.sign_private) == 0o600 and _mode(paths.hpke_private) == 0o600
    private = load_hpke_private(paths.hpke_private)
    assert isinstance(private, x25519.X25519PrivateKey)
    assert _raw(load_hpke_public(paths.hpke_public)) == _raw(private.public_key())
    assert public_key_file_fingerprint(paths.hpke_public) == fingerprint(private.public_key())


def test_init_keys_node_writes_only_signing_key(tmp_path: Path) -> None:
    paths = init_keys(key_dir=tmp_path, role="node")
    assert paths.hpke_private is None and paths.hpke_public is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sign.key", "sign.pub"]


def test_init_keys_rerun_keeps_existing_keys(tmp_path: Path) -> None:
    first = init_keys(key_dir=tmp_path, role="server")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = init_keys(key_dir=tmp_path, role="server")
    assert second == first
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_init_keys_overwrite_rotates(tmp_path: Path) -> None:
    first = init_keys(key_dir=tmp_path, role="server")
    old_sign = first.sign_public.read_bytes()
    assert first.hpke_public is not None
    old_hpke = first.hpke_public.read_bytes()
    init_keys(key_dir=tmp_path, role="server", overwrite=True)
    assert first.sign_public.read_bytes() != old_sign
    assert first.hpke_public.read_bytes() != old_hpke


def test_init_keys_recreates_missing_public_from_private(tmp_path: Path) -> None:
    paths = init_keys(key_dir=tmp_path, role="server")
    assert paths.hpke_public is not None
    original = paths.sign_public.read_bytes(), paths.hpke_public.read_bytes()
    paths.sign_public.unlink()
    paths.hpke_public.unlink()
    init_keys(key_dir=tmp_path, role="server")
    assert (paths.sign_public.read_bytes(), paths.hpke_public.read_bytes()) == original


def test_init_keys_refuses_public_without_private(tmp_path: Path) -> None:
    paths = init_keys(key_dir=tmp_path, role="node")
    published = paths.sign_public.read_bytes()
    paths.sign_private.unlink()
    with pytest.raises(KeyFileError, match="exists without its private key"):
        init_keys(key_dir=tmp_path, role="node")
    assert paths.sign_public.read_bytes() == published


def test_init_keys_refuses_mismatched_pair(tmp_path: Path) -> None:
    paths = init_keys(key_dir=tmp_path, role="node")
    save_public_key(paths.sign_public, generate_signing_key().public_key())
    with pytest.raises(KeyFileError, match="does not match the private key"):
        init_keys(key_dir=tmp_path, role="node")


def test_init_keys_refuses_suite_change_without_overwrite(tmp_path: Path) -> None:
    if not keys.pq_hybrid_available():
        pytest.skip("ML-KEM hybrid not offered by this cryptography build")
    paths = init_keys(key_dir=tmp_path, role="server")
    assert paths.hpke_private is not None
    kept = paths.hpke_private.read_bytes()
    with pytest.raises(KeyFileError, match="holds a 'x25519' key"):
        init_keys(key_dir=tmp_path, role="server", suite="mlkem768-x25519")
    assert paths.hpke_private.read_bytes() == kept


def test_init_keys_rejects_unknown_suite_and_role(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown HPKE suite 'rsa'"):
        init_keys(key_dir=tmp_path, role="server", suite="rsa")
    with pytest.raises(ValueError, match="role must be"):
        init_keys(key_dir=tmp_path, role="client")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_hybrid_suite_keys(tmp_path: Path) -> None:
    if not keys.pq_hybrid_available():
        with pytest.raises(UnsupportedSuiteError, match="upgrade cryptography"):
            init_keys(key_dir=tmp_path, role="server", suite="mlkem768-x25519")
        return
    paths = init_keys(key_dir=tmp_path, role="server", suite="mlkem768-x25519")
    assert paths.hpke_private is not None and paths.hpke_public is not None
    assert paths.hpke_private.read_bytes().count(b"-----BEGIN PRIVATE KEY-----") == 2
    assert isinstance(load_hpke_private(paths.hpke_private), hpke.MLKEM768X25519PrivateKey)
    assert isinstance(load_hpke_public(paths.hpke_public), hpke.MLKEM768X25519PublicKey)
    assert len(public_key_file_fingerprint(paths.hpke_public)) == 16
    assert init_keys(key_dir=tmp_path, role="server", suite="mlkem768-x25519") == paths


def test_hybrid_suite_unsupported_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "pq_hybrid_available", lambda: False)
    with pytest.raises(UnsupportedSuiteError, match="mlkem768-x25519.*use suite 'x25519'"):
        init_keys(key_dir=tmp_path, role="server", suite="mlkem768-x25519")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- enrollment


@pytest.fixture()
def node_pub(tmp_path: Path) -> Path:
    return init_keys(key_dir=tmp_path / "node1", role="node").sign_public


def test_enroll_and_load(tmp_path: Path, node_pub: Path) -> None:
    registry = tmp_path / "server" / "nodes.json"
    enroll_node(registry_path=registry, node_id="node-1", public_key_path=node_pub)
    enrolled = load_enrolled_nodes(registry)
    assert list(enrolled) == ["node-1"]
    assert _raw(enrolled["node-1"]) == _raw(load_signing_public(node_pub))
    document = json.loads(registry.read_text())
    assert document["format"] == "serforget-node-registry" and document["version"] == 1


def test_reenroll_same_key_is_a_noop(tmp_path: Path, node_pub: Path) -> None:
    registry = tmp_path / "nodes.json"
    enroll_node(registry_path=registry, node_id="node-1", public_key_path=node_pub)
    before = registry.stat().st_mtime_ns, registry.read_bytes()
    enroll_node(registry_path=registry, node_id="node-1", public_key_path=node_pub)
    assert (registry.stat().st_mtime_ns, registry.read_bytes()) == before


def test_reenroll_different_key_needs_replace(tmp_path: Path, node_pub: Path) -> None:
    registry = tmp_path / "nodes.json"
    enroll_node(registry_path=registry, node_id="node-1", public_key_path=node_pub)
    kept = registry.read_bytes()
    other = init_keys(key_dir=tmp_path / "node1b", role="node").sign_public
    with pytest.raises(EnrollmentError, match="'node-1' is enrolled with key"):
        enroll_node(registry_path=registry, node_id="node-1", public_key_path=other)
    assert registry.read_bytes() == kept
    enroll_node(registry_path=registry, node_id="node-1", public_key_path=other, replace=True)
    assert _raw(load_enrolled_nodes(registry)["node-1"]) == _raw(load_signing_public(other))


def test_same_key_for_two_nodes_is_refused(tmp_path: Path, node_pub: Path) -> None:
    registry = tmp_path / "nodes.json"
    enroll_node(registry_path=registry, node_id="node-1", public_key_path=node_pub)
    with pytest.raises(EnrollmentError, match="already enrolled for node 'node-1'"):
        enroll_node(registry_path=registry, node_id="node-2", public_key_path=node_pub)


def test_enroll_several_nodes_keeps_all(tmp_path: Path) -> None:
    registry = tmp_path / "nodes.json"
    for index in range(3):
        pub = init_keys(key_dir=tmp_path / f"n{index}", role="node").sign_public
        enroll_node(registry_path=registry, node_id=f"n{index}", public_key_path=pub)
    assert sorted(load_enrolled_nodes(registry)) == ["n0", "n1", "n2"]


def test_enroll_rejects_bad_node_id_and_non_signing_key(tmp_path: Path, node_pub: Path) -> None:
    registry = tmp_path / "nodes.json"
    with pytest.raises(ValueError, match="node_id must be"):
        enroll_node(registry_path=registry, node_id="../etc", public_key_path=node_pub)
    hpke_pub = init_keys(key_dir=tmp_path / "srv", role="server").hpke_public
    assert hpke_pub is not None
    with pytest.raises(KeyFileError, match="expected one Ed25519 public key"):
        enroll_node(registry_path=registry, node_id="n", public_key_path=hpke_pub)
    assert not registry.exists()


def test_load_registry_errors_name_the_file(tmp_path: Path, node_pub: Path) -> None:
    registry = tmp_path / "nodes.json"
    with pytest.raises(KeyFileError, match="node registry not found"):
        load_enrolled_nodes(registry)
    registry.write_text("{broken")
    with pytest.raises(KeyFileError, match="unreadable node registry"):
        load_enrolled_nodes(registry)
    registry.write_text(json.dumps({"format": "serforget-node-registry", "version": 99, "nodes": {}}))
    with pytest.raises(KeyFileError, match="unsupported registry version 99"):
        load_enrolled_nodes(registry)
    with pytest.raises(KeyFileError, match="unsupported registry version"):
        enroll_node(registry_path=registry, node_id="n", public_key_path=node_pub)
    assert json.loads(registry.read_text())["version"] == 99  # an unreadable registry is never rewritten


def test_load_registry_detects_edited_fingerprint(tmp_path: Path, node_pub: Path) -> None:
    registry = tmp_path / "nodes.json"
    enroll_node(registry_path=registry, node_id="node-1", public_key_path=node_pub)
    document = json.loads(registry.read_text())
    document["nodes"]["node-1"]["fingerprint"] = "0" * 16
    registry.write_text(json.dumps(document))
    with pytest.raises(KeyFileError, match=r"nodes\['node-1'\]\.fingerprint"):
        load_enrolled_nodes(registry)
