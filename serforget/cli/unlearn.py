"""``serforget unlearn`` and ``serforget unlearn-eval``: forget-set-only unlearning and its report.

- ``unlearn``: what a device runs - a checkpoint plus a manifest of the utterances to forget in,
  an unlearned checkpoint out (forget-set-only methods only: a device holds no one else's data).
- ``unlearn-eval``: the paper's evaluation of one forget set - Original, Retrain and every
  method on forget / remaining / test data with membership inference, written as JSON, Markdown
  and PNGs.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Sequence

from serforget.cli._args import add_progress
from serforget.common.training import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("unlearn", help="unlearn a forget set from a checkpoint using the forget set alone")
    run.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder to unlearn from")
    run.add_argument("--forget-manifest", type=Path, required=True, help="manifest of the utterances to forget")
    run.add_argument("--out", type=Path, required=True, help="folder for the unlearned checkpoint")
    run.add_argument("--method", default="rl_adv_ela", help="a forget-set-only method (default rl_adv_ela)")
    run.add_argument(
        "--target-forget-acc", type=float, help="stop at this forget accuracy (sets --set stop=retrain-level)"
    )
    run.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    _add_common(run)
    run.set_defaults(handler=_unlearn)

    ev = sub.add_parser("unlearn-eval", help="evaluate unlearning methods against Retrain on one forget set")
    ev.add_argument("--checkpoint", type=Path, required=True, help="the original (trained) checkpoint")
    ev.add_argument("--manifest", type=Path, help="full corpus manifest, split by speaker (see --n-valid/--n-test)")
    ev.add_argument("--train", type=Path, help="training manifest (instead of --manifest)")
    ev.add_argument("--valid", type=Path, help="validation manifest (instead of --manifest)")
    ev.add_argument("--test", type=Path, help="test manifest (instead of --manifest)")
    ev.add_argument("--n-valid", type=int, default=3)
    ev.add_argument("--n-test", type=int, default=5)
    ev.add_argument("--split-seed", type=int, default=0)
    ev.add_argument("--forget", type=Path, help="file of training utt ids to forget, one per line ('#' comments)")
    ev.add_argument("--n-forget", type=int, default=10, help="else: forget this many random training utterances")
    ev.add_argument("--seed", type=int, default=0, help="seed of the forget draw, the methods and the attack folds")
    ev.add_argument(
        "--methods",
        default=",".join(_paper_rows()),
        help="comma-separated methods, METHOD or METHOD@retrain-level (default: the paper's rows)",
    )
    ev.add_argument(
        "--target-forget-acc",
        type=float,
        help="target of @retrain-level rows (default: the original model's validation UA)",
    )
    ev.add_argument("--no-retrain", action="store_true", help="skip the Retrain oracle (no gap, no speed-up)")
    ev.add_argument("--retrain-epochs", type=int, default=TrainConfig().epochs)
    ev.add_argument("--out", type=Path, required=True, help="report folder (report.json, report.md, PNGs)")
    _add_common(ev)
    ev.set_defaults(handler=_unlearn_eval)


def _paper_rows() -> tuple[str, ...]:
    from serforget.common.unlearning.evaluation import PAPER_ROWS

    return PAPER_ROWS


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an UnlearnConfig setting, e.g. --set penalty_tau=0.25 (repeatable)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_progress(parser)


def _config(args: argparse.Namespace, **changes: object):
    from serforget.common.unlearning import UnlearnConfig

    values: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = value.strip()
    values.update({k: v for k, v in changes.items() if v is not None})
    values.setdefault("device", args.device)
    return UnlearnConfig.from_mapping(values)


def _clip_seconds(meta) -> float:
    from serforget.common.data import DEFAULT_CLIP_SECONDS

    return float(meta.provenance.get("settings", {}).get("clip_seconds", DEFAULT_CLIP_SECONDS))


def _unlearn(args: argparse.Namespace) -> int:
    from serforget.common.checkpoint import META_FILE, load_checkpoint, save_checkpoint
    from serforget.common.data import load_waveforms
    from serforget.common.fsutil import check_output_dir, sha256_file
    from serforget.common.manifest import read_manifest
    from serforget.common.unlearning import FORGET_ONLY_METHODS, unlearn

    if args.method not in FORGET_ONLY_METHODS:
        raise ValueError(
            f"--method must be a forget-set-only method ({', '.join(FORGET_ONLY_METHODS)}), got {args.method!r}"
        )
    check_output_dir(args.out, what="--out")
    if args.out.resolve() == args.checkpoint.resolve():
        raise ValueError(f"--out {args.out} is the source checkpoint; write the unlearned model elsewhere")
    if (args.out / META_FILE).exists() and not args.overwrite:
        raise ValueError(f"{args.out / META_FILE} already exists; pass --overwrite to replace it")
    stop = "retrain-level" if args.target_forget_acc is not None else None
    config = _config(args, stop=stop, target_forget_acc=args.target_forget_acc)
    model, meta = load_checkpoint(args.checkpoint)
    forget_utts = read_manifest(args.forget_manifest)
    if not forget_utts:
        raise ValueError(f"{args.forget_manifest}: no utterances to forget")
    forget = load_waveforms(forget_utts, labels=meta.labels, clip_seconds=_clip_seconds(meta), progress=args.progress)
    result = unlearn(model, forget, method=args.method, config=config, progress=args.progress)
    save_checkpoint(
        model=result.model.cpu(),
        out_dir=args.out,
        labels=meta.labels,
        sample_rate=meta.sample_rate,
        provenance={
            **{k: v for k, v in meta.provenance.items() if k == "settings"},
            "unlearning": result.summary(),
            "source_checkpoint": str(args.checkpoint.resolve()),
            "source_weights_sha256": meta.weights_sha256,
            "forget_manifest": str(args.forget_manifest.resolve()),
            "forget_manifest_sha256": sha256_file(args.forget_manifest),
        },
    )
    print(
        f"{args.out}: {args.method} forgot {len(forget)} utterances in {result.seconds:.2f} s "
        f"({result.epochs} epochs, {result.steps} steps, stop: {result.stop_reason}); "
        f"forget accuracy {result.forget_acc_trajectory[0]:.3f} -> {result.forget_acc:.3f}"
    )
    return 0


def _read_forget_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: forget list not found") from None
    from serforget.common.manifest import check_id

    # a comment and the blanks around it go; the id itself is checked, never trimmed
    ids = [line.split("#", 1)[0].rstrip() for line in lines]
    ids = [check_id(i, what=f"{path}:{n}") for n, i in enumerate(ids, start=1) if i]
    if not ids:
        raise ValueError(f"{path}: no utterance ids")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate utterance ids")
    return ids


def _load_splits(args: argparse.Namespace, labels: Sequence[str], clip_seconds: float):
    from serforget.common.data import load_waveforms
    from serforget.common.manifest import SplitSpec, filter_labels, read_manifest, speaker_split

    if args.manifest is not None:
        if any(p is not None for p in (args.train, args.valid, args.test)):
            raise ValueError("give either --manifest or --train/--valid/--test, not both")
        split = speaker_split(
            filter_labels(read_manifest(args.manifest), labels),
            SplitSpec(n_valid=args.n_valid, n_test=args.n_test, seed=args.split_seed),
        )
        parts = {"train": split.train, "valid": split.valid, "test": split.test}
    else:
        if args.train is None or args.test is None:
            raise ValueError("give --manifest, or at least --train and --test manifests")
        parts = {
            name: filter_labels(read_manifest(path), labels) if path is not None else []
            for name, path in (("train", args.train), ("valid", args.valid), ("test", args.test))
        }
    return {
        name: load_waveforms(utts, labels=labels, clip_seconds=clip_seconds, progress=args.progress)
        for name, utts in parts.items()
    }


def _unlearn_eval(args: argparse.Namespace) -> int:
    from serforget.common.checkpoint import load_checkpoint
    from serforget.common.fsutil import check_output_dir
    from serforget.common.training import evaluate_model
    from serforget.common.unlearning.evaluation import (
        EvalSets,
        evaluate_unlearning,
        parse_run,
        run_retrain,
        write_report,
    )

    check_output_dir(args.out, what="--out")
    original, meta = load_checkpoint(args.checkpoint)
    sets = _load_splits(args, meta.labels, _clip_seconds(meta))
    train, valid, test = sets["train"], sets["valid"], sets["test"]
    if args.forget is not None:
        ids = _read_forget_ids(args.forget)
    else:
        if not 0 < args.n_forget < len(train):
            raise ValueError(f"--n-forget must lie in [1, {len(train) - 1}] for {len(train)} training utterances")
        ids = sorted(random.Random(args.seed).sample(train.utt_ids, args.n_forget))
    data = EvalSets(forget=train.select_ids(ids), remain=train.exclude_ids(ids), test=test, labels=meta.labels)
    target = args.target_forget_acc
    if target is None and len(valid):
        target = evaluate_model(original, valid, labels=meta.labels, device=args.device)["ua"]
    base = _config(args, seed=args.seed)
    runs = [
        parse_run(spec.strip(), base=base, target_forget_acc=target) for spec in args.methods.split(",") if spec.strip()
    ]
    retrained = None
    if not args.no_retrain:
        train_config = TrainConfig(epochs=args.retrain_epochs, seed=args.seed, device=args.device)
        retrained = run_retrain(
            original,
            data.remain,
            labels=meta.labels,
            train_config=train_config,
            valid=valid if len(valid) else None,
            progress=args.progress,
        )
    rows = evaluate_unlearning(
        original,
        sets=data,
        runs=runs,
        retrained=retrained,
        device=args.device,
        seed=args.seed,
        extra={"n_forget": len(ids), "seed": args.seed},
        progress=args.progress,
    )
    meta_info = {
        "checkpoint": str(args.checkpoint.resolve()),
        "forget": str(args.forget) if args.forget else f"{len(ids)} random training utterances (seed {args.seed})",
        "sets": f"{len(data.forget)} forget / {len(data.remain)} remain / {len(test)} test",
        "target forget accuracy (@retrain-level)": target,
        "unlearning config": base.to_dict(),
        "forget ids": ids,
    }
    paths = write_report(rows, out_dir=args.out, meta=meta_info, title="Unlearning evaluation")
    print(paths["md"].read_text(encoding="utf-8"))
    return 0
