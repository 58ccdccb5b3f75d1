"""Audio loading with one policy for every corpus: 16 kHz, mono, float32, validated.

Policy (documented in README):
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

from common.audio_limits import MAX_ABS_SAMPLE, MAX_SECONDS, SAMPLE_RATE, header_problem


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file and the reason."""


def load_audio(
    path: str | os.PathLike[str], *, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_SECONDS
) -> torch.Tensor:
    """Load ``path`` as a 1-D float32 tensor at ``sample_rate``, mono, finite, non-empty."""
    file = Path(path)
    if not file.is_file():
        raise AudioError(f"{file}: audio file not found")
    try:
        with sf.SoundFile(str(file)) as handle:
            problem = header_problem(sample_rate=handle.samplerate, channels=handle.channels, frames=handle.frames,
                                     max_seconds=max_seconds)
            if problem is not None:
                raise AudioError(f"{file}: {problem}")
            data, native_rate = handle.read(dtype="float32", always_2d=True), handle.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, AudioError):
            raise
        raise AudioError(f"{file}: not a readable audio file ({exc})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{file}: audio file holds no samples")
    if native_rate <= 0:
        raise AudioError(f"{file}: invalid sample rate {native_rate}")
    if data.shape[0] / native_rate > max_seconds:
        raise AudioError(
            f"{file}: {data.shape[0] / native_rate:.1f} s is longer than the {max_seconds:.0f} s limit"
        )
    if not np.isfinite(data).all():
        raise AudioError(f"{file}: audio contains NaN or infinite samples")
    if np.abs(data).max() > MAX_ABS_SAMPLE:
        raise AudioError(f"{file}: samples reach {np.abs(data).max():.3g}, beyond {MAX_ABS_SAMPLE:g} x full scale")
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if native_rate != sample_rate:
        mono = AF.resample(mono, orig_freq=int(native_rate), new_freq=sample_rate)
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


def save_audio(path: str | os.PathLike[str], wave: torch.Tensor | np.ndarray, *, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write a mono waveform as 16-bit PCM WAV (used by tests, demos and the synthetic corpus)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    samples = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    sf.write(str(target), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return target
