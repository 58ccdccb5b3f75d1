"""GPU check: train and unlearn on CUDA and on the CPU of the same machine, side by side.

Why: the federated path promises that a node with a GPU trains and unlearns on it (run config
``gpus-per-node``); this is the short check a GPU machine runs to show that it does and what it
buys. For the compact model (the default log-mel CNN) and a base-size wav2vec2 (transformers'
default ``Wav2Vec2Config``: 12 layers, 768 wide, about 95M parameters; random weights, since
speed does not depend on the values) it times, on each device:

- ``train``: ``--train-steps`` optimiser steps of ``common.training.train_model`` (batch
  ``--batch``, ``--seconds`` of audio per utterance), after one untimed warm-up step;
- ``unlearn``: ``common.unlearning.unlearn`` (``rl_adv_ela``, the default method) of 10
  utterances, a fixed number of epochs (stop rule ``zero`` with an unreachable target is not
  used: ``max_epochs`` bounds it and the epochs run are reported).

Inputs are noisy tones (no corpus needed); nothing is downloaded. On a machine without CUDA the
CUDA rows are skipped with a note and the CPU rows still run. ``--tiny`` (or ``GPU_CHECK_TINY=1``)
swaps in a tiny wav2vec2 config and fewer steps: the quick self-test, not a measurement.

    scripts/gpu_check.sh            # writes benchmarks/results/gpu_check.json and .md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serforget.common.data import WaveformSet
from serforget.common.fsutil import atomic_write_json, atomic_write_text
from serforget.common.labels import task_labels
from serforget.common.models import build_model
from serforget.common.models.hf import tiny_hf_config
from serforget.common.training import TrainConfig, train_model
from serforget.common.unlearning import UnlearnConfig, unlearn

RESULTS = Path(__file__).resolve().parent / "results"
N_FORGET = 10
SR = 16_000


def tone_set(n: int, seconds: float, labels: tuple[str, ...], *, seed: int = 0) -> WaveformSet:
    """``n`` noisy tones, one pitch per label: learnable enough that unlearning has something to undo."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    targets = [i % len(labels) for i in range(n)]
    waves = [0.3 * np.sin(2 * np.pi * (150.0 + 60.0 * y) * t) + 0.02 * rng.standard_normal(t.size) for y in targets]
    return WaveformSet(
        waves=torch.tensor(np.stack(waves), dtype=torch.float32),
        targets=torch.tensor(targets),
        utt_ids=[f"u{i:03d}" for i in range(n)],
        speakers=["s0"] * n,
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_device(
    arch: str,
    config: dict,
    device: str,
    *,
    steps: int,
    batch: int,
    seconds: float,
    unlearn_epochs: int,
    labels: tuple[str, ...],
) -> dict[str, Any]:
    """Train ``steps`` steps and unlearn 10 utterances of one model on one device; seconds of each."""
    torch.manual_seed(0)
    model = build_model(arch=arch, config=config, labels=labels)
    warm = tone_set(batch, seconds, labels, seed=1)
    data = tone_set(batch * steps, seconds, labels, seed=2)
    tc = TrainConfig(epochs=1, batch_size=batch, lr=1e-4, device=device, select_best=False)
    train_model(model, warm, config=tc, progress=False)  # CUDA context, cuDNN autotuning, allocator
    _sync(device)
    start = time.perf_counter()
    train_model(model, data, config=tc, progress=False)
    _sync(device)
    train_s = time.perf_counter() - start
    forget = tone_set(N_FORGET, seconds, labels, seed=2)  # the first training utterances (same generator)
    ucfg = UnlearnConfig(
        device=device, max_epochs=unlearn_epochs, stop="zero", batch_size=N_FORGET, pgd_k=1, pgd_steps=2
    )
    start = time.perf_counter()
    result = unlearn(model.cpu(), forget, method="rl_adv_ela", config=ucfg)
    _sync(device)
    unlearn_s = time.perf_counter() - start
    return {
        "train_s": train_s,
        "train_step_s": train_s / steps,
        "unlearn_s": unlearn_s,
        "unlearn_epochs": len(result.forget_acc_trajectory) - 1,
        "forget_acc_after": result.forget_acc,
    }


def run(*, tiny: bool, out: Path, seconds: float) -> dict[str, Any]:
    labels = task_labels("4class")
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    models = {
        "logmel_cnn": ({}, dict(steps=2 if tiny else 10, batch=4 if tiny else 16, unlearn_epochs=1 if tiny else 3)),
        ("wav2vec2-tiny" if tiny else "wav2vec2-base"): (
            {"hf_config": tiny_hf_config(arch="wav2vec2", n_labels=len(labels))} if tiny else {"hf_config": {}},
            dict(steps=1 if tiny else 3, batch=2 if tiny else 8, unlearn_epochs=1),
        ),
    }
    rows = []
    for name, (config, plan) in models.items():
        arch = "wav2vec2" if name.startswith("wav2vec2") else name
        n_params = sum(p.numel() for p in build_model(arch=arch, config=config, labels=labels).parameters())
        timings = {}
        for device in devices:
            print(f"gpu_check: {name} on {device} ...", flush=True)
            timings[device] = time_device(arch, config, device, seconds=seconds, labels=labels, **plan)
        row = {
            "model": name,
            "params": n_params,
            **plan,
            "seconds_per_utt": seconds,
            "cpu": timings["cpu"],
            "cuda": timings.get("cuda"),
        }
        if "cuda" in timings:
            row["speedup"] = {
                k: timings["cpu"][k] / timings["cuda"][k]
                for k in ("train_step_s", "unlearn_s")
                if timings["cuda"][k] > 0
            }
        rows.append(row)
    result = {
        "tiny": tiny,
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "note": None if cuda else "no CUDA device visible: CUDA rows skipped, CPU rows measured",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "n_forget": N_FORGET,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """The side-by-side table: CPU and CUDA seconds and the ratio for each model and step."""
    cell = lambda row, dev, key: f"{row[dev][key]:.3f}" if row.get(dev) else "skipped"
    lines = [
        f"# GPU check ({'tiny self-test' if result['tiny'] else 'measurement'})",
        "",
        f"CUDA: {result['cuda_device'] or 'none'}; CPU threads: {result['cpu_threads']}; torch {result['torch']}",
        "",
    ]
    if result["note"]:
        lines += [f"**{result['note']}**", ""]
    lines += ["| model | params | step | CPU s | CUDA s | CPU / CUDA |", "|---|---:|---|---:|---:|---:|"]
    for row in result["rows"]:
        for key, label in (
            ("train_step_s", f"train step (batch {row['batch']}, {row['seconds_per_utt']:g} s)"),
            ("unlearn_s", f"unlearn {result['n_forget']} utts ({row['unlearn_epochs']} epoch(s))"),
        ):
            ratio = f"{row['speedup'][key]:.1f}x" if row.get("speedup", {}).get(key) else "-"
            lines.append(
                f"| {row['model']} | {row['params'] / 1e6:.2f}M | {label} | {cell(row, 'cpu', key)} | "
                f"{cell(row, 'cuda', key)} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        default=os.environ.get("GPU_CHECK_TINY", "") not in ("", "0"),
        help="tiny wav2vec2 and few steps: a self-test (also GPU_CHECK_TINY=1)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu_check.json)")
    parser.add_argument("--seconds", type=float, default=2.0, help="audio per utterance")
    args = parser.parse_args(argv)
    out = args.out or RESULTS / ("gpu_check_tiny.json" if args.tiny else "gpu_check.json")
    result = run(tiny=args.tiny, out=out, seconds=0.5 if args.tiny and args.seconds == 2.0 else args.seconds)
    print(markdown(result))
    print(f"gpu_check: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
