"""Audio loading with one policy for every corpus: 16 kHz, mono, float32, validated.

Policy (documented in docs/architecture.md):
- read with ``soundfile`` (torchaudio 2.9 has no I/O backend without torchcodec);
- mix multichannel audio down to mono by averaging channels;
- resample to 16 kHz with ``torchaudio.functional.resample`` (band-limited sinc);
- reject empty, unreadable, non-audio, NaN/Inf and absurdly long files with :class:`AudioError`
  naming the file, so a bad recording can never silently become a silent training example;
- fixed-length batches: :func:`fix_length` centre-crops long clips (the middle carries the
  utterance; leading/trailing silence is cut first) and zero-pads short ones at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from serforget.common.audio_limits import MAX_SECONDS, SAMPLE_RATE, decode_mono


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file and the reason."""


def load_audio(
    path: str | os.PathLike[str], *, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_SECONDS
) -> torch.Tensor:
    """Load ``path`` as a 1-D float32 tensor at ``sample_rate``, mono, finite, non-empty."""
    data, native_rate = decode_mono(path, max_seconds=max_seconds, error=AudioError)
    mono = torch.from_numpy(np.ascontiguousarray(data))
    if native_rate != sample_rate:
        mono = AF.resample(mono, orig_freq=native_rate, new_freq=sample_rate)
    return mono.to(torch.float32)


def fix_length(wave: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Centre-crop or end-pad a 1-D waveform to exactly ``n_samples``."""
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    length = wave.shape[-1]
    if length >= n_samples:
        start = (length - n_samples) // 2
        return wave[..., start : start + n_samples]
    return torch.nn.functional.pad(wave, (0, n_samples - length))


def save_audio(
    path: str | os.PathLike[str], wave: torch.Tensor | np.ndarray, *, sample_rate: int = SAMPLE_RATE
) -> Path:
    """Write a mono waveform as 16-bit PCM WAV (used by tests, demos and the synthetic corpus)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    samples = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    sf.write(str(target), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return target
