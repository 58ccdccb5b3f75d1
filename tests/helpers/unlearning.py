"""Shared tiny task for the unlearning tests.

A 4-class "emotion" task of 0.25 s tones: class c is a sine at its own frequency with random
phase, level and noise. A log-mel CNN with a few channels learns it in about a second on a CPU,
which is what the unit tests need: a real trained waveform model that PGD, importance and the
unlearning loop can act on.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from serforget.common.data import WaveformSet
from serforget.common.models import build_model
from serforget.common.training import TrainConfig, train_model

LABELS = ("neutral", "happy", "angry", "sad")
SAMPLES = 4000
TINY_CNN = {
    "n_mels": 16,
    "n_fft": 256,
    "hop_length": 128,
    "channels": [4, 8],
    "hidden": 16,
    "dropout": 0.0,
    "groups": 2,
}
_FREQS = (300.0, 700.0, 1500.0, 3000.0)


def tone_set(
    n_per_class: int, *, seed: int, prefix: str = "u", speaker: str = "spk", marker: bool = False
) -> WaveformSet:
    """Tones of the four classes; ``marker`` gates them on and off at 10 Hz, one speaker's "voice".

    The gating makes sharp edges in time, which the CNN's local filters see anywhere in the
    spectrogram (a marker at a fixed frequency would be nearly invisible to its global pooling).
    """
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(SAMPLES) / 16_000
    waves, targets = [], []
    for c, freq in enumerate(_FREQS):
        for _ in range(n_per_class):
            phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
            level = 0.1 + 0.3 * float(torch.rand(1, generator=gen))
            noise = 0.05 * torch.randn(SAMPLES, generator=gen)
            gate = ((t * 20).floor() % 2 == 0).float() if marker else 1.0
            waves.append(level * gate * torch.sin(2 * math.pi * freq * t + phase) + noise)
            targets.append(c)
    n = len(targets)
    return WaveformSet(
        waves=torch.stack(waves).clamp(-1, 1),
        targets=torch.tensor(targets),
        utt_ids=[f"{prefix}{i:03d}" for i in range(n)],
        speakers=[speaker] * n,
    )


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch="logmel_cnn", config=TINY_CNN, labels=LABELS)


def concat(*sets: WaveformSet) -> WaveformSet:
    return WaveformSet(
        waves=torch.cat([s.waves for s in sets]),
        targets=torch.cat([s.targets for s in sets]),
        utt_ids=[u for s in sets for u in s.utt_ids],
        speakers=[p for s in sets for p in s.speakers],
    )


@lru_cache(maxsize=1)
def _trained_state() -> tuple[dict, WaveformSet, WaveformSet]:
    train = concat(tone_set(12, seed=1, prefix="train"), tone_set(2, seed=3, prefix="marked", speaker="m", marker=True))
    held_out = tone_set(10, seed=2, prefix="held")
    model = tiny_model()
    train_model(model, train, config=TrainConfig(epochs=20, batch_size=16, lr=1e-2, device="cpu"), progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, train, held_out


def trained_tiny() -> tuple[torch.nn.Module, WaveformSet, WaveformSet]:
    """A fresh copy of the trained tiny model, its training set and a held-out set.

    The training set ends with 8 utterances (2 per class) of speaker ``m`` with the gating marker:
    the natural forget set (a speaker asking to be deleted), distinguishable from the rest.
    """
    state, train, held_out = _trained_state()
    model = tiny_model()
    model.load_state_dict(state)
    return model.eval(), train, held_out


def accuracy(model: torch.nn.Module, data: WaveformSet) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data.waves).argmax(1) == data.targets).float().mean())


class SpectralMLP(nn.Module):
    """Time-averaged log power spectrum -> MLP: a tiny waveform model with room to memorise.

    The default CNN pools globally over frequency and time, so it can barely single out a few
    utterances; this model sees every frequency bin separately, which lets an unlearning method
    change its answer on a few utterances without moving the rest (the situation the end-to-end
    test needs to tell a good method from a destructive one).
    """

    def __init__(self, n_classes: int = 4, n_fft: int = 256, hidden: int = 128) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.net = nn.Sequential(nn.Linear(n_fft // 2 + 1, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waveform, self.n_fft, self.n_fft // 2, window=self.window, return_complex=True)
        return self.net(torch.log(spec.abs().pow(2) + 1e-6).mean(dim=-1))


@lru_cache(maxsize=1)
def _trained_mlp_state() -> dict:
    _, train, _ = _trained_state()
    torch.manual_seed(0)
    model = SpectralMLP()
    train_model(model, train, config=TrainConfig(epochs=20, batch_size=16, lr=1e-2, device="cpu"), progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_mlp() -> tuple[torch.nn.Module, WaveformSet, WaveformSet]:
    """Like :func:`trained_tiny` with a :class:`SpectralMLP` trained on the same data."""
    _, train, held_out = _trained_state()
    model = SpectralMLP()
    model.load_state_dict(_trained_mlp_state())
    return model.eval(), train, held_out
