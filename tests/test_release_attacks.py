"""Attacks on release distribution (issue 11): each test reproduces one attack and shows it refused.

Names say what is attacked: ``recursion`` (deeply nested JSON in a signature file),
``slow_retrieval`` / ``endless_data`` (a server that drips or floods bytes), ``rollback``,
``freeze``, ``mix_and_match``, ``arbitrary_software``, ``key_rotation``, ``tombstone`` (revoked
model files deleted). The HTTP attackers are real servers on 127.0.0.1 in threads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serforget.common.edge.pull import PullError, current_release, pull_release
from serforget.common.keys import init_keys, load_signing_private
from serforget.common.release import (
    DEFAULT_INDEX_LIFETIME_S,
    IndexEntry,
    ReleaseError,
    ReleaseIndex,
    ReleaseRegistry,
    check_signed_manifest,
    parse_signed_index,
    sign_bytes,
)
from tests.helpers.http import ThreadedServers

REPO_ROOT = Path(__file__).resolve().parents[1]
NESTED = b"[" * 4096


@pytest.fixture
def published(registry: ReleaseRegistry, tmp_path: Path, key: Ed25519PrivateKey) -> Callable[..., int]:
    counter = iter(range(1_000))

    def publish(**kwargs) -> int:
        folder = tmp_path / f"ckpt-{next(counter)}"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(os.urandom(4096))
        parent = registry.versions()[-1] if registry.versions() else None
        signing_key = kwargs.pop("signing_key", key)
        return registry.publish(
            files={"model.onnx": folder / "model.onnx"}, signing_key=signing_key, parent=parent, **kwargs
        ).version

    return publish


# --------------------------------------------------------------------------- recursion


def test_recursion_nested_signature_files_are_a_release_error(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ReleaseError, match="nested too deeply"):
        parse_signed_index(b"{}", NESTED, public_key=key.public_key(), source="index")
    with pytest.raises(ReleaseError, match="nested too deeply"):
        check_signed_manifest(b"{}", NESTED, public_key=key.public_key(), source="manifest")


@pytest.mark.parametrize("victim", ["index", "manifest"])
def test_recursion_nested_sig_is_refused_by_pull(
    victim: str, registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path
) -> None:
    version = published()
    if victim == "index":
        (registry.root / "index" / "g000001.sig").write_bytes(NESTED)
    else:
        (registry.path(version) / "manifest.sig").write_bytes(NESTED)
    with pytest.raises(PullError, match="nested too deeply"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    assert current_release(dest) is None


def test_recursion_nested_sig_is_one_line_in_the_cli(tmp_path: Path, registry: ReleaseRegistry, published) -> None:
    keys = init_keys(key_dir=tmp_path / "keys", role="server")
    published(signing_key=load_signing_private(keys.sign_private))
    (registry.root / "index" / "g000001.sig").write_bytes(NESTED)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "serforget",
            "edge",
            "pull",
            "--from",
            str(registry.root),
            "--to",
            str(tmp_path / "dev"),
            "--server-key",
            str(keys.sign_public),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and "RecursionError" not in run.stderr
    assert "nested too deeply" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- slow retrieval, endless data


class _Attacker(BaseHTTPRequestHandler):
    """A hostile release server; ``mode`` picks the attack. Every loop is bounded, so a test that
    does not cut the connection still ends (and then fails on its assertion)."""

    mode = "drip-body"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802
        try:
            if self.mode == "drip-headers":
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Pad: ")
                for i in range(200):  # one header byte every 50 ms: each read is fast, the whole is not
                    self.wfile.write(b"\r\nX-Pad: " if i % 40 == 39 else b"X")
                    self.wfile.flush()
                    threading.Event().wait(0.05)
            elif self.mode == "drip-body":
                self.send_response(200)
                self.send_header("Content-Length", "2000")  # within every small-file budget
                self.end_headers()
                for _ in range(200):
                    self.wfile.write(b"[")
                    self.wfile.flush()
                    threading.Event().wait(0.05)
            elif self.mode == "huge-length":
                self.send_response(200)
                self.send_header("Content-Length", str(10**12))
                self.end_headers()
                self.wfile.write(b"[" * 65536)
            elif self.mode == "endless":
                self.send_response(200)
                self.end_headers()  # no Content-Length: the body runs until the server closes
                block = b" " * (1 << 20)
                for _ in range(40):
                    self.wfile.write(block)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


@pytest.fixture
def attacker() -> Iterator[Callable[[str], str]]:
    servers = ThreadedServers()

    def start(mode: str) -> str:
        handler = type("Handler", (_Attacker,), {"mode": mode})
        return servers.start(ThreadingHTTPServer(("127.0.0.1", 0), handler))

    yield start
    servers.stop_all()


@pytest.mark.parametrize("mode", ["drip-body", "drip-headers"])
def test_slow_retrieval_is_cut_at_the_total_deadline(mode: str, attacker, dest: Path, key: Ed25519PrivateKey) -> None:
    # every byte arrives well within the 0.5-s read timeout, so only a total deadline stops it
    with pytest.raises(PullError, match="deadline"):
        pull_release(source=attacker(mode), dest=dest, server_public_key=key.public_key(), timeout_s=0.5, min_rate=1e9)
    assert current_release(dest) is None


@pytest.mark.parametrize("mode", ["huge-length", "endless"])
def test_endless_data_is_refused_at_the_size_budget(mode: str, attacker, dest: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(PullError, match=r"larger than the \d+-byte limit"):
        pull_release(source=attacker(mode), dest=dest, server_public_key=key.public_key())
    assert current_release(dest) is None


# --------------------------------------------------------------------------- freshness: freeze, rollback


DAY = 24 * 3600.0


def _plant_index(registry: ReleaseRegistry, index: ReleaseIndex, key: Ed25519PrivateKey) -> None:
    """Make ``index`` (signed with ``key``) the one the registry serves, as a hostile mirror would."""
    folder = registry.root / "index"
    data = index.to_bytes()
    (folder / f"g{index.sequence:06d}.json").write_bytes(data)
    (folder / f"g{index.sequence:06d}.sig").write_bytes(sign_bytes(data, signing_key=key))
    (folder / "HEAD.json").write_text(json.dumps({"format_version": 1, "generation": index.sequence}))


def _clock(monkeypatch: pytest.MonkeyPatch, offset_s: float) -> None:
    """Move the device's clock (and the registry's) ``offset_s`` into the future."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + offset_s)


def test_freeze_an_expired_index_is_refused_and_a_resigned_one_accepted(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published()
    pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    frozen = registry.read_index(public_key=key.public_key())
    assert frozen.expires == pytest.approx(frozen.generated_at + DEFAULT_INDEX_LIFETIME_S)

    _clock(monkeypatch, DEFAULT_INDEX_LIFETIME_S + 60)  # the attacker keeps serving the same index
    with pytest.raises(PullError, match=r"expired .* \(freeze\)"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    assert current_release(dest) == dest / "releases" / "v0001"  # availability kept, nothing new trusted

    registry.refresh_index(signing_key=key)  # the honest server re-signs on schedule
    assert pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key()).version == 1


def test_freeze_an_index_without_expiry_is_refused(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path
) -> None:
    published()
    current = registry.read_index(public_key=key.public_key())
    legacy = ReleaseIndex(
        sequence=current.sequence + 1, generated_at=time.time(), releases=current.releases, format_version=1
    )
    _plant_index(registry, legacy, key)
    with pytest.raises(PullError, match="no signed expiry"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())


@pytest.mark.parametrize(
    ("generated", "expires", "message"),
    [
        (0.0, 400 * DAY, "more than"),  # an index signed to live for a year defeats expiry
        (3600.0, 3600.0 + DAY, "in the future"),  # generated_at is checked against the device clock
    ],
)
def test_freeze_implausible_index_lifetimes_are_refused(
    registry: ReleaseRegistry,
    published,
    key: Ed25519PrivateKey,
    dest: Path,
    generated: float,
    expires: float,
    message: str,
) -> None:
    published()
    current = registry.read_index(public_key=key.public_key())
    now = time.time()
    odd = ReleaseIndex(
        sequence=current.sequence + 1, generated_at=now + generated, releases=current.releases, expires=now + expires
    )
    _plant_index(registry, odd, key)
    with pytest.raises(PullError, match=message):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())


def test_rollback_a_fresh_device_refuses_an_old_index_below_its_trust_anchor(
    tmp_path: Path,
    registry: ReleaseRegistry,
    published,
    key: Ed25519PrivateKey,
    dest: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    published()
    stale_mirror = tmp_path / "stale-mirror"
    shutil.copytree(registry.root, stale_mirror)  # still lists v1 as live
    published(revoke_previous=True, applied_request_ids=["del-1"])
    anchor = registry.read_index(public_key=key.public_key()).sequence  # shipped in the device image

    with pytest.raises(PullError, match="rollback"):
        pull_release(source=str(stale_mirror), dest=dest, server_public_key=key.public_key(), min_sequence=anchor)
    assert current_release(dest) is None and not (dest / "releases" / "v0001").exists()

    # without an anchor, expiry still bounds the replay: a week later the stale index is dead
    _clock(monkeypatch, DEFAULT_INDEX_LIFETIME_S + 60)
    with pytest.raises(PullError, match="expired"):
        pull_release(source=str(stale_mirror), dest=tmp_path / "other-device", server_public_key=key.public_key())
    assert not (tmp_path / "other-device" / "releases" / "v0001").exists()


def test_rollback_the_seen_sequence_is_persisted_even_when_the_download_fails(
    tmp_path: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path
) -> None:
    published()
    stale_mirror = tmp_path / "stale-mirror"
    shutil.copytree(registry.root, stale_mirror)
    published(revoke_previous=True, applied_request_ids=["del-1"])
    (registry.path(2) / "model.onnx").write_bytes(b"truncated")  # the new release cannot be installed
    with pytest.raises(PullError):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    with pytest.raises(PullError, match="rollback"):
        pull_release(source=str(stale_mirror), dest=dest, server_public_key=key.public_key())
    assert not (dest / "releases" / "v0001").exists()


def test_rollback_a_different_index_under_an_accepted_sequence_is_refused(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path
) -> None:
    published()
    published(revoke_previous=True, applied_request_ids=["del-1"])
    pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    # the byte-identical index again is fine (nothing changed on the server)
    assert pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key()).changed is False

    current = registry.read_index(public_key=key.public_key())
    unrevoked = tuple(IndexEntry(e.version, e.manifest_sha256, False, "") for e in current.releases)
    twin = ReleaseIndex(
        sequence=current.sequence,
        generated_at=current.generated_at + 1,
        releases=unrevoked[:1],
        expires=current.expires,
    )
    _plant_index(registry, twin, key)
    with pytest.raises(PullError, match="differs from the index already accepted"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    assert current_release(dest) == dest / "releases" / "v0002"


# --------------------------------------------------------------------------- arbitrary software, mix-and-match, extraneous files


def test_arbitrary_software_unsigned_model_and_foreign_key_are_refused(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path
) -> None:
    published()
    (registry.path(1) / "model.onnx").write_bytes(b"\x00" * 4096)  # same size, attacker's bytes
    with pytest.raises(PullError, match="SHA-256 does not match"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    with pytest.raises(PullError, match="does not verify"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=Ed25519PrivateKey.generate().public_key())
    assert current_release(dest) is None


def test_mix_and_match_a_manifest_from_another_release_is_refused(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path
) -> None:
    published()
    published()
    for name in ("manifest.json", "manifest.sig"):  # v2's folder now carries v1's (validly signed) manifest
        shutil.copy(registry.path(1) / name, registry.path(2) / name)
    with pytest.raises(PullError, match="does not match the hash in the signed index"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())


def test_extraneous_dependencies_unlisted_files_are_never_installed(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path
) -> None:
    published()
    (registry.path(1) / "evil.onnx").write_bytes(b"not in the manifest")
    installed = pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key()).path
    assert sorted(p.name for p in installed.iterdir()) == ["manifest.json", "manifest.sig", "model.onnx"]
    (installed / "evil.onnx").write_bytes(b"planted on the device")  # a local extra is caught too
    result = pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    assert result.changed and not (result.path / "evil.onnx").exists()


# --------------------------------------------------------------------------- tombstones of revoked releases


def test_tombstone_revoked_release_files_are_deleted_and_its_signed_manifest_kept(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path
) -> None:
    published()
    manifest_before = (registry.path(1) / "manifest.json").read_bytes()
    published(revoke_previous=True, applied_request_ids=["del-1"])
    assert sorted(p.name for p in registry.path(1).iterdir()) == ["manifest.json", "manifest.sig"]
    assert (registry.path(1) / "manifest.json").read_bytes() == manifest_before
    tombstone = registry.verify(1, public_key=key.public_key())  # the hashes still verify as a signed record
    assert set(tombstone.files) == {"model.onnx"}
    assert registry.latest(public_key=key.public_key()).version == 2
    # an explicit revoke of the newest buries it too, and the device is left with nothing to install
    registry.revoke(versions=[2], reason="test", signing_key=key)
    assert not (registry.path(2) / "model.onnx").exists()
    with pytest.raises(PullError, match="every release is revoked"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())


def test_tombstone_a_burial_cut_short_is_finished_by_the_next_writer(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    published()
    monkeypatch.setattr(ReleaseRegistry, "_bury_revoked", lambda self, **kwargs: None)  # crash before the deletion
    registry.revoke(versions=[1], reason="test", signing_key=key)
    assert (registry.path(1) / "model.onnx").exists()
    monkeypatch.undo()
    registry.refresh_index(signing_key=key)
    assert not (registry.path(1) / "model.onnx").exists()


def test_tombstone_revoked_release_is_not_served_over_http(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, serve_http
) -> None:
    import urllib.error
    import urllib.request

    published()
    published(revoke_previous=True, applied_request_ids=["del-1"])
    url = serve_http(registry.root)
    for name in ("model.onnx", "manifest.json"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/v0001/{name}", timeout=5)
        assert refused.value.code == 410
        refused.value.close()


# --------------------------------------------------------------------------- key compromise and rotation


def test_key_rotation_devices_follow_it_and_then_refuse_the_compromised_key(
    tmp_path: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path
) -> None:
    published()
    published(revoke_previous=True, applied_request_ids=["del-1"])
    pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    stolen = key  # the old key leaked: the operator rotates to a new one
    new_key = Ed25519PrivateKey.generate()
    assert registry.rotate_key(pinned=key.public_key(), old_signing_key=key, new_signing_key=new_key) == 2
    assert registry.verify(2, public_key=new_key.public_key())  # manifests re-signed, contents unchanged
    published(signing_key=new_key)

    result = pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    assert result.version == 3
    assert json.loads((dest / "current.json").read_text())["key_version"] == 2
    # a fresh device provisioned with the original key follows the same chain
    assert (
        pull_release(source=str(registry.root), dest=tmp_path / "fresh", server_public_key=key.public_key()).version
        == 3
    )

    # the attacker signs a newer index with the stolen key that resurrects revoked v1, on a mirror hiding the rotation
    mirror = tmp_path / "evil-mirror"
    shutil.copytree(registry.root, mirror)
    shutil.rmtree(mirror / "root")
    current = registry.read_index(public_key=new_key.public_key())
    evil = ReleaseIndex(
        sequence=current.sequence + 5,
        generated_at=time.time(),
        expires=time.time() + DAY,
        releases=tuple(IndexEntry(e.version, e.manifest_sha256, False, "") for e in current.releases[:1]),
    )
    _plant_index(ReleaseRegistry(mirror), evil, stolen)
    with pytest.raises(PullError, match="does not verify"):
        pull_release(source=str(mirror), dest=dest, server_public_key=key.public_key())
    assert current_release(dest) == dest / "releases" / "v0003"


@pytest.mark.parametrize("forgery", ["only-old-key", "unrelated-key", "wrong-version"])
def test_key_rotation_forged_rotations_are_refused(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path, forgery: str
) -> None:
    from serforget.common.release import encode_rotation, rotation_name

    published()
    pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    attacker = Ed25519PrivateKey.generate()
    if forgery == "only-old-key":  # the new key's own signature is someone else's
        doc = json.loads(encode_rotation(version=2, old_signing_key=key, new_signing_key=attacker))
        doc["signature_by_new"] = Ed25519PrivateKey.generate().sign(b"x").hex()
        data = json.dumps(doc).encode()
    elif forgery == "unrelated-key":
        data = encode_rotation(version=2, old_signing_key=Ed25519PrivateKey.generate(), new_signing_key=attacker)
    else:
        data = encode_rotation(version=3, old_signing_key=key, new_signing_key=attacker)
    (registry.root / "root").mkdir()
    (registry.root / rotation_name(2)).write_bytes(data)
    with pytest.raises(PullError, match="does not verify|does not trust|expected 2"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    assert json.loads((dest / "current.json").read_text())["key_version"] == 1


def test_key_rotation_is_served_over_http(
    registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path, serve_http
) -> None:
    published()
    new_key = Ed25519PrivateKey.generate()
    registry.rotate_key(pinned=key.public_key(), old_signing_key=key, new_signing_key=new_key)
    assert pull_release(source=serve_http(registry.root), dest=dest, server_public_key=key.public_key()).version == 1
    assert json.loads((dest / "current.json").read_text())["key_version"] == 2
