"""Shared fixtures: tiny corpora and models built on the fly (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serforget.common.audio import save_audio
from serforget.common.checkpoint import save_checkpoint
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import Utterance, write_manifest
from serforget.common.models import build_model
from serforget.common.release import ReleaseRegistry
from serforget.server.federation import ServerDir
from serforget.server.release_http import serve_releases
from tests.helpers.audio import tone, write_espeak_corpus
from tests.helpers.envelopes import WORLD, World
from tests.helpers.federation import make_server
from tests.helpers.http import ThreadedServers


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


@pytest.fixture(scope="session")
def espeak_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real synthesized speech, two voices (``tests.helpers.audio.write_espeak_corpus``); read-only, shared."""
    return write_espeak_corpus(tmp_path_factory.mktemp("espeak"))


@dataclass(frozen=True)
class ReleaseExport:
    """A default log-mel CNN (seed 0), its checkpoint, and the files a release ships for it."""

    model: torch.nn.Module
    checkpoint: Path
    files: dict[str, Path]


@pytest.fixture(scope="session")
def release_export(espeak_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> ReleaseExport:
    """``export_release_models`` run once per session (it is the slowest fixture: fp32 export with
    parity, every int8 candidate, their timings): model.onnx, model.int8.onnx (published whatever
    its speed here), onnx_report.json for release 3. Tests read it; none may modify it."""
    from serforget.common.onnx_export import export_release_models

    root = tmp_path_factory.mktemp("release-export")
    torch.manual_seed(0)
    model = build_model(arch="logmel_cnn", config={}, labels=FOUR_CLASS).eval()
    checkpoint = save_checkpoint(model=model, out_dir=root / "ckpt", labels=FOUR_CLASS)
    files = export_release_models(
        checkpoint_dir=checkpoint,
        out_dir=root / "onnx",
        parity_manifest=espeak_corpus,
        release_version=3,
        max_ua_drop=100.0,
        max_parity_utterances=4,
        min_int8_speedup=1e-6,
        calibration_manifest=espeak_corpus,
    )
    return ReleaseExport(model=model, checkpoint=checkpoint, files=files)


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
    servers = ThreadedServers()
    yield lambda root: servers.start(serve_releases(root=root, port=0))
    servers.stop_all()
