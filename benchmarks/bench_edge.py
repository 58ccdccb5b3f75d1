"""Edge inference: ONNX Runtime fp32 and int8 against PyTorch eager, same inputs, one run.

Why: releases ship as ONNX so edge devices can drop torch; this measures what that buys (latency,
real-time factor, size) and what int8 costs (UA), side by side on the same machine in the same
run, so ratios stay meaningful even on a busy shared host. For each configuration (batch 1 and
16; 1 s, 3 s and 10 s of audio; 1 thread and all threads) the three runtimes are timed in
alternating blocks (see :func:`blocked_timings`) so that load changes hit all of them alike;
the median call latency is reported (``latency_ms``, with the fastest call as ``latency_min_ms``:
on a busy host the minimum shows what the runtime can do, the median what a caller gets). Inputs are real test-split utterances of the synthetic
corpus, concatenated to the target length (speech throughout, not zero padding).

The model is the default log-mel CNN, trained briefly on the synthetic corpus's train split
(speaker-independent protocol: ``n_valid=3, n_test=5, seed=0``) unless ``--checkpoint`` is given.
UA is measured on the test split at the training clip length for every runtime and precision.
The int8 model is quantized with an unbounded UA check so its UA can be reported either way;
whether it would be published under the default 1-point bound is reported next to it.

Real-time factor = latency / seconds of audio in the batch (batch x audio length).

Run from the repository root (about 5 minutes on 2 cores, most of it training)::

    .venv/bin/python -m benchmarks.bench_edge

Writes ``benchmarks/results/edge.json``, ``edge.md`` and ``edge.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from serforget.common.audio import load_audio
from serforget.common.checkpoint import WEIGHTS_FILE, load_checkpoint
from serforget.common.corpora.synth import synthesize_corpus
from serforget.common.data import DEFAULT_CLIP_SECONDS, load_waveforms
from serforget.common.edge.runtime import OnnxModel
from serforget.common.fsutil import atomic_write_json, atomic_write_text
from serforget.common.manifest import filter_labels, read_manifest
from serforget.common.onnx_export import (
    DEFAULT_MAX_UA_DROP,
    EvalSet,
    export_onnx,
    onnx_ua,
    parity_waves_from_manifest,
    quantize_int8,
)
from serforget.common.pipeline import make_splits, train_checkpoint
from serforget.common.training import TrainConfig, evaluate_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_VERSION = 1
BATCHES = (1, 16)
AUDIO_SECONDS = (1.0, 3.0, 10.0)
#: Test utterances concatenated into the latency inputs (enough distinct speech for 16 x 10 s).
LATENCY_UTTERANCES = 64
RUNTIMES: tuple[tuple[str, str], ...] = (("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
#: The issue's targets, checked and reported with the measurements.
TARGET_SPEEDUP_BATCH1 = 2.0
TARGET_RTF_ONE_CORE = 0.01
TARGET_INT8_SIZE_RATIO = 0.4
TARGET_INT8_UA_DROP = 1.0

Runner = Callable[[np.ndarray], object]


# --------------------------------------------------------------------------- model and data


def prepare_checkpoint(*, data_dir: Path, work_dir: Path, checkpoint: Path | None, epochs: int) -> tuple[Path, dict[str, Path]]:
    """The corpus splits, and the given checkpoint or a briefly trained default model."""
    manifest = synthesize_corpus(out_dir=data_dir)
    splits = make_splits(manifest=manifest, out_dir=data_dir / "splits")
    if checkpoint is not None:
        return checkpoint, splits
    trained = train_checkpoint(
        train_manifest=splits["train"], valid_manifest=splits["valid"], out_dir=work_dir / "original",
        train_config=TrainConfig(epochs=epochs, device="cpu"), progress=False,
    )
    return trained, splits


def speech_batch(waves: Sequence[np.ndarray], *, batch: int, seconds: float, sample_rate: int) -> np.ndarray:
    """``[batch, seconds * rate]`` of real speech: consecutive utterances concatenated, cut to length."""
    n = int(round(seconds * sample_rate))
    rows, cursor = [], 0
    for _ in range(batch):
        pieces, have = [], 0
        while have < n:
            piece = waves[cursor % len(waves)]
            pieces.append(piece)
            have += piece.shape[0]
            cursor += 1
        rows.append(np.concatenate(pieces)[:n])
    return np.stack(rows).astype(np.float32)


# --------------------------------------------------------------------------- timing


def blocked_timings(runners: dict[str, Runner], x: np.ndarray, *, repeats: int, warmup: int, rounds: int = 2) -> dict[str, list[float]]:
    """Milliseconds per call of each runner on the same input, measured in alternating blocks.

    Each runner gets ``rounds`` blocks (A B C A B C ...) of ``warmup`` untimed then
    ``repeats / rounds`` timed calls. Why blocks rather than strict alternation: PyTorch's OpenMP
    workers and ONNX Runtime's thread pool both spin for a while after a call, so alternating
    call by call makes each runtime wait for the other's spinning threads; a block's warm-up
    calls absorb that, while repeating the blocks still spreads load changes over all runtimes.
    """
    samples: dict[str, list[float]] = {name: [] for name in runners}
    per_block = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(warmup):
                run(x)
            for _ in range(per_block):
                start = time.perf_counter()
                run(x)
                samples[name].append(1000.0 * (time.perf_counter() - start))
    return samples


def torch_runner(model: torch.nn.Module, threads: int) -> Runner:
    def run(x: np.ndarray) -> object:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def onnx_runner(path: Path, threads: int) -> Runner:
    session = OnnxModel(path, threads=threads)
    return lambda x: session.run(x)


def measure_latency(
    *, model: torch.nn.Module, paths: dict[str, Path], test_waves: Sequence[np.ndarray], sample_rate: int,
    thread_counts: Sequence[int], repeats: int, warmup: int,
) -> list[dict[str, Any]]:
    """Latency rows for every runtime x batch x audio length x thread count."""
    rows = []
    for threads in thread_counts:
        runners = {
            "pytorch/fp32": torch_runner(model, threads),
            "onnxruntime/fp32": onnx_runner(paths["fp32"], threads),
            "onnxruntime/int8": onnx_runner(paths["int8"], threads),
        }
        for batch in BATCHES:
            for seconds in AUDIO_SECONDS:
                x = speech_batch(test_waves, batch=batch, seconds=seconds, sample_rate=sample_rate)
                timings = blocked_timings(runners, x, repeats=repeats, warmup=warmup)
                medians = {name: statistics.median(values) for name, values in timings.items()}
                for name, latency_ms in medians.items():
                    runtime, precision = name.split("/")
                    rows.append({
                        "runtime": runtime, "precision": precision, "batch": batch, "audio_s": seconds,
                        "threads": threads, "latency_ms": latency_ms, "latency_min_ms": min(timings[name]),
                        "rtf": latency_ms / 1000.0 / (batch * seconds),
                    })
                print(f"threads={threads} batch={batch:2d} audio={seconds:4.1f}s  " + "  ".join(
                    f"{name} {ms:8.2f} ms" for name, ms in medians.items()) + f"  eager/fp32 {medians['pytorch/fp32'] / medians['onnxruntime/fp32']:.2f}x", flush=True)
    return rows


# --------------------------------------------------------------------------- summary


def _latency(rows: list[dict[str, Any]], **key: Any) -> float:
    (row,) = [r for r in rows if all(r[k] == v for k, v in key.items())]
    return float(row["latency_ms"])


def ratio_rows(rows: list[dict[str, Any]], thread_counts: Sequence[int]) -> list[dict[str, Any]]:
    """Per configuration: eager / ONNX fp32 and ONNX fp32 / int8 latency ratios (>1: faster)."""
    out = []
    for threads in thread_counts:
        for batch in BATCHES:
            for seconds in AUDIO_SECONDS:
                key = {"batch": batch, "audio_s": seconds, "threads": threads}
                eager = _latency(rows, runtime="pytorch", precision="fp32", **key)
                fp32 = _latency(rows, runtime="onnxruntime", precision="fp32", **key)
                int8 = _latency(rows, runtime="onnxruntime", precision="int8", **key)
                out.append({**key, "eager_over_onnx_fp32": eager / fp32, "onnx_fp32_over_int8": fp32 / int8,
                            "eager_over_onnx_int8": eager / int8})
    return out


def check_targets(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], sizes: dict[str, int], ua: dict[str, float]) -> dict[str, Any]:
    batch1 = [r["eager_over_onnx_fp32"] for r in ratios if r["batch"] == 1]
    one_core = [r["rtf"] for r in rows if (r["runtime"], r["precision"], r["batch"], r["threads"]) == ("onnxruntime", "fp32", 1, 1)]
    size_ratio = sizes["onnxruntime/int8"] / sizes["onnxruntime/fp32"]
    ua_drop = 100.0 * (ua["onnxruntime/fp32"] - ua["onnxruntime/int8"])
    return {
        "onnx_fp32_speedup_batch1_min": {"value": min(batch1), "target": f">= {TARGET_SPEEDUP_BATCH1}", "met": min(batch1) >= TARGET_SPEEDUP_BATCH1},
        "onnx_fp32_rtf_one_core_max": {"value": max(one_core), "target": f"< {TARGET_RTF_ONE_CORE}", "met": max(one_core) < TARGET_RTF_ONE_CORE},
        "int8_size_ratio": {"value": size_ratio, "target": f"<= {TARGET_INT8_SIZE_RATIO}", "met": size_ratio <= TARGET_INT8_SIZE_RATIO},
        "int8_ua_drop_points": {"value": ua_drop, "target": f"<= {TARGET_INT8_UA_DROP}", "met": ua_drop <= TARGET_INT8_UA_DROP},
    }


def environment() -> dict[str, Any]:
    cpu = platform.processor() or ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
    }


def _oversubscription_note(result: dict[str, Any]) -> list[str]:
    """A caveat for the multi-threaded rows when other processes kept every CPU busy during the run."""
    cpus = result["environment"]["cpu_count"] or 1
    load = max(result["load_average_start"][0], result["load_average_end"][0])
    if load <= cpus:
        return []
    return ["", f"The host was oversubscribed (load average up to {load:.1f} on {cpus} CPUs): rows with more than one thread "
                "include waits for descheduled worker threads (PyTorch's OpenMP barriers suffer most), so compare runtimes on the "
                "1-thread rows, and see the min column for what each runtime does when it gets the CPUs."]


def write_markdown(path: Path, result: dict[str, Any]) -> Path:
    env, model = result["environment"], result["model"]
    lines = [
        "# Edge inference: ONNX Runtime vs PyTorch eager",
        "",
        f"Generated by `benchmarks/bench_edge.py` in {result['wall_s']:.0f} s: median of {result['repeats']} timed calls "
        f"per runtime and configuration, in two alternating blocks each after {result['warmup']} warm-up calls. {env['cpu']} ({env['cpu_count']} CPUs), torch {env['torch']}, "
        f"onnxruntime {env['onnxruntime']}; load average {result['load_average_start'][0]:.1f} at start, "
        f"{result['load_average_end'][0]:.1f} at end (shared host: absolute times are noisy, ratios are measured side by side).",
        "",
        f"Model: `{model['arch']}` ({model['n_parameters']:,} parameters), {model['source']}. UA on the test split "
        f"({model['n_test']} utterances, {model['clip_s']:.0f} s clips). ONNX parity on {model['parity']['n_examples']} real clips "
        f"({', '.join(f'{s:g}' for s in model['parity']['lengths_s'])} s; batches {model['parity']['batch_sizes']}): max |logit diff| "
        f"{model['parity']['max_abs_logit_diff']:.2e}, argmax agreement {model['parity']['argmax_agreement']:.4f}.",
        *_oversubscription_note(result),
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "|---|---:|---|---|",
    ]
    for name, check in result["targets"].items():
        lines.append(f"| {name} | {check['value']:.4g} | {check['target']} | {'yes' if check['met'] else 'no'} |")
    lines += [
        "",
        f"int8 publication under the default {DEFAULT_MAX_UA_DROP:g}-point bound: "
        f"{'yes' if result['int8_published_under_default_bound'] else 'no'}.",
        "",
        "## Size and UA",
        "",
        f"The PyTorch size is the checkpoint's weights file; the ONNX files also hold the {model['rebuilt_constant_bytes']:,} bytes "
        "of front-end constants (DFT kernels, mel filterbank) that the PyTorch model rebuilds when it is constructed.",
        "",
        "| runtime | precision | size (bytes) | UA |",
        "|---|---|---:|---:|",
    ]
    for name, size in result["sizes"].items():
        runtime, precision = name.split("/")
        lines.append(f"| {runtime} | {precision} | {size:,} | {result['ua'][name]:.4f} |")
    lines += ["", "## Latency ratios (> 1: the right-hand side is faster)", "",
              "| threads | batch | audio s | eager / ONNX fp32 | ONNX fp32 / int8 | eager / ONNX int8 |", "|---:|---:|---:|---:|---:|---:|"]
    for r in result["ratios"]:
        lines.append(f"| {r['threads']} | {r['batch']} | {r['audio_s']:g} | {r['eager_over_onnx_fp32']:.2f} | "
                     f"{r['onnx_fp32_over_int8']:.2f} | {r['eager_over_onnx_int8']:.2f} |")
    lines += ["", "## All rows", "", "| runtime | precision | threads | batch | audio s | latency ms (median) | latency ms (min) | RTF | size bytes | UA |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['runtime']} | {r['precision']} | {r['threads']} | {r['batch']} | {r['audio_s']:g} | "
                     f"{r['latency_ms']:.2f} | {r['latency_min_ms']:.2f} | {r['rtf']:.5f} | {r['size_bytes']:,} | {r['ua']:.4f} |")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict[str, Any]], thread_counts: Sequence[int]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(thread_counts), figsize=(6 * len(thread_counts), 4), sharey=True, squeeze=False)
    configs = [(b, s) for b in BATCHES for s in AUDIO_SECONDS]
    width = 0.27
    for ax, threads in zip(axes[0], thread_counts):
        for i, (runtime, precision) in enumerate(RUNTIMES):
            values = [_latency(rows, runtime=runtime, precision=precision, batch=b, audio_s=s, threads=threads) for b, s in configs]
            ax.bar(np.arange(len(configs)) + (i - 1) * width, values, width, label=f"{runtime} {precision}")
        ax.set_xticks(range(len(configs)), [f"b{b}\n{s:g}s" for b, s in configs])
        ax.set_yscale("log")
        ax.set_title(f"{threads} thread{'s' if threads > 1 else ''}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("median latency per call (ms)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry point


def run_benchmark(
    *, data_dir: Path, work_dir: Path, checkpoint: Path | None, epochs: int, repeats: int, warmup: int, max_test_utterances: int | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    load_start = os.getloadavg()
    ckpt, splits = prepare_checkpoint(data_dir=data_dir, work_dir=work_dir, checkpoint=checkpoint, epochs=epochs)
    model, meta = load_checkpoint(ckpt)
    clip_s = float(meta.provenance.get("settings", {}).get("clip_seconds", DEFAULT_CLIP_SECONDS))
    test_manifest = splits["test"]
    print(f"checkpoint {ckpt}; exporting with parity on {test_manifest}", flush=True)
    export = export_onnx(
        model=model, labels=meta.labels, out_path=work_dir / "onnx" / "model.onnx", release_version=None,
        sample_rate=meta.sample_rate, weights_sha256=meta.weights_sha256, window_seconds=clip_s,
        parity_waves=parity_waves_from_manifest(manifest=test_manifest, labels=meta.labels, sample_rate=meta.sample_rate),
        parity_source=f"test split of {data_dir}",
    )
    test_utterances = filter_labels(read_manifest(test_manifest), meta.labels)[:max_test_utterances]
    test_set = load_waveforms(test_utterances, labels=meta.labels, clip_seconds=clip_s, sample_rate=meta.sample_rate)
    eval_set = EvalSet(waves=test_set.waves.numpy(), targets=test_set.targets.numpy(), labels=meta.labels)
    quant = quantize_int8(fp32_path=export.path, out_path=work_dir / "onnx" / "model.int8.onnx", eval_set=eval_set, max_ua_drop=100.0)
    paths = {"fp32": export.path, "int8": work_dir / "onnx" / "model.int8.onnx"}
    ua = {
        "pytorch/fp32": float(evaluate_model(model, test_set, labels=meta.labels, device="cpu")["ua"]),
        "onnxruntime/fp32": onnx_ua(OnnxModel(paths["fp32"]), eval_set),
        "onnxruntime/int8": onnx_ua(OnnxModel(paths["int8"]), eval_set),
    }
    sizes = {
        "pytorch/fp32": (ckpt / WEIGHTS_FILE).stat().st_size,
        "onnxruntime/fp32": paths["fp32"].stat().st_size,
        "onnxruntime/int8": paths["int8"].stat().st_size,
    }
    print(f"UA {ua}; sizes {sizes}", flush=True)
    # Speech for the latency inputs: whole test utterances (not the fixed-length UA clips).
    test_waves = [load_audio(u.path, sample_rate=meta.sample_rate).numpy() for u in test_utterances[:LATENCY_UTTERANCES]]
    thread_counts = sorted({1, os.cpu_count() or 1})
    rows = measure_latency(model=model, paths=paths, test_waves=test_waves, sample_rate=meta.sample_rate,
                           thread_counts=thread_counts, repeats=repeats, warmup=warmup)
    for row in rows:
        name = f"{row['runtime']}/{row['precision']}"
        row["size_bytes"], row["ua"] = sizes[name], ua[name]
    ratios = ratio_rows(rows, thread_counts)
    return {
        "benchmark": "edge",
        "format_version": RESULT_VERSION,
        "created_at": time.time(),
        "environment": environment(),
        "repeats": repeats,
        "warmup": warmup,
        "thread_counts": thread_counts,
        "model": {
            "arch": meta.arch, "n_parameters": sum(p.numel() for p in model.parameters()), "checkpoint": str(ckpt),
            "source": f"--checkpoint {checkpoint}" if checkpoint else f"trained {epochs} epochs on the synthetic corpus train split",
            "weights_sha256": meta.weights_sha256, "n_test": len(eval_set), "clip_s": clip_s,
            "rebuilt_constant_bytes": _rebuilt_constant_bytes(model),
            "parity": vars(export.parity),
        },
        "int8": quant.to_dict(),
        "int8_published_under_default_bound": bool(quant.ua_drop_points is not None and quant.ua_drop_points <= DEFAULT_MAX_UA_DROP),
        "ua": ua,
        "sizes": sizes,
        "rows": rows,
        "ratios": ratios,
        "targets": check_targets(rows, ratios, sizes, ua),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - started,
    }


def _rebuilt_constant_bytes(model: torch.nn.Module) -> int:
    """Bytes of buffers a checkpoint omits because the model rebuilds them (the DFT kernels, mel filters).

    Why reported: ONNX files must carry these constants, so they explain most of the size gap
    between the PyTorch checkpoint and the fp32 ONNX model.
    """
    saved = set(model.state_dict())
    return sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name not in saved)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/synth"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_edge"))
    parser.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of training the default model")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs when no --checkpoint is given")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-test-utterances", type=int, help="cap the UA evaluation (smoke runs)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    result = run_benchmark(
        data_dir=args.data_dir, work_dir=args.work_dir, checkpoint=args.checkpoint, epochs=args.epochs,
        repeats=args.repeats, warmup=args.warmup, max_test_utterances=args.max_test_utterances,
    )
    atomic_write_json(args.out / "edge.json", result)
    write_markdown(args.out / "edge.md", result)
    plot(args.out / "edge.png", result["rows"], result["thread_counts"])
    for name, check in result["targets"].items():
        print(f"{name}: {check['value']:.4g} (target {check['target']}) {'met' if check['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
