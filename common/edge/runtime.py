"""Torch-free building blocks of edge inference: ONNX sessions, model metadata, audio, windows.

Why a module of its own: edge devices have ONNX Runtime, numpy and soundfile but no torch, so
everything the device needs to turn a file into model input lives here, importing nothing that
pulls torch in (a test runs the edge path in a fresh interpreter and checks ``sys.modules``).
The server-side exporter (:mod:`serforget.common.onnx_export`) imports the metadata keys and
:class:`OnnxModel` from here too, so both sides read and write one definition of the format.

ONNX model format (``format`` = ``serforget-onnx``, ``format_version`` 1): one input
``waveform`` ``float32[batch, samples]`` (16 kHz mono, both axes dynamic), outputs ``logits`` and
``probabilities`` ``float32[batch, n_labels]``; the log-mel front end is inside the graph. The
model's ``metadata_props`` carry the strings listed in :data:`METADATA_KEYS`.

Audio policy (the decoding and checks of :func:`serforget.common.audio_limits.decode_mono`, shared with training): channels
averaged to mono, NaN/Inf and empty files rejected, resampling with the same band-limited
Hann-windowed sinc interpolation as ``torchaudio.functional.resample`` (defaults: 6 zero
crossings, roll-off 0.99), re-implemented in numpy because scipy is not a project dependency
and a cruder resampler (linear interpolation) would alias and shift the features a model
trained on torchaudio-resampled audio sees.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from serforget.common.audio_limits import MAX_SECONDS, decode_mono

#: Value of the ``format`` metadata entry that marks a serforget ONNX model.
ONNX_FORMAT = "serforget-onnx"
#: Version of the metadata layout below; bumped on any incompatible change.
ONNX_FORMAT_VERSION = 1
INPUT_NAME = "waveform"
OUTPUT_NAMES: tuple[str, str] = ("logits", "probabilities")
PRECISIONS: tuple[str, ...] = ("fp32", "int8")
#: ``metadata_props`` keys every exported model carries (values are strings; ``labels`` is JSON).
METADATA_KEYS: tuple[str, ...] = (
    "format",
    "format_version",
    "arch",
    "labels",
    "sample_rate",
    "release_version",
    "weights_sha256",
    "precision",
    "window_seconds",
)

_LOWPASS_ZERO_CROSSINGS = 6
_ROLLOFF = 0.99
#: Output frames (of ``new_rate / gcd`` samples each) resampled per matrix product, bounding memory.
_RESAMPLE_FRAMES_PER_BLOCK = 4096


class EdgeError(ValueError):
    """Edge inference cannot proceed; the message names the model or audio file at fault."""


class EdgeModelError(EdgeError):
    """A model file is missing, not ONNX, or lacks the serforget metadata."""


class EdgeAudioError(EdgeError):
    """An audio file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class ModelInfo:
    """What a serforget ONNX model says about itself in its metadata."""

    arch: str
    labels: tuple[str, ...]
    sample_rate: int
    release_version: int | None
    weights_sha256: str
    precision: str
    window_seconds: float
    format_version: int

    def to_metadata(self) -> dict[str, str]:
        """The ``metadata_props`` strings for this model (inverse of :func:`parse_model_info`)."""
        return {
            "format": ONNX_FORMAT,
            "format_version": str(self.format_version),
            "arch": self.arch,
            "labels": json.dumps(list(self.labels)),
            "sample_rate": str(self.sample_rate),
            "release_version": "" if self.release_version is None else str(self.release_version),
            "weights_sha256": self.weights_sha256,
            "precision": self.precision,
            "window_seconds": repr(float(self.window_seconds)),
        }


def parse_model_info(metadata: Mapping[str, str], *, source: str) -> ModelInfo:
    """Validate a model's metadata strings; :class:`EdgeModelError` names ``source`` and the field."""
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise EdgeModelError(f"{source}: not a serforget ONNX model, metadata lacks {missing}")
    if metadata["format"] != ONNX_FORMAT:
        raise EdgeModelError(f"{source}: metadata format is {metadata['format']!r}, expected {ONNX_FORMAT!r}")
    if metadata["format_version"] != str(ONNX_FORMAT_VERSION):
        raise EdgeModelError(f"{source}: unsupported format_version {metadata['format_version']!r}")
    try:
        labels = json.loads(metadata["labels"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise EdgeModelError(f"{source}: metadata labels is not JSON ({exc})") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise EdgeModelError(f"{source}: metadata labels must be a non-empty JSON list of strings")
    if metadata["precision"] not in PRECISIONS:
        raise EdgeModelError(f"{source}: metadata precision {metadata['precision']!r} is not one of {PRECISIONS}")
    release = metadata["release_version"]
    return ModelInfo(
        arch=metadata["arch"],
        labels=tuple(labels),
        sample_rate=_positive_number(metadata["sample_rate"], int, field="sample_rate", source=source),
        release_version=None
        if release == ""
        else _positive_number(release, int, field="release_version", source=source),
        weights_sha256=metadata["weights_sha256"],
        precision=metadata["precision"],
        window_seconds=_positive_number(metadata["window_seconds"], float, field="window_seconds", source=source),
        format_version=ONNX_FORMAT_VERSION,
    )


def _positive_number(text: str, kind: type, *, field: str, source: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise EdgeModelError(f"{source}: metadata {field} {text!r} is not a {kind.__name__}") from None
    if not math.isfinite(value) or value <= 0:
        raise EdgeModelError(f"{source}: metadata {field} must be positive, got {text!r}")
    return value


class OnnxModel:
    """An ONNX Runtime session of a serforget model plus its validated metadata.

    ``threads`` sets ONNX Runtime's intra-op thread count (``None``: its default, all cores);
    inter-op parallelism stays at one thread because the graph is a single chain.
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeModelError(f"{self.path}: model file not found")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads}")
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
            raise EdgeModelError(f"{self.path}: ONNX Runtime cannot load the model ({exc})") from None
        try:
            metadata = self.session.get_modelmeta().custom_metadata_map
        except UnicodeDecodeError as exc:  # a flipped byte inside a metadata string
            raise EdgeModelError(f"{self.path}: ONNX metadata is not valid UTF-8 ({exc.reason})") from None
        self.info = parse_model_info(metadata, source=str(self.path))
        self._check_signature()

    def _check_signature(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or tuple(outputs) != OUTPUT_NAMES:
            raise EdgeModelError(
                f"{self.path}: expected input {[INPUT_NAME]} and outputs {list(OUTPUT_NAMES)}, got {inputs} and {outputs}"
            )

    def run(self, waves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, probabilities)`` for a float32 batch ``[batch, samples]``."""
        batch = np.ascontiguousarray(waves, dtype=np.float32)
        if batch.ndim != 2:
            raise ValueError(f"{self.path}: expected waveforms of shape [batch, samples], got {batch.shape}")
        logits, probabilities = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return logits, probabilities


# --------------------------------------------------------------------------- audio


def read_audio(path: str | os.PathLike[str], *, sample_rate: int, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """Decode ``path`` to a 1-D float32 array at ``sample_rate``, mono, finite, non-empty."""
    mono, native_rate = decode_mono(path, max_seconds=max_seconds, error=EdgeAudioError)
    if native_rate != sample_rate:
        mono = resample(mono, orig_rate=native_rate, new_rate=sample_rate)
    return mono


def _sinc_kernels(orig: int, new: int) -> tuple[np.ndarray, int]:
    """Polyphase filter bank ``[new, 2 * width + orig]`` of torchaudio's ``sinc_interp_hann``.

    ``orig``/``new`` are the rates divided by their gcd; output sample ``j`` of each block is a
    windowed-sinc FIR over the input around time ``j / new``, low-passed at ``0.99 * min`` rate.
    """
    base = min(orig, new) * _ROLLOFF
    width = math.ceil(_LOWPASS_ZERO_CROSSINGS * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    t = (np.arange(0, -new, -1, dtype=np.float64)[:, None] / new + idx) * base
    t = np.clip(t, -_LOWPASS_ZERO_CROSSINGS, _LOWPASS_ZERO_CROSSINGS)
    window = np.cos(t * math.pi / _LOWPASS_ZERO_CROSSINGS / 2) ** 2
    kernels = np.sinc(t) * window * (base / orig)  # np.sinc(x) = sin(pi x) / (pi x)
    return kernels.astype(np.float32), width


def resample(wave: np.ndarray, *, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal, numerically equal to ``torchaudio.functional.resample``."""
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    signal = np.asarray(wave, dtype=np.float32)
    if signal.ndim != 1:
        raise ValueError(f"resample expects a 1-D signal, got shape {signal.shape}")
    if orig_rate == new_rate:
        return signal.copy()
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    kernels, width = _sinc_kernels(orig, new)
    padded = np.pad(signal, (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernels.shape[1])[::orig]
    blocks = [
        frames[start : start + _RESAMPLE_FRAMES_PER_BLOCK] @ kernels.T
        for start in range(0, frames.shape[0], _RESAMPLE_FRAMES_PER_BLOCK)
    ]
    target_length = math.ceil(new * signal.shape[0] / orig)
    return np.concatenate(blocks).reshape(-1)[:target_length].astype(np.float32)


# --------------------------------------------------------------------------- windows


def split_windows(wave: np.ndarray, *, window: int, hop: int) -> np.ndarray:
    """Cut a 1-D signal into ``[n_windows, window]`` analysis windows.

    A signal no longer than ``window`` becomes one window, zero-padded at the end exactly like
    :func:`serforget.common.audio.fix_length` pads training clips. A longer one gets windows every ``hop``
    samples plus one final window aligned to the end, so no tail audio is ignored.
    """
    if window <= 0 or hop <= 0:
        raise ValueError(f"window and hop must be positive, got window={window}, hop={hop}")
    length = wave.shape[0]
    if length <= window:
        return np.pad(wave, (0, window - length))[None, :]
    starts = list(range(0, length - window + 1, hop))
    if starts[-1] != length - window:
        starts.append(length - window)
    return np.stack([wave[start : start + window] for start in starts])
