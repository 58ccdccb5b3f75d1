"""Shared fixtures: tiny corpora and models built on the fly (nothing is downloaded)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serforget.common.audio import save_audio
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import Utterance, write_manifest
from serforget.common.release import ReleaseRegistry
from serforget.server.federation import ServerDir
from serforget.server.release_http import serve_releases
from tests.helpers.audio import tone
from tests.helpers.envelopes import WORLD, World
from tests.helpers.federation import make_server


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """4 speakers x 4 emotions x 3 takes of tones whose pitch encodes the emotion."""
    base = {"neutral": 220.0, "happy": 440.0, "angry": 660.0, "sad": 150.0}
    utts = []
    for s in range(4):
        for emotion in FOUR_CLASS:
            for take in range(3):
                utt_id = f"spk{s}_{emotion}_{take}"
                path = save_audio(
                    tmp_path / "wav" / f"{utt_id}.wav",
                    tone(base[emotion] * (1 + 0.03 * s), 0.5 + 0.1 * take, seed=s * 100 + take),
                )
                utts.append(Utterance(utt_id, path, f"spk{s}", emotion))
    write_manifest(tmp_path / "manifest.csv", utts)
    return tmp_path / "manifest.csv"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def world() -> World:
    """The shared envelope world (keys are made once per session: HPKE key generation is slow)."""
    return WORLD


@pytest.fixture()
def server(tmp_path: Path) -> ServerDir:
    """A server dir with two enrolled nodes, ``node-a`` and ``node-b``."""
    return make_server(tmp_path)


# --------------------------------------------------------------------------- releases


@pytest.fixture
def key() -> Ed25519PrivateKey:
    """The server's release signing key (a fresh one per test: generating it takes microseconds)."""
    return Ed25519PrivateKey.generate()


@pytest.fixture
def registry(tmp_path: Path) -> ReleaseRegistry:
    """An empty release registry where the server keeps it."""
    return ReleaseRegistry(tmp_path / "server" / "releases")


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """An edge device's release folder (absent until the first pull)."""
    return tmp_path / "device"


@pytest.fixture
def serve_http() -> Iterator[Callable[[Path], str]]:
    """``start(root) -> "http://127.0.0.1:PORT"``: ``serve_releases`` on an ephemeral port in a thread.

    Every server started is shut down and joined when the test ends, pass or fail.
    """
    running: list[tuple[object, threading.Thread]] = []

    def start(root: Path) -> str:
        server = serve_releases(root=root, port=0)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        thread.start()
        running.append((server, thread))
        host, port = server.server_address[:2]
        return f"http://{host}:{port}"

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join()
