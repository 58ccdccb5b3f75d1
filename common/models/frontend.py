"""Log-mel front end built from real-valued convolutions so it exports to ONNX.

Why not ``torchaudio.transforms.MelSpectrogram``: its complex ``torch.stft`` does not convert to
ONNX with a dynamic length axis (see ``shared/ONNX.md``). Here the STFT is two ``conv1d`` with
fixed Hann-windowed cosine/sine kernels (centre padding by reflection, like ``torch.stft`` with
``center=True``), followed by the power spectrum and torchaudio's own mel filterbank. A test
keeps it numerically equal to torchaudio's ``MelSpectrogram``; as plain tensor ops it is also
differentiable end to end, so adversarial examples can be crafted in the waveform domain.
"""

from __future__ import annotations

import math

import torch
import torchaudio.functional as AF
from torch import nn


class LogMel(nn.Module):
    """Waveform ``[batch, samples]`` -> log-mel ``[batch, n_mels, frames]``."""

    def __init__(
        self,
        *,
        sample_rate: int = 16_000,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        log_floor: float = 1e-6,
    ) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.log_floor = log_floor
        n_freqs = n_fft // 2 + 1
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        time = torch.arange(n_fft, dtype=torch.float64)
        freqs = torch.arange(n_freqs, dtype=torch.float64)
        angle = 2.0 * math.pi * freqs[:, None] * time[None, :] / n_fft
        kernels = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window], dim=0)
        self.register_buffer("dft_kernels", kernels.to(torch.float32).unsqueeze(1), persistent=False)
        fbanks = AF.melscale_fbanks(
            n_freqs=n_freqs,
            f_min=f_min,
            f_max=f_max if f_max is not None else sample_rate / 2,
            n_mels=n_mels,
            sample_rate=sample_rate,
        )
        self.register_buffer("mel_fbanks", fbanks.T.contiguous(), persistent=False)

    def power_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """Mel power spectrogram (before the log), equal to torchaudio's MelSpectrogram."""
        pad = self.n_fft // 2
        padded = nn.functional.pad(waveform.unsqueeze(1), (pad, pad), mode="reflect")
        spec = nn.functional.conv1d(padded, self.dft_kernels, stride=self.hop_length)
        n_freqs = self.n_fft // 2 + 1
        power = spec[:, :n_freqs] ** 2 + spec[:, n_freqs:] ** 2
        return torch.matmul(self.mel_fbanks, power)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.log(self.power_mel(waveform) + self.log_floor)
