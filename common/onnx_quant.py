"""int8 candidates for a release (static QDQ, static QOperator, dynamic), their latency, and the rule that picks one.

Why several candidates and a measured choice: which int8 form is fastest depends on the model
and the CPU, and sometimes none is faster than fp32. Measured here (AVX2, no VNNI,
``benchmarks/results/edge.md``): ONNX Runtime's dynamic int8 convolution (``ConvInteger``) made
the log-mel CNN 3-7x *slower* than fp32, static int8 runs it at 0.66x fp32, while the int8
forms of a wav2vec2-base-size model are 1.05-1.11x faster than fp32.
Static quantization (``quantize_static``: activation ranges calibrated on audio, per-channel
int8 weights, ONNX Runtime's model pre-processing first) removes the per-call activation scans.
So the release builds every candidate, measures UA and latency, and publishes the fastest one
that keeps UA within the bound and is faster than fp32 (:func:`choose_int8`), or none, saying why.

What is quantized: matrix products and convolutions of the model body (``Conv``, ``MatMul``,
``Gemm``). The log-mel front end computes in fp32: its outputs span about twelve decades before
the log, which one int8 activation scale per tensor cannot represent (quiet bins collapse to the
floor). Its constant matrices (DFT kernels, most of a small model's file) are *stored* as int8
with one scale per output column, rescaled by ``Cast`` and ``Mul`` nodes that ONNX Runtime
folds back into float matrices when the session loads (:func:`store_front_end_int8`), so the
int8 file stays small at no per-call cost. Dynamic quantization leaves
convolutions alone for the reason above.

Latency is compared on thread CPU time at one thread (``time.thread_time`` around the call;
ONNX Runtime runs a one-thread session on the calling thread): on a shared host, wall time
also counts the time the process waited for a CPU, which says nothing about the model.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from serforget.common.edge.runtime import INPUT_NAME

#: Candidate names, in the order they are built and reported.
CANDIDATES: tuple[str, ...] = ("static-qdq", "static-qoperator", "dynamic")
#: Operators quantized in the model body.
STATIC_OP_TYPES: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
DYNAMIC_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm")
#: Initializer name endings of the log-mel front end (both the conv and the folded form), kept fp32.
FRONT_END_CONSTANTS: tuple[str, ...] = ("dft_kernels", "mel_fbanks", "cos_fold", "sin_fold", "mel_fbanks_t")
#: Calibration clips used at most: activation ranges settle after a few dozen utterances.
DEFAULT_MAX_CALIBRATION = 32


class QuantizationError(ValueError):
    """A candidate could not be built (the quantizer failed on this graph)."""


@dataclass(frozen=True)
class Timing:
    """Per-call latency of one model at one thread: medians over interleaved rounds."""

    wall_ms: float
    cpu_ms: float
    wall_min_ms: float
    n_calls: int


@dataclass(frozen=True)
class Candidate:
    """One int8 variant and what was measured about it."""

    name: str
    quantization: str
    quant_format: str | None
    size_bytes: int | None
    ua: float | None
    ua_drop_points: float | None
    cpu_ms: float | None
    speedup: float | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def failed(cls, name: str, error: str) -> Candidate:
        """A candidate that could not be built or measured: nothing but its name and why."""
        return cls(
            name=name,
            quantization=name.split("-")[0],
            quant_format=None,
            size_bytes=None,
            ua=None,
            ua_drop_points=None,
            cpu_ms=None,
            speedup=None,
            error=error,
        )


class _Reader(CalibrationDataReader):
    """Feeds calibration clips one at a time (batch 1, the edge shape) to the calibrator."""

    def __init__(self, waves: Sequence[np.ndarray]) -> None:
        self._items = iter([{INPUT_NAME: np.asarray(w, dtype=np.float32)[None, :]} for w in waves])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def front_end_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of nodes that read a front-end constant (DFT kernels, mel filters): left in fp32."""
    constants = {i.name for i in proto.graph.initializer if i.name.split(".")[-1] in FRONT_END_CONSTANTS}
    return [node.name for node in proto.graph.node if constants.intersection(node.input)]


def store_front_end_int8(path: Path) -> int:
    """Store the front end's float matrices of the quantized file ``path`` as int8 + per-column scale.

    Why: the DFT matrices are about 60 % of the log-mel CNN's fp32 file. Stored symmetric int8
    per output column (the largest entry of each column maps to 127), they are turned back into
    float by the graph itself (constant-folded at session creation), so the arithmetic stays fp32 and only the weights' rounding
    (relative error <= 1/254 of a column's peak) reaches the features; the candidate's UA is
    measured with it. Returns the number of matrices converted.
    """
    proto = onnx.load(str(path))
    graph = proto.graph
    converted, kept, added = 0, [], []
    for init in graph.initializer:
        if (
            init.name.split(".")[-1] not in FRONT_END_CONSTANTS
            or init.data_type != onnx.TensorProto.FLOAT
            or len(init.dims) != 2
        ):
            kept.append(init)
            continue
        matrix = onnx.numpy_helper.to_array(init).astype(np.float64)
        scale = np.abs(matrix).max(axis=0) / 127.0
        scale[scale == 0] = 1.0
        quantized = np.clip(np.rint(matrix / scale), -127, 127).astype(np.int8)
        stored = f"{init.name}.int8"
        kept += [
            onnx.numpy_helper.from_array(quantized, stored),
            onnx.numpy_helper.from_array(scale.astype(np.float32), f"{init.name}.scale"),
        ]
        # Cast and Mul (not DequantizeLinear, which ONNX Runtime keeps unfolded for its QDQ fusions):
        # constant inputs, so the session folds them back into the float matrix once, at load time
        added += [
            onnx.helper.make_node(
                "Cast", [stored], [f"{init.name}.float"], name=f"{init.name}.cast", to=onnx.TensorProto.FLOAT
            ),
            onnx.helper.make_node(
                "Mul", [f"{init.name}.float", f"{init.name}.scale"], [init.name], name=f"{init.name}.rescale"
            ),
        ]
        converted += 1
    if converted:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = added + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.save_model(proto, str(path))
    return converted


def quantize_candidate(*, name: str, source: Path, out: Path, calibration: Sequence[np.ndarray] | None) -> None:
    """Write candidate ``name`` of the raw fp32 graph ``source`` to ``out``; :class:`QuantizationError` on failure."""
    if name not in CANDIDATES:
        raise ValueError(f"unknown int8 candidate {name!r}; expected one of {CANDIDATES}")
    excluded = front_end_nodes(onnx.load(str(source), load_external_data=False))
    try:
        if name == "dynamic":
            quantize_dynamic(
                str(source),
                str(out),
                weight_type=QuantType.QInt8,
                per_channel=False,
                op_types_to_quantize=list(DYNAMIC_OP_TYPES),
                nodes_to_exclude=excluded,
            )
            store_front_end_int8(out)
            return
        if not calibration:
            raise QuantizationError("static quantization needs calibration audio")
        with tempfile.TemporaryDirectory(prefix="quant-") as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            # symbolic shape inference fails on the exporter's dynamic Concat shapes; ONNX's own is used
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(out),
                _Reader(calibration),
                quant_format=QuantFormat.QDQ if name == "static-qdq" else QuantFormat.QOperator,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(STATIC_OP_TYPES),
                nodes_to_exclude=excluded,
            )
        store_front_end_int8(out)
    except QuantizationError:
        raise
    except Exception as exc:  # the quantizer raises many unrelated types; all mean "no such candidate"
        raise QuantizationError(f"{name} quantization of {source.name} failed: {type(exc).__name__}: {exc}") from exc


def interleaved_timings(
    runners: dict[str, Callable[[], object]], *, rounds: int = 3, calls: int = 3, warmup: int = 1
) -> dict[str, Timing]:
    """Time every runner in ``rounds`` alternating blocks (A B C A B C ...) of ``warmup`` + ``calls`` calls.

    Why rounds: on a shared host the load changes over seconds, and spreading each model's calls
    over the whole measurement makes those changes hit all of them alike. Medians of wall and
    thread CPU time are kept; the minimum wall time shows what the model does when it has the CPU.
    """
    if rounds < 1 or calls < 1 or warmup < 0:
        raise ValueError(f"rounds and calls must be positive and warmup non-negative, got {rounds}, {calls}, {warmup}")
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(warmup):
                run()
            for _ in range(calls):
                wall0, cpu0 = time.perf_counter(), time.thread_time()
                run()
                cpu[name].append(1000.0 * (time.thread_time() - cpu0))
                wall[name].append(1000.0 * (time.perf_counter() - wall0))
    return {
        name: Timing(
            wall_ms=statistics.median(wall[name]),
            cpu_ms=statistics.median(cpu[name]),
            wall_min_ms=min(wall[name]),
            n_calls=len(wall[name]),
        )
        for name in runners
    }


def choose_int8(
    candidates: Sequence[Candidate], *, max_ua_drop: float, min_speedup: float, tolerance: float = 1e-9
) -> tuple[Candidate | None, str]:
    """The candidate to publish and why: the fastest one within the UA bound and at least ``min_speedup`` x fp32.

    A candidate without a measured UA drop or speed-up (no labelled data, build failure) is never
    published: an unmeasured int8 model could be both less accurate and slower than fp32.
    """
    if not math.isfinite(max_ua_drop) or max_ua_drop < 0:
        raise ValueError(f"max_ua_drop must be a non-negative number of UA points, got {max_ua_drop!r}")
    if not math.isfinite(min_speedup) or min_speedup <= 0:
        raise ValueError(f"min_speedup must be a positive factor, got {min_speedup!r}")
    eligible, refusals = [], []
    for c in candidates:
        if c.error is not None:
            refusals.append(f"{c.name}: not built ({c.error})")
        elif c.ua_drop_points is None:
            refusals.append(f"{c.name}: UA change not measured (no labelled evaluation data)")
        elif c.ua_drop_points > max_ua_drop + tolerance:
            refusals.append(f"{c.name}: UA drop {c.ua_drop_points:.2f} points exceeds the {max_ua_drop:g}-point bound")
        elif c.speedup is None:
            refusals.append(f"{c.name}: latency not measured")
        elif c.speedup < min_speedup:
            refusals.append(f"{c.name}: {c.speedup:.2f}x fp32 speed, below the required {min_speedup:g}x")
        else:
            eligible.append(c)
    if not eligible:
        return None, "no int8 candidate is both within the UA bound and faster than fp32: " + (
            "; ".join(refusals) or "none was built"
        )
    best = max(eligible, key=lambda c: c.speedup or 0.0)
    return best, (
        f"{best.name}: UA drop {best.ua_drop_points:.2f} points within the {max_ua_drop:g}-point bound, "
        f"{best.speedup:.2f}x fp32 speed (required {min_speedup:g}x)"
    )
