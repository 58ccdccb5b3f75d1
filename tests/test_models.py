import pytest
import torch
import torchaudio

from serforget.common.models import build_model, model_spec
from serforget.common.models.cnn import CNNConfig, LogMelCNN
from serforget.common.models.frontend import LogMel


@pytest.mark.parametrize("length", [1600, 16_000, 24_321])
def test_frontend_matches_torchaudio_melspectrogram(length: int) -> None:
    x = torch.randn(3, length) * 0.2
    ref = torchaudio.transforms.MelSpectrogram(sample_rate=16_000, n_fft=400, hop_length=160, n_mels=40)(x)
    ours = LogMel(n_mels=40).power_mel(x)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_cnn_forward_backward_and_waveform_gradient() -> None:
    model = LogMelCNN(n_classes=4)
    wave = (torch.randn(2, 8000) * 0.1).requires_grad_()
    logits = model(wave)
    assert logits.shape == (2, 4)
    logits[:, 1].sum().backward()
    assert wave.grad is not None and wave.grad.abs().sum() > 0  # attackable in the waveform domain
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_is_batch_independent() -> None:
    # GroupNorm, not BatchNorm: an utterance's logits do not depend on its batch neighbours.
    model = LogMelCNN(n_classes=4).train()
    x = torch.randn(4, 8000)
    torch.manual_seed(1)
    model.eval()
    alone = model(x[:1])
    together = model(x)[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_registry_round_trip_and_errors() -> None:
    model = build_model(arch="logmel_cnn", config={"channels": [8, 16], "hidden": 16}, labels=["a", "b", "c"])
    spec = model_spec(model)
    rebuilt = build_model(arch=spec["arch"], config=spec["config"], labels=["a", "b", "c"])
    assert rebuilt.config == model.config == CNNConfig(channels=(8, 16), hidden=16)
    with pytest.raises(ValueError, match="unknown model arch"):
        build_model(arch="resnet", config={}, labels=["a"])
    with pytest.raises(ValueError, match="unknown logmel_cnn config keys"):
        build_model(arch="logmel_cnn", config={"layers": 3}, labels=["a"])
