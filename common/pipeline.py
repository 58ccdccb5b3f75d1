"""The default experiment's idempotent steps: corpus -> splits -> trained checkpoint -> report.

Why a module of its own: the CLI's ``demo``, the benchmarks and the federated simulation all
start from the same data and the same original model. Each step checks whether its output
already exists for the same settings (a JSON stamp holding them) and skips the work if so, in
the spirit of SpeechBrain's idempotent data preparation.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from serforget.common.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from serforget.common.data import DEFAULT_CLIP_SECONDS, load_waveforms
from serforget.common.fsutil import atomic_write_json, check_output_dir
from serforget.common.labels import task_labels
from serforget.common.manifest import SplitSpec, filter_labels, read_manifest, speaker_split, write_manifest
from serforget.common.metrics import plot_confusion
from serforget.common.models import build_model
from serforget.common.training import TrainConfig, evaluate_model, train_model

SPLITS = ("train", "valid", "test")


def _stamp_matches(path: Path, settings: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text()) == settings
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def make_splits(
    *, manifest: Path, out_dir: Path, task: str = "4class", split: SplitSpec = SplitSpec()
) -> dict[str, Path]:
    """Write speaker-independent ``train/valid/test.csv`` (task labels only) and a stamp."""
    out = Path(out_dir)
    settings = {"manifest": str(Path(manifest).resolve()), "task": task, **_stamp_fields(split)}
    paths = {name: out / f"{name}.csv" for name in SPLITS}
    stamp = out / "split.json"
    if _stamp_matches(stamp, settings) and all(p.exists() for p in paths.values()):
        return paths
    utts = filter_labels(read_manifest(manifest), task_labels(task))
    parts = speaker_split(utts, split)
    for name in SPLITS:
        write_manifest(paths[name], getattr(parts, name))
    atomic_write_json(stamp, settings)
    return paths


def _stamp_fields(split: SplitSpec) -> dict[str, Any]:
    """The split's settings as the stamp stores them (the random split's keep their original names)."""
    fields = {"n_valid": split.n_valid, "n_test": split.n_test, "seed": split.seed}
    if split.protocol != "random":
        fields.update(protocol=split.protocol, valid=list(split.valid), test=list(split.test), fold=split.fold)
    return fields


def training_speakers(*, manifest: Path, task: str = "4class", split: SplitSpec = SplitSpec()) -> list[str]:
    """The training speakers (sorted) that ``make_splits`` with the same arguments keeps: one node each.

    Why apart from ``make_splits``: ``serforget simulate`` must size Flower's simulation
    (``num-supernodes``) before the ServerApp provisions anything, with exactly the partition
    the ServerApp will then write.
    """
    utts = filter_labels(read_manifest(manifest), task_labels(task))  # ManifestError names the file and row
    if not utts:
        raise ValueError(
            f"data-manifest {manifest}: no utterance carries a label of task {task!r} ({', '.join(task_labels(task))})"
        )
    try:
        parts = speaker_split(utts, split)
    except ValueError as exc:
        where = (
            "valid-speakers / test-speakers" if split.protocol == "random" else f"split.protocol = {split.protocol!r}"
        )
        raise ValueError(f"data-manifest {manifest}: {exc} ({where})") from None
    return sorted({u.speaker for u in parts.train})


def train_checkpoint(
    *,
    train_manifest: Path,
    valid_manifest: Path | None,
    out_dir: Path,
    task: str = "4class",
    arch: str = "logmel_cnn",
    model_config: dict | None = None,
    train_config: TrainConfig = TrainConfig(),
    clip_seconds: float = DEFAULT_CLIP_SECONDS,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Train a model on a manifest split and save it; skipped when an identical run is saved."""
    labels = task_labels(task)
    settings = {
        "train_manifest": str(Path(train_manifest).resolve()),
        "valid_manifest": str(Path(valid_manifest).resolve()) if valid_manifest else None,
        "task": task,
        "arch": arch,
        "model_config": model_config or {},
        "train_config": asdict(train_config),
        "clip_seconds": clip_seconds,
    }
    out = check_output_dir(out_dir, what="checkpoint folder")
    # the model is built before any audio loads, so a bad arch or model config fails at once
    model = build_model(arch=arch, config=model_config or {}, labels=labels)
    if not force and (out / "model.json").exists():
        meta = read_checkpoint_meta(out)
        if meta.provenance.get("settings") == settings:
            return out
    train = load_waveforms(read_manifest(train_manifest), labels=labels, clip_seconds=clip_seconds, progress=progress)
    valid = (
        load_waveforms(read_manifest(valid_manifest), labels=labels, clip_seconds=clip_seconds, progress=progress)
        if valid_manifest
        else None
    )
    history = train_model(model, train, config=train_config, valid=valid, labels=labels, progress=progress)
    return save_checkpoint(
        model=model.cpu(),
        out_dir=out,
        labels=labels,
        provenance={"settings": settings, "history": history.to_dict(), "n_train": len(train)},
    )


def evaluate_checkpoint(
    *, checkpoint: Path, manifest: Path, out_dir: Path | None = None, device: str = "auto", progress: bool = False
) -> dict:
    """UA/WA/F1/confusion of a checkpoint on a manifest; optionally saved as JSON + PNG."""
    out = None if out_dir is None else check_output_dir(out_dir, what="evaluation folder")
    model, meta = load_checkpoint(checkpoint, device="cpu")
    clip = float(meta.provenance.get("settings", {}).get("clip_seconds", DEFAULT_CLIP_SECONDS))
    data = load_waveforms(
        filter_labels(read_manifest(manifest), meta.labels), labels=meta.labels, clip_seconds=clip, progress=progress
    )
    report = evaluate_model(model, data, labels=meta.labels, device=device)
    report["checkpoint"] = str(checkpoint)
    report["manifest"] = str(manifest)
    if out is not None:
        atomic_write_json(out / "metrics.json", report)
        plot_confusion(
            report["confusion"],
            labels=meta.labels,
            path=out / "confusion.png",
            title=f"UA {report['ua']:.3f}  WA {report['wa']:.3f}",
        )
    return report


def format_report(rows: Sequence[tuple[str, dict]]) -> str:
    """A Markdown table of UA / WA / macro-F1 per evaluated split."""
    lines = ["| split | n | UA | WA | macro-F1 |", "|---|---:|---:|---:|---:|"]
    for name, rep in rows:
        lines.append(f"| {name} | {rep['n']} | {rep['ua']:.3f} | {rep['wa']:.3f} | {rep['macro_f1']:.3f} |")
    return "\n".join(lines)
