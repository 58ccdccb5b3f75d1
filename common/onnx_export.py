"""Export a trained SER model to ONNX for edge devices, prove it matches PyTorch, quantize it.

Why this exists: every release the server publishes also ships as ONNX, so edge devices can run
it with ONNX Runtime alone (no torch). A converted graph that silently disagrees with the model
the server evaluated would make every accuracy and unlearning claim about the release wrong on
the device, so export is gated: the graph must pass ``onnx.checker``, keep both input axes
symbolic, and reproduce PyTorch's logits on real audio of several lengths and batch sizes, or
:func:`export_onnx` raises and writes nothing. The int8 variant is gated too: it is published
only when its measured UA drop on labelled audio is within a bound *and* it runs faster than
the fp32 file (:mod:`serforget.common.onnx_quant`). The published fp32 file is ONNX Runtime's offline-
optimized graph with the log-mel DFT folded (:mod:`serforget.common.onnx_graph`).

How: the model is wrapped to return ``(logits, probabilities)`` and exported with torch's
``torch.export``-based exporter (``dynamo=True``) with named dynamic axes ``batch`` and
``samples``. That exporter is the maintained one (the TorchScript exporter is deprecated in
torch 2.9), stores the front end's DFT kernels as initializers (so dynamic quantization can
shrink them) and implements opsets from 18, hence the default. The example input has batch 2
because batch 1 would specialise the batch axis (``shared/ONNX.md``). In the exported copy every
``GroupNorm`` is replaced by a numerically safer equivalent (see :class:`_StableGroupNorm`); the
parity check compares against the caller's unmodified model. Metadata keys and the runtime
wrapper come from :mod:`serforget.common.edge.runtime`, the module the device itself uses.

``onnx_report.json`` (``format`` ``serforget-onnx-report``, ``format_version`` 1) records what
:func:`export_release_models` did: the export and parity reports, the int8 decision and sizes.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from serforget.common.checkpoint import load_checkpoint, state_dict_bytes
from serforget.common.data import DEFAULT_CLIP_SECONDS, load_waveforms
from serforget.common.edge.runtime import (
    INPUT_NAME,
    ONNX_FORMAT_VERSION,
    OUTPUT_NAMES,
    ModelInfo,
    OnnxModel,
)
from serforget.common.fsutil import atomic_write_json, fsync_dir, sha256_bytes, sha256_file
from serforget.common.manifest import filter_labels, read_manifest
from serforget.common.metrics import classification_report
from serforget.common.models.frontend import LogMel
from serforget.common.onnx_graph import use_folded_dft
from serforget.common.onnx_quant import (
    CANDIDATES,
    DEFAULT_MAX_CALIBRATION,
    Candidate,
    QuantizationError,
    choose_int8,
    interleaved_timings,
    quantize_candidate,
)

DEFAULT_OPSET = 18
#: torch 2.9's exporter has no implementations below opset 18 and its down-conversion fails on
#: the transformers graphs, so a lower request is refused rather than silently ignored.
MIN_OPSET = 18
#: fp32 parity bound on |logit difference| between ONNX Runtime and PyTorch.
DEFAULT_ATOL = 1e-4
#: Fraction of parity examples whose argmax must agree (the issue's 99.9 %).
DEFAULT_MIN_ARGMAX_AGREEMENT = 0.999
#: Crop lengths of the parity check: shorter than, equal to and longer than a training clip.
PARITY_SECONDS: tuple[float, ...] = (0.5, 1.0, 3.0, 7.0)
#: Batch sizes cycled through in the parity check (batch 1 included: the axis must stay dynamic).
PARITY_BATCH_SIZES: tuple[int, ...] = (1, 2, 3, 4)
DEFAULT_MAX_PARITY_UTTERANCES = 16
#: Largest UA drop, in percentage points, at which the int8 model is still published.
DEFAULT_MAX_UA_DROP = 1.0
#: Speed an int8 candidate needs, as a multiple of the fp32 model's (thread CPU time, one thread, batch 1):
#: 10 % above fp32, so that timing noise on a busy host does not publish an int8 model that is no faster.
DEFAULT_MIN_INT8_SPEEDUP = 1.1
#: ONNX Runtime's offline optimization level for the published fp32 file. "Extended" folds
#: constants and fuses operators but, unlike "all", applies no layout transformation tied to the
#: exporting machine's CPU, so the saved file suits every device; the device session still runs
#: its own hardware-specific passes when it loads the file.
OFFLINE_OPTIMIZATION = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
#: A drop exactly at the bound is accepted; float rounding of the difference of two ratios must not flip that.
_UA_DROP_TOLERANCE = 1e-9

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "onnx_report.json"
REPORT_FORMAT = "serforget-onnx-report"
REPORT_FORMAT_VERSION = 1


class OnnxExportError(ValueError):
    """The model cannot be exported, or the exported graph is not what edge devices need."""


class ParityError(OnnxExportError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the allowed bound; nothing was written."""


@dataclass(frozen=True)
class ParityReport:
    """How closely ONNX Runtime reproduced PyTorch on the parity inputs."""

    source: str
    n_examples: int
    lengths_s: list[float]
    batch_sizes: list[int]
    max_abs_logit_diff: float
    max_abs_prob_diff: float
    argmax_agreement: float
    atol: float
    min_argmax_agreement: float
    passed: bool


@dataclass(frozen=True)
class ExportReport:
    """Where the fp32 model went and what it is."""

    path: Path
    size_bytes: int
    sha256: str
    opset: int
    metadata: dict[str, str]
    parity: ParityReport
    export_seconds: float
    #: ``"ort-extended"`` when the file is ONNX Runtime's offline-optimized graph, ``"none"`` otherwise.
    optimization: str = "none"
    #: ``"folded-dft"`` or ``"conv-dft"``: how the log-mel front end's DFT is computed in the graph
    #: (``"none"`` for models without one, e.g. wav2vec2).
    front_end: str = "conv-dft"
    #: Size of the exporter's graph before offline optimization.
    raw_size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": self.path.name}


@dataclass(frozen=True)
class QuantReport:
    """Every int8 candidate's measured size, UA change and speed, and which one (if any) was published.

    ``quantization``, ``size_bytes_int8``, ``size_ratio``, ``ua_int8``, ``ua_drop_points`` and
    ``speedup`` describe the published candidate, or the smallest built one when none was published.
    """

    published: bool
    reason: str
    path: Path | None
    quantization: str | None
    size_bytes_fp32: int
    size_bytes_int8: int | None
    size_ratio: float | None
    ua_fp32: float | None
    ua_int8: float | None
    ua_drop_points: float | None
    max_ua_drop_points: float
    speedup: float | None
    min_speedup: float
    fp32_cpu_ms: float | None
    n_eval: int
    calibration_source: str
    candidates: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": self.path.name if self.path is not None else None}


@dataclass(frozen=True)
class EvalSet:
    """Labelled fixed-length clips for measuring UA with ONNX Runtime (``waves[N, samples]``)."""

    waves: np.ndarray
    targets: np.ndarray
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.targets.shape[0])


class _StableGroupNorm(nn.Module):
    """``nn.GroupNorm`` with its statistics reduced one axis at a time; same parameters, same function.

    Why: exported as is, GroupNorm becomes ONNX ``InstanceNormalization``, whose ONNX Runtime
    kernel accumulates each group's statistics in one float32 pass. Over long inputs whose values
    sit far from zero (log-mel frames of silence are at log(1e-6) = -13.8) that loses precision:
    a trained log-mel CNN's logits drifted by 2e-4 from PyTorch on 7 s clips, above the fp32
    parity bound. Means taken over one axis at a time (at most a few hundred terms each) and a
    two-pass variance bring the difference back to about 3e-6.
    """

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups = norm.num_groups
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    @staticmethod
    def _mean_per_group(grouped: torch.Tensor) -> torch.Tensor:
        for dim in range(grouped.dim() - 1, 1, -1):
            grouped = grouped.mean(dim=dim, keepdim=True)
        return grouped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(x.shape[0], self.num_groups, x.shape[1] // self.num_groups, *x.shape[2:])
        centered = grouped - self._mean_per_group(grouped)
        normalized = (centered / torch.sqrt(self._mean_per_group(centered * centered) + self.eps)).reshape(x.shape)
        if self.weight is None:
            return normalized
        shape = [1, -1] + [1] * (x.dim() - 2)
        return normalized * self.weight.reshape(shape) + self.bias.reshape(shape)


def _use_stable_group_norms(model: nn.Module) -> None:
    """Swap every ``nn.GroupNorm`` of ``model`` (the export copy) for :class:`_StableGroupNorm`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, _StableGroupNorm(child))


class _LogitsAndProbabilities(nn.Module):
    """The exported graph: the model's logits plus their softmax, so devices need no post-processing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(waveform)
        return logits, torch.softmax(logits, dim=-1)


# --------------------------------------------------------------------------- parity inputs


def probe_waves(
    *, sample_rate: int = 16_000, seconds: Sequence[float] = PARITY_SECONDS, per_length: int = 10
) -> list[torch.Tensor]:
    """Deterministic speech-like signals (voiced harmonics with vibrato, syllabic envelope, noise).

    ``per_length=10`` fills one batch of each size in :data:`PARITY_BATCH_SIZES` (1+2+3+4) per length.

    Used for the parity check only when no labelled corpus audio is available, so that an export
    is never unchecked; a manifest of real audio is preferred (see :func:`parity_waves_from_manifest`).
    """
    rng = np.random.default_rng(0)
    waves = []
    for duration in seconds:
        n = int(round(duration * sample_rate))
        t = np.arange(n) / sample_rate
        for _ in range(per_length):
            f0 = rng.uniform(90.0, 260.0) * (1.0 + 0.05 * np.sin(2 * np.pi * rng.uniform(3.0, 6.0) * t))
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            voiced = sum(np.sin(k * phase) / k for k in range(1, 9))
            envelope = 0.5 * (1.0 + np.sin(2 * np.pi * rng.uniform(2.0, 5.0) * t + rng.uniform(0, np.pi)))
            wave = 0.1 * envelope * voiced + 0.01 * rng.standard_normal(n)
            waves.append(torch.from_numpy(wave.astype(np.float32)))
    return waves


def _spread(items: Sequence[Any], k: int) -> list[Any]:
    """``k`` items evenly spaced over ``items`` (all of them when there are fewer)."""
    if len(items) <= k:
        return list(items)
    return [items[i * len(items) // k] for i in range(k)]


def parity_waves_from_manifest(
    *,
    manifest: str | os.PathLike[str],
    labels: Sequence[str],
    sample_rate: int = 16_000,
    seconds: Sequence[float] = PARITY_SECONDS,
    max_utterances: int = DEFAULT_MAX_PARITY_UTTERANCES,
) -> list[torch.Tensor]:
    """Real utterances from ``manifest``, each cut (centre crop / end pad) to every length in ``seconds``."""
    utterances = _spread(sorted(filter_labels(read_manifest(manifest), labels), key=lambda u: u.utt_id), max_utterances)
    if not utterances:
        raise OnnxExportError(f"{manifest}: no utterance with one of the labels {list(labels)} for the parity check")
    waves = []
    for duration in seconds:
        clips = load_waveforms(utterances, labels=labels, clip_seconds=duration, sample_rate=sample_rate)
        waves.extend(clips.waves.unbind(0))
    return waves


def eval_set_from_manifest(
    *, manifest: str | os.PathLike[str], labels: Sequence[str], clip_seconds: float, sample_rate: int = 16_000
) -> EvalSet:
    """Every utterance of ``manifest`` with one of ``labels``, cut like training clips."""
    data = load_waveforms(
        filter_labels(read_manifest(manifest), labels),
        labels=labels,
        clip_seconds=clip_seconds,
        sample_rate=sample_rate,
    )
    if len(data) == 0:
        raise OnnxExportError(f"{manifest}: no utterance with one of the labels {list(labels)} to measure UA on")
    return EvalSet(waves=data.waves.numpy(), targets=data.targets.numpy(), labels=tuple(labels))


# --------------------------------------------------------------------------- checks


def _batches_by_length(waves: Sequence[torch.Tensor | np.ndarray]) -> list[torch.Tensor]:
    """Stack equal-length waves into batches whose sizes cycle through :data:`PARITY_BATCH_SIZES`."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for wave in waves:
        tensor = torch.as_tensor(wave, dtype=torch.float32)
        if tensor.dim() != 1:
            raise OnnxExportError(f"parity waves must be 1-D, got shape {tuple(tensor.shape)}")
        by_length.setdefault(int(tensor.shape[0]), []).append(tensor)
    batches = []
    for length in sorted(by_length):
        group, start, turn = by_length[length], 0, 0
        while start < len(group):
            size = PARITY_BATCH_SIZES[turn % len(PARITY_BATCH_SIZES)]
            batches.append(torch.stack(group[start : start + size]))
            start, turn = start + size, turn + 1
    return batches


@torch.no_grad()
def check_parity(
    *,
    model: nn.Module,
    onnx_model: OnnxModel,
    waves: Sequence[torch.Tensor | np.ndarray],
    source: str,
    sample_rate: int,
    atol: float = DEFAULT_ATOL,
    min_argmax_agreement: float = DEFAULT_MIN_ARGMAX_AGREEMENT,
) -> ParityReport:
    """Run PyTorch and ONNX Runtime on the same batches and compare logits, probabilities, argmax."""
    if not waves:
        raise OnnxExportError("the parity check needs at least one waveform")
    max_logit = max_prob = 0.0
    agree = total = 0
    lengths, sizes = set(), set()
    for batch in _batches_by_length(waves):
        torch_logits = model(batch)
        torch_probs = torch.softmax(torch_logits, dim=-1).numpy()
        onnx_logits, onnx_probs = onnx_model.run(batch.numpy())
        if onnx_logits.shape != tuple(torch_logits.shape):
            raise ParityError(f"ONNX logits have shape {onnx_logits.shape}, PyTorch {tuple(torch_logits.shape)}")
        torch_logits = torch_logits.numpy()
        max_logit = max(max_logit, float(np.abs(onnx_logits - torch_logits).max()))
        max_prob = max(max_prob, float(np.abs(onnx_probs - torch_probs).max()))
        agree += int((onnx_logits.argmax(axis=1) == torch_logits.argmax(axis=1)).sum())
        total += batch.shape[0]
        lengths.add(round(batch.shape[1] / sample_rate, 4))
        sizes.add(int(batch.shape[0]))
    agreement = agree / total
    return ParityReport(
        source=source,
        n_examples=total,
        lengths_s=sorted(lengths),
        batch_sizes=sorted(sizes),
        max_abs_logit_diff=max_logit,
        max_abs_prob_diff=max_prob,
        argmax_agreement=agreement,
        atol=atol,
        min_argmax_agreement=min_argmax_agreement,
        passed=max_logit <= atol and agreement >= min_argmax_agreement,
    )


def check_graph(proto: onnx.ModelProto, *, n_labels: int, source: str) -> None:
    """What an edge consumer relies on: a valid graph, input ``[batch, samples]`` with both dims symbolic."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(f"{source}: onnx.checker rejects the graph ({exc})") from None
    inputs = {i.name: i for i in proto.graph.input}
    if list(inputs) != [INPUT_NAME]:
        raise OnnxExportError(f"{source}: graph inputs are {list(inputs)}, expected [{INPUT_NAME!r}]")
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    if len(dims) != 2 or not all(d.dim_param and not d.HasField("dim_value") for d in dims):
        shape = [d.dim_param or d.dim_value for d in dims]
        raise OnnxExportError(f"{source}: input {INPUT_NAME!r} has shape {shape}; both axes must be symbolic")
    outputs = [o.name for o in proto.graph.output]
    if tuple(outputs) != OUTPUT_NAMES:
        raise OnnxExportError(f"{source}: graph outputs are {outputs}, expected {list(OUTPUT_NAMES)}")
    for output in proto.graph.output:
        last = output.type.tensor_type.shape.dim[-1]
        if last.HasField("dim_value") and last.dim_value != n_labels:
            raise OnnxExportError(
                f"{source}: output {output.name!r} has {last.dim_value} classes, expected {n_labels} labels"
            )


# --------------------------------------------------------------------------- export


def _staging_path(out_path: Path) -> Path:
    """A private file next to ``out_path`` (same file system, so the final rename is atomic)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    return Path(name)


def _commit(staged: Path, out_path: Path) -> None:
    with open(staged, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(staged, 0o644)
    os.replace(staged, out_path)
    fsync_dir(out_path.parent)


def _set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace our keys in ``metadata_props``, keeping unrelated entries (e.g. the quantizer's)."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*kept, *sorted(metadata.items())]:
        proto.metadata_props.add(key=key, value=value)


def _example_input(sample_rate: int) -> torch.Tensor:
    """One second of quiet noise, batch 2 (batch 1 would pin the exported batch axis to 1)."""
    return 0.01 * torch.randn(2, sample_rate, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _check_output_width(model: nn.Module, *, n_labels: int, sample_rate: int) -> None:
    """Fail before the (slow) export when the model's classes and the label list disagree."""
    logits = model(_example_input(sample_rate))
    if logits.dim() != 2 or logits.shape[1] != n_labels:
        raise OnnxExportError(
            f"{type(model).__name__} outputs logits of shape {tuple(logits.shape)}, expected [batch, {n_labels}] for the labels"
        )


def _strip_debug_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node/per-value debug metadata (stack traces, FX names, class paths).

    Why: it is about 15 % of a small model's file, means nothing to ONNX Runtime, and would ship
    the server's source paths to every device. Model-level metadata (ours) is kept.
    """
    for entry in [*graph.node, *graph.value_info, *graph.input, *graph.output, *graph.initializer]:
        del entry.metadata_props[:]
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs]:
                _strip_debug_metadata(subgraph)


def _trace_to_onnx(model: nn.Module, *, opset: int, sample_rate: int) -> onnx.ModelProto:
    example = _example_input(sample_rate)
    try:
        program = torch.onnx.export(
            _LogitsAndProbabilities(model).eval(),
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={INPUT_NAME: {0: "batch", 1: "samples"}},
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many unrelated types; all mean "cannot export"
        raise OnnxExportError(f"torch.onnx.export failed for {type(model).__name__}: {exc}") from exc
    proto = program.model_proto
    _strip_debug_metadata(proto.graph)
    return proto


def _model_arch(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    if not callable(spec):
        raise OnnxExportError(f"{type(model).__name__} has no spec(); only project models can be exported")
    return str(spec()["arch"])


def export_onnx(
    *,
    model: nn.Module,
    labels: Sequence[str],
    out_path: str | os.PathLike[str],
    release_version: int | None,
    sample_rate: int = 16_000,
    weights_sha256: str | None = None,
    window_seconds: float = DEFAULT_CLIP_SECONDS,
    opset: int = DEFAULT_OPSET,
    parity_waves: Sequence[torch.Tensor | np.ndarray] | None = None,
    parity_source: str = "caller-supplied waves",
    atol: float = DEFAULT_ATOL,
    min_argmax_agreement: float = DEFAULT_MIN_ARGMAX_AGREEMENT,
    fold_dft: bool = True,
    optimize: bool = True,
    raw_out_path: str | os.PathLike[str] | None = None,
) -> ExportReport:
    """Export ``model`` (waveform in, logits and probabilities out) to ``out_path``, parity-checked.

    ``weights_sha256`` is the checkpoint's weights hash; when omitted it is computed from the
    model's state dict exactly as :func:`serforget.common.checkpoint.save_checkpoint` would.
    ``window_seconds`` (the training clip length) tells devices how to window long files.
    Without ``parity_waves``, deterministic :func:`probe_waves` are used. The model is copied,
    so the caller's module keeps its device and train/eval mode. Raises :class:`ParityError`
    (and leaves ``out_path`` untouched) when the graph does not match PyTorch.

    ``fold_dft`` computes the log-mel front end with :class:`serforget.common.onnx_graph.FoldedDftLogMel`
    (half the DFT arithmetic); ``optimize`` saves ONNX Runtime's offline-optimized graph
    (:data:`OFFLINE_OPTIMIZATION`) instead of the exporter's, so devices skip those passes and the
    file holds folded constants. The parity check runs on the file that is written.
    ``raw_out_path``, when given, also receives the exporter's graph before optimization: the
    quantizer works on that one (it does not know ONNX Runtime's fused operators).
    """
    labels = tuple(labels)
    if not labels or len(set(labels)) != len(labels):
        raise OnnxExportError(f"labels must be a non-empty list of distinct names, got {list(labels)}")
    if release_version is not None and (
        isinstance(release_version, bool) or not isinstance(release_version, int) or release_version < 1
    ):
        raise OnnxExportError(f"release_version must be a positive integer or None, got {release_version!r}")
    if not math.isfinite(window_seconds) or window_seconds <= 0:
        raise OnnxExportError(f"window_seconds must be a positive number of seconds, got {window_seconds!r}")
    if opset < MIN_OPSET:
        raise OnnxExportError(f"opset {opset} is not supported; the exporter needs opset {MIN_OPSET} or newer")
    out = Path(out_path)
    started = time.perf_counter()
    frozen = copy.deepcopy(model).cpu().eval()
    info = ModelInfo(
        arch=_model_arch(frozen),
        labels=labels,
        sample_rate=sample_rate,
        release_version=release_version,
        weights_sha256=weights_sha256 or sha256_bytes(state_dict_bytes(frozen.state_dict())),
        precision="fp32",
        window_seconds=window_seconds,
        format_version=ONNX_FORMAT_VERSION,
    )
    _check_output_width(frozen, n_labels=len(labels), sample_rate=sample_rate)
    exported = copy.deepcopy(frozen)
    _use_stable_group_norms(exported)
    has_log_mel = any(isinstance(m, LogMel) for m in exported.modules())
    folded = use_folded_dft(exported) > 0 if fold_dft else False
    proto = _trace_to_onnx(exported, opset=opset, sample_rate=sample_rate)
    _set_metadata(proto, info.to_metadata())
    check_graph(proto, n_labels=len(labels), source=str(out))
    if parity_waves is None:
        parity_waves, parity_source = probe_waves(sample_rate=sample_rate), "synthetic probe signals"
    staged = _staging_path(out)
    raw_staged = _staging_path(Path(raw_out_path) if raw_out_path is not None else out)
    try:
        onnx.save_model(proto, str(raw_staged))
        raw_size = raw_staged.stat().st_size
        if optimize:
            _optimize_offline(raw_staged, staged, metadata=info.to_metadata())
        else:
            staged.write_bytes(raw_staged.read_bytes())
        parity = check_parity(
            model=frozen,
            onnx_model=OnnxModel(staged),
            waves=parity_waves,
            source=parity_source,
            sample_rate=sample_rate,
            atol=atol,
            min_argmax_agreement=min_argmax_agreement,
        )
        if not parity.passed:
            raise ParityError(
                f"{out}: ONNX Runtime does not match PyTorch on {parity.n_examples} {parity_source} examples: "
                f"max |logit diff| {parity.max_abs_logit_diff:.3g} (bound {atol:g}), argmax agreement "
                f"{parity.argmax_agreement:.4f} (bound {min_argmax_agreement:g}); nothing was written"
            )
        _commit(staged, out)
        if raw_out_path is not None:
            _commit(raw_staged, Path(raw_out_path))
    finally:
        staged.unlink(missing_ok=True)
        raw_staged.unlink(missing_ok=True)
    return ExportReport(
        path=out,
        size_bytes=out.stat().st_size,
        sha256=sha256_file(out),
        opset=opset,
        metadata=info.to_metadata(),
        parity=parity,
        export_seconds=time.perf_counter() - started,
        optimization="ort-extended" if optimize else "none",
        front_end="folded-dft" if folded else ("conv-dft" if has_log_mel else "none"),
        raw_size_bytes=raw_size,
    )


def _optimize_offline(source: Path, target: Path, *, metadata: dict[str, str]) -> None:
    """Write ONNX Runtime's :data:`OFFLINE_OPTIMIZATION` graph of ``source`` to ``target``, keeping our metadata."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = OFFLINE_OPTIMIZATION
    options.optimized_model_filepath = str(target)
    try:
        onnxruntime.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise OnnxExportError(f"{source}: ONNX Runtime cannot optimize the exported graph ({exc})") from None
    proto = onnx.load(str(target))
    _set_metadata(proto, metadata)
    onnx.save_model(proto, str(target))


# --------------------------------------------------------------------------- int8


def onnx_ua(onnx_model: OnnxModel, data: EvalSet, *, batch_size: int = 32) -> float:
    """Unweighted accuracy of an ONNX model on ``data`` (the metric releases are judged by)."""
    if onnx_model.info.labels != data.labels:
        raise OnnxExportError(
            f"{onnx_model.path}: labels {list(onnx_model.info.labels)} differ from the data's {list(data.labels)}"
        )
    predictions = [
        onnx_model.run(data.waves[start : start + batch_size])[0].argmax(axis=1)
        for start in range(0, len(data), batch_size)
    ]
    return float(
        classification_report(data.targets.tolist(), np.concatenate(predictions).tolist(), labels=data.labels)["ua"]
    )


def build_candidate(
    *, name: str, source: Path, out: Path, calibration: Sequence[np.ndarray] | None, info: ModelInfo
) -> None:
    """Quantize the raw fp32 graph ``source`` as candidate ``name`` into ``out`` with int8 metadata; checked by onnx.checker.

    Raises :class:`serforget.common.onnx_quant.QuantizationError` when the quantizer or the checker fails.
    """
    quantize_candidate(name=name, source=source, out=out, calibration=calibration)
    proto = onnx.load(str(out))
    _set_metadata(proto, {**info.to_metadata(), "precision": "int8", "quantization": name})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise QuantizationError(f"the {name} int8 graph fails onnx.checker ({exc})") from None
    onnx.save_model(proto, str(out))


def quantize_int8(
    *,
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    eval_set: EvalSet | None,
    max_ua_drop: float = DEFAULT_MAX_UA_DROP,
    source_path: str | os.PathLike[str] | None = None,
    calibration: Sequence[np.ndarray] | None = None,
    calibration_source: str = "synthetic probe signals",
    min_speedup: float = DEFAULT_MIN_INT8_SPEEDUP,
    candidates: Sequence[str] = CANDIDATES,
    timing_rounds: int = 3,
    timing_calls: int = 3,
) -> QuantReport:
    """Build the int8 ``candidates``, measure them, and write the chosen one (if any) to ``out_path``.

    ``fp32_path`` is the fp32 model devices would otherwise run (UA and speed are compared with
    it); ``source_path`` is the graph to quantize (the exporter's, before ONNX Runtime's offline
    optimization; defaults to ``fp32_path``). Static candidates calibrate on ``calibration``
    clips (training audio in the benchmark; :func:`probe_waves` when none is given). UA is measured
    with ONNX Runtime on ``eval_set``; speed is thread CPU time per call at one thread and batch 1
    on one window, fp32 and candidates interleaved (:func:`serforget.common.onnx_quant.interleaved_timings`).
    :func:`serforget.common.onnx_quant.choose_int8` picks the fastest candidate within ``max_ua_drop`` UA
    points and at least ``min_speedup`` x fp32. Without labelled data nothing is published.
    ``out_path`` is never partially written: candidates are staged, the chosen one renamed into place.
    """
    if not math.isfinite(max_ua_drop) or max_ua_drop < 0:
        raise OnnxExportError(f"max_ua_drop must be a non-negative number of UA points, got {max_ua_drop!r}")
    if not math.isfinite(min_speedup) or min_speedup <= 0:
        raise OnnxExportError(f"min_speedup must be a positive factor, got {min_speedup!r}")
    unknown = sorted(set(candidates) - set(CANDIDATES))
    if unknown or not candidates:
        raise OnnxExportError(
            f"int8 candidates must be a non-empty subset of {list(CANDIDATES)}, got {list(candidates)}"
        )
    fp32_file, out = Path(fp32_path), Path(out_path)
    source = Path(source_path) if source_path is not None else fp32_file
    fp32_model = OnnxModel(fp32_file)
    info = fp32_model.info
    if info.precision != "fp32" or OnnxModel(source).info.precision != "fp32":
        raise OnnxExportError(f"{source}: metadata precision is not 'fp32'; quantize the fp32 model")
    if calibration is None:
        calibration = [
            w.numpy() for w in probe_waves(sample_rate=info.sample_rate, seconds=(info.window_seconds,), per_length=16)
        ]
        calibration_source = "synthetic probe signals"
    if eval_set is None or len(eval_set) == 0:
        return QuantReport(
            published=False,
            reason="no labelled evaluation data, so the UA change cannot be measured",
            path=None,
            quantization=None,
            size_bytes_fp32=fp32_file.stat().st_size,
            size_bytes_int8=None,
            size_ratio=None,
            ua_fp32=None,
            ua_int8=None,
            ua_drop_points=None,
            max_ua_drop_points=max_ua_drop,
            speedup=None,
            min_speedup=min_speedup,
            fp32_cpu_ms=None,
            n_eval=0,
            calibration_source=calibration_source,
            candidates=[],
        )
    ua_fp32 = onnx_ua(fp32_model, eval_set)
    staged: dict[str, Path] = {}
    errors: dict[str, str] = {}
    try:
        for name in candidates:
            path = _staging_path(out)
            staged[name] = path
            try:
                build_candidate(name=name, source=source, out=path, calibration=calibration, info=info)
            except QuantizationError as exc:
                errors[name] = str(exc)
        built = {name: OnnxModel(path, threads=1) for name, path in staged.items() if name not in errors}
        wave = eval_set.waves[:1]  # one window of real audio, batch 1: the edge shape
        fp32_timed = OnnxModel(fp32_file, threads=1)
        runners = {
            "fp32": lambda: fp32_timed.run(wave),
            **{name: (lambda m=m: m.run(wave)) for name, m in built.items()},
        }
        timings = interleaved_timings(runners, rounds=timing_rounds, calls=timing_calls)
        results = []
        for name in candidates:
            if name in errors:
                results.append(Candidate.failed(name, errors[name]))
                continue
            ua = onnx_ua(built[name], eval_set)
            results.append(
                Candidate(
                    name=name,
                    quantization=name.split("-")[0],
                    quant_format={"static-qdq": "QDQ", "static-qoperator": "QOperator"}.get(name),
                    size_bytes=staged[name].stat().st_size,
                    ua=ua,
                    ua_drop_points=100.0 * (ua_fp32 - ua),
                    cpu_ms=timings[name].cpu_ms,
                    speedup=timings["fp32"].cpu_ms / max(timings[name].cpu_ms, 1e-9),
                )
            )
        chosen, reason = choose_int8(
            results, max_ua_drop=max_ua_drop, min_speedup=min_speedup, tolerance=_UA_DROP_TOLERANCE
        )
        if chosen is not None:
            _commit(staged[chosen.name], out)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    size_fp32 = fp32_file.stat().st_size
    shown = chosen or min(
        (c for c in results if c.size_bytes is not None), key=lambda c: c.size_bytes or 0, default=None
    )
    return QuantReport(
        published=chosen is not None,
        reason=reason,
        path=out if chosen is not None else None,
        quantization=shown.name if shown else None,
        size_bytes_fp32=size_fp32,
        size_bytes_int8=shown.size_bytes if shown else None,
        size_ratio=shown.size_bytes / size_fp32 if shown and shown.size_bytes else None,
        ua_fp32=ua_fp32,
        ua_int8=shown.ua if shown else None,
        ua_drop_points=shown.ua_drop_points if shown else None,
        max_ua_drop_points=max_ua_drop,
        speedup=shown.speedup if shown else None,
        min_speedup=min_speedup,
        fp32_cpu_ms=timings["fp32"].cpu_ms,
        n_eval=len(eval_set),
        calibration_source=calibration_source,
        candidates=[c.to_dict() for c in results],
    )


def calibration_waves_from_manifest(
    *,
    manifest: str | os.PathLike[str],
    labels: Sequence[str],
    clip_seconds: float,
    sample_rate: int = 16_000,
    max_utterances: int = DEFAULT_MAX_CALIBRATION,
) -> list[np.ndarray]:
    """Up to ``max_utterances`` clips of ``manifest`` (spread over it, cut like training clips) for static calibration."""
    utterances = _spread(sorted(filter_labels(read_manifest(manifest), labels), key=lambda u: u.utt_id), max_utterances)
    if not utterances:
        raise OnnxExportError(f"{manifest}: no utterance with one of the labels {list(labels)} to calibrate int8 on")
    clips = load_waveforms(utterances, labels=labels, clip_seconds=clip_seconds, sample_rate=sample_rate)
    return [wave.numpy() for wave in clips.waves.unbind(0)]


# --------------------------------------------------------------------------- release entry point


def export_release_models(
    *,
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    parity_manifest: str | os.PathLike[str] | None = None,
    release_version: int | None = None,
    int8: bool = True,
    max_ua_drop: float = DEFAULT_MAX_UA_DROP,
    atol: float = DEFAULT_ATOL,
    max_parity_utterances: int = DEFAULT_MAX_PARITY_UTTERANCES,
    calibration_manifest: str | os.PathLike[str] | None = None,
    min_int8_speedup: float = DEFAULT_MIN_INT8_SPEEDUP,
) -> dict[str, Path]:
    """Export a checkpoint for a release; returns release file name -> path of the files to publish.

    Always ``model.onnx`` (ONNX Runtime's offline-optimized fp32 graph) and ``onnx_report.json``;
    ``model.int8.onnx`` only when ``int8`` is set and some int8 candidate kept UA within
    ``max_ua_drop`` on ``parity_manifest``'s labelled utterances *and* ran at least
    ``min_int8_speedup`` x as fast as fp32 (:func:`quantize_int8`). ``parity_manifest`` (real
    corpus audio, e.g. the held-out split) drives the parity check; without it synthetic probe
    signals are used and the int8 variant cannot be published. Static int8 calibrates on
    ``calibration_manifest`` (training audio, never the audio UA is measured on) or, without one,
    on synthetic probe signals; the report says which.
    """
    model, meta = load_checkpoint(checkpoint_dir)
    out = Path(out_dir)
    window = float(meta.provenance.get("settings", {}).get("clip_seconds", DEFAULT_CLIP_SECONDS))
    if parity_manifest is not None:
        waves = parity_waves_from_manifest(
            manifest=parity_manifest,
            labels=meta.labels,
            sample_rate=meta.sample_rate,
            max_utterances=max_parity_utterances,
        )
        source = f"{len(waves) // len(PARITY_SECONDS)} utterances of {Path(parity_manifest).name}"
    else:
        waves, source = None, "synthetic probe signals"
    with tempfile.TemporaryDirectory(prefix="onnx-raw-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        export = export_onnx(
            model=model,
            labels=meta.labels,
            out_path=out / FP32_FILE,
            release_version=release_version,
            sample_rate=meta.sample_rate,
            weights_sha256=meta.weights_sha256,
            window_seconds=window,
            parity_waves=waves,
            parity_source=source,
            atol=atol,
            raw_out_path=raw,
        )
        files = {FP32_FILE: export.path}
        quant = None
        if int8:
            eval_set = (
                eval_set_from_manifest(
                    manifest=parity_manifest, labels=meta.labels, clip_seconds=window, sample_rate=meta.sample_rate
                )
                if parity_manifest is not None
                else None
            )
            calibration = (
                calibration_waves_from_manifest(
                    manifest=calibration_manifest, labels=meta.labels, clip_seconds=window, sample_rate=meta.sample_rate
                )
                if calibration_manifest is not None and eval_set is not None
                else None
            )
            quant = quantize_int8(
                fp32_path=export.path,
                source_path=raw,
                out_path=out / INT8_FILE,
                eval_set=eval_set,
                max_ua_drop=max_ua_drop,
                calibration=calibration,
                min_speedup=min_int8_speedup,
                calibration_source=f"{len(calibration)} clips of {Path(calibration_manifest).name}"
                if calibration
                else "synthetic probe signals",
            )
            if quant.published and quant.path is not None:
                files[INT8_FILE] = quant.path
    report = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        "created_at": time.time(),
        "checkpoint_weights_sha256": meta.weights_sha256,
        "release_version": release_version,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "fp32": export.to_dict(),
        "int8": quant.to_dict() if quant is not None else None,
        "files": {name: {"sha256": sha256_file(path), "size": path.stat().st_size} for name, path in files.items()},
    }
    files[REPORT_FILE] = atomic_write_json(out / REPORT_FILE, report)
    return files
