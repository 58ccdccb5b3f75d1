"""Shared fixtures: tiny corpora and models built on the fly (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from serforget.common.audio import save_audio
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import Utterance, write_manifest


def tone(freq: float, seconds: float, *, sr: int = 16_000, seed: int = 0, amp: float = 0.3) -> np.ndarray:
    """A noisy tone: a tiny, learnable stand-in for an emotional utterance."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """4 speakers x 4 emotions x 3 takes of tones whose pitch encodes the emotion."""
    base = {"neutral": 220.0, "happy": 440.0, "angry": 660.0, "sad": 150.0}
    utts = []
    for s in range(4):
        for emotion in FOUR_CLASS:
            for take in range(3):
                utt_id = f"spk{s}_{emotion}_{take}"
                path = save_audio(tmp_path / "wav" / f"{utt_id}.wav",
                                  tone(base[emotion] * (1 + 0.03 * s), 0.5 + 0.1 * take, seed=s * 100 + take))
                utts.append(Utterance(utt_id, path, f"spk{s}", emotion))
    write_manifest(tmp_path / "manifest.csv", utts)
    return tmp_path / "manifest.csv"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
