"""Limits every audio reader applies, shared by the torch loader and the torch-free edge runtime."""

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
        return f"header claims {frames} frames x {channels} channels, over the {MAX_DECODE_BYTES >> 20} MiB decode limit"
    return None
