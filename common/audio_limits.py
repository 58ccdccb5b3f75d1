"""Limits and checked decoding shared by the torch loader and the torch-free edge runtime.

Both readers must refuse exactly the same files with the same reasons (a recording that trains
must also be predictable on the edge), so the decode-and-validate step lives here once; each
reader only adds its own resampler and error type.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf

#: The sample rate every model of the project consumes.
SAMPLE_RATE = 16_000
#: Refuse recordings longer than this (a 10-minute "utterance" is a mistake or an attack).
MAX_SECONDS = 600.0
#: Refuse float samples beyond this multiple of full scale: finite but absurd values (1e38) overflow
#: the power spectrum inside the model and turn logits and gradients into NaN.
MAX_ABS_SAMPLE = 1e3
#: Refuse headers claiming more channels than any recording setup has.
MAX_CHANNELS = 64
#: Refuse headers whose decoded size would exceed this: soundfile allocates the size the header
#: claims before reading, so a forged header could otherwise exhaust memory.
MAX_DECODE_BYTES = 1 << 30


def header_problem(*, sample_rate: int, channels: int, frames: int, max_seconds: float) -> str | None:
    """Why a file's header must be refused before decoding (``None`` if it may be decoded)."""
    if sample_rate <= 0:
        return f"invalid sample rate {sample_rate}"
    if channels <= 0 or channels > MAX_CHANNELS:
        return f"{channels} channels (at most {MAX_CHANNELS})"
    if frames / sample_rate > max_seconds:
        return f"{frames / sample_rate:.1f} s is longer than the {max_seconds:.0f} s limit"
    if frames * channels * 4 > MAX_DECODE_BYTES:
        return (
            f"header claims {frames} frames x {channels} channels, over the {MAX_DECODE_BYTES >> 20} MiB decode limit"
        )
    return None


def decode_mono(path: str | os.PathLike[str], *, max_seconds: float, error: type[Exception]) -> tuple[np.ndarray, int]:
    """Decode ``path`` to a mono float32 array (channels averaged) and its native sample rate.

    Refuses, raising ``error`` with a message naming the file: a missing or unreadable file, a
    header :func:`header_problem` rejects (checked before soundfile allocates), no samples, a
    duration over ``max_seconds``, NaN/Inf samples and samples beyond :data:`MAX_ABS_SAMPLE`.
    """
    file = Path(path)
    if not file.is_file():
        raise error(f"{file}: audio file not found")
    try:
        with sf.SoundFile(str(file)) as handle:
            problem = header_problem(
                sample_rate=handle.samplerate, channels=handle.channels, frames=handle.frames, max_seconds=max_seconds
            )
            if problem is not None:
                raise error(f"{file}: {problem}")
            data, native_rate = handle.read(dtype="float32", always_2d=True), handle.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, error):
            raise
        raise error(f"{file}: not a readable audio file ({exc})") from None
    if data.shape[0] == 0:
        raise error(f"{file}: audio file holds no samples")
    if native_rate <= 0:
        raise error(f"{file}: invalid sample rate {native_rate}")
    if data.shape[0] / native_rate > max_seconds:
        raise error(f"{file}: {data.shape[0] / native_rate:.1f} s is longer than the {max_seconds:.0f} s limit")
    if not np.isfinite(data).all():
        raise error(f"{file}: audio contains NaN or infinite samples")
    if np.abs(data).max() > MAX_ABS_SAMPLE:
        raise error(f"{file}: samples reach {np.abs(data).max():.3g}, beyond {MAX_ABS_SAMPLE:g} x full scale")
    return data.mean(axis=1, dtype=np.float32), int(native_rate)
