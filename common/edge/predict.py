"""Edge inference: emotion predictions for audio files with ONNX Runtime alone (no torch).

Why windows: the model was trained on fixed-length clips (the ``window_seconds`` stored in the
ONNX metadata, 3 s by default), and a recording of a minute is not one emotion sample. A file no
longer than a window is zero-padded at the end to one window, as training pads short clips; a
longer file is cut into windows every ``hop`` (half a window by default) plus one window flush
with the end, and the per-window probabilities are averaged. Averaging probabilities rather
than taking a majority vote keeps the output a distribution and lets confident windows count
more than ambiguous ones.

Why ``latency_ms`` covers decoding too: it is what a user of the device waits for per file;
``inference_ms`` isolates the ONNX Runtime part for comparison with the benchmarks.

Output format (``format`` ``serforget-edge-predictions``, ``format_version`` 1): see
:meth:`PredictionRun.to_dict`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serforget.common.edge.runtime import PRECISIONS, EdgeModelError, OnnxModel, read_audio, split_windows

PREDICTIONS_FORMAT = "serforget-edge-predictions"
PREDICTIONS_FORMAT_VERSION = 1
MODEL_FILES: dict[str, str] = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
#: Windows per ONNX Runtime call: large enough to amortise call overhead, small enough for devices.
MAX_WINDOWS_PER_RUN = 16
#: File name of a pulled edge folder's pointer to its current release (see ``serforget.common.edge.pull``).
_EDGE_POINTER = "current.json"


@dataclass(frozen=True)
class Prediction:
    """The emotion of one file and how it was obtained."""

    file: str
    label: str
    probabilities: dict[str, float]
    duration_s: float
    n_windows: int
    latency_ms: float
    inference_ms: float


@dataclass(frozen=True)
class PredictionRun:
    """Predictions of one model for several files."""

    model_path: Path
    model: OnnxModel
    predictions: list[Prediction]

    def to_dict(self) -> dict[str, Any]:
        info = self.model.info
        return {
            "format": PREDICTIONS_FORMAT,
            "format_version": PREDICTIONS_FORMAT_VERSION,
            "model": {
                "path": str(self.model_path),
                "arch": info.arch,
                "precision": info.precision,
                "release_version": info.release_version,
                "weights_sha256": info.weights_sha256,
                "labels": list(info.labels),
                "sample_rate": info.sample_rate,
                "window_seconds": info.window_seconds,
            },
            "predictions": [vars(p) for p in self.predictions],
        }


def resolve_model_file(model: str | os.PathLike[str], *, precision: str = "fp32") -> Path:
    """The ONNX file to run for ``model``: a ``.onnx`` file, a release folder, or a pulled edge folder.

    A pulled edge folder (holding ``current.json``) resolves to its current verified release;
    a folder holding ``model.onnx`` / ``model.int8.onnx`` to the file of ``precision``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    path = Path(model)
    if path.is_file():
        return path
    if not path.is_dir():
        raise EdgeModelError(f"{path}: no such model file or folder")
    if (path / _EDGE_POINTER).is_file():
        from serforget.common.edge.pull import current_release  # only pulled folders need the release code

        release = current_release(path)
        if release is None:
            raise EdgeModelError(f"{path}: no release is installed (run `serforget edge pull` first)")
        path = release
    candidate = path / MODEL_FILES[precision]
    if not candidate.is_file():
        hint = (
            " (the int8 variant is only published when its UA drop is within the bound and it runs faster than fp32)"
            if precision == "int8"
            else ""
        )
        raise EdgeModelError(f"{path}: has no {MODEL_FILES[precision]}{hint}")
    return candidate


def _mean_probabilities(model: OnnxModel, windows: np.ndarray) -> np.ndarray:
    chunks = [
        model.run(windows[start : start + MAX_WINDOWS_PER_RUN])[1]
        for start in range(0, len(windows), MAX_WINDOWS_PER_RUN)
    ]
    return np.concatenate(chunks).mean(axis=0)


def predict_file(model: OnnxModel, path: str | os.PathLike[str], *, hop_seconds: float | None = None) -> Prediction:
    """Predict one file: decode and resample, window, run, average the window probabilities."""
    info = model.info
    window = int(round(info.window_seconds * info.sample_rate))
    hop = int(round((hop_seconds if hop_seconds is not None else info.window_seconds / 2) * info.sample_rate))
    if not 0 < hop <= window:
        raise ValueError(
            f"hop_seconds must be positive and at most the {info.window_seconds:g} s window, got {hop_seconds}"
        )
    started = time.perf_counter()
    wave = read_audio(path, sample_rate=info.sample_rate)
    windows = split_windows(wave, window=window, hop=hop)
    inference_start = time.perf_counter()
    probabilities = _mean_probabilities(model, windows)
    finished = time.perf_counter()
    return Prediction(
        file=str(path),
        label=info.labels[int(np.argmax(probabilities))],
        probabilities={label: float(p) for label, p in zip(info.labels, probabilities)},
        duration_s=wave.shape[0] / info.sample_rate,
        n_windows=int(windows.shape[0]),
        latency_ms=1000.0 * (finished - started),
        inference_ms=1000.0 * (finished - inference_start),
    )


def predict_files(
    *,
    model: str | os.PathLike[str],
    files: Sequence[str | os.PathLike[str]],
    precision: str = "fp32",
    threads: int | None = None,
    hop_seconds: float | None = None,
) -> PredictionRun:
    """Load the model once (see :func:`resolve_model_file`) and predict every file in order."""
    if not files:
        raise ValueError("no audio files given")
    model_path = resolve_model_file(model, precision=precision)
    onnx_model = OnnxModel(model_path, threads=threads)
    predictions = [predict_file(onnx_model, file, hop_seconds=hop_seconds) for file in files]
    return PredictionRun(model_path=model_path, model=onnx_model, predictions=predictions)
