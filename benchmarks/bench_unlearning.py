"""The seed paper's table on the default synthetic corpus: forget-set-only unlearning vs baselines.

Protocol (the lead's default data protocol, shared with training and the federated runs):
corpus = ``synthesize_corpus(data/synth)``; 4-class task; speaker split 3 valid / 5 test speakers
(seed 0); original model = default log-mel CNN trained with ``TrainConfig()`` (best valid UA).
For every forget-set size N and seed, the forget set is N training utterances drawn at random
(seeded by ``(N, seed)``); Retrain = the same recipe from scratch on the training set minus the
forget set. Rows: Original, Retrain, NegGrad, RL, RL+Adv, RL+Ela, RL+Adv+Ela (stop ``zero``),
RL+Adv+Ela@retrain-level (stop at the original model's held-out *validation* UA, the number the
server sends in the federated system), FT, NegGrad+, SCRUB. Also a tau sweep (N = 10) and a
forget-set size sweep. Every time is wall time on this machine, with unlearning and retraining
measured the same way in the same process (:mod:`serforget.common.unlearning.measure`).

Resumable: finished cells (one experiment, N, seed) are kept in ``<work-dir>/partial.json``
together with a fingerprint of the settings; a rerun with the same settings skips them, and the
original and retrained checkpoints are cached in ``<work-dir>`` with the time they took.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_unlearning            # full run (< 60 min on 2 cores)
    .venv/bin/python -m benchmarks.bench_unlearning --quick    # smoke run, minutes

Writes ``benchmarks/results/unlearning.json`` (a list of rows), ``unlearning.md`` and PNGs
(``--out`` changes the folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from serforget.common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from serforget.common.corpora.synth import synthesize_corpus
from serforget.common.data import WaveformSet, load_waveforms
from serforget.common.fsutil import atomic_write_json, atomic_write_text
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import read_manifest
from serforget.common.pipeline import make_splits, train_checkpoint
from serforget.common.training import TrainConfig, evaluate_model
from serforget.common.unlearning import FORGET_ONLY_METHODS, REMAIN_METHODS, UnlearnConfig
from serforget.common.unlearning.evaluation import (
    DISPLAY_NAMES,
    PAPER_ROWS,
    EvalSets,
    Retrained,
    add_reference_columns,
    evaluate_unlearning,
    markdown_table,
    parse_run,
    plot_cost,
    plot_method_bars,
    plot_sweep,
    run_retrain,
    summarize,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROW_FORMAT_VERSION = 1
PARTIAL_FORMAT_VERSION = 1
TABLE_METRICS = (
    "forget_acc",
    "remain_acc",
    "test_ua",
    "test_wa",
    "mia_auc",
    "mia_adv",
    "mia_conf_auc",
    "mia_entropy_auc",
    "gap",
    "unlearn_s",
    "unlearn_cpu_s",
    "speedup",
    "speedup_cpu",
    "mem_ratio",
    "epochs",
)
SWEEP_METHODS = ("rl_adv_ela", "rl_adv_ela@retrain-level")


@dataclass(frozen=True)
class BenchSettings:
    """Everything a result depends on; its hash guards the partial file against mixing runs."""

    sizes: tuple[int, ...] = (10, 50, 100)
    seeds: tuple[int, ...] = (0, 1, 2)
    taus: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0)
    tau_size: int = 10
    sweep_sizes: tuple[int, ...] = (5, 10, 25, 50, 100)
    rows: tuple[str, ...] = PAPER_ROWS
    train_epochs: int = TrainConfig().epochs
    unlearn: tuple[tuple[str, Any], ...] = ()
    device: str = "cpu"

    def fingerprint(self) -> str:
        """Hash of these settings *and* of the resolved unlearning config: a changed library default
        must invalidate finished cells as surely as a changed ``--set``."""
        payload = {**asdict(self), "resolved_unlearn": self.unlearn_config().to_dict()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def unlearn_config(self) -> UnlearnConfig:
        return UnlearnConfig.from_mapping({**dict(self.unlearn), "device": self.device})

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.train_epochs, device=self.device)


QUICK = BenchSettings(sizes=(10,), seeds=(0,), taus=(0.25, 1.0), sweep_sizes=(5, 10), train_epochs=4)


@dataclass
class BenchData:
    train: WaveformSet
    valid: WaveformSet
    test: WaveformSet


# ----------------------------------------------------------------------------- data and models


def load_data(data_dir: Path, *, progress: bool) -> BenchData:
    """Default corpus (rendered if missing), the 3/5-speaker split, waveforms in memory."""
    manifest = synthesize_corpus(out_dir=data_dir, progress=progress)
    splits = make_splits(manifest=manifest, out_dir=data_dir / "splits")
    sets = {
        name: load_waveforms(read_manifest(path), labels=FOUR_CLASS, progress=progress) for name, path in splits.items()
    }
    return BenchData(train=sets["train"], valid=sets["valid"], test=sets["test"])


def original_checkpoint(data_dir: Path, work_dir: Path, settings: BenchSettings, *, progress: bool) -> Path:
    """Train (or reuse) the original model with the lead's recipe."""
    splits = make_splits(manifest=data_dir / "manifest.csv", out_dir=data_dir / "splits")
    return train_checkpoint(
        train_manifest=splits["train"],
        valid_manifest=splits["valid"],
        out_dir=work_dir / "original",
        train_config=settings.train_config(),
        progress=progress,
    )


def forget_ids(train: WaveformSet, *, n_forget: int, seed: int) -> list[str]:
    """N training utterances drawn at random; the same (N, seed) gives the same set in every experiment."""
    if not 0 < n_forget < len(train):
        raise ValueError(f"n_forget must lie in [1, {len(train) - 1}], got {n_forget}")
    return sorted(random.Random(f"forget-{n_forget}-{seed}").sample(train.utt_ids, n_forget))


def retrained(
    original: torch.nn.Module,
    remain: WaveformSet,
    valid: WaveformSet,
    *,
    cache: Path,
    settings: BenchSettings,
    progress: bool,
) -> Retrained:
    """The oracle for one forget set, cached with the wall time and peak memory it took."""
    train_config = asdict(settings.train_config())
    try:
        model, meta = load_checkpoint(cache)
        if (
            meta.provenance.get("remain_sha") == _ids_sha(remain.utt_ids)
            and meta.provenance.get("train_config") == train_config
        ):
            return Retrained(
                model=model,
                seconds=float(meta.provenance["retrain_s"]),
                cpu_seconds=float(meta.provenance["retrain_cpu_s"]),
                peak_bytes=int(meta.provenance["retrain_peak_bytes"]),
            )
    except CheckpointError:
        pass
    result = run_retrain(
        original, remain, labels=FOUR_CLASS, train_config=settings.train_config(), valid=valid, progress=progress
    )
    save_checkpoint(
        model=result.model.cpu(),
        out_dir=cache,
        labels=FOUR_CLASS,
        provenance={
            "remain_sha": _ids_sha(remain.utt_ids),
            "train_config": train_config,
            "retrain_s": result.seconds,
            "retrain_cpu_s": result.cpu_seconds,
            "retrain_peak_bytes": result.peak_bytes,
        },
    )
    return result


def _ids_sha(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


# ----------------------------------------------------------------------------- partial results


class Partial:
    """Finished cells, rewritten atomically after each one so a crash loses at most one cell."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.cells: dict[str, list[dict[str, Any]]] = {}
        if path.exists():
            raw = json.loads(path.read_text())
            if raw.get("format_version") != PARTIAL_FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported format_version {raw.get('format_version')!r}")
            if raw.get("fingerprint") == fingerprint:
                self.cells = raw["cells"]

    def done(self, key: str) -> bool:
        return key in self.cells

    def add(self, key: str, rows: list[dict[str, Any]]) -> None:
        self.cells[key] = rows
        atomic_write_json(
            self.path, {"format_version": PARTIAL_FORMAT_VERSION, "fingerprint": self.fingerprint, "cells": self.cells}
        )

    def rows(self) -> list[dict[str, Any]]:
        return [row for rows in self.cells.values() for row in rows]


# ----------------------------------------------------------------------------- experiments


@dataclass(frozen=True)
class Cell:
    """One forget set (N, seed) and the rows computed for it in one experiment.

    ``main`` cells train the Retrain oracle and score Original and Retrain too; ``tau`` cells reuse
    the oracle of the main cell with the same forget set; ``size`` cells (forget-set sizes outside
    the main table) have no oracle - retraining is the dominant cost of the benchmark - and are
    compared with the Original row instead.
    """

    experiment: str
    n_forget: int
    seed: int
    runs: tuple[str, ...]
    config_changes: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.experiment}/n{self.n_forget}/s{self.seed}/{dict(self.config_changes)}"


def plan_cells(settings: BenchSettings) -> list[Cell]:
    """Main cells first: the tau sweep reads their Retrain rows."""
    if settings.tau_size not in settings.sizes:
        raise ValueError(f"tau_size {settings.tau_size} must be one of the main sizes {settings.sizes}")
    cells = [Cell("main", n, s, settings.rows) for n in settings.sizes for s in settings.seeds]
    cells += [
        Cell("tau", settings.tau_size, s, ("rl_adv_ela",), (("penalty_tau", tau),))
        for tau in settings.taus
        for s in settings.seeds
    ]
    cells += [
        Cell("size", n, s, SWEEP_METHODS)
        for n in settings.sweep_sizes
        if n not in settings.sizes
        for s in settings.seeds
    ]
    return cells


def run_cell(
    cell: Cell,
    *,
    data: BenchData,
    original: torch.nn.Module,
    held_out_ua: float,
    work_dir: Path,
    settings: BenchSettings,
    done_rows: list[dict[str, Any]],
    progress: bool,
) -> list[dict[str, Any]]:
    ids = forget_ids(data.train, n_forget=cell.n_forget, seed=cell.seed)
    sets = EvalSets(
        forget=data.train.select_ids(ids), remain=data.train.exclude_ids(ids), test=data.test, labels=FOUR_CLASS
    )
    oracle = None
    if cell.experiment == "main":
        oracle = retrained(
            original,
            sets.remain,
            data.valid,
            settings=settings,
            progress=progress,
            cache=work_dir / f"retrain_n{cell.n_forget}_s{cell.seed}",
        )
    base = settings.unlearn_config().replace(seed=cell.seed, **dict(cell.config_changes))
    runs = [parse_run(spec, base=base, target_forget_acc=held_out_ua) for spec in cell.runs]
    rows = evaluate_unlearning(
        original,
        sets=sets,
        runs=runs,
        retrained=oracle,
        device=settings.device,
        seed=cell.seed,
        include_original=cell.experiment != "tau",
        extra={
            "format_version": ROW_FORMAT_VERSION,
            "experiment": cell.experiment,
            "n_forget": cell.n_forget,
            "seed": cell.seed,
            "held_out_ua": held_out_ua,
        },
    )
    if cell.experiment == "tau":
        reference = [
            r
            for r in done_rows
            if r["experiment"] == "main"
            and r["method"] == "retrain"
            and r["n_forget"] == cell.n_forget
            and r["seed"] == cell.seed
        ]
        add_reference_columns(rows, reference[0])
    for row in rows:
        row.setdefault("penalty_tau", base.penalty_tau)
    return rows


# ----------------------------------------------------------------------------- report


def write_results(rows: list[dict[str, Any]], *, out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """``unlearning.json`` (list of rows), ``unlearning.md`` and the PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": atomic_write_json(out_dir / "unlearning.json", rows)}
    main_rows = [r for r in rows if r["experiment"] == "main"]
    main = summarize(main_rows, keys=("n_forget", "method"), metrics=TABLE_METRICS)
    paths["bars"] = plot_method_bars(
        main,
        path=out_dir / "unlearning_methods.png",
        title="Unlearning on the synthetic corpus (mean ± std over seeds)",
    )
    paths["cost"] = plot_cost(main, path=out_dir / "unlearning_cost.png")
    tau_rows = [r for r in rows if r["experiment"] == "tau"]
    tau_refs = [
        r
        for r in rows
        if r["experiment"] == "main"
        and r["method"] == "retrain"
        and r["n_forget"] == (tau_rows[0]["n_forget"] if tau_rows else None)
    ]
    tau = summarize(tau_rows, keys=("method", "penalty_tau"), metrics=TABLE_METRICS)
    if tau:
        paths["tau"] = plot_sweep(
            tau,
            x_key="penalty_tau",
            series_key="method",
            path=out_dir / "unlearning_tau.png",
            log_x=True,
            metrics=(
                ("test_ua", "test UA"),
                ("forget_acc", "forget acc"),
                ("mia_auc", "MIA AUC (loss)"),
                ("epochs", "epochs"),
            ),
            references=_means(tau_refs, ("test_ua", "forget_acc", "mia_auc")),
            title=f"tau sweep, N = {tau_rows[0]['n_forget']} (dashed: Retrain)",
        )
    size_rows = [r for r in rows if r["experiment"] in ("size", "main") and r["method"] in (*SWEEP_METHODS, "original")]
    size = summarize(size_rows, keys=("method", "n_forget"), metrics=TABLE_METRICS)
    if size:
        paths["size"] = plot_sweep(
            size,
            x_key="n_forget",
            series_key="method",
            path=out_dir / "unlearning_size.png",
            log_x=True,
            metrics=(
                ("test_ua", "test UA"),
                ("forget_acc", "forget acc"),
                ("mia_auc", "MIA AUC (loss)"),
                ("unlearn_s", "seconds"),
            ),
            title="forget-set size sweep",
        )
    paths["md"] = atomic_write_text(out_dir / "unlearning.md", _markdown(rows, main, tau, size, meta))
    return paths


def _means(rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float]:
    return {m: sum(r[m] for r in rows) / len(rows) for m in metrics} if rows else {}


def _markdown(rows, main, tau, size, meta) -> str:
    lines = ["# Forget-set-only unlearning: benchmark on the default synthetic corpus", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += [
        "",
        "Cells are mean ± std over seeds. Gap = mean |metric - Retrain| over forget acc, remain acc,",
        "test UA, test WA and MIA AUC (loss), in points. Speed-up = retrain wall time / unlearning wall",
        "time (importance and adversarial generation included). MIA AUC: forget vs test utterances,",
        "attack fitted on remaining-vs-test outputs (0.5 = indistinguishable from unseen data).",
        "",
    ]
    lines += _targets(rows)
    lines += _comparison(main)
    for n_forget in dict.fromkeys(e["n_forget"] for e in main):
        lines += ["", f"## N = {n_forget}", "", markdown_table([e for e in main if e["n_forget"] == n_forget])]
    if tau:
        lines += [
            "",
            "## penalty_tau sweep (RL+Adv+Ela)",
            "",
            "| method | penalty_tau | forget acc % | test UA % | MIA AUC | epochs |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for e in tau:
            lines.append(
                f"| {DISPLAY_NAMES.get(e['method'], e['method'])} | {e['penalty_tau']} | {_pm(e, 'forget_acc', 100)} | "
                f"{_pm(e, 'test_ua', 100)} | {_pm(e, 'mia_auc', 1, 3)} | {_pm(e, 'epochs', 1)} |"
            )
    if size:
        lines += [
            "",
            "## forget-set size sweep",
            "",
            "| method | N | forget acc % | test UA % | MIA AUC | gap | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for e in sorted(size, key=lambda e: (e["method"], e["n_forget"])):
            lines.append(
                f"| {DISPLAY_NAMES.get(e['method'], e['method'])} | {e['n_forget']} | {_pm(e, 'forget_acc', 100)} | "
                f"{_pm(e, 'test_ua', 100)} | {_pm(e, 'mia_auc', 1, 3)} | {_pm(e, 'gap', 1)} | {_pm(e, 'unlearn_s', 1, 2)} |"
            )
    lines += ["", "![methods](unlearning_methods.png)", "", "![cost](unlearning_cost.png)"]
    if tau:
        lines += ["", "![tau](unlearning_tau.png)"]
    if size:
        lines += ["", "![size](unlearning_size.png)"]
    return "\n".join(lines) + "\n"


def _pm(entry: dict[str, Any], metric: str, scale: float, digits: int = 1) -> str:
    mean = entry.get(f"{metric}_mean")
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}f} ± {(entry.get(f'{metric}_std') or 0.0) * scale:.{digits}f}"


def check_targets(rows: list[dict[str, Any]], *, n_forget: int = 10) -> list[tuple[str, bool, str]]:
    """The issue's targets for the default setting, computed from one run's main rows (means over seeds)."""
    main = [r for r in rows if r["experiment"] == "main" and r["n_forget"] == n_forget]
    by = {
        m: [r for r in main if r["method"] == m]
        for m in ("original", "retrain", "rl_adv_ela", "rl_adv_ela@retrain-level")
    }
    if not all(by.values()):
        return []

    def mean(method: str, metric: str) -> float:
        return sum(r[metric] for r in by[method]) / len(by[method])

    def speedups(method: str) -> tuple[float, float]:
        wall = mean("retrain", "unlearn_s") / mean(method, "unlearn_s")
        return wall, mean("retrain", "unlearn_cpu_s") / mean(method, "unlearn_cpu_s")

    level = "rl_adv_ela@retrain-level"
    drop = (mean("original", "test_ua") - mean("rl_adv_ela", "test_ua")) * 100
    drop_level = (mean("original", "test_ua") - mean(level, "test_ua")) * 100
    (speed, speed_cpu), (speed_level, speed_level_cpu) = speedups("rl_adv_ela"), speedups(level)
    forget_gap = abs(mean(level, "forget_acc") - mean("retrain", "forget_acc")) * 100
    mia_gap = abs(mean(level, "mia_auc") - mean("retrain", "mia_auc"))
    return [
        ("RL+Adv+Ela test UA within 1.5 pts of Original", drop <= 1.5, f"drop {drop:+.2f} pts"),
        (
            "RL+Adv+Ela >= 100x faster than Retrain (wall)",
            speed >= 100,
            f"{speed:.0f}x wall, {speed_cpu:.0f}x CPU time",
        ),
        ("@retrain-level test UA within 1.5 pts of Original", drop_level <= 1.5, f"drop {drop_level:+.2f} pts"),
        (
            "@retrain-level >= 100x faster than Retrain (wall)",
            speed_level >= 100,
            f"{speed_level:.0f}x wall, {speed_level_cpu:.0f}x CPU time",
        ),
        ("@retrain-level forget acc within 5 pts of Retrain", forget_gap <= 5, f"|diff| {forget_gap:.1f} pts"),
        ("@retrain-level MIA AUC within 0.05 of Retrain", mia_gap <= 0.05, f"|diff| {mia_gap:.3f}"),
    ]


def _comparison(main: list[dict[str, Any]]) -> list[str]:
    """Per N: the forget-set-only method closest to Retrain against the best remaining-data one.

    Computed from the summary (no numbers are written by hand); "doing nothing" (Original) is
    listed too, since a method that ends further from Retrain than the untouched model did harm.
    """
    forget_only = {name for name in PAPER_ROWS if name.partition("@")[0] in FORGET_ONLY_METHODS}
    lines = [
        "",
        "## Closest to Retrain (mean gap, points; lower is better)",
        "",
        "| N | Original (no unlearning) | best forget-set-only | best remaining-data | forget-set-only matches? |",
        "|---:|---|---|---|---|",
    ]
    for n_forget in dict.fromkeys(e["n_forget"] for e in main):
        entries = {e["method"]: e for e in main if e["n_forget"] == n_forget and e.get("gap_mean") is not None}
        ours = [entries[m] for m in forget_only if m in entries]
        theirs = [entries[m] for m in REMAIN_METHODS if m in entries]
        if not ours or not theirs or "original" not in entries:
            continue
        best_ours = min(ours, key=lambda e: e["gap_mean"])
        best_theirs = min(theirs, key=lambda e: e["gap_mean"])
        verdict = (
            "yes"
            if best_ours["gap_mean"] <= best_theirs["gap_mean"]
            else (f"no (+{best_ours['gap_mean'] - best_theirs['gap_mean']:.1f} pts)")
        )
        lines.append(
            f"| {n_forget} | {entries['original']['gap_mean']:.1f} | {_name_gap(best_ours)} | "
            f"{_name_gap(best_theirs)} | {verdict} |"
        )
    return lines if len(lines) > 5 else []


def _name_gap(entry: dict[str, Any]) -> str:
    return f"{DISPLAY_NAMES.get(entry['method'], entry['method'])} ({entry['gap_mean']:.1f} ± {entry['gap_std']:.1f})"


def _targets(rows: list[dict[str, Any]]) -> list[str]:
    checks = check_targets(rows)
    if not checks:
        return []
    lines = ["## Targets (N = 10, means over seeds, same run)", "", "| target | met | value |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'no'} | {value} |" for name, ok, value in checks]
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/synth"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_unlearning"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 10, one seed, 4 training epochs")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (the reference setting), auto or cuda")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an UnlearnConfig default for every method (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else BenchSettings()
    overrides = tuple(sorted(_parse_set(item) for item in args.set))
    settings = BenchSettings(
        **{
            **asdict(settings),
            "unlearn": overrides,
            "device": args.device,
            **({"seeds": tuple(range(args.seeds))} if args.seeds else {}),
        }
    )
    settings.unlearn_config()  # validate the overrides before any long work
    work_dir = args.work_dir / ("quick" if args.quick else "full")
    start = time.perf_counter()
    data = load_data(args.data_dir, progress=True)
    ckpt = original_checkpoint(args.data_dir, work_dir, settings, progress=True)
    original, _ = load_checkpoint(ckpt)
    held_out_ua = evaluate_model(original, data.valid, labels=FOUR_CLASS, device=settings.device)["ua"]
    partial = Partial(work_dir / "partial.json", settings.fingerprint())
    cells = plan_cells(settings)
    for cell in tqdm(cells, desc="benchmark cells", unit="cell"):
        if partial.done(cell.key):
            continue
        partial.add(
            cell.key,
            run_cell(
                cell,
                data=data,
                original=original,
                held_out_ua=held_out_ua,
                work_dir=work_dir,
                settings=settings,
                done_rows=partial.rows(),
                progress=False,
            ),
        )
    rows = partial.rows()
    meta = {
        "corpus": f"{args.data_dir} ({len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test utterances)",
        "original model": f"logmel_cnn, TrainConfig(epochs={settings.train_epochs}), held-out (valid) UA {held_out_ua:.3f}",
        "seeds": list(settings.seeds),
        "unlearning config": settings.unlearn_config().to_dict(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, device {settings.device}",
        "wall time of this invocation": f"{time.perf_counter() - start:.0f} s (resumed cells not included)",
        "command": " ".join(["python -m benchmarks.bench_unlearning", *(argv if argv is not None else sys.argv[1:])]),
    }
    paths = write_results(rows, out_dir=args.out, meta=meta)
    for name, ok, value in check_targets(rows):
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value}")
    print("\n".join(str(p) for p in paths.values()))
    return 0


def _parse_set(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
    return key.strip(), value.strip()


if __name__ == "__main__":
    sys.exit(main())
