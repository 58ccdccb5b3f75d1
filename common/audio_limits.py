"""Limits every audio reader applies, shared by the torch loader and the torch-free edge runtime."""

#: The sample rate every model of the project consumes.
SAMPLE_RATE = 16_000
#: Refuse recordings longer than this (a 10-minute "utterance" is a mistake or an attack).
MAX_SECONDS = 600.0
#: Refuse float samples beyond this multiple of full scale: finite but absurd values (1e38) overflow
#: the power spectrum inside the model and turn logits and gradients into NaN.
MAX_ABS_SAMPLE = 1e3
