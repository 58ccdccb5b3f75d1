"""``serforget train|evaluate|demo``: centralized training and evaluation on manifest splits."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from serforget.cli._args import add_progress, bool_value
from serforget.common.training import TrainConfig


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(TrainConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if field.type in ("bool", bool):
            parser.add_argument(flag, type=bool_value, default=field.default, dest=field.name, metavar="BOOL")
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(field.type), type(field.default))
            parser.add_argument(flag, type=kind, default=field.default, dest=field.name)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a SER model on a manifest (speaker-independent split)")
    train.add_argument("--train", type=Path, required=True, help="training manifest")
    train.add_argument("--valid", type=Path, help="validation manifest (best-UA epoch is kept)")
    train.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    train.add_argument("--task", default="4class")
    train.add_argument("--arch", default="logmel_cnn", choices=("logmel_cnn", "wav2vec2", "hubert"))
    train.add_argument(
        "--model-config", type=json.loads, default={}, help='JSON, e.g. {"pretrained_dir": "/models/wav2vec2-base"}'
    )
    train.add_argument("--clip-seconds", type=float, default=3.0)
    train.add_argument("--force", action="store_true", help="retrain even if an identical run is saved")
    _add_train_flags(train)
    add_progress(train)
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser("evaluate", help="UA/WA/macro-F1/confusion of a checkpoint on a manifest")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--manifest", type=Path, required=True)
    evaluate.add_argument("--out", type=Path, help="folder for metrics.json and confusion.png")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_progress(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    demo = sub.add_parser("demo", help="centralized pipeline: synth corpus -> split -> train -> evaluation table")
    demo.add_argument("--data-dir", type=Path, default=Path("data/synth"))
    demo.add_argument("--out", type=Path, default=Path("runs/central"))
    _add_train_flags(demo)
    add_progress(demo)
    demo.set_defaults(handler=_demo)


def _train(args: argparse.Namespace) -> int:
    from serforget.common.checkpoint import read_checkpoint_meta
    from serforget.common.pipeline import train_checkpoint

    out = train_checkpoint(
        train_manifest=args.train,
        valid_manifest=args.valid,
        out_dir=args.out,
        task=args.task,
        arch=args.arch,
        model_config=args.model_config,
        train_config=_train_config(args),
        clip_seconds=args.clip_seconds,
        force=args.force,
        progress=args.progress,
    )
    print(summary_line(read_checkpoint_meta(out).provenance, out))
    return 0


def summary_line(provenance: dict, out: Path) -> str:
    """One line a person reads after ``train``: what was trained, how well, how long, where it is."""
    history = provenance.get("history", {})
    epochs = history.get("epochs", [])
    parts = [
        f"trained {provenance.get('settings', {}).get('arch', '?')} on {provenance.get('n_train', '?')} utterances"
        f" for {len(epochs)} epochs in {history.get('seconds', 0.0):.0f} s"
    ]
    if epochs:
        parts.append(f"final train loss {epochs[-1]['train_loss']:.3f}")
    if history.get("best_valid_ua") is not None:
        parts.append(f"best valid UA {history['best_valid_ua']:.3f} (epoch {history['best_epoch']})")
    return ", ".join(parts) + f" -> {out}"


def _evaluate(args: argparse.Namespace) -> int:
    from serforget.common.pipeline import evaluate_checkpoint, format_report

    report = evaluate_checkpoint(
        checkpoint=args.checkpoint, manifest=args.manifest, out_dir=args.out, device=args.device, progress=args.progress
    )
    print(format_report([(args.manifest.stem, report)]))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from serforget.common.corpora.synth import synthesize_corpus
    from serforget.common.fsutil import atomic_write_text, check_output_dir
    from serforget.common.pipeline import evaluate_checkpoint, format_report, make_splits, train_checkpoint

    check_output_dir(args.data_dir, what="--data-dir")
    check_output_dir(args.out, what="--out")
    manifest = synthesize_corpus(out_dir=args.data_dir, progress=args.progress)
    splits = make_splits(manifest=manifest, out_dir=args.data_dir / "splits")
    ckpt = train_checkpoint(
        train_manifest=splits["train"],
        valid_manifest=splits["valid"],
        out_dir=args.out / "model",
        train_config=_train_config(args),
        progress=args.progress,
    )
    rows = [
        (
            name,
            evaluate_checkpoint(
                checkpoint=ckpt, manifest=splits[name], out_dir=args.out / f"eval_{name}", progress=args.progress
            ),
        )
        for name in ("valid", "test")
    ]
    table = format_report(rows)
    atomic_write_text(args.out / "report.md", table + "\n")
    print(table)
    print(f"confusion matrices: {args.out}/eval_*/confusion.png")
    return 0
