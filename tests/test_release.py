"""Tests for the signed release registry and its HTTP server (torch-free, dummy weight files)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serforget.common import release as release_mod
from serforget.common.release import (
    MANIFEST_FORMAT_VERSION,
    ReleaseError,
    ReleaseManifest,
    ReleaseRegistry,
    sign_bytes,
)
from tests.helpers.releases import write_format_one

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkpoint(tmp_path: Path) -> dict[str, Path]:
    """A fake checkpoint: random 'weights' and a small JSON config."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "model.json").write_text(json.dumps({"arch": "cnn", "labels": ["neutral", "happy"]}))
    return {"model.safetensors": folder / "model.safetensors", "model.json": folder / "model.json"}


def _get(url: str, raw_path: str) -> tuple[int, bytes]:
    """GET with the path sent byte-for-byte (no client-side normalisation of '..')."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    try:
        connection.request("GET", raw_path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --------------------------------------------------------------------------- publish / verify


def test_publish_verify_round_trip(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    first = registry.publish(files=checkpoint, signing_key=key, parent=None, metrics={"uar": 0.61}, notes={"round": 3})
    second = registry.publish(
        files=checkpoint, signing_key=key, parent=1, applied_request_ids=["req-1"], revoke_previous=True
    )

    assert registry.versions() == [1, 2]
    assert registry.path(1).name == "v0001"
    assert registry.verify(1, public_key=key.public_key()) == first
    assert registry.verify(2, public_key=key.public_key()) == second
    assert registry.manifest(2) == second
    assert second.parent == 1 and second.applied_request_ids == ("req-1",)
    assert first.metrics == {"uar": 0.61} and first.notes == {"round": 3}
    assert first.format_version == second.format_version == MANIFEST_FORMAT_VERSION == 2
    for name, source in checkpoint.items():
        assert (registry.path(2) / name).read_bytes() == source.read_bytes()
        assert first.files[name]["size"] == source.stat().st_size
        assert not (registry.path(1) / name).exists()  # v1 is revoked: a tombstone, see test_release_attacks
    # The manifest on disk is exactly the canonical bytes that were signed.
    assert (registry.path(2) / "manifest.json").read_bytes() == second.to_bytes()


def test_manifest_rejects_traversal_names_and_unknown_fields(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    manifest = registry.publish(files=checkpoint, signing_key=key, parent=None)
    doc = json.loads(manifest.to_bytes())
    doc["files"]["../escape"] = doc["files"].pop("model.json")
    with pytest.raises(ReleaseError, match="escape"):
        ReleaseManifest.from_bytes(json.dumps(doc).encode(), source="crafted")
    doc = json.loads(manifest.to_bytes())
    doc["format_version"] = 99
    with pytest.raises(ReleaseError, match="format_version"):
        ReleaseManifest.from_bytes(json.dumps(doc).encode(), source="crafted")
    doc = json.loads(manifest.to_bytes())
    doc["surprise"] = 1
    with pytest.raises(ReleaseError, match="surprise"):
        ReleaseManifest.from_bytes(json.dumps(doc).encode(), source="crafted")


def test_releases_of_manifest_format_1_still_verify_and_new_ones_are_format_2(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release published before the rename (``applies_requests``) is never lost: it verifies,
    its request ids are read, and re-serialising it gives back its signed bytes; the writer
    writes format 2 (``applied_request_ids``) only."""
    write_format_one(monkeypatch)
    registry.publish(files=checkpoint, signing_key=key, parent=None, applied_request_ids=["req-old"])
    monkeypatch.undo()
    old_doc = json.loads((registry.path(1) / "manifest.json").read_bytes())
    assert old_doc["format_version"] == 1 and old_doc["applies_requests"] == ["req-old"]
    assert "applied_request_ids" not in old_doc

    new = registry.publish(files=checkpoint, signing_key=key, parent=1, applied_request_ids=["req-new"])
    new_doc = json.loads((registry.path(2) / "manifest.json").read_bytes())
    assert new_doc["format_version"] == 2 and new_doc["applied_request_ids"] == ["req-new"]
    assert "applies_requests" not in new_doc

    old = registry.verify(1, public_key=key.public_key())
    assert (old.format_version, old.applied_request_ids) == (1, ("req-old",))
    assert old.to_bytes() == (registry.path(1) / "manifest.json").read_bytes()
    assert registry.verify(2, public_key=key.public_key()) == new
    assert registry.read_index(public_key=key.public_key()).sequence >= 2


@pytest.mark.parametrize(
    ("format_version", "fields", "message"),
    [
        (
            2,
            {"applied_request_ids": ["r1"], "applies_requests": ["r2"]},
            "'applies_requests' does not belong to manifest format 2",
        ),
        (
            1,
            {"applied_request_ids": ["r1"], "applies_requests": ["r2"]},
            "'applied_request_ids' does not belong to manifest format 1",
        ),
        (2, {}, r"missing fields \['applied_request_ids'\]"),
        (1, {}, r"missing fields \['applies_requests'\]"),
        (2, {"applies_requests": ["r1"]}, "'applies_requests' does not belong to manifest format 2"),
        (1, {"applied_request_ids": ["r1"]}, "'applied_request_ids' does not belong to manifest format 1"),
        (True, {"applied_request_ids": ["r1"]}, "format_version True is not supported"),
    ],
)
def test_hostile_manifest_with_both_or_neither_request_field_is_refused_even_when_signed(
    registry: ReleaseRegistry,
    checkpoint: dict[str, Path],
    key: Ed25519PrivateKey,
    format_version: object,
    fields: dict,
    message: str,
) -> None:
    manifest = registry.publish(files=checkpoint, signing_key=key, parent=None)
    doc = json.loads(manifest.to_bytes())
    del doc["applied_request_ids"]
    data = json.dumps({**doc, "format_version": format_version, **fields}).encode()
    with pytest.raises(ReleaseError, match=message):
        ReleaseManifest.from_bytes(data, source="crafted")
    # signed with the real key and put in place, it is still refused, naming the file
    (registry.path(1) / "manifest.json").write_bytes(data)
    (registry.path(1) / "manifest.sig").write_bytes(sign_bytes(data, signing_key=key))
    with pytest.raises(ReleaseError, match=message):
        registry.verify(1, public_key=key.public_key())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"files": {"../evil": "checkpoint"}}, "file name"),
        ({"files": {".hidden": "checkpoint"}}, "file name"),
        ({"files": {"manifest.json": "checkpoint"}}, "reserved"),
        ({"files": {"model.bin": Path("/nonexistent/model.bin")}}, "not an existing regular file"),
        ({"parent": 7}, "parent release 7"),
        ({"reason": "why"}, "revoke_previous"),
        ({"metrics": {"uar": float("nan")}}, "metrics"),
        ({"metrics": {"uar": object()}}, "metrics"),
        ({"applied_request_ids": ["a", "a"]}, "duplicate"),
        ({"files": {}}, "at least one"),
    ],
)
def test_publish_rejects_bad_input_without_writing(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey, kwargs: dict, message: str
) -> None:
    arguments = {"files": checkpoint, "signing_key": key, "parent": None, **kwargs}
    # "checkpoint" stands for a real source file, so only the release name is at fault.
    arguments["files"] = {
        name: checkpoint["model.json"] if src == "checkpoint" else src for name, src in arguments["files"].items()
    }
    with pytest.raises(ReleaseError, match=message):
        registry.publish(**arguments)
    assert registry.versions() == []


def test_publish_requires_an_ed25519_private_key(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    with pytest.raises(TypeError, match="Ed25519PrivateKey"):
        registry.publish(files=checkpoint, signing_key=key.public_key(), parent=None)


def _tamper_file(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def _tamper_manifest(folder: Path) -> None:
    path = folder / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"parent":null', b'"parent":null '))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_tamper_file, "SHA-256"),
        (_tamper_manifest, "signature does not verify"),
        (lambda folder: (folder / "manifest.sig").unlink(), "manifest.sig: missing"),
        (lambda folder: (folder / "model.json").unlink(), r"missing \['model.json'\]"),
        (lambda folder: (folder / "extra.onnx").write_bytes(b"x"), r"extra \['extra.onnx'\]"),
        (lambda folder: (folder / "model.json").write_bytes(b"{}"), "size"),
    ],
)
def test_verify_detects_tampering(
    registry: ReleaseRegistry,
    checkpoint: dict[str, Path],
    key: Ed25519PrivateKey,
    tamper: Callable[[Path], None],
    message: str,
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    tamper(registry.path(1))
    with pytest.raises(ReleaseError, match=message):
        registry.verify(1, public_key=key.public_key())


def test_verify_rejects_wrong_key(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    stranger = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ReleaseError, match="signature does not verify"):
        registry.verify(1, public_key=stranger)
    with pytest.raises(ReleaseError, match="signature does not verify"):
        registry.latest(public_key=stranger)
    with pytest.raises(ReleaseError, match="signature does not verify"):
        registry.read_index(public_key=stranger)


# --------------------------------------------------------------------------- crash safety


def test_failure_mid_publish_leaves_only_complete_releases(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    real_copy = release_mod._copy_with_digest
    copies = []

    def copy_then_die(source: Path, target: Path) -> dict:
        copies.append(target.name)
        if len(copies) == 2:
            raise OSError("simulated disk failure mid-publish")
        return real_copy(source, target)

    monkeypatch.setattr(release_mod, "_copy_with_digest", copy_then_die)
    with pytest.raises(OSError, match="simulated"):
        registry.publish(files=checkpoint, signing_key=key, parent=1)
    monkeypatch.undo()

    assert registry.versions() == [1]
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".staging-")]
    assert [e.version for e in registry.read_index(public_key=key.public_key()).releases] == [1]
    again = registry.publish(files=checkpoint, signing_key=key, parent=1)
    assert again.version == 2
    registry.verify(2, public_key=key.public_key())


def test_hard_crash_leftovers_are_ignored_then_cleaned(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    # What a killed process leaves: a half-filled staging folder that was never renamed.
    leftover = registry.root / ".staging-killed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    (registry.root / "v01").mkdir()  # not a canonical version name either

    assert registry.versions() == [1]
    assert registry.latest(public_key=key.public_key()).version == 1
    registry.publish(files=checkpoint, signing_key=key, parent=1)
    assert registry.versions() == [1, 2]
    assert not leftover.exists()


def test_crash_after_commit_before_index_is_repaired(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)

    def die(self: ReleaseRegistry, *, signing_key: Ed25519PrivateKey) -> None:
        raise KeyboardInterrupt("simulated kill before the index update")

    monkeypatch.setattr(ReleaseRegistry, "_write_index", die)
    with pytest.raises(KeyboardInterrupt):
        registry.publish(files=checkpoint, signing_key=key, parent=1)
    monkeypatch.undo()

    # The release is complete (rename was the commit point) but the signed index is stale.
    assert registry.versions() == [1, 2]
    registry.verify(2, public_key=key.public_key())
    stale = registry.read_index(public_key=key.public_key())
    assert [e.version for e in stale.releases] == [1]
    fresh = registry.refresh_index(signing_key=key)
    assert [e.version for e in fresh.releases] == [1, 2]
    assert fresh.sequence == stale.sequence + 1


def test_existing_release_is_never_overwritten(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    staging = tmp_path / "other"
    staging.mkdir()
    with pytest.raises(ReleaseError, match="append-only"):
        release_mod._commit_staged_release(staging, registry.path(1))
    registry.verify(1, public_key=key.public_key())


# --------------------------------------------------------------------------- revocation and index


def test_revocation_hides_release_and_is_logged(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    registry.publish(files=checkpoint, signing_key=key, parent=1)
    registry.revoke(versions=[2], reason="trained on a revoked consent", signing_key=key)

    assert registry.revoked() == {2: "trained on a revoked consent"}
    assert registry.latest().version == 1
    assert registry.latest(public_key=key.public_key()).version == 1
    index = registry.read_index(public_key=key.public_key())
    assert index.revoked() == {2: "trained on a revoked consent"}
    assert index.newest_available().version == 1

    third = registry.publish(
        files=checkpoint, signing_key=key, parent=1, applied_request_ids=["del-9"], revoke_previous=True
    )
    assert set(registry.revoked()) == {1, 2}
    assert "del-9" in registry.revoked()[1]
    assert registry.revoked()[2] == "trained on a revoked consent"  # first reason is kept
    assert registry.latest(public_key=key.public_key()) == third
    # Append-only log: one signed entry per revocation, the earlier one untouched.
    assert sorted(p.name for p in (registry.root / "revocations").iterdir()) == ["r000001.json", "r000002.json"]
    # publish, publish, revoke, then the revoking publish signs the index twice: once with the
    # revocation (before the new release exists), once with the new release
    assert registry.read_index(public_key=key.public_key()).sequence == 5


def test_revoke_rejects_bad_requests(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    with pytest.raises(ReleaseError, match=r"unknown releases \[5\]"):
        registry.revoke(versions=[5], reason="x", signing_key=key)
    with pytest.raises(ReleaseError, match="reason"):
        registry.revoke(versions=[1], reason=" ", signing_key=key)
    with pytest.raises(ReleaseError, match="no versions"):
        registry.revoke(versions=[], reason="x", signing_key=key)
    assert registry.revoked() == {}


def test_forged_revocation_entry_is_detected(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    registry.publish(files=checkpoint, signing_key=key, parent=1)
    registry.revoke(versions=[2], reason="bad", signing_key=key)
    entry_path = registry.root / "revocations" / "r000001.json"
    doc = json.loads(entry_path.read_bytes())
    doc["entry"]["versions"] = [1, 2]
    entry_path.write_text(json.dumps(doc))
    with pytest.raises(ReleaseError, match="r000001.json: signature does not verify"):
        registry.latest(public_key=key.public_key())
    with pytest.raises(ReleaseError, match="signature does not verify"):
        registry.refresh_index(signing_key=key)


def test_latest_is_none_when_everything_is_revoked(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    assert registry.latest() is None
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    registry.revoke(versions=[1], reason="deleted", signing_key=key)
    assert registry.latest(public_key=key.public_key()) is None


def test_tampered_index_is_refused(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    index_file = registry.root / "index" / "g000001.json"
    index_file.write_bytes(index_file.read_bytes().replace(b'"revoked":false', b'"revoked":true '))
    with pytest.raises(ReleaseError, match="signature does not verify"):
        registry.read_index(public_key=key.public_key())


# --------------------------------------------------------------------------- HTTP serving


def test_serves_index_and_release_files(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey, serve_http
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    address = serve_http(registry.root)
    index_bytes, signature = registry.read_index_files()
    assert _get(address, "/index.json") == (200, index_bytes)
    assert _get(address, "/index.sig") == (200, signature)
    assert _get(address, "/v0001/model.safetensors") == (200, checkpoint["model.safetensors"].read_bytes())
    assert _get(address, "/v0001/manifest.json") == (200, (registry.path(1) / "manifest.json").read_bytes())


def test_index_is_404_before_first_publish(registry: ReleaseRegistry, serve_http) -> None:
    registry.root.mkdir(parents=True)
    assert _get(serve_http(registry.root), "/index.json")[0] == 404


def test_revoked_release_is_gone(
    registry: ReleaseRegistry, checkpoint: dict[str, Path], key: Ed25519PrivateKey, serve_http
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    registry.publish(files=checkpoint, signing_key=key, parent=1)
    address = serve_http(registry.root)
    assert _get(address, "/v0001/model.json")[0] == 200
    registry.revoke(versions=[1], reason="forgotten speaker", signing_key=key)
    for name in ("model.json", "model.safetensors", "manifest.json", "manifest.sig"):
        status, body = _get(address, f"/v0001/{name}")
        assert status == 410 and b"forgotten speaker" in body
    assert _get(address, "/v0002/model.json")[0] == 200


@pytest.mark.parametrize(
    "raw_path",
    [
        "/",
        "/v0001/",
        "/v0001",
        "/index",
        "/v0001/../../secret.txt",
        "/v0001/..%2f..%2fsecret.txt",
        "/../secret.txt",
        "/secret.txt",
        "//secret.txt",
        "/v0001/notes.txt",
        "/v0001/%2e%2e",
        "/v1/model.json",
        "/v00001/model.json",
        "/v0009/model.json",
        "/.lock",
        "/revocations/r000001.json",
        "/index/HEAD.json",
    ],
)
def test_no_listing_or_path_traversal(
    registry: ReleaseRegistry,
    checkpoint: dict[str, Path],
    key: Ed25519PrivateKey,
    serve_http,
    raw_path: str,
    tmp_path: Path,
) -> None:
    registry.publish(files=checkpoint, signing_key=key, parent=None)
    secret = b"TOP-SECRET-NOT-A-RELEASE"
    (tmp_path / "secret.txt").write_bytes(secret)
    (registry.root / "secret.txt").write_bytes(secret)
    (registry.path(1) / "notes.txt").write_bytes(secret)  # present on disk but not in the manifest
    status, body = _get(serve_http(registry.root), raw_path)
    assert status == 404
    assert secret not in body and b"model" not in body


# --------------------------------------------------------------------------- edge constraints


def test_release_module_does_not_import_torch() -> None:
    code = "import sys, serforget.common.release; assert 'torch' not in sys.modules and 'flwr' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
