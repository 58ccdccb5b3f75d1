"""Shared fixtures: tiny corpora and models built on the fly (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serforget.common.audio import save_audio
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import Utterance, write_manifest
from serforget.server.federation import ServerDir
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
