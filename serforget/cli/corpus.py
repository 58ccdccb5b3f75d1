"""``serforget corpus synth|index|split``: data preparation, separate from training."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from serforget.cli._args import add_progress
from serforget.common.fsutil import check_output_dir, check_output_file


def register(sub: argparse._SubParsersAction) -> None:
    corpus = sub.add_parser("corpus", help="synthesize, index or split an emotional-speech corpus")
    csub = corpus.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")

    from serforget.common.corpora.synth import SynthConfig

    synth = csub.add_parser("synth", help="generate the synthetic acted-emotion corpus (espeak-ng)")
    synth.add_argument("--out", type=Path, required=True, help="output folder (manifest.csv + wav/)")
    for field in dataclasses.fields(SynthConfig):
        if field.type in ("int", "float", int, float):
            kind = int if field.type in ("int", int) else float
            synth.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=field.default, dest=field.name)
    add_progress(synth)
    synth.set_defaults(handler=_synth)

    index = csub.add_parser("index", help="index a real corpus from its on-disk layout into a manifest")
    from serforget.common.corpora import FORMATS

    index.add_argument("--format", choices=FORMATS, required=True)
    index.add_argument("--root", type=Path, required=True)
    index.add_argument("--out", type=Path, required=True)
    index.set_defaults(handler=_index)

    split = csub.add_parser("split", help="speaker-independent train/valid/test manifests")
    split.add_argument("--manifest", type=Path, required=True)
    split.add_argument("--out-dir", type=Path, required=True)
    split.add_argument("--task", default="4class")
    split.add_argument("--n-valid", type=int, default=3)
    split.add_argument("--n-test", type=int, default=5)
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(handler=_split)


def _synth(args: argparse.Namespace) -> int:
    from serforget.common.corpora.synth import SynthConfig, synthesize_corpus

    check_output_dir(args.out, what="--out")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig) if hasattr(args, f.name)}
    manifest = synthesize_corpus(out_dir=args.out, config=SynthConfig(**values), progress=args.progress)
    print(manifest)
    return 0


def _index(args: argparse.Namespace) -> int:
    from serforget.common.corpora import index_corpus
    from serforget.common.manifest import write_manifest

    check_output_file(args.out, what="--out")
    if not args.root.is_dir():
        raise ValueError(f"--root {args.root}: not a folder")
    result = index_corpus(fmt=args.format, root=args.root)
    write_manifest(args.out, result.utterances)
    for skipped in result.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}")
    print(
        f"{len(result.utterances)} utterances from {len({u.speaker for u in result.utterances})} speakers -> {args.out}"
        f" ({len(result.skipped)} files skipped)"
    )
    return 0


def _split(args: argparse.Namespace) -> int:
    from serforget.common.manifest import SplitSpec, read_manifest
    from serforget.common.pipeline import make_splits

    check_output_dir(args.out_dir, what="--out-dir")
    paths = make_splits(
        manifest=args.manifest,
        out_dir=args.out_dir,
        task=args.task,
        split=SplitSpec(n_valid=args.n_valid, n_test=args.n_test, seed=args.seed),
    )
    for name, path in paths.items():
        rows = read_manifest(path)
        print(f"{name}: {len(rows)} utterances, {len({u.speaker for u in rows})} speakers -> {path}")
    return 0
