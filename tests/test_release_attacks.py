"""Attacks on release distribution (issue 11): each test reproduces one attack and shows it refused.

Names say what is attacked: ``recursion`` (deeply nested JSON in a signature file),
``slow_retrieval`` / ``endless_data`` (a server that drips or floods bytes), ``rollback``,
``freeze``, ``mix_and_match``, ``arbitrary_software``, ``key_rotation``, ``tombstone`` (revoked
model files deleted). The HTTP attackers are real servers on 127.0.0.1 in threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.edge.pull import PullError, current_release, pull_release
from common.keys import init_keys, load_signing_private
from common.release import ReleaseError, ReleaseRegistry, check_signed_manifest, parse_signed_index

REPO_ROOT = Path(__file__).resolve().parents[1]
NESTED = b"[" * 4096


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def registry(tmp_path: Path) -> ReleaseRegistry:
    return ReleaseRegistry(tmp_path / "server" / "releases")


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "device"


@pytest.fixture
def published(registry: ReleaseRegistry, tmp_path: Path, key: Ed25519PrivateKey) -> Callable[..., int]:
    counter = iter(range(1_000))

    def publish(**kwargs) -> int:
        folder = tmp_path / f"ckpt-{next(counter)}"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(os.urandom(4096))
        parent = registry.versions()[-1] if registry.versions() else None
        signing_key = kwargs.pop("signing_key", key)
        return registry.publish(files={"model.onnx": folder / "model.onnx"}, signing_key=signing_key, parent=parent, **kwargs).version

    return publish


# --------------------------------------------------------------------------- recursion


def test_recursion_nested_signature_files_are_a_release_error(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ReleaseError, match="nested too deeply"):
        parse_signed_index(b"{}", NESTED, public_key=key.public_key(), source="index")
    with pytest.raises(ReleaseError, match="nested too deeply"):
        check_signed_manifest(b"{}", NESTED, public_key=key.public_key(), source="manifest")


@pytest.mark.parametrize("victim", ["index", "manifest"])
def test_recursion_nested_sig_is_refused_by_pull(victim: str, registry: ReleaseRegistry, published, key: Ed25519PrivateKey, dest: Path) -> None:
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
        [sys.executable, "-m", "common", "edge", "pull", "--from", str(registry.root), "--to", str(tmp_path / "dev"),
         "--server-key", str(keys.sign_public)],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=False,
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
                self.send_header("Content-Length", "100000")
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
    servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(mode: str) -> str:
        handler = type("Handler", (_Attacker,), {"mode": mode})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("mode", ["drip-body", "drip-headers"])
def test_slow_retrieval_is_cut_at_the_total_deadline(mode: str, attacker, dest: Path, key: Ed25519PrivateKey) -> None:
    # every byte arrives well within the 0.5-s read timeout, so only a total deadline stops it
    with pytest.raises(PullError, match="deadline"):
        pull_release(source=attacker(mode), dest=dest, server_public_key=key.public_key(), timeout_s=0.5, min_rate=1e9)
    assert current_release(dest) is None


@pytest.mark.parametrize("mode", ["huge-length", "endless"])
def test_endless_data_is_refused_at_the_size_budget(mode: str, attacker, dest: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(PullError, match="larger than the 16777216-byte limit"):
        pull_release(source=attacker(mode), dest=dest, server_public_key=key.public_key())
    assert current_release(dest) is None
