"""``TrainConfig.cache_frontend``: the same training, with the parameter-free front end computed once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from serforget.common.data import WaveformSet
from serforget.common.models.cnn import CNNConfig, LogMelCNN
from serforget.common.training import CONVERGED, TrainConfig, cached_frontend, train_model


def _data() -> WaveformSet:
    g = torch.Generator().manual_seed(0)
    waves = torch.randn(24, 8000, generator=g) * 0.1
    return WaveformSet(
        waves=waves, targets=torch.arange(24) % 4, utt_ids=[f"u{i}" for i in range(24)], speakers=["s"] * 24
    )


def _model() -> LogMelCNN:
    torch.manual_seed(1)
    return LogMelCNN(n_classes=4, config=CNNConfig(channels=(4, 8), hidden=8, dropout=0.0))


def test_cached_front_end_trains_to_the_same_weights():
    data = _data()
    config = TrainConfig(epochs=2, batch_size=8, device="cpu", seed=3)
    plain, cached = _model(), _model()
    train_model(plain, data, config=config, progress=False)
    train_model(cached, data, config=dataclasses.replace(config, cache_frontend=True), progress=False)
    for (name, a), (_, b) in zip(plain.state_dict().items(), cached.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-4), name


def test_models_without_a_separable_front_end_fall_back_to_waveforms():
    model = torch.nn.Sequential(torch.nn.Linear(8000, 4))
    assert cached_frontend(model, _data(), device=torch.device("cpu")) is None
    train_model(model, _data(), config=TrainConfig(epochs=1, device="cpu", cache_frontend=True), progress=False)


def test_converged_preset_keeps_the_last_epoch_and_bad_settings_are_refused():
    assert CONVERGED.select_best is False and CONVERGED.epochs >= 40
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)
