"""A malicious node: how much test UA can one crafted, validly signed delta destroy?

Why: an enrolled device signs its own deltas, so signatures cannot stop a device that *wants*
to wreck the global model. What stops it is the server path every delta takes:
:func:`serforget.server.federation.check_delta` (names, shapes, finite values, L2 norm at most
``max_delta_ratio`` x the model's norm), :func:`serforget.server.federation.gate_on_held_out` (refused if
applying it alone costs more than ``max_ua_drop`` UA points on the server's held-out set) and
:func:`serforget.server.federation.merge_deltas` with the elastic constraint (``constraint.tau``, ``constraint.strength`` and the
global MAS importance map). This benchmark crafts deltas against a trained default model, sends
each through exactly those functions with the default :class:`~common.settings.RunSettings`, and
measures test UA before and after, with and without the elastic constraint. The server's held-out
set is the validation split minus the utterances the attacker optimises on; test UA is measured
on other speakers. A rejected delta does no damage; the damage it *would* have done is still
reported to show what each check buys.

Attacks (each scaled to several relative norms ``||delta|| / ||theta||``):

* ``random``: a Gaussian direction (what a broken device sends);
* ``ascent``: projected gradient *ascent* of the cross-entropy on held-out (validation) speakers;
* ``targeted``: projected gradient descent pushing every validation prediction to one class;
* ``elastic-aware``: the same targeted objective optimised *through* the elastic scaling, i.e. an
  attacker who knows the global importance map (white box; the worst case);
* ``free-bias``: the whole budget on the output bias of the class whose bias entry has the
  lowest importance. Why it matters: the elastic rule normalises importance per tensor, so the
  least important entry of every tensor has importance 0 and moves freely.

Run from the repository root (about 5 minutes on 2 CPU cores)::

    .venv/bin/python -m benchmarks.bench_malicious

Writes ``benchmarks/results/malicious.json``, ``malicious.md`` and ``malicious.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from serforget.common.checkpoint import load_checkpoint
from serforget.common.data import WaveformSet, load_waveforms
from serforget.common.fsutil import atomic_write_json, atomic_write_text
from serforget.common.manifest import read_manifest
from serforget.common.settings import RunSettings
from serforget.common.training import evaluate_model
from serforget.common.unlearning import mas_importance
from serforget.common.unlearning.elastic import elastic_constraint
from serforget.server.federation import DeltaError, DeltaVerdict, check_delta, gate_on_held_out, merge_deltas

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_VERSION = 2
DEFAULT_CHECKPOINT = Path("runs/bench_unlearning/full/original")
DEFAULT_SPLITS = Path("data/synth/splits")
DEFAULT_NORMS = (0.05, 0.15, 0.3, 0.5, 1.0)
ATTACKS = ("random", "ascent", "targeted", "elastic-aware", "free-bias")
#: Crafted deltas stop this far inside the requested norm, so a delta "at the limit" is not
#: rejected by float rounding of its own norm.
_INSIDE = 1.0 - 1e-6

Delta = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Setting:
    """What the server would do: the defaults of the federated app."""

    max_delta_ratio: float
    constraint_tau: float
    constraint_strength: float
    max_ua_drop: float

    @classmethod
    def defaults(cls) -> Setting:
        settings = RunSettings()
        return cls(
            settings.max_delta_ratio, settings.constraint_tau, settings.constraint_strength, settings.max_ua_drop
        )


@dataclass(frozen=True)
class Trial:
    """One crafted delta and what the server path made of it."""

    attack: str
    target_ratio: float
    relative_norm: float
    accepted: bool
    reason: str
    #: whether the held-out gate alone would let it through (whatever the norm check said)
    passes_gate: bool
    gate_drop: float
    ua_elastic: float
    ua_plain: float
    damage_elastic: float
    damage_plain: float


@dataclass(frozen=True)
class AttackContext:
    """Everything an attack may use: the model, its weights, the attacker's data, the importance map."""

    model: nn.Module
    base: Delta
    attack_data: WaveformSet
    importance: Delta
    setting: Setting
    target_class: int
    steps: int
    seed: int

    @property
    def model_norm(self) -> float:
        return _norm(self.base)


# --------------------------------------------------------------------------- helpers


def _norm(tensors: Delta) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def _scaled_to(delta: Delta, norm: float) -> Delta:
    current = _norm(delta)
    return {k: v * (norm / max(current, 1e-12)) for k, v in delta.items()}


def _project(delta: Delta, norm: float) -> Delta:
    """Keep the delta inside the L2 ball the server allows (the check is on the raw delta)."""
    return _scaled_to(delta, norm) if _norm(delta) > norm else delta


def _elastic_scales(ctx: AttackContext) -> Delta:
    """Per-entry factors the server's elastic rule will multiply the delta by (1 = moves freely)."""
    ones = {k: torch.ones_like(v) for k, v in ctx.base.items()}
    return elastic_constraint(
        ones,
        ctx.importance,
        constraint_tau=ctx.setting.constraint_tau,
        constraint_strength=ctx.setting.constraint_strength,
    )


def _pgd(
    ctx: AttackContext,
    *,
    budget: float,
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    through_elastic: bool,
) -> Delta:
    """Projected normalised-gradient descent on ``objective(logits, targets)`` within ``budget``.

    ``through_elastic`` optimises the delta the server will actually apply (scaled entry-wise by
    the elastic factors) while the norm budget stays on the raw delta, as ``check_delta`` checks it.
    """
    scales = _elastic_scales(ctx) if through_elastic else None
    delta = {k: torch.zeros_like(v) for k, v in ctx.base.items()}
    step = budget / 4.0
    waves, targets = ctx.attack_data.waves, ctx.attack_data.targets
    ctx.model.eval()
    for _ in range(ctx.steps):
        leaves = {k: v.clone().requires_grad_(True) for k, v in delta.items()}
        applied = {k: leaves[k] * scales[k] if scales is not None else leaves[k] for k in leaves}
        logits = functional_call(ctx.model, {k: ctx.base[k] + applied[k] for k in ctx.base}, (waves,))
        loss = objective(logits, targets)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        grad_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        if grad_norm == 0.0:
            break
        delta = _project({k: delta[k] - step * g / grad_norm for k, g in zip(leaves, grads)}, budget)
    return _scaled_to(delta, budget)


def _towards_class(target: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def objective(logits: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, torch.full((logits.shape[0],), target, dtype=torch.long))

    return objective


def _ascent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -nn.functional.cross_entropy(logits, targets)


# --------------------------------------------------------------------------- attacks


def craft(attack: str, ctx: AttackContext, *, ratio: float) -> Delta:
    """A delta of relative norm ``ratio`` for ``attack`` (one of :data:`ATTACKS`)."""
    budget = ratio * ctx.model_norm * _INSIDE
    if attack == "random":
        generator = torch.Generator().manual_seed(ctx.seed)
        return _scaled_to({k: torch.randn(v.shape, generator=generator) for k, v in ctx.base.items()}, budget)
    if attack == "ascent":
        return _pgd(ctx, budget=budget, objective=_ascent, through_elastic=False)
    if attack == "targeted":
        return _pgd(ctx, budget=budget, objective=_towards_class(ctx.target_class), through_elastic=False)
    if attack == "elastic-aware":
        return _pgd(ctx, budget=budget, objective=_towards_class(ctx.target_class), through_elastic=True)
    if attack == "free-bias":
        return _free_bias(ctx, budget=budget)
    raise ValueError(f"unknown attack {attack!r}; known: {ATTACKS}")


def output_bias_name(model: nn.Module) -> str:
    """The last 1-D parameter: the bias of the output layer (one entry per class)."""
    names = [name for name, p in model.named_parameters() if p.ndim == 1]
    return names[-1]


def _free_bias(ctx: AttackContext, *, budget: float) -> Delta:
    """Raise the output bias of ``target_class`` by the whole budget; nothing else moves."""
    name = output_bias_name(ctx.model)
    delta = {k: torch.zeros_like(v) for k, v in ctx.base.items()}
    delta[name][ctx.target_class] = budget
    return delta


def least_important_class(model: nn.Module, importance: Delta) -> int:
    """The class whose output-bias entry the elastic rule leaves freest (lowest importance)."""
    return int(importance[output_bias_name(model)].argmin())


# --------------------------------------------------------------------------- evaluation


def _ua(model: nn.Module, state: Delta, test: WaveformSet, labels: Sequence[str]) -> float:
    model.load_state_dict(state)
    return float(evaluate_model(model, test, labels=labels, device="cpu")["ua"])


def run_trial(
    attack: str,
    ratio: float,
    ctx: AttackContext,
    *,
    test: WaveformSet,
    gate: WaveformSet,
    labels: Sequence[str],
    ua_before: float,
) -> Trial:
    """Craft, check, gate and merge one delta exactly as the ServerApp would, and measure the damage."""
    delta = craft(attack, ctx, ratio=ratio)
    try:
        relative = check_delta(delta, ctx.base, max_delta_ratio=ctx.setting.max_delta_ratio)
        accepted, reason = True, "accepted"
    except DeltaError as exc:
        relative, accepted, reason = _norm(delta) / ctx.model_norm, False, exc.reason
    (gated,) = gate_on_held_out(
        [DeltaVerdict(attack, True, "accepted", delta=delta)],
        base=ctx.base,
        score=lambda state: _ua(ctx.model, state, gate, labels),
        max_ua_drop=ctx.setting.max_ua_drop,
        importance=ctx.importance,
        constraint=True,
        constraint_tau=ctx.setting.constraint_tau,
        constraint_strength=ctx.setting.constraint_strength,
    )
    if accepted and not gated.accepted:
        accepted, reason = False, "harms-held-out"
    elastic = merge_deltas(
        ctx.base,
        [delta],
        importance=ctx.importance,
        constraint=True,
        constraint_tau=ctx.setting.constraint_tau,
        constraint_strength=ctx.setting.constraint_strength,
    )
    plain = merge_deltas(
        ctx.base,
        [delta],
        importance=None,
        constraint=False,
        constraint_tau=ctx.setting.constraint_tau,
        constraint_strength=0.0,
    )
    ua_elastic, ua_plain = _ua(ctx.model, elastic, test, labels), _ua(ctx.model, plain, test, labels)
    ctx.model.load_state_dict(ctx.base)
    return Trial(
        attack,
        ratio,
        relative,
        accepted,
        reason,
        gated.accepted,
        float(gated.ua_drop),
        ua_elastic,
        ua_plain,
        100.0 * (ua_before - ua_elastic),
        100.0 * (ua_before - ua_plain),
    )


# --------------------------------------------------------------------------- reporting


def summarise(trials: Sequence[Trial], *, ua_before: float) -> dict[str, Any]:
    accepted = [t for t in trials if t.accepted]
    worst_elastic = max(accepted, key=lambda t: t.damage_elastic, default=None)
    worst_plain = max(accepted, key=lambda t: t.damage_plain, default=None)
    return {
        "ua_before": ua_before,
        "n_trials": len(trials),
        "n_accepted": len(accepted),
        "n_rejected": len(trials) - len(accepted),
        "worst_accepted_damage_points_elastic": worst_elastic.damage_elastic if worst_elastic else 0.0,
        "worst_accepted_attack_elastic": f"{worst_elastic.attack}@{worst_elastic.target_ratio}"
        if worst_elastic
        else None,
        "worst_accepted_damage_points_without_elastic": worst_plain.damage_plain if worst_plain else 0.0,
        "worst_accepted_attack_without_elastic": f"{worst_plain.attack}@{worst_plain.target_ratio}"
        if worst_plain
        else None,
        "worst_damage_by_bound": worst_damage_by_bound(trials),
    }


def worst_damage_by_bound(trials: Sequence[Trial]) -> list[dict[str, float]]:
    """For each tried norm taken as the server's ``max_delta_ratio``: the worst damage it would let through.

    Why: it tells an operator what a tighter norm bound buys (honest unlearning deltas of the
    default scenario are far below the default bound; see README, "Not protected").
    """
    rows = []
    for bound in sorted({t.target_ratio for t in trials}):
        inside = [t for t in trials if t.relative_norm <= bound]
        rows.append(
            {
                "max_delta_ratio": bound,
                "worst_damage_elastic": max((t.damage_elastic for t in inside), default=0.0),
                "worst_damage_without_elastic": max((t.damage_plain for t in inside), default=0.0),
                "worst_damage_elastic_gated": max((t.damage_elastic for t in inside if t.passes_gate), default=0.0),
            }
        )
    return rows


def to_markdown(document: dict[str, Any]) -> str:
    s, setting = document["summary"], document["setting"]
    lines = [
        "# Malicious node: worst test-UA damage of one crafted delta",
        "",
        f"Generated by `benchmarks/bench_malicious.py` in {document['seconds']:.0f} s on {document['cpus']} CPUs: "
        f"checkpoint `{document['checkpoint']}`, {document['n_test']} test utterances (held-out speakers), "
        f"attacker data {document['n_attack']} validation utterances, importance from {document['n_importance']} "
        f"training utterances. Server settings: max-delta-ratio {setting['max_delta_ratio']}, constraint.tau "
        f"{setting['constraint_tau']}, constraint.strength {setting['constraint_strength']}, max-ua-drop {setting['max_ua_drop']} "
        f"(held-out gate on {document['n_gate']} validation utterances the attacker does not use). Target class of the targeted "
        f"attacks: `{document['target_label']}` (lowest output-bias importance).",
        "",
        f"Test UA before: **{100 * s['ua_before']:.1f}%**. Worst damage of an *accepted* delta: "
        f"**{s['worst_accepted_damage_points_elastic']:.1f} UA points** with the elastic constraint "
        f"({s['worst_accepted_attack_elastic']}), **{s['worst_accepted_damage_points_without_elastic']:.1f} points** "
        f"without it ({s['worst_accepted_attack_without_elastic']}). Rejected deltas do no damage; their "
        "columns show what they would have done.",
        "",
        "| attack | target ratio | relative norm | gate: held-out UA drop | server verdict | UA after (elastic) | damage (elastic) | UA after (no elastic) | damage (no elastic) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for t in document["trials"]:
        verdict = "accepted" if t["accepted"] else f"rejected ({t['reason']})"
        lines.append(
            f"| {t['attack']} | {t['target_ratio']:.2f} | {t['relative_norm']:.3f} | {t['gate_drop']:.1f} | {verdict} | "
            f"{100 * t['ua_elastic']:.1f}% | {t['damage_elastic']:.1f} | {100 * t['ua_plain']:.1f}% | {t['damage_plain']:.1f} |"
        )
    lines += [
        "",
        "## What a tighter norm bound would let through",
        "",
        "Worst damage (UA points) over every crafted delta whose relative norm fits under the bound, "
        "if that bound were the server's `max-delta-ratio`: with the elastic constraint and the held-out gate "
        "(the server's path), with the elastic constraint alone, and with neither.",
        "",
        "| max-delta-ratio | worst damage (elastic + gate) | worst damage (elastic) | worst damage (no elastic) |",
        "|---:|---:|---:|---:|",
    ]
    for row in s["worst_damage_by_bound"]:
        lines.append(
            f"| {row['max_delta_ratio']:.2f} | {row['worst_damage_elastic_gated']:.1f} | {row['worst_damage_elastic']:.1f} | "
            f"{row['worst_damage_without_elastic']:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def plot(trials: Sequence[Trial], *, setting: Setting, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for index, attack in enumerate(ATTACKS):
        rows = sorted((t for t in trials if t.attack == attack), key=lambda t: t.relative_norm)
        if not rows:
            continue
        color = f"C{index}"
        x = [t.relative_norm for t in rows]
        ax.plot(x, [t.damage_elastic for t in rows], "o-", color=color, label=f"{attack} (elastic)")
        ax.plot(x, [t.damage_plain for t in rows], "x--", color=color, alpha=0.6, label=f"{attack} (no elastic)")
    ax.axvline(setting.max_delta_ratio, color="k", lw=1)
    ax.axvspan(setting.max_delta_ratio, ax.get_xlim()[1], color="0.9", zorder=0, label="rejected by the norm check")
    ax.set_xlabel("||delta|| / ||model||")
    ax.set_ylabel("test UA damage (points)")
    ax.set_title("One malicious delta through the server path")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def _load(manifest: Path, labels: Sequence[str], limit: int | None, seed: int) -> WaveformSet:
    """Decode a split, or a seeded random ``limit`` of its utterances (decoding is the slow part)."""
    utterances = [u for u in read_manifest(manifest) if u.emotion in set(labels)]
    if limit is not None and len(utterances) > limit:
        order = torch.randperm(len(utterances), generator=torch.Generator().manual_seed(seed))[:limit]
        utterances = [utterances[i] for i in sorted(order.tolist())]
    return load_waveforms(utterances, labels=labels, progress=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="trained default model")
    parser.add_argument("--splits", type=Path, default=DEFAULT_SPLITS, help="folder with train/valid/test.csv")
    parser.add_argument("--norms", type=float, nargs="+", default=list(DEFAULT_NORMS), help="relative delta norms")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--steps", type=int, default=8, help="gradient steps of the crafted attacks")
    parser.add_argument("--attack-utts", type=int, default=32, help="validation utterances the attacker optimises on")
    parser.add_argument("--importance-utts", type=int, default=64, help="training utterances for the MAS map")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, meta = load_checkpoint(args.checkpoint)
    labels = list(meta.labels)
    test = _load(args.splits / "test.csv", labels, None, args.seed)
    valid = _load(args.splits / "valid.csv", labels, None, args.seed)
    order = torch.randperm(len(valid), generator=torch.Generator().manual_seed(args.seed))
    attack_data, gate = valid.subset(order[: args.attack_utts]), valid.subset(order[args.attack_utts :])
    importance = mas_importance(
        model, _load(args.splits / "train.csv", labels, args.importance_utts, args.seed), device="cpu"
    )
    model.eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    setting = Setting.defaults()
    target = least_important_class(model, importance)
    ctx = AttackContext(model, base, attack_data, importance, setting, target, args.steps, args.seed)
    ua_before = _ua(model, base, test, labels)
    trials = []
    for attack in args.attacks:
        for ratio in args.norms:
            trial = run_trial(attack, ratio, ctx, test=test, gate=gate, labels=labels, ua_before=ua_before)
            print(
                f"{attack:14s} ratio {ratio:5.2f}: {trial.reason:9s} damage elastic {trial.damage_elastic:5.1f} "
                f"plain {trial.damage_plain:5.1f}",
                flush=True,
            )
            trials.append(trial)
    document = {
        "result_version": RESULT_VERSION,
        "checkpoint": str(args.checkpoint),
        "setting": asdict(setting),
        "target_class": target,
        "target_label": labels[target],
        "n_test": len(test),
        "n_attack": len(attack_data),
        "n_gate": len(gate),
        "n_importance": args.importance_utts,
        "steps": args.steps,
        "seed": args.seed,
        "model_norm": ctx.model_norm,
        "summary": summarise(trials, ua_before=ua_before),
        "trials": [asdict(t) for t in trials],
        "seconds": time.perf_counter() - started,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    atomic_write_json(args.out_dir / "malicious.json", document)
    atomic_write_text(args.out_dir / "malicious.md", to_markdown(document))
    plot(trials, setting=setting, path=args.out_dir / "malicious.png")
    print(to_markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
