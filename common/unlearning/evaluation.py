"""Evaluate unlearning the way the seed paper's table does, and write the report.

For the original model, the Retrain oracle and every method: forget accuracy, remaining-set
accuracy, test UA and WA, membership inference on the forget set (loss, confidence and entropy
attacks fitted on remaining-vs-test outputs; :mod:`serforget.common.privacy`), the mean absolute gap to the
retrained model over those metrics, wall time and peak memory of unlearning against retraining.

Rows are flat dicts of JSON values (one per method and forget set), so the CLI report and the
benchmark's results file share one shape; :func:`summarize` turns rows into mean/std per group,
:func:`markdown_table` and the ``plot_*`` functions render them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from serforget.common.data import WaveformSet
from serforget.common.device import resolve_device
from serforget.common.fsutil import atomic_write_json, atomic_write_text
from serforget.common.metrics import classification_report
from serforget.common.privacy import ATTACKS, membership_inference
from serforget.common.training import TrainConfig, predict_logits
from serforget.common.unlearning.baselines import retrain_from_scratch
from serforget.common.unlearning.config import METHODS, REMAIN_METHODS, UnlearnConfig
from serforget.common.unlearning.engine import unlearn
from serforget.common.unlearning.measure import ResourceMeter

REPORT_FORMAT_VERSION = 1
#: Metrics averaged (absolute difference, in points) into the gap to the retrained model.
GAP_METRICS: tuple[str, ...] = ("forget_acc", "remain_acc", "test_ua", "test_wa", "mia_auc")
#: Row names as the paper's table prints them.
DISPLAY_NAMES: dict[str, str] = {
    "original": "Original",
    "retrain": "Retrain",
    "neggrad": "NegGrad",
    "rl": "RL",
    "rl_adv": "RL+Adv",
    "rl_ela": "RL+Ela",
    "rl_adv_ela": "RL+Adv+Ela",
    "rl_adv_ela@retrain-level": "RL+Adv+Ela@retrain-level",
    "ft": "FT",
    "neggrad_plus": "NegGrad+",
    "scrub": "SCRUB",
}
#: The paper's rows in table order.
PAPER_ROWS: tuple[str, ...] = (
    "neggrad",
    "rl",
    "rl_adv",
    "rl_ela",
    "rl_adv_ela",
    "rl_adv_ela@retrain-level",
    "ft",
    "neggrad_plus",
    "scrub",
)
_MIA_PREFIX = {"loss": "mia", "confidence": "mia_conf", "entropy": "mia_entropy"}


@dataclass
class EvalSets:
    """The three sets every model is scored on; ``remain`` = training set minus forget set."""

    forget: WaveformSet
    remain: WaveformSet
    test: WaveformSet
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        overlap = set(self.forget.utt_ids) & (set(self.remain.utt_ids) | set(self.test.utt_ids))
        if overlap:
            raise ValueError(f"forget utterances also appear in remain/test: {sorted(overlap)[:5]}")
        for name in ("forget", "remain", "test"):
            if len(getattr(self, name)) == 0:
                raise ValueError(f"the {name} set is empty")


@dataclass(frozen=True)
class MethodRun:
    """One table row: ``name`` (e.g. ``rl_adv_ela@retrain-level``), the engine method and its config."""

    name: str
    method: str
    config: UnlearnConfig


@dataclass
class Retrained:
    """The Retrain oracle's model with the cost of obtaining it."""

    model: nn.Module
    seconds: float
    cpu_seconds: float
    peak_bytes: int


def parse_run(spec: str, *, base: UnlearnConfig, target_forget_acc: float | None) -> MethodRun:
    """``method`` or ``method@stop`` (``@zero`` / ``@retrain-level``) -> a :class:`MethodRun`.

    ``@retrain-level`` needs ``target_forget_acc`` (the held-out accuracy).
    """
    method, _, stop = spec.partition("@")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in {spec!r}; known: {', '.join(METHODS)}")
    if not stop:
        return MethodRun(name=method, method=method, config=base)
    if stop == "retrain-level":
        if target_forget_acc is None:
            raise ValueError(f"{spec!r} needs a target forget accuracy (the held-out accuracy)")
        return MethodRun(name=spec, method=method, config=base.replace(stop=stop, target_forget_acc=target_forget_acc))
    if stop == "zero":
        return MethodRun(name=spec, method=method, config=base.replace(stop="zero"))
    raise ValueError(f"unknown stop rule {stop!r} in {spec!r}; use @zero or @retrain-level")


def score_model(
    model: nn.Module, sets: EvalSets, *, device: str | torch.device = "auto", seed: int = 0
) -> dict[str, float]:
    """Accuracies and membership-inference results of one model (flat, JSON-able)."""
    logits = {name: predict_logits(model, getattr(sets, name), device=device) for name in ("forget", "remain", "test")}
    test = classification_report(sets.test.targets.tolist(), logits["test"].argmax(1).tolist(), labels=sets.labels)
    row: dict[str, float] = {
        "forget_acc": _accuracy(logits["forget"], sets.forget.targets),
        "remain_acc": _accuracy(logits["remain"], sets.remain.targets),
        "test_ua": test["ua"],
        "test_wa": test["wa"],
    }
    attacks = membership_inference(
        member_logits=logits["remain"],
        member_targets=sets.remain.targets,
        nonmember_logits=logits["test"],
        nonmember_targets=sets.test.targets,
        forget_logits=logits["forget"],
        forget_targets=sets.forget.targets,
        attacks=ATTACKS,
        seed=seed,
    )
    for attack, result in attacks.items():
        prefix = _MIA_PREFIX[attack]
        row[f"{prefix}_auc"] = result.auc
        row[f"{prefix}_adv"] = result.advantage
        row[f"{prefix}_member_auc"] = result.member_auc
    return row


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == targets).float().mean())


def gap_to_reference(row: dict[str, Any], reference: dict[str, Any], *, metrics: Sequence[str] = GAP_METRICS) -> float:
    """Mean absolute difference over ``metrics``, in points (accuracies and AUC times 100)."""
    return float(np.mean([abs(row[m] - reference[m]) * 100.0 for m in metrics]))


def run_retrain(
    original: nn.Module,
    remain: WaveformSet,
    *,
    labels: Sequence[str],
    train_config: TrainConfig,
    valid: WaveformSet | None,
    progress: bool = False,
) -> Retrained:
    """Train the oracle and measure it the same way unlearning is measured."""
    device = resolve_device(train_config.device)
    with ResourceMeter(device) as meter:
        model, _ = retrain_from_scratch(
            original, remain, labels=labels, train_config=train_config, valid=valid, progress=progress
        )
    return Retrained(
        model=model,
        seconds=meter.result.seconds,
        cpu_seconds=meter.result.cpu_seconds,
        peak_bytes=meter.result.peak_bytes,
    )


def evaluate_unlearning(
    original: nn.Module,
    *,
    sets: EvalSets,
    runs: Sequence[MethodRun],
    retrained: Retrained | None,
    device: str | torch.device = "auto",
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    include_original: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Rows for Original (unless ``include_original`` is false), Retrain (when given) and every run.

    Every row gets ``extra`` merged in; ``seed`` seeds the attack's cross-fitting folds. With the
    oracle the rows also get the reference columns of :func:`add_reference_columns`.
    """
    base = dict(extra or {})
    rows = []
    if include_original:
        rows.append(
            {
                **base,
                "method": "original",
                **score_model(original, sets, device=device, seed=seed),
                "unlearn_s": 0.0,
                "unlearn_cpu_s": 0.0,
            }
        )
    if retrained is not None:
        rows.append(
            {
                **base,
                "method": "retrain",
                **score_model(retrained.model, sets, device=device, seed=seed),
                "unlearn_s": retrained.seconds,
                "unlearn_cpu_s": retrained.cpu_seconds,
                "peak_mem_mb": retrained.peak_bytes / 2**20,
            }
        )
    for run in tqdm(runs, desc="methods", unit="method", disable=not progress, leave=False):
        rows.append({**base, **_unlearn_row(original, sets, run, device=device, seed=seed)})
    if retrained is not None:
        add_reference_columns(rows, next(r for r in rows if r["method"] == "retrain"))
    return rows


def _unlearn_row(original: nn.Module, sets: EvalSets, run: MethodRun, *, device: str | torch.device, seed: int) -> dict:
    remain = sets.remain if run.method in REMAIN_METHODS else None
    result = unlearn(original, sets.forget, method=run.method, config=run.config, remain=remain)
    return {
        "method": run.name,
        **score_model(result.model, sets, device=device, seed=seed),
        "unlearn_s": result.seconds,
        "unlearn_cpu_s": result.cpu_seconds,
        "peak_mem_mb": result.peak_memory_bytes / 2**20,
        "epochs": result.epochs,
        "steps": result.steps,
        "stop": run.config.stop,
        "stop_reason": result.stop_reason,
        "target_forget_acc": run.config.target_forget_acc,
        "penalty_tau": run.config.penalty_tau,
        "n_adversarial": result.n_adversarial,
        "phase_seconds": result.phase_seconds,
        "forget_acc_trajectory": result.forget_acc_trajectory,
    }


def add_reference_columns(rows: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    """Add ``gap``, cost of retraining and the ratios to it, from the Retrain row ``reference``.

    ``gap`` is :func:`gap_to_reference`; ``speedup`` = retrain wall seconds / unlearning wall
    seconds, ``speedup_cpu`` the same in CPU seconds; ``mem_ratio`` = unlearning peak memory /
    retraining peak memory. Rows are updated in place (a separate call lets a sweep reuse the
    oracle of an earlier experiment on the same forget set).
    """
    retrain_s, retrain_cpu_s = reference["unlearn_s"], reference["unlearn_cpu_s"]
    retrain_mem = reference.get("peak_mem_mb")
    for row in rows:
        row["retrain_s"], row["retrain_cpu_s"], row["retrain_peak_mem_mb"] = retrain_s, retrain_cpu_s, retrain_mem
        row["gap"] = gap_to_reference(row, reference)
        seconds, cpu_seconds = row.get("unlearn_s") or 0.0, row.get("unlearn_cpu_s") or 0.0
        row["speedup"] = retrain_s / seconds if seconds > 0 else None
        row["speedup_cpu"] = retrain_cpu_s / cpu_seconds if cpu_seconds > 0 else None
        peak = row.get("peak_mem_mb")
        row["mem_ratio"] = peak / retrain_mem if peak is not None and retrain_mem else None


# ----------------------------------------------------------------------------- summaries


def summarize(rows: Iterable[dict[str, Any]], *, keys: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, std (sample, ddof=1; 0 for one row) and count of each metric per group of ``keys``.

    Groups keep the order in which they first appear; a metric missing or ``None`` in a row is
    skipped for that row.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(keys, key))
        entry["n_runs"] = len(members)
        for metric in metrics:
            values = [float(r[metric]) for r in members if r.get(metric) is not None]
            entry[f"{metric}_mean"] = float(np.mean(values)) if values else None
            entry[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None)
        out.append(entry)
    return out


def _format_cell(mean: float | None, std: float | None, *, scale: float, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean * scale:.{digits}f} ± {(std or 0.0) * scale:.{digits}f}"


#: ``(metric, header, scale, digits)`` of the standard table.
TABLE_COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("forget_acc", "Forget acc %", 100.0, 1),
    ("remain_acc", "Remain acc %", 100.0, 1),
    ("test_ua", "Test UA %", 100.0, 1),
    ("test_wa", "Test WA %", 100.0, 1),
    ("mia_auc", "MIA AUC (loss)", 1.0, 3),
    ("mia_adv", "MIA adv. (loss)", 1.0, 3),
    ("mia_entropy_auc", "MIA AUC (entropy)", 1.0, 3),
    ("gap", "Gap to retrain (pts)", 1.0, 2),
    ("unlearn_s", "Time s", 1.0, 2),
    ("speedup", "Speed-up vs retrain (wall)", 1.0, 0),
    ("speedup_cpu", "Speed-up (CPU time)", 1.0, 0),
    ("mem_ratio", "Peak mem / retrain", 1.0, 2),
)


def markdown_table(
    summary: Sequence[dict[str, Any]],
    *,
    row_key: str = "method",
    columns: Sequence[tuple[str, str, float, int]] = TABLE_COLUMNS,
) -> str:
    """A Markdown table of ``mean ± std`` cells, one line per summary entry."""
    header = ["Method", *[c[1] for c in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summary:
        name = DISPLAY_NAMES.get(str(entry[row_key]), str(entry[row_key]))
        cells = [
            _format_cell(entry.get(f"{m}_mean"), entry.get(f"{m}_std"), scale=s, digits=d) for m, _, s, d in columns
        ]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_method_bars(
    summary: Sequence[dict[str, Any]],
    *,
    path: str | os.PathLike[str],
    metrics: Sequence[tuple[str, str]] = (
        ("forget_acc", "forget acc"),
        ("test_ua", "test UA"),
        ("mia_auc", "MIA AUC (loss)"),
    ),
    group_key: str = "n_forget",
    title: str = "",
) -> Path:
    """One panel per metric: a bar per method (mean ± std), grouped by ``group_key``; Retrain dashed."""
    plt = _pyplot()
    groups = list(dict.fromkeys(e.get(group_key) for e in summary))
    methods = [m for m in dict.fromkeys(e["method"] for e in summary) if m != "retrain"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    width = 0.8 / max(len(groups), 1)
    for ax, (metric, label) in zip(axes[0], metrics):
        for g_i, group in enumerate(groups):
            entries = {e["method"]: e for e in summary if e.get(group_key) == group}
            means = [entries.get(m, {}).get(f"{metric}_mean") for m in methods]
            stds = [entries.get(m, {}).get(f"{metric}_std") or 0.0 for m in methods]
            xs = np.arange(len(methods)) + (g_i - (len(groups) - 1) / 2) * width
            bars = ax.bar(
                xs,
                [np.nan if v is None else v for v in means],
                width,
                yerr=stds,
                capsize=2,
                label=f"{group_key}={group}",
            )
            reference = entries.get("retrain", {}).get(f"{metric}_mean")
            if reference is not None:
                ax.hlines(
                    reference,
                    xs[0] - width / 2,
                    xs[-1] + width / 2,
                    colors=bars.patches[0].get_facecolor(),
                    linestyles="dashed",
                    linewidth=1,
                )
        ax.set_xticks(
            range(len(methods)), [DISPLAY_NAMES.get(m, m) for m in methods], rotation=60, ha="right", fontsize=8
        )
        ax.set_title(f"{label} (dashed: Retrain)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, plt, path)


def plot_sweep(
    summary: Sequence[dict[str, Any]],
    *,
    x_key: str,
    path: str | os.PathLike[str],
    metrics: Sequence[tuple[str, str]],
    series_key: str = "method",
    references: dict[str, float] | None = None,
    log_x: bool = False,
    title: str = "",
) -> Path:
    """One panel per metric: mean ± std against ``x_key``, one line per ``series_key`` value."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.8), squeeze=False)
    series = list(dict.fromkeys(e[series_key] for e in summary))
    for ax, (metric, label) in zip(axes[0], metrics):
        for name in series:
            points = sorted(
                (e[x_key], e.get(f"{metric}_mean"), e.get(f"{metric}_std") or 0.0)
                for e in summary
                if e[series_key] == name and e.get(f"{metric}_mean") is not None
            )
            if points:
                xs, ys, es = zip(*points)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=DISPLAY_NAMES.get(str(name), str(name)))
        if references and metric in references:
            ax.axhline(references[metric], color="grey", linestyle="dashed", linewidth=1, label="reference")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(x_key)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, plt, path)


def plot_cost(summary: Sequence[dict[str, Any]], *, path: str | os.PathLike[str], title: str = "") -> Path:
    """Wall time per method on a log axis, Retrain included (the cost the methods avoid)."""
    plt = _pyplot()
    entries = [e for e in summary if e["method"] != "original" and e.get("unlearn_s_mean") is not None]
    names = list(dict.fromkeys(e["method"] for e in entries))
    means = [np.mean([e["unlearn_s_mean"] for e in entries if e["method"] == n]) for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(range(len(names)), means, color=["tab:red" if n == "retrain" else "tab:blue" for n in names])
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), [DISPLAY_NAMES.get(n, n) for n in names], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("wall time, s (log)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "unlearning cost vs retraining")
    return _save(fig, plt, path)


def _save(fig, plt, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- report


def write_report(
    rows: Sequence[dict[str, Any]], *, out_dir: str | os.PathLike[str], meta: dict[str, Any], title: str
) -> dict[str, Path]:
    """``report.json`` (format_version, meta, rows), ``report.md`` and PNG plots under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [c[0] for c in TABLE_COLUMNS]
    summary = summarize(rows, keys=("n_forget", "method"), metrics=metrics)
    paths = {
        "json": atomic_write_json(
            out / "report.json",
            {
                "format_version": REPORT_FORMAT_VERSION,
                "created_at": time.time(),
                "meta": meta,
                "rows": list(rows),
            },
        ),
        "bars": plot_method_bars(summary, path=out / "metrics.png", title=title),
        "cost": plot_cost(summary, path=out / "cost.png"),
    }
    lines = [f"# {title}", ""]
    for key, value in meta.items():
        lines.append(f"- **{key}**: {value}")
    for n_forget in dict.fromkeys(e["n_forget"] for e in summary):
        lines += ["", f"## N = {n_forget} forget utterances", ""]
        lines.append(markdown_table([e for e in summary if e["n_forget"] == n_forget]))
    lines += ["", "![metrics](metrics.png)", "", "![cost](cost.png)", ""]
    paths["md"] = atomic_write_text(out / "report.md", "\n".join(lines))
    return paths
