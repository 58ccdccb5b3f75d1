"""Tests for pulling signed releases onto an edge device, from a folder and over real HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serforget.common.edge.pull import PullError, current_release, pull_release
from serforget.common.release import ReleaseRegistry, sign_bytes
from tests.helpers.releases import write_format_one

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_files(tmp_path: Path) -> Callable[[str], dict[str, Path]]:
    """Dummy checkpoint + ONNX files whose content differs per tag, so releases are distinguishable."""

    def make(tag: str) -> dict[str, Path]:
        folder = tmp_path / f"ckpt-{tag}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(tag.encode() + os.urandom(2048))
        (folder / "model.json").write_text(json.dumps({"tag": tag}))
        (folder / "model.onnx").write_bytes(b"onnx-" + tag.encode())
        return {path.name: path for path in folder.iterdir()}

    return make


@pytest.fixture
def published(registry: ReleaseRegistry, make_files, key: Ed25519PrivateKey) -> Callable[..., int]:
    def publish(tag: str, **kwargs) -> int:
        parent = registry.versions()[-1] if registry.versions() else None
        return registry.publish(files=make_files(tag), signing_key=key, parent=parent, **kwargs).version

    return publish


@pytest.fixture(params=["dir", "http"])
def source(request: pytest.FixtureRequest, registry: ReleaseRegistry, serve_http) -> str:
    """The same registry, reached as a folder or through the HTTP server."""
    return str(registry.root) if request.param == "dir" else serve_http(registry.root)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _no_leftovers(dest: Path) -> bool:
    return not [p for p in dest.iterdir() if p.name.startswith((".incoming-", ".trash-"))]


# --------------------------------------------------------------------------- happy paths


def test_pull_accepts_a_release_published_with_manifest_format_1(
    source: str, dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey, monkeypatch
) -> None:
    """Devices keep installing releases published before the manifest rename (format 1)."""
    write_format_one(monkeypatch)
    published("old", applied_request_ids=["del-0"])
    monkeypatch.undo()
    assert json.loads((registry.path(1) / "manifest.json").read_bytes())["format_version"] == 1
    result = pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert (result.version, result.changed) == (1, True)
    assert _snapshot(result.path) == _snapshot(registry.path(1))
    published("new", revoke_previous=True, applied_request_ids=["del-1"])
    assert pull_release(source=source, dest=dest, server_public_key=key.public_key()).version == 2


def test_pull_installs_newest_and_is_idempotent(
    source: str, dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey
) -> None:
    published("a")
    result = pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert (result.version, result.changed, result.removed_revoked) == (1, True, [])
    assert result.path == dest / "releases" / "v0001" == current_release(dest)
    assert _snapshot(result.path) == _snapshot(registry.path(1))

    again = pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert (again.version, again.changed) == (1, False)

    published("b")
    newer = pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert (newer.version, newer.changed) == (2, True)
    assert current_release(dest) == dest / "releases" / "v0002"
    assert _snapshot(newer.path) == _snapshot(registry.path(2))
    state = json.loads((dest / "current.json").read_text())
    assert state["format_version"] == 2 and state["path"] == "releases/v0002"
    assert _no_leftovers(dest)


def test_current_release_is_none_before_any_pull(dest: Path) -> None:
    assert current_release(dest) is None


def test_damaged_local_copy_is_downloaded_again(source: str, dest: Path, published, key: Ed25519PrivateKey) -> None:
    published("a")
    installed = pull_release(source=source, dest=dest, server_public_key=key.public_key()).path
    (installed / "model.onnx").write_bytes(b"bit rot")
    repaired = pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert repaired.changed and (installed / "model.onnx").read_bytes() == b"onnx-a"
    assert _no_leftovers(dest)


# --------------------------------------------------------------------------- refusals keep the old release


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_and_resign_nothing(path: Path) -> None:
    """Change the manifest's metadata without the server key: the signature no longer matches."""
    doc = json.loads(path.read_bytes())
    doc["metrics"] = {"uar": 0.99}
    path.write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda v: _flip_byte(v / "model.safetensors"), "model.safetensors: SHA-256 does not match"),
        (lambda v: (v / "model.onnx").write_bytes(b"onnx-b-and-more"), "model.onnx: larger than the signed size"),
        (lambda v: (v / "model.onnx").write_bytes(b"onnx"), "model.onnx: got 4 bytes"),
        (lambda v: (v / "model.onnx").unlink(), "model.onnx"),
        (
            lambda v: _rewrite_and_resign_nothing(v / "manifest.json"),
            "manifest does not match the hash in the signed index",
        ),
        (lambda v: (v / "manifest.sig").unlink(), "manifest.sig"),
    ],
)
def test_tampered_release_is_refused_and_old_release_kept(
    source: str, dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey, tamper, message: str
) -> None:
    published("a")
    old = pull_release(source=source, dest=dest, server_public_key=key.public_key()).path
    before = _snapshot(old)
    published("b")
    tamper(registry.path(2))

    with pytest.raises(PullError, match=message):
        pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert current_release(dest) == old
    assert _snapshot(old) == before
    assert not (dest / "releases" / "v0002").exists()
    assert _no_leftovers(dest)


def test_manifest_resigned_by_another_key_is_refused(
    dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey
) -> None:
    """A manifest whose hash the index vouches for but whose signature is foreign is still refused."""
    published("a")
    folder = registry.path(1)
    foreign = Ed25519PrivateKey.generate()
    (folder / "manifest.sig").write_bytes(sign_bytes((folder / "manifest.json").read_bytes(), signing_key=foreign))
    with pytest.raises(PullError, match="signature does not verify"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())
    assert current_release(dest) is None


def test_wrong_public_key_is_refused(source: str, dest: Path, published, key: Ed25519PrivateKey) -> None:
    published("a")
    pull_release(source=source, dest=dest, server_public_key=key.public_key())
    published("b")
    stranger = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(PullError, match="index: signature does not verify"):
        pull_release(source=source, dest=dest, server_public_key=stranger)
    assert current_release(dest) == dest / "releases" / "v0001"


def test_missing_or_tampered_index_signature_is_refused(
    source: str, dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey
) -> None:
    published("a")
    pull_release(source=source, dest=dest, server_public_key=key.public_key())
    published("b")
    index_dir = registry.root / "index"
    signature = index_dir / "g000002.sig"
    signature.unlink()
    with pytest.raises(PullError, match=r"g000002.sig: missing|index.json: HTTP 500"):
        pull_release(source=source, dest=dest, server_public_key=key.public_key())
    _flip_byte(index_dir / "g000002.json")
    shutil.copy(index_dir / "g000001.sig", signature)
    with pytest.raises(PullError, match="signature does not verify"):
        pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert current_release(dest) == dest / "releases" / "v0001"


def test_replayed_older_index_is_refused(
    tmp_path: Path, dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey
) -> None:
    published("a")
    stale_mirror = tmp_path / "stale-mirror"
    shutil.copytree(registry.root, stale_mirror)
    published("b", revoke_previous=True, applied_request_ids=["del-1"])
    pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())

    with pytest.raises(PullError, match="replayed index"):
        pull_release(source=str(stale_mirror), dest=dest, server_public_key=key.public_key())
    assert current_release(dest) == dest / "releases" / "v0002"
    assert not (dest / "releases" / "v0001").exists()


# --------------------------------------------------------------------------- revocation on the device


def test_revoked_local_copies_are_deleted(source: str, dest: Path, published, key: Ed25519PrivateKey) -> None:
    published("a")
    published("b")
    pull_release(source=source, dest=dest, server_public_key=key.public_key())
    # Keep an older non-revoked copy around too, to check only revoked ones are deleted.
    assert (dest / "releases" / "v0002").is_dir()
    published("c", revoke_previous=True, applied_request_ids=["del-7"])
    result = pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert (result.version, result.removed_revoked, result.changed) == (3, [2], True)
    assert sorted(p.name for p in (dest / "releases").iterdir()) == ["v0003"]
    assert _no_leftovers(dest)


def test_revoking_the_newest_falls_back_to_an_older_release(
    source: str, dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey
) -> None:
    published("a")
    published("b")
    assert pull_release(source=source, dest=dest, server_public_key=key.public_key()).version == 2
    registry.revoke(versions=[2], reason="bad model", signing_key=key)
    result = pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert (result.version, result.removed_revoked) == (1, [2])
    assert current_release(dest) == dest / "releases" / "v0001"


def test_everything_revoked_is_refused_and_local_copy_deleted(
    source: str, dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey
) -> None:
    published("a")
    pull_release(source=source, dest=dest, server_public_key=key.public_key())
    registry.revoke(versions=[1], reason="speaker withdrew consent", signing_key=key)
    with pytest.raises(PullError, match="every release is revoked"):
        pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert current_release(dest) is None
    assert not (dest / "releases" / "v0001").exists()


def test_revoked_current_is_deleted_even_when_the_replacement_is_tampered(
    source: str, dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey
) -> None:
    """Privacy over availability: an authentic revocation applies even if the new download fails."""
    published("a")
    pull_release(source=source, dest=dest, server_public_key=key.public_key())
    published("b", revoke_previous=True, applied_request_ids=["del-2"])
    _flip_byte(registry.path(2) / "model.safetensors")
    with pytest.raises(PullError, match="SHA-256"):
        pull_release(source=source, dest=dest, server_public_key=key.public_key())
    assert current_release(dest) is None
    assert not (dest / "releases").exists() or not list((dest / "releases").iterdir())


def test_revoked_release_files_are_refused_over_http_even_with_a_stale_index(
    dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey, serve_http
) -> None:
    """The server checks the live revocation log, so a not-yet-reindexed revocation still blocks downloads."""
    published("a")
    url = serve_http(registry.root)
    index_before = registry.read_index_files()
    registry.revoke(versions=[1], reason="withdrawn", signing_key=key)
    # Simulate a crash that left the old index generation current.
    head = registry.root / "index" / "HEAD.json"
    head.write_text(json.dumps({"format_version": 1, "generation": 1}))
    assert registry.read_index_files() == index_before
    with pytest.raises(PullError, match="410 Gone"):
        pull_release(source=url, dest=dest, server_public_key=key.public_key())
    assert current_release(dest) is None


# --------------------------------------------------------------------------- input checks and edge constraints


def test_bad_source_and_key_are_rejected(dest: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    with pytest.raises(PullError, match="neither an existing registry folder"):
        pull_release(source=str(tmp_path / "nowhere"), dest=dest, server_public_key=key.public_key())
    with pytest.raises(TypeError, match="Ed25519PublicKey"):
        pull_release(source=str(tmp_path), dest=dest, server_public_key=key)


def test_corrupt_current_json_is_reported(
    dest: Path, registry: ReleaseRegistry, published, key: Ed25519PrivateKey
) -> None:
    published("a")
    dest.mkdir()
    (dest / "current.json").write_text("{not json")
    with pytest.raises(PullError, match="current.json"):
        pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key())


def test_edge_modules_do_not_import_torch() -> None:
    code = (
        "import sys, serforget.common.edge, serforget.common.edge.pull, serforget.common.release; "
        "bad = {'torch', 'flwr'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_pull_progress_counts_every_byte_of_the_release(registry, published, key, dest, monkeypatch) -> None:
    """``edge pull --progress``: one byte-level bar whose total is the release's signed size, filled exactly."""
    import serforget.common.edge.pull as pull_module

    bars = []

    class Spy(pull_module.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.counted, self.shown = 0, not kwargs.get("disable", False)
            bars.append(self)

        def update(self, n: float = 1) -> None:
            self.counted += n
            super().update(n)

    monkeypatch.setattr(pull_module, "tqdm", Spy)
    version = published("a")
    total = sum(meta["size"] for meta in registry.manifest(version).files.values())
    pull_release(source=str(registry.root), dest=dest, server_public_key=key.public_key(), progress=True)
    assert [(bar.total, bar.counted, bar.shown) for bar in bars] == [(total, total, True)]
