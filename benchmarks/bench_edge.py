"""Edge inference: PyTorch eager vs ONNX Runtime fp32 (each export step) vs every int8 candidate, one run.

Why: releases ship as ONNX so edge devices can drop torch. This measures, side by side in one run
on the same machine, what each step of the export buys (the front end's DFT folded, ONNX
Runtime's offline graph optimization), what each int8 form (static QDQ, static QOperator,
dynamic) costs in UA and buys in speed, and which one the release's rule
(:func:`serforget.common.onnx_quant.choose_int8`) would publish. Batch 1, one thread: the edge case.

Timing: every runtime of an architecture is timed in interleaved rounds (A B C ... A B C ...,
:func:`serforget.common.onnx_quant.interleaved_timings`) on the same input; medians of wall time
(``latency_ms``) and of thread CPU time (``cpu_ms``) are reported. The host is shared (2 CPUs,
several other jobs): wall time includes the time the process waited for a CPU, so the targets
are judged on CPU time (``rtf_cpu``), with the wall numbers next to them.

Also measured per runtime, in a fresh process each: cold start (model/session creation plus the
first inference; import time reported apart) and peak resident memory; and the installed size
of a torch-free edge environment (a virtual environment with only ONNX Runtime, numpy and
soundfile from PyPI, in which the ONNX cold starts then run).

Models: the default log-mel CNN trained briefly on the synthetic corpus (UA on its test split;
static int8 calibrates on training-split clips), and a wav2vec2-base-size backbone
(transformers' default ``Wav2Vec2Config``, random weights: latency does not depend on the
values, UA would be chance, so int8 is compared with fp32 by logit difference and argmax
agreement instead).

Run from the repository root (15-30 minutes on a busy 2-core host)::

    .venv/bin/python -m benchmarks.bench_edge

Writes ``benchmarks/results/edge.json``, ``edge.md`` and ``edge.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from tqdm import tqdm

from serforget.common.audio import load_audio
from serforget.common.checkpoint import WEIGHTS_FILE, load_checkpoint, save_checkpoint
from serforget.common.corpora.synth import synthesize_corpus
from serforget.common.data import DEFAULT_CLIP_SECONDS, load_waveforms
from serforget.common.edge.runtime import OnnxModel
from serforget.common.fsutil import atomic_write_json, atomic_write_text
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import filter_labels, read_manifest
from serforget.common.models import build_model
from serforget.common.models.frontend import LogMel
from serforget.common.onnx_export import (
    DEFAULT_MAX_UA_DROP,
    DEFAULT_MIN_INT8_SPEEDUP,
    EvalSet,
    build_candidate,
    calibration_waves_from_manifest,
    export_onnx,
    onnx_ua,
    parity_waves_from_manifest,
    probe_waves,
)
from serforget.common.onnx_graph import FoldedDftLogMel
from serforget.common.onnx_quant import CANDIDATES, Candidate, QuantizationError, choose_int8, interleaved_timings
from serforget.common.pipeline import make_splits, train_checkpoint
from serforget.common.training import TrainConfig, evaluate_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_VERSION = 2
CNN_AUDIO_SECONDS = (1.0, 3.0, 10.0)
W2V2_AUDIO_SECONDS = (3.0,)
#: Test utterances concatenated into the latency inputs.
LATENCY_UTTERANCES = 16
#: Pinned versions of the edge environment's packages (the project's own pins).
EDGE_PACKAGES = ("onnxruntime==1.32.0", "numpy==2.4.6", "soundfile==0.14.0")
#: The issue's targets.
TARGET_INT8_SPEEDUP = 1.5
TARGET_INT8_UA_BOUND = 1.0
TARGET_FP32_OVER_EAGER = 3.0
TARGET_CNN_RTF = 0.003
TARGET_W2V2_INT8_RTF = 0.1

Runner = Callable[[], object]


# --------------------------------------------------------------------------- models and data


def prepare_checkpoint(
    *, data_dir: Path, work_dir: Path, checkpoint: Path | None, epochs: int
) -> tuple[Path, dict[str, Path]]:
    """The corpus splits, and the given checkpoint or a briefly trained default model."""
    manifest = synthesize_corpus(out_dir=data_dir)
    splits = make_splits(manifest=manifest, out_dir=data_dir / "splits")
    if checkpoint is not None:
        return checkpoint, splits
    trained = train_checkpoint(
        train_manifest=splits["train"],
        valid_manifest=splits["valid"],
        out_dir=work_dir / "original",
        train_config=TrainConfig(epochs=epochs, device="cpu"),
        progress=False,
    )
    return trained, splits


def speech_input(waves: Sequence[np.ndarray], *, seconds: float, sample_rate: int) -> np.ndarray:
    """``[1, seconds * rate]`` of real speech: consecutive utterances concatenated, cut to length."""
    n = int(round(seconds * sample_rate))
    pieces, have, cursor = [], 0, 0
    while have < n:
        pieces.append(waves[cursor % len(waves)])
        have += pieces[-1].shape[0]
        cursor += 1
    return np.concatenate(pieces)[:n][None, :].astype(np.float32)


def torch_runner(model: torch.nn.Module, x: np.ndarray) -> Runner:
    tensor = torch.from_numpy(x)

    def run() -> object:
        with torch.inference_mode():
            return model(tensor)

    return run


def onnx_runner(path: Path, x: np.ndarray) -> Runner:
    session = OnnxModel(path, threads=1)
    return lambda: session.run(x)


# --------------------------------------------------------------------------- fresh-process measurements

#: Peak resident set of this process. Not ``ru_maxrss``: Linux keeps that across fork + exec, so a
#: child started by a large benchmark process would report the parent's size; ``VmHWM`` belongs to
#: the new address space that ``exec`` created.
_PEAK = """
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

_ORT_COLD = (
    _PEAK
    + """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from serforget.common.edge.runtime import OnnxModel
t1 = time.perf_counter()
model = OnnxModel(sys.argv[1], threads=1)
t2 = time.perf_counter()
model.run(np.load(sys.argv[2]))
t3 = time.perf_counter()
print(json.dumps({"import_ms": 1e3 * (t1 - t0), "load_ms": 1e3 * (t2 - t1), "first_ms": 1e3 * (t3 - t2),
                  "peak_mem_mb": peak_mb(), "torch_loaded": "torch" in sys.modules}))
"""
)

_TORCH_COLD = (
    _PEAK
    + """
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch
from serforget.common.checkpoint import load_checkpoint
t1 = time.perf_counter()
torch.set_num_threads(1)
model, _ = load_checkpoint(sys.argv[1])
t2 = time.perf_counter()
with torch.inference_mode():
    model(torch.from_numpy(np.load(sys.argv[2])))
t3 = time.perf_counter()
print(json.dumps({"import_ms": 1e3 * (t1 - t0), "load_ms": 1e3 * (t2 - t1), "first_ms": 1e3 * (t3 - t2),
                  "peak_mem_mb": peak_mb(), "torch_loaded": True}))
"""
)


def cold_start(*, python: str, script: str, model_path: Path, x_path: Path, repeats: int) -> dict[str, Any]:
    """Median over ``repeats`` fresh processes of load + first inference, and the largest peak RSS."""
    runs = []
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    for _ in range(repeats):
        done = subprocess.run(
            [python, "-c", script, str(model_path), str(x_path)], capture_output=True, text=True, env=env, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"cold start of {model_path} with {python} failed: {done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    pick = sorted(runs, key=lambda r: r["load_ms"] + r["first_ms"])[len(runs) // 2]
    return {
        "cold_start_ms": pick["load_ms"] + pick["first_ms"],
        "load_ms": pick["load_ms"],
        "first_inference_ms": pick["first_ms"],
        "import_ms": pick["import_ms"],
        "peak_mem_mb": max(r["peak_mem_mb"] for r in runs),
        "torch_loaded": pick["torch_loaded"],
        "cold_start_repeats": repeats,
    }


def edge_environment(work_dir: Path) -> dict[str, Any]:
    """Create a venv with only the edge packages from PyPI; its installed size and interpreter."""
    venv = work_dir / "edge-venv"
    if venv.exists():
        shutil.rmtree(venv)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run(
        [*pip, "install", "--quiet", "--disable-pip-version-check", "--no-cache-dir", *EDGE_PACKAGES], check=True
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    freeze = subprocess.run(
        [*pip, "list", "--format=freeze", "--disable-pip-version-check"], capture_output=True, text=True, check=True
    ).stdout.split()

    def du(path: Path) -> int:
        return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())

    return {
        "python": str(python),
        "packages": freeze,
        "installed_bytes": du(venv),
        "site_packages_bytes": du(Path(site)),
        "has_torch": any(p.lower().startswith("torch") for p in freeze),
        "setup_s": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------- one architecture


def build_variants(
    *,
    model: torch.nn.Module,
    labels: Sequence[str],
    out: Path,
    parity_waves: Sequence[Any],
    parity_source: str,
    window_s: float,
    weights_sha256: str | None,
    calibration: list[np.ndarray],
    fold_steps: bool,
) -> tuple[dict[str, Path], dict[str, Any], dict[str, str]]:
    """Export every fp32 step and build every int8 candidate; returns paths, export reports, build errors."""
    out.mkdir(parents=True, exist_ok=True)
    paths, reports, errors = {}, {}, {}
    steps = [("fp32-conv-dft-raw", False, False)] if fold_steps else []
    steps += [("fp32-raw", True, False), ("fp32-release", True, True)]
    for name, fold, optimize in steps:
        report = export_onnx(
            model=model,
            labels=labels,
            out_path=out / f"{name}.onnx",
            release_version=None,
            weights_sha256=weights_sha256,
            window_seconds=window_s,
            parity_waves=parity_waves,
            parity_source=parity_source,
            fold_dft=fold,
            optimize=optimize,
        )
        paths[name], reports[name] = report.path, report.to_dict()
        print(
            f"  exported {name}: {report.size_bytes:,} bytes, parity max |diff| {report.parity.max_abs_logit_diff:.2e} "
            f"({report.export_seconds:.0f} s)",
            flush=True,
        )
    info = OnnxModel(paths["fp32-release"]).info
    for name in CANDIDATES:
        path = out / f"int8-{name}.onnx"
        try:
            build_candidate(name=name, source=paths["fp32-raw"], out=path, calibration=calibration, info=info)
            paths[f"int8-{name}"] = path
            print(f"  built int8 {name}: {path.stat().st_size:,} bytes", flush=True)
        except QuantizationError as exc:
            errors[name] = str(exc)
            print(f"  int8 {name} failed: {exc}", flush=True)
    return paths, reports, errors


def precision_of(variant: str) -> tuple[str, str, str | None]:
    """``(runtime, precision, quantization)`` of a variant name."""
    if variant == "pytorch":
        return "pytorch", "fp32", None
    if variant.startswith("int8-"):
        return "onnxruntime", "int8", variant.removeprefix("int8-").split("-")[0]
    return "onnxruntime", "fp32", None


def measure_arch(
    *,
    arch: str,
    model: torch.nn.Module,
    paths: dict[str, Path],
    latency_waves: Sequence[np.ndarray],
    audio_seconds: Sequence[float],
    sample_rate: int,
    rounds: int,
    calls: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """Latency rows (batch 1, one thread) for every variant and audio length, interleaved per length."""
    torch.set_num_threads(1)
    rows = []
    for seconds in audio_seconds:
        x = speech_input(latency_waves, seconds=seconds, sample_rate=sample_rate)
        runners = {"pytorch": torch_runner(model, x), **{name: onnx_runner(path, x) for name, path in paths.items()}}
        timings = interleaved_timings(runners, rounds=rounds, calls=calls, warmup=warmup)
        for name, t in timings.items():
            runtime, precision, quantization = precision_of(name)
            rows.append(
                {
                    "arch": arch,
                    "variant": name,
                    "runtime": runtime,
                    "precision": precision,
                    "quantization": quantization,
                    "threads": 1,
                    "batch": 1,
                    "audio_s": seconds,
                    "latency_ms": t.wall_ms,
                    "latency_min_ms": t.wall_min_ms,
                    "cpu_ms": t.cpu_ms,
                    "rtf": t.wall_ms / 1000.0 / seconds,
                    "rtf_cpu": t.cpu_ms / 1000.0 / seconds,
                    "n_calls": t.n_calls,
                }
            )
        shown = "  ".join(f"{n} {t.cpu_ms:.2f}" for n, t in timings.items())
        print(f"  {arch} {seconds:g} s, CPU ms per call: {shown}", flush=True)
    return rows


def int8_agreement(fp32: Path, int8: Path, waves: np.ndarray) -> dict[str, float]:
    """Max |logit diff| and argmax agreement of an int8 candidate against fp32 on ``waves`` (batch 1 each)."""
    a, b = OnnxModel(fp32, threads=1), OnnxModel(int8, threads=1)
    diffs, agree = [], 0
    for wave in waves:
        la, lb = a.run(wave[None, :])[0], b.run(wave[None, :])[0]
        diffs.append(float(np.abs(la - lb).max()))
        agree += int(la.argmax() == lb.argmax())
    return {"max_abs_logit_diff": max(diffs), "argmax_agreement": agree / len(waves), "n": len(waves)}


# --------------------------------------------------------------------------- front end micro-benchmark


class _FrontEnd(torch.nn.Module):
    """A front end alone, waveform -> mel power, for the micro-benchmark's export."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.inner.power_mel(waveform)


def _stft_graph(frontend: LogMel, path: Path) -> Path:
    """ONNX ``STFT`` (opset 17) + power + mel filterbank, built by hand (torch's complex STFT does not export)."""
    from onnx import TensorProto, helper, numpy_helper

    n_fft, hop = frontend.n_fft, frontend.hop_length
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64).numpy().astype(np.float32)
    inits = [
        numpy_helper.from_array(window, "window"),
        numpy_helper.from_array(np.array(hop, np.int64), "step"),
        numpy_helper.from_array(np.array(n_fft, np.int64), "length"),
        numpy_helper.from_array(np.array([0, n_fft // 2, 0, n_fft // 2], np.int64), "pads"),
        numpy_helper.from_array(frontend.mel_fbanks.T.contiguous().numpy(), "mel"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    nodes = [
        helper.make_node("Pad", ["waveform", "pads"], ["padded"], mode="reflect"),
        helper.make_node("STFT", ["padded", "step", "window", "length"], ["spec"], onesided=1),
        helper.make_node("ReduceSumSquare", ["spec", "last"], ["power"], keepdims=0),
        helper.make_node("MatMul", ["power", "mel"], ["mel_power_t"]),
        helper.make_node("Transpose", ["mel_power_t"], ["mel_power"], perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "stft_front_end",
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("mel_power", TensorProto.FLOAT, None)],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def front_end_benchmark(
    *, model: torch.nn.Module, x: np.ndarray, out: Path, rounds: int, calls: int
) -> list[dict[str, Any]]:
    """The log-mel front end alone in three forms: conv1d DFT (as trained), folded DFT, ONNX STFT op."""
    frontend: LogMel = model.frontend
    out.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(np.repeat(x, 2, axis=0))
    paths = {}
    for name, module in (("conv1d-dft", frontend), ("folded-dft", FoldedDftLogMel(frontend))):
        program = torch.onnx.export(
            _FrontEnd(module).eval(),
            (example,),
            dynamo=True,
            opset_version=18,
            input_names=["waveform"],
            output_names=["mel_power"],
            dynamic_shapes={"waveform": {0: "batch", 1: "samples"}},
            verbose=False,
        )
        program.save(str(out / f"{name}.onnx"))
        paths[name] = out / f"{name}.onnx"
    paths["onnx-stft-op"] = _stft_graph(frontend, out / "onnx-stft-op.onnx")
    with torch.no_grad():
        reference = frontend.power_mel(torch.from_numpy(x)).numpy()
    sessions, runners = {}, {}
    for name, path in paths.items():
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        sessions[name] = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runners[name] = lambda s=sessions[name]: s.run(None, {"waveform": x})
    timings = interleaved_timings(runners, rounds=rounds, calls=calls)
    rows = []
    for name, t in timings.items():
        got = sessions[name].run(None, {"waveform": x})[0]
        rows.append(
            {
                "front_end": name,
                "audio_s": x.shape[1] / 16_000,
                "cpu_ms": t.cpu_ms,
                "latency_ms": t.wall_ms,
                "max_rel_diff": float(np.abs(got - reference).max() / np.abs(reference).max()),
                "size_bytes": paths[name].stat().st_size,
            }
        )
    return rows


# --------------------------------------------------------------------------- summary


def _row(rows: list[dict[str, Any]], **key: Any) -> dict[str, Any]:
    (row,) = [r for r in rows if all(r.get(k) == v for k, v in key.items())]
    return row


def release_decision(
    rows: list[dict[str, Any]], *, arch: str, audio_s: float, ua: dict[str, float | None], errors: dict[str, str]
) -> tuple[list[Candidate], Candidate | None, str]:
    """The release rule applied to this run's measurements (speed at ``audio_s``, UA on the test split)."""
    fp32 = _row(rows, arch=arch, variant="fp32-release", audio_s=audio_s)["cpu_ms"]
    out = []
    for name in CANDIDATES:
        if name in errors:
            out.append(Candidate.failed(name, errors[name]))
            continue
        row = _row(rows, arch=arch, variant=f"int8-{name}", audio_s=audio_s)
        u, u32 = ua.get(f"int8-{name}"), ua.get("fp32-release")
        out.append(
            Candidate(
                name=name,
                quantization=name.split("-")[0],
                quant_format={"static-qdq": "QDQ", "static-qoperator": "QOperator"}.get(name),
                size_bytes=row["size_bytes"],
                ua=u,
                ua_drop_points=None if u is None or u32 is None else 100.0 * (u32 - u),
                cpu_ms=row["cpu_ms"],
                speedup=fp32 / row["cpu_ms"],
            )
        )
    chosen, reason = choose_int8(out, max_ua_drop=DEFAULT_MAX_UA_DROP, min_speedup=DEFAULT_MIN_INT8_SPEEDUP)
    return out, chosen, reason


def check_targets(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["rows"]
    cnn, w2v = result["archs"]["logmel_cnn"], result["archs"].get("wav2vec2_base")
    targets: dict[str, Any] = {}
    within = [
        c
        for c in cnn["int8_candidates"]
        if c["ua_drop_points"] is not None and c["ua_drop_points"] <= TARGET_INT8_UA_BOUND
    ]
    best = max(within, key=lambda c: c["speedup"], default=None)
    targets["cnn_int8_speedup_over_onnx_fp32"] = {
        "value": best["speedup"] if best else None,
        "target": f">= {TARGET_INT8_SPEEDUP} within {TARGET_INT8_UA_BOUND:g} UA point",
        "met": bool(best and best["speedup"] >= TARGET_INT8_SPEEDUP),
        "detail": f"best int8 candidate within the UA bound: {best['name'] if best else 'none'} at {cnn['decision_audio_s']:g} s",
    }
    ratios = [
        _row(rows, arch="logmel_cnn", variant="pytorch", audio_s=s)["cpu_ms"]
        / _row(rows, arch="logmel_cnn", variant="fp32-release", audio_s=s)["cpu_ms"]
        for s in CNN_AUDIO_SECONDS
    ]
    targets["cnn_onnx_fp32_speedup_over_eager_min"] = {
        "value": min(ratios),
        "target": f">= {TARGET_FP32_OVER_EAGER}",
        "met": min(ratios) >= TARGET_FP32_OVER_EAGER,
        "detail": "minimum over 1, 3, 10 s",
    }
    published = f"int8-{cnn['published']}" if cnn["published"] else "fp32-release"
    rtf = max(_row(rows, arch="logmel_cnn", variant=published, audio_s=s)["rtf_cpu"] for s in CNN_AUDIO_SECONDS)
    targets["cnn_rtf_one_core_max"] = {
        "value": rtf,
        "target": f"<= {TARGET_CNN_RTF}",
        "met": rtf <= TARGET_CNN_RTF,
        "detail": f"the published model ({published}), worst of 1, 3, 10 s",
    }
    if w2v is not None:
        int8_rows = [r for r in rows if r["arch"] == "wav2vec2_base" and r["precision"] == "int8"]
        fastest = min(int8_rows, key=lambda r: r["rtf_cpu"], default=None)
        targets["w2v2_base_int8_rtf_one_core"] = {
            "value": fastest["rtf_cpu"] if fastest else None,
            "target": f"< {TARGET_W2V2_INT8_RTF}",
            "met": bool(fastest and fastest["rtf_cpu"] < TARGET_W2V2_INT8_RTF),
            "detail": f"fastest int8 candidate ({fastest['variant'] if fastest else 'none'}) at 3 s",
        }
    return targets


def environment() -> dict[str, Any]:
    cpu = platform.processor() or ""
    cpuinfo = Path("/proc/cpuinfo")
    flags: list[str] = []
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma")) or "vnni" in f]
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


# --------------------------------------------------------------------------- report


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def write_markdown(path: Path, result: dict[str, Any]) -> Path:
    env = result["environment"]
    load = result["load_average"]
    lines = [
        "# Edge inference: PyTorch eager vs ONNX Runtime fp32 vs int8 (batch 1, one thread)",
        "",
        f"Generated by `benchmarks/bench_edge.py` in {result['wall_s']:.0f} s. {env['cpu']} ({env['cpu_count']} CPUs; "
        f"{', '.join(env['cpu_flags'])}: no VNNI), torch {env['torch']}, onnxruntime {env['onnxruntime']}.",
        "",
        f"**Contention.** The host was shared with other jobs: load average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end, "
        f"peak sampled {load['max_sampled']:.1f} on {env['cpu_count']} CPUs. Runtimes were timed in {result['timing']['rounds']} interleaved rounds "
        f"of {result['timing']['warmup']} warm-up + {result['timing']['calls']} calls each (CNN; wav2vec2: {result['timing']['w2v2_rounds']} x "
        f"{result['timing']['w2v2_calls']}), medians reported. Wall time includes waiting for a CPU, so targets are judged on the median "
        "thread CPU time per call (`cpu_ms`, `rtf_cpu`); wall medians (`latency_ms`, `rtf`) are listed next to them.",
        "",
        "## Targets",
        "",
        "| target | measured | goal | met | on |",
        "|---|---:|---|---|---|",
    ]
    for name, check in result["targets"].items():
        lines.append(
            f"| {name} | {_fmt(check['value'])} | {check['target']} | {'yes' if check['met'] else '**no**'} | {check['detail']} |"
        )
    for arch, info in result["archs"].items():
        lines += ["", f"## {arch}", "", info["description"], ""]
        lines.append(
            f"Release decision (the rule of `serforget.common.onnx_quant.choose_int8` on this run's numbers at {info['decision_audio_s']:g} s): "
            f"{'publish int8 **' + info['published'] + '**' if info['published'] else 'no int8'}: {info['decision_reason']}."
        )
        lines += [
            "",
            "| variant | runtime | precision | quantization | size bytes | UA | int8 vs fp32 | cold start ms | import ms | peak MB |",
            "|---|---|---|---|---:|---:|---|---:|---:|---:|",
        ]
        for name, v in info["variants"].items():
            agreement = v.get("agreement")
            agree = (
                f"max diff {agreement['max_abs_logit_diff']:.3g}, argmax {agreement['argmax_agreement']:.3f}"
                if agreement
                else "-"
            )
            lines.append(
                f"| {name} | {v['runtime']} | {v['precision']} | {v['quantization'] or '-'} | {v['size_bytes']:,} | {_fmt(v['ua'])} | {agree} | "
                f"{_fmt(v.get('cold_start_ms'), '.0f')} | {_fmt(v.get('import_ms'), '.0f')} | {_fmt(v.get('peak_mem_mb'), '.0f')} |"
            )
        lines += [
            "",
            "| variant | audio s | CPU ms | wall ms (median) | wall ms (min) | RTF (CPU) | RTF (wall) | eager / this | ONNX fp32 / this |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in [r for r in result["rows"] if r["arch"] == arch]:
            eager = _row(result["rows"], arch=arch, variant="pytorch", audio_s=r["audio_s"])["cpu_ms"]
            fp32 = _row(result["rows"], arch=arch, variant="fp32-release", audio_s=r["audio_s"])["cpu_ms"]
            lines.append(
                f"| {r['variant']} | {r['audio_s']:g} | {r['cpu_ms']:.2f} | {r['latency_ms']:.2f} | {r['latency_min_ms']:.2f} | "
                f"{r['rtf_cpu']:.5f} | {r['rtf']:.5f} | {eager / r['cpu_ms']:.2f} | {fp32 / r['cpu_ms']:.2f} |"
            )
    fe = result.get("front_end")
    if fe:
        lines += [
            "",
            "## Log-mel front end alone (3 s, one thread)",
            "",
            "| form | CPU ms | wall ms | max relative diff vs PyTorch | size bytes |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in fe:
            lines.append(
                f"| {r['front_end']} | {r['cpu_ms']:.3f} | {r['latency_ms']:.3f} | {r['max_rel_diff']:.2e} | {r['size_bytes']:,} |"
            )
    edge = result.get("edge_env")
    if edge:
        lines += [
            "",
            "## Torch-free edge environment",
            "",
            f"A fresh virtual environment with only {', '.join(EDGE_PACKAGES)} from PyPI: {edge['installed_bytes'] / 2**20:.1f} MiB installed "
            f"({edge['site_packages_bytes'] / 2**20:.1f} MiB of site-packages; torch present: {edge['has_torch']}). "
            f"Packages: {', '.join(edge['packages'])}. The ONNX cold starts above ran in it (`torch` never imported: "
            f"{result['onnx_cold_start_torch_free']}).",
        ]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def plot(path: Path, result: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(result["archs"])
    fig, axes = plt.subplots(1, len(archs), figsize=(6.5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        rows = [r for r in result["rows"] if r["arch"] == arch]
        seconds = sorted({r["audio_s"] for r in rows})
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            values = [_row(rows, variant=variant, audio_s=s)["rtf_cpu"] for s in seconds]
            ax.bar(np.arange(len(seconds)) + (i - (len(variants) - 1) / 2) * width, values, width, label=variant)
        target = TARGET_CNN_RTF if arch == "logmel_cnn" else TARGET_W2V2_INT8_RTF
        ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"RTF target {target:g}")
        ax.set_xticks(range(len(seconds)), [f"{s:g} s" for s in seconds])
        ax.set_yscale("log")
        ax.set_xlabel("audio per call (batch 1)")
        ax.set_ylabel("real-time factor (thread CPU time / audio)")
        ax.set_title(f"{arch}, one thread")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry point


class _LoadSampler:
    """Highest 1-minute load average seen at the sampling points (stated with the results)."""

    def __init__(self) -> None:
        self.max = os.getloadavg()[0]

    def sample(self) -> None:
        self.max = max(self.max, os.getloadavg()[0])


def _variant_table(paths: dict[str, Path], ua: dict[str, float | None], pytorch_size: int) -> dict[str, dict[str, Any]]:
    table = {
        "pytorch": {
            "runtime": "pytorch",
            "precision": "fp32",
            "quantization": None,
            "size_bytes": pytorch_size,
            "ua": ua.get("pytorch"),
        }
    }
    for name, path in paths.items():
        runtime, precision, quantization = precision_of(name)
        table[name] = {
            "runtime": runtime,
            "precision": precision,
            "quantization": quantization,
            "size_bytes": path.stat().st_size,
            "ua": ua.get(name),
        }
    return table


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    load = _LoadSampler()
    load_start = os.getloadavg()
    work = args.work_dir
    ckpt, splits = prepare_checkpoint(
        data_dir=args.data_dir, work_dir=work, checkpoint=args.checkpoint, epochs=args.epochs
    )
    model, meta = load_checkpoint(ckpt)
    labels, rate = meta.labels, meta.sample_rate
    clip_s = float(meta.provenance.get("settings", {}).get("clip_seconds", DEFAULT_CLIP_SECONDS))
    test_utts = filter_labels(read_manifest(splits["test"]), labels)[: args.max_test_utterances]
    test_set = load_waveforms(test_utts, labels=labels, clip_seconds=clip_s, sample_rate=rate)
    eval_set = EvalSet(waves=test_set.waves.numpy(), targets=test_set.targets.numpy(), labels=labels)
    calibration = calibration_waves_from_manifest(
        manifest=splits["train"], labels=labels, clip_seconds=clip_s, sample_rate=rate
    )
    latency_waves = [load_audio(u.path, sample_rate=rate).numpy() for u in test_utts[:LATENCY_UTTERANCES]]
    edge = edge_environment(work) if not args.skip_edge_env else None
    python_edge = edge["python"] if edge else sys.executable
    result: dict[str, Any] = {"archs": {}, "rows": []}
    torch_free = True

    # ---- compact log-mel CNN
    print(f"logmel_cnn: {ckpt}", flush=True)
    parity = parity_waves_from_manifest(manifest=splits["test"], labels=labels, sample_rate=rate)
    paths, reports, errors = build_variants(
        model=model,
        labels=labels,
        out=work / "onnx" / "logmel_cnn",
        parity_waves=parity,
        parity_source=f"test split of {args.data_dir}",
        window_s=clip_s,
        weights_sha256=meta.weights_sha256,
        calibration=calibration,
        fold_steps=True,
    )
    load.sample()
    ua = {"pytorch": float(evaluate_model(model, test_set, labels=labels, device="cpu")["ua"])}
    for name, path in tqdm(paths.items(), desc="UA per variant", unit="model"):
        ua[name] = onnx_ua(OnnxModel(path), eval_set)
    rows = measure_arch(
        arch="logmel_cnn",
        model=model,
        paths=paths,
        latency_waves=latency_waves,
        audio_seconds=CNN_AUDIO_SECONDS,
        sample_rate=rate,
        rounds=args.rounds,
        calls=args.calls,
        warmup=args.warmup,
    )
    load.sample()
    variants = _variant_table(paths, ua, (ckpt / WEIGHTS_FILE).stat().st_size)
    x_path = work / "cold_input_cnn.npy"
    np.save(x_path, speech_input(latency_waves, seconds=clip_s, sample_rate=rate))
    for name in tqdm(variants, desc="cold starts (logmel_cnn)", unit="variant"):
        if name == "pytorch":
            variants[name].update(
                cold_start(
                    python=sys.executable, script=_TORCH_COLD, model_path=ckpt, x_path=x_path, repeats=args.cold_repeats
                )
            )
        else:
            variants[name].update(
                cold_start(
                    python=python_edge,
                    script=_ORT_COLD,
                    model_path=paths[name],
                    x_path=x_path,
                    repeats=args.cold_repeats,
                )
            )
            torch_free &= not variants[name]["torch_loaded"]
    for name in paths:
        if name.startswith("int8-"):
            variants[name]["agreement"] = int8_agreement(paths["fp32-release"], paths[name], eval_set.waves[:64])
    for r in rows:
        r.update(
            size_bytes=variants[r["variant"]]["size_bytes"],
            ua=variants[r["variant"]]["ua"],
            cold_start_ms=variants[r["variant"]]["cold_start_ms"],
            peak_mem_mb=variants[r["variant"]]["peak_mem_mb"],
        )
    candidates, chosen, reason = release_decision(rows, arch="logmel_cnn", audio_s=clip_s, ua=ua, errors=errors)
    result["rows"] += rows
    result["archs"]["logmel_cnn"] = {
        "description": f"`logmel_cnn` ({sum(p.numel() for p in model.parameters()):,} parameters), "
        f"{'--checkpoint ' + str(args.checkpoint) if args.checkpoint else f'trained {args.epochs} epochs on the synthetic corpus train split'}; "
        f"UA on the test split ({len(eval_set)} utterances, {clip_s:g} s clips); static int8 calibrated on {len(calibration)} "
        f"training-split clips. fp32 steps: `fp32-conv-dft-raw` (the exporter's graph with the conv1d DFT, the previous release form), "
        f"`fp32-raw` (folded DFT), `fp32-release` (folded DFT + ONNX Runtime offline optimization: the published file).",
        "variants": variants,
        "exports": reports,
        "int8_candidates": [c.to_dict() for c in candidates],
        "published": chosen.name if chosen else None,
        "decision_reason": reason,
        "decision_audio_s": clip_s,
    }
    print(f"logmel_cnn release decision: {reason}", flush=True)
    if not args.skip_front_end:
        result["front_end"] = front_end_benchmark(
            model=model,
            x=speech_input(latency_waves, seconds=3.0, sample_rate=rate),
            out=work / "onnx" / "front_end",
            rounds=args.rounds,
            calls=args.calls,
        )
    load.sample()

    # ---- wav2vec2-base size, random weights
    if not args.skip_w2v2:
        print("wav2vec2_base: building the default Wav2Vec2Config with random weights", flush=True)
        torch.manual_seed(0)
        w2v = build_model(arch="wav2vec2", config={"hf_config": {"model_type": "wav2vec2"}}, labels=FOUR_CLASS).eval()
        w2v_ckpt = save_checkpoint(model=w2v, out_dir=work / "w2v2_base_ckpt", labels=FOUR_CLASS)
        w2v_parity = [w for w in probe_waves(seconds=(1.0, 3.0), per_length=3)]
        w_paths, w_reports, w_errors = build_variants(
            model=w2v,
            labels=FOUR_CLASS,
            out=work / "onnx" / "w2v2_base",
            parity_waves=w2v_parity,
            parity_source="synthetic probe signals",
            window_s=clip_s,
            weights_sha256=None,
            calibration=calibration[: args.w2v2_calibration],
            fold_steps=False,
        )
        load.sample()
        w_rows = measure_arch(
            arch="wav2vec2_base",
            model=w2v,
            paths=w_paths,
            latency_waves=latency_waves,
            audio_seconds=W2V2_AUDIO_SECONDS,
            sample_rate=rate,
            rounds=args.w2v2_rounds,
            calls=args.w2v2_calls,
            warmup=1,
        )
        load.sample()
        w_variants = _variant_table(w_paths, {}, (w2v_ckpt / WEIGHTS_FILE).stat().st_size)
        w_x = work / "cold_input_w2v2.npy"
        np.save(w_x, speech_input(latency_waves, seconds=3.0, sample_rate=rate))
        for name in tqdm(w_variants, desc="cold starts (wav2vec2_base)", unit="variant"):
            if name == "pytorch":
                w_variants[name].update(
                    cold_start(python=sys.executable, script=_TORCH_COLD, model_path=w2v_ckpt, x_path=w_x, repeats=1)
                )
            else:
                w_variants[name].update(
                    cold_start(python=python_edge, script=_ORT_COLD, model_path=w_paths[name], x_path=w_x, repeats=1)
                )
                torch_free &= not w_variants[name]["torch_loaded"]
        for name in w_paths:
            if name.startswith("int8-"):
                w_variants[name]["agreement"] = int8_agreement(
                    w_paths["fp32-release"], w_paths[name], eval_set.waves[: args.w2v2_agreement]
                )
        for r in w_rows:
            r.update(
                size_bytes=w_variants[r["variant"]]["size_bytes"],
                ua=None,
                cold_start_ms=w_variants[r["variant"]]["cold_start_ms"],
                peak_mem_mb=w_variants[r["variant"]]["peak_mem_mb"],
            )
        w_candidates, _, _ = release_decision(w_rows, arch="wav2vec2_base", audio_s=3.0, ua={}, errors=w_errors)
        result["rows"] += w_rows
        result["archs"]["wav2vec2_base"] = {
            "description": f"transformers' default `Wav2Vec2Config` ({sum(p.numel() for p in w2v.parameters()):,} parameters), random weights "
            f"(seed 0), 4-class head; 3 s of speech per call. UA is not meaningful for random weights: int8 is compared with "
            f"fp32 by logits on {args.w2v2_agreement} test clips; static int8 calibrated on {min(args.w2v2_calibration, len(calibration))} "
            "training-split clips. The release rule cannot publish int8 here (no UA), so the speed of every candidate is shown.",
            "variants": w_variants,
            "exports": w_reports,
            "int8_candidates": [c.to_dict() for c in w_candidates],
            "published": None,
            "decision_reason": "UA not measurable with random weights; speed only",
            "decision_audio_s": 3.0,
        }
    result.update(
        {
            "benchmark": "edge",
            "format_version": RESULT_VERSION,
            "created_at": time.time(),
            "environment": environment(),
            "timing": {
                "rounds": args.rounds,
                "calls": args.calls,
                "warmup": args.warmup,
                "w2v2_rounds": args.w2v2_rounds,
                "w2v2_calls": args.w2v2_calls,
                "clock": "median thread CPU time per call (targets) and median wall time",
            },
            "edge_env": edge,
            "onnx_cold_start_torch_free": torch_free,
            "load_average": {"start": list(load_start), "end": list(os.getloadavg()), "max_sampled": load.max},
            "wall_s": time.perf_counter() - started,
        }
    )
    result["targets"] = check_targets(result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/synth"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_edge"))
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of training the default model")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs when no --checkpoint is given")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (compact model)")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per round (compact model)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--cold-repeats", type=int, default=3, help="fresh processes per cold-start measurement (compact model)"
    )
    parser.add_argument("--w2v2-rounds", type=int, default=3)
    parser.add_argument("--w2v2-calls", type=int, default=2)
    parser.add_argument(
        "--w2v2-calibration", type=int, default=8, help="calibration clips for the wav2vec2 static int8 candidates"
    )
    parser.add_argument(
        "--w2v2-agreement", type=int, default=8, help="clips for the wav2vec2 int8-vs-fp32 logit comparison"
    )
    parser.add_argument("--max-test-utterances", type=int, help="cap the UA evaluation (smoke runs)")
    parser.add_argument("--skip-w2v2", action="store_true")
    parser.add_argument(
        "--skip-edge-env",
        action="store_true",
        help="do not build the PyPI edge venv (cold starts then use this interpreter)",
    )
    parser.add_argument("--skip-front-end", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    result = run_benchmark(args)
    atomic_write_json(args.out / "edge.json", result)
    write_markdown(args.out / "edge.md", result)
    plot(args.out / "edge.png", result)
    for name, check in result["targets"].items():
        print(f"{name}: {_fmt(check['value'])} (target {check['target']}) {'met' if check['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
