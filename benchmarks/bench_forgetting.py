"""Can forgetting be measured, and how well does forget-set-only unlearning do? (issue 10)

Protocol (docs/forgetting.md has the reasoning and the results):

* **Regimes.** ``memorising`` (the default synthetic corpus: speaker-specific acting, ambiguous
  takes, annotation noise) and ``generalising`` (the same corpus with those knobs at 0).
* **Splits.** The corpus's speaker split (3 valid / 5 test speakers, seed 0). Of every training
  speaker, ``holdout_frac`` of the utterances are held out as *in-speaker non-members*; the rest
  is the *pool* the models train on. The training speakers are split again: ``tuning_speakers``
  of them supply the tuning forget sets, the others the evaluation forget sets.
* **Models.** The compact log-mel CNN (``model``), trained as practitioners fine-tune: fixed
  epochs, no early stopping (:data:`serforget.common.training.CONVERGED`). ``n_originals`` originals
  with their own seeds; one Retrain per evaluation forget set, seeded independently of every
  original; ``n_shadows`` shadow models for the per-example attack, each trained on the pool
  minus a random half of the evaluation speakers' utterances (per-utterance inclusion, seeded).
* **Tuning.** Every hyperparameter of the default method is chosen on tuning forget sets (tuning
  speakers, seeds ``tune-*``) scored with validation-speaker UA and the honest stop target only,
  then frozen. Evaluation forget sets use seeds ``eval-*``; nothing is tuned on them or on the test
  speakers. The tuning log goes to ``forgetting_tuning.json``.
* **Stop target a server can honestly supply.** The original's accuracy on the in-speaker
  held-out utterances (annotated labels): what a device measures on recordings it keeps out of
  training, no Retrain needed.
* **Metrics** (one definition each, :mod:`serforget.common.unlearning.audit`): forget accuracy and its
  difference to Retrain; test UA drop against the original (test speakers; WA is not reported:
  the test set is balanced, so WA equals UA); the per-example (U-LiRA-style) attack AUC of
  unlearned vs Retrain; the population loss attack with in-speaker and unseen-speaker
  non-members (the confidence attack is dropped: it ranks utterances exactly as the loss does);
  the EMD of forget-set losses to the Retrain ensemble; speed-up over Retrain as the median of
  per-forget-set ratios and the ratio of totals, on CPU time (steadier than wall time on a
  shared machine; wall time is recorded too). All differences carry paired 95 % bootstrap
  intervals over forget sets.

Resumable: every trained model and every finished cell is cached under ``--work-dir`` with a
fingerprint of the settings; a rerun skips them. ``--reduced`` runs the labelled smaller
configuration that fits a busy 2-core machine. The full one is bigger than the issue's 90-minute
budget on 2 cores: its base cells took about 90 min of wall time in three processes on shared
cores, and its fidelity cells (seed paper's zero rule, L2UL with 100 PGD steps, each unlearned on
every shadow too) cost about 20 CPU-min per forget set on top (L2UL alone 211 CPU-s on the original).

    python -m benchmarks.bench_forgetting --reduced
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from serforget.common.corpora.synth import LABELS_NAME, REGIMES, SynthConfig, read_label_table, synthesize_corpus
from serforget.common.data import WaveformSet, load_waveforms
from serforget.common.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import SplitSpec, read_manifest
from serforget.common.metrics import classification_report
from serforget.common.models.cnn import CNNConfig, LogMelCNN
from serforget.common.pipeline import make_splits
from serforget.common.training import CONVERGED, TrainConfig, predict_logits, train_model
from serforget.common.unlearning import UnlearnConfig, unlearn
from serforget.common.unlearning.audit import (
    ShadowScores,
    emd_1d,
    lira_scores,
    losses,
    paired_bootstrap,
    population_auc,
    speedups,
    ulira_auc,
)
from serforget.common.unlearning.measure import ResourceMeter

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FORMAT_VERSION = 1


#: ``UnlearnConfig`` fields renamed since cells were first cached (new name -> old name)
UNLEARN_FIELDS_RENAMED: dict[str, str] = {"penalty_lambda": "ela_lambda", "penalty_tau": "tau"}


@dataclass(frozen=True)
class Settings:
    """Everything a result depends on; its hash keys the caches."""

    regimes: tuple[str, ...] = ("memorising", "generalising")
    sizes: tuple[int, ...] = (10, 50, 100)
    #: sizes at which the fidelity rows (seed paper's zero rule, L2UL) run; they are the costly ones
    fidelity_sizes: tuple[int, ...] = (10,)
    #: sizes evaluated in the generalising regime (the comparison regime)
    generalising_sizes: tuple[int, ...] = (10,)
    n_eval_sets: int = 10
    tuning_sizes: tuple[int, ...] = (10, 50)
    n_tuning_sets: int = 3
    n_originals: int = 3
    n_shadows: int = 8
    epochs: int = 60
    lr: float = 3e-3
    channels: tuple[int, ...] = (8, 16, 32, 32)
    #: 40 ms windows and hops: a quarter of the default CNN's frames, so shadows are affordable
    n_fft: int = 640
    hop_length: int = 640
    hidden: int = 128
    dropout: float = 0.1
    holdout_frac: float = 0.2
    tuning_speakers: int = 4
    #: the seed paper's stop rule (forget accuracy 0), with a generous cap reported when hit
    zero_max_epochs: int = 300
    #: PGD iterations of the L2UL-faithful row (Cha et al.: 100)
    l2ul_pgd_steps: int = 100
    #: tuning grid: changes to the landed default, each scored on the tuning sets
    #: (``loss_match_weight`` gets the original's in-speaker held-out losses as its reference)
    grid: tuple[tuple[tuple[str, Any], ...], ...] = (
        (),
        (("relabel_to", "runner_up"),),
        (("relabel_to", "runner_up"), ("anchor_weight", 1.0)),
        (("relabel_to", "runner_up"), ("loss_match_weight", 3.0)),
        (("relabel_to", "runner_up"), ("anchor_weight", 1.0), ("loss_match_weight", 3.0)),
        (("relabel_to", "runner_up"), ("importance_scope", "trained")),
        (("relabel_to", "runner_up"), ("lr", 3e-4), ("stop_check", "step")),
    )
    #: sizes with a row for the landed default (a comparison row; the targets are the tuned method's)
    landed_default_sizes: tuple[int, ...] = (10, 50)
    #: forget sets per N for the fidelity rows (their shadows make them the costliest cells)
    n_fidelity_sets: int = 10
    reduced: bool = False
    #: changes to both regimes' corpus config (the test suite's smaller corpus), and the split
    synth_overrides: tuple[tuple[str, Any], ...] = ()
    n_valid: int = 3
    n_test: int = 5

    def synth_config(self, regime: str) -> SynthConfig:
        return dataclasses.replace(REGIMES[regime], **dict(self.synth_overrides))

    def fingerprint(self, *, renamed: Mapping[str, str] | None = None) -> str:
        default = UnlearnConfig().to_dict()
        for new, old in (renamed or {}).items():
            default[old] = default.pop(new)
        payload = {**asdict(self), "default": default}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def accepted_fingerprints(self) -> tuple[str, ...]:
        """This configuration's fingerprint and the one it had before ``UnlearnConfig`` fields were renamed.

        The rename (issue 13) changed names only, not one value or computation, so cells cached
        under the old names are this configuration's cells (new cells are written under the new one).
        """
        return self.fingerprint(), self.fingerprint(renamed=UNLEARN_FIELDS_RENAMED)

    def model_fingerprint(self) -> str:
        """What a trained model depends on (not the unlearning settings, so those can change freely)."""
        payload = [
            self.epochs,
            self.lr,
            self.channels,
            self.n_fft,
            self.hop_length,
            self.hidden,
            self.dropout,
            self.synth_overrides,
            self.n_valid,
            self.n_test,
            self.holdout_frac,
            self.tuning_speakers,
        ]
        return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:12]

    def train_config(self, seed: int) -> TrainConfig:
        return dataclasses.replace(
            CONVERGED, epochs=self.epochs, lr=self.lr, seed=seed, device="cpu", cache_frontend=True
        )


FULL = Settings()
REDUCED = Settings(
    epochs=30,
    sizes=(10, 50),
    fidelity_sizes=(10,),
    generalising_sizes=(10,),
    n_eval_sets=3,
    tuning_sizes=(10,),
    n_tuning_sets=2,
    n_shadows=4,
    l2ul_pgd_steps=10,
    zero_max_epochs=100,
    reduced=True,
    grid=((), (("relabel_to", "runner_up"),), (("relabel_to", "runner_up"), ("anchor_weight", 1.0))),
)
#: Small enough for the test suite (structure and attack power only).
SMOKE = Settings(
    regimes=("memorising",),
    sizes=(10,),
    fidelity_sizes=(10,),
    generalising_sizes=(),
    n_eval_sets=2,
    tuning_sizes=(10,),
    n_tuning_sets=1,
    n_originals=1,
    n_shadows=2,
    epochs=60,
    lr=3e-3,
    channels=(8, 16),
    l2ul_pgd_steps=2,
    zero_max_epochs=5,
    grid=((), (("relabel_to", "runner_up"),)),
    reduced=True,
    tuning_speakers=2,
    n_valid=2,
    n_test=2,
    synth_overrides=(("n_speakers", 8), ("sentences_per_speaker", 4)),
)

#: Rows of every table. ``default`` is the landed config (``UnlearnConfig()``) at the honest
#: target; ``tuned`` adds the frozen changes chosen on the tuning sets.
METHOD_NAMES = {
    "original": "Original (do nothing)",
    "retrain": "Retrain",
    "default": "RL+Adv+Ela@retrain-level (landed default)",
    "tuned": "RL+Adv+Ela@retrain-level (tuned on tuning sets)",
    "rl_adv_ela_zero": "RL+Adv+Ela@zero (seed paper's stop rule)",
    "l2ul": "L2UL-faithful (Cha et al.)",
}


# ----------------------------------------------------------------------------- data


@dataclass
class RegimeData:
    pool: WaveformSet
    heldout: WaveformSet
    valid: WaveformSet
    test: WaveformSet
    tuning_candidates: list[str]
    eval_candidates: list[str]
    mislabelled: set[str]


def load_regime(regime: str, data_root: Path, settings: Settings) -> RegimeData:
    """The regime's corpus (rendered if missing), its splits and the member/non-member partition."""
    out = data_root / ("synth" if regime == "memorising" else f"synth_{regime}")
    if settings.synth_overrides:
        out = out.with_name(out.name + "_" + hashlib.sha256(repr(settings.synth_overrides).encode()).hexdigest()[:8])
    manifest = synthesize_corpus(out_dir=out, config=settings.synth_config(regime), progress=False)
    splits = make_splits(
        manifest=manifest, out_dir=out / "splits", split=SplitSpec(n_valid=settings.n_valid, n_test=settings.n_test)
    )
    sets = {name: load_waveforms(read_manifest(path), labels=FOUR_CLASS) for name, path in splits.items()}
    train = sets["train"]
    rng = random.Random(f"holdout-{regime}")
    speakers = sorted(set(train.speakers))
    tuning_speakers = set(rng.sample(speakers, settings.tuning_speakers))
    held: set[int] = set()
    for speaker in speakers:
        rows = [i for i, s in enumerate(train.speakers) if s == speaker]
        held.update(rng.sample(rows, round(settings.holdout_frac * len(rows))))
    pool = train.subset([i for i in range(len(train)) if i not in held])
    table = read_label_table(out / LABELS_NAME)
    return RegimeData(
        pool=pool,
        heldout=train.subset(sorted(held)),
        valid=sets["valid"],
        test=sets["test"],
        tuning_candidates=[u for u, s in zip(pool.utt_ids, pool.speakers) if s in tuning_speakers],
        eval_candidates=[u for u, s in zip(pool.utt_ids, pool.speakers) if s not in tuning_speakers],
        mislabelled={u for u, row in table.items() if row.mislabelled},
    )


def forget_set(candidates: Sequence[str], *, n: int, tag: str) -> list[str]:
    """``n`` utterances drawn from ``candidates`` with the seed string ``tag`` (``eval-*``/``tune-*``)."""
    if not 0 < n <= len(candidates):
        raise ValueError(f"cannot draw {n} forget utterances from {len(candidates)} candidates")
    return sorted(random.Random(tag).sample(list(candidates), n))


# ----------------------------------------------------------------------------- model cache


def _model(settings: Settings) -> LogMelCNN:
    config = CNNConfig(
        channels=settings.channels,
        n_fft=settings.n_fft,
        hop_length=settings.hop_length,
        hidden=settings.hidden,
        dropout=settings.dropout,
    )
    return LogMelCNN(n_classes=len(FOUR_CLASS), config=config)


@dataclass
class Trained:
    model: LogMelCNN
    seconds: float
    cpu_seconds: float


class NotCached(RuntimeError):
    """A model or cell the report-only mode needs has not been computed yet."""


def trained(path: Path, data: WaveformSet, *, seed: int, settings: Settings, cached_only: bool = False) -> Trained:
    """Train (or load from ``path``) a fresh model on ``data`` with seed ``seed``."""
    key = hashlib.sha256(
        ("\n".join(sorted(data.utt_ids)) + f"|{seed}|{settings.model_fingerprint()}").encode()
    ).hexdigest()
    meta_path = path.with_suffix(".json")
    if meta_path.exists() and path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            model = _model(settings)
            model.load_state_dict(torch.load(path, weights_only=True))
            return Trained(model.eval(), meta["seconds"], meta["cpu_seconds"])
    if cached_only:
        raise NotCached(f"{path} has not been trained yet")
    if not _claim(path.with_suffix(".lock")):
        # Another process of this benchmark is training the same model: wait for it.
        while path.with_suffix(".lock").exists() and _lock_alive(path.with_suffix(".lock")):
            time.sleep(5.0)
        return trained(path, data, seed=seed, settings=settings)
    try:
        torch.manual_seed(seed)
        model = _model(settings)
        with ResourceMeter(torch.device("cpu")) as meter:
            train_model(model, data, config=settings.train_config(seed), progress=False)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        atomic_write_bytes(path, buffer.getvalue())
        atomic_write_json(
            meta_path, {"key": key, "seconds": meter.result.seconds, "cpu_seconds": meter.result.cpu_seconds}
        )
    finally:
        path.with_suffix(".lock").unlink(missing_ok=True)
    return Trained(model.eval(), meter.result.seconds, meter.result.cpu_seconds)


def _claim(lock: Path) -> bool:
    """Create ``lock`` holding our pid; False if a live process holds it (a dead holder's is taken over)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_alive(lock):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def _lock_alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text().strip() or "0")
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return True  # being written right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shadow_membership(candidates: Sequence[str], n_shadows: int, *, regime: str) -> np.ndarray:
    """``[shadows, candidates]`` inclusion: each utterance in exactly half of the shadows (balanced)."""
    rng = np.random.default_rng(np.random.SeedSequence([7, len(candidates), n_shadows, *regime.encode()]))
    inside = np.zeros((n_shadows, len(candidates)), dtype=bool)
    for column in range(len(candidates)):
        inside[rng.permutation(n_shadows)[: n_shadows // 2], column] = True
    return inside


# ----------------------------------------------------------------------------- scoring


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(1) == targets).float().mean()) if len(targets) else math.nan


def ua(model: torch.nn.Module, data: WaveformSet) -> float:
    logits = predict_logits(model, data, device="cpu")
    return classification_report(data.targets.tolist(), logits.argmax(1).tolist(), labels=FOUR_CLASS)["ua"]


@dataclass
class Context:
    """What every cell of one regime needs."""

    regime: str
    data: RegimeData
    originals: list[Trained]
    shadows: list[Trained]
    inside: np.ndarray  # [shadows, eval candidates]
    targets: list[float]  # honest stop target per original
    #: per original, its losses on the in-speaker held-out utterances (what "never seen" looks
    #: like; the reference of loss matching and of the tuning score's EMD term)
    heldout_losses: list[np.ndarray]
    original_test_ua: list[float]
    original_valid_ua: list[float]
    settings: Settings
    tuned: dict[str, Any]


def with_reference(changes: dict[str, Any], ctx: Context, original: int) -> dict[str, Any]:
    """``changes`` plus the original's held-out reference losses when they switch loss matching on."""
    if changes.get("loss_match_weight", 0.0) > 0:
        return {**changes, "reference_losses": tuple(float(v) for v in ctx.heldout_losses[original])}
    return dict(changes)


def method_config(name: str, *, ctx: Context, original: int, seed: int) -> tuple[str, UnlearnConfig]:
    """(engine method, config) of a table row, for original number ``original``."""
    base = UnlearnConfig(device="cpu", seed=seed)
    target = ctx.targets[original]
    if name == "default":
        return "rl_adv_ela", base.replace(stop="retrain-level", target_forget_acc=target)
    if name == "tuned":
        tuned = with_reference(ctx.tuned, ctx, original)
        return "rl_adv_ela", base.replace(stop="retrain-level", target_forget_acc=target, **tuned)
    if name == "rl_adv_ela_zero":
        return "rl_adv_ela", base.replace(stop="zero", max_epochs=ctx.settings.zero_max_epochs)
    if name == "l2ul":
        return "neggrad_adv_ela", base.replace(
            stop="zero",
            stop_check="step",
            optimizer="sgd",
            lr=1e-3,
            weight_decay=1e-4,
            loss_weighting="set_size",
            adv_label="attack_target",
            adv_drop_unflipped=False,
            pgd_k=20,
            pgd_steps=ctx.settings.l2ul_pgd_steps,
            pgd_step=2.5 / ctx.settings.l2ul_pgd_steps,
            penalty_lambda=0.5,
            penalty_tau=1.0,
            importance="mas",
            max_epochs=ctx.settings.zero_max_epochs,
        )
    raise ValueError(f"unknown row {name!r}")


def retrain_path(work: Path, n: int, index: int) -> Path:
    return work / f"retrain_n{n}_{index}.pt"


def retrain_seed(n: int, index: int) -> int:
    """Retrain seeds: never an original's (1000+) or a shadow's (5000+)."""
    return 3000 + 100 * n + index


def prefetch_retrains(settings: Settings, *, regime: str, data_root: Path, work_root: Path) -> None:
    """Train the shadows (last first) and Retrain models (last cell first) of one regime.

    Retraining does not depend on the original, the tuning or the other models, so a second
    process can do it while the first trains the originals and shadows; the cell computation
    then finds them in the cache (both write atomically, so a race only duplicates work).
    """
    torch.set_num_threads(1)
    data = load_regime(regime, data_root, settings)
    inside = shadow_membership(data.eval_candidates, settings.n_shadows, regime=regime)
    for k in tqdm(list(reversed(range(settings.n_shadows))), desc=f"shadows ({regime})", unit="model"):
        dropped = {u for u, keep in zip(data.eval_candidates, inside[k]) if not keep}
        trained(
            work_root / regime / f"shadow_{k}.pt",
            data.pool.exclude_ids(sorted(dropped)),
            seed=5000 + k,
            settings=settings,
        )
    sizes = settings.sizes if regime == "memorising" else settings.generalising_sizes
    plan = [(n, i) for i in range(settings.n_eval_sets) for n in sizes]
    for n, i in tqdm(list(reversed(plan)), desc=f"retrains ({regime})", unit="model"):
        ids = forget_set(data.eval_candidates, n=n, tag=f"eval-{regime}-{n}-{i}")
        trained(
            retrain_path(work_root / regime, n, i),
            data.pool.exclude_ids(ids),
            seed=retrain_seed(n, i),
            settings=settings,
        )


def run_cell(ctx: Context, *, n: int, index: int, methods: Sequence[str], work: Path) -> list[dict[str, Any]]:
    """Every row of one evaluation forget set."""
    data, settings = ctx.data, ctx.settings
    ids = forget_set(data.eval_candidates, n=n, tag=f"eval-{ctx.regime}-{n}-{index}")
    forget = data.pool.select_ids(ids)
    remain = data.pool.exclude_ids(ids)
    which = index % len(ctx.originals)
    original, target = ctx.originals[which].model, ctx.targets[which]
    retrain = trained(retrain_path(work, n, index), remain, seed=retrain_seed(n, index), settings=settings)
    column = {u: i for i, u in enumerate(data.eval_candidates)}
    inside = ctx.inside[:, [column[u] for u in ids]]  # [shadows, n]
    y = forget.targets
    retrain_logits = predict_logits(retrain.model, forget, device="cpu")
    shadow_logits = [predict_logits(s.model, forget, device="cpu") for s in ctx.shadows]
    out_scores = np.full(inside.shape, np.nan)
    for k, logits in enumerate(shadow_logits):
        out_scores[k, ~inside[k]] = lira_scores(logits, y)[~inside[k]]
    retrain_ensemble = np.concatenate(
        [losses(retrain_logits, y)] + [losses(shadow, y)[~inside[k]] for k, shadow in enumerate(shadow_logits)]
    )
    heldout_logits = predict_logits(original, data.heldout, device="cpu")
    rows = []
    common = {
        "regime": ctx.regime,
        "n": n,
        "index": index,
        "original": which,
        "target": target,
        "n_mislabelled": sum(u in data.mislabelled for u in ids),
        "retrain_forget_acc": accuracy(retrain_logits, y),
        "retrain_s": retrain.seconds,
        "retrain_cpu_s": retrain.cpu_seconds,
    }
    for name in methods:
        if name == "retrain":
            model, seconds, cpu_seconds, steps, reason = (
                retrain.model,
                retrain.seconds,
                retrain.cpu_seconds,
                None,
                "retrain",
            )
            in_scores = out_scores  # the Retrain row is the reference: its own attack is 0.5 by definition
        elif name == "original":
            model, seconds, cpu_seconds, steps, reason = original, 0.0, 0.0, 0, "no_op"
            in_scores = np.full(inside.shape, np.nan)
            for k, logits in enumerate(shadow_logits):
                in_scores[k, inside[k]] = lira_scores(logits, y)[inside[k]]
        else:
            method, config = method_config(name, ctx=ctx, original=which, seed=index)
            result = unlearn(original, forget, method=method, config=config)
            model, seconds, cpu_seconds, steps, reason = (
                result.model,
                result.seconds,
                result.cpu_seconds,
                result.steps,
                result.stop_reason,
            )
            in_scores = np.full(inside.shape, np.nan)
            for k, shadow in enumerate(ctx.shadows):
                members = np.flatnonzero(inside[k])
                if len(members) == 0:
                    continue
                sub = forget.subset(members.tolist())
                shadow_result = unlearn(shadow.model, sub, method=method, config=config)
                in_scores[k, members] = lira_scores(predict_logits(shadow_result.model, sub, device="cpu"), sub.targets)
        logits = predict_logits(model, forget, device="cpu")
        scores = ShadowScores(unlearned=in_scores, retrained=out_scores)
        row = {
            **common,
            "method": name,
            "forget_acc": accuracy(logits, y),
            "test_ua": ua(model, data.test),
            "attack_auc": 0.5
            if name == "retrain"
            else ulira_auc(lira_scores(logits, y), lira_scores(retrain_logits, y), scores),
            "pop_auc_inspeaker": population_auc(
                logits, y, predict_logits(model, data.heldout, device="cpu"), data.heldout.targets
            ),
            "pop_auc_unseen": population_auc(
                logits, y, predict_logits(model, data.test, device="cpu"), data.test.targets
            ),
            "emd_to_retrain": emd_1d(losses(logits, y), retrain_ensemble),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "steps": steps,
            "stop_reason": reason,
            "flipped_mislabelled": int(
                sum(1 for i, u in enumerate(ids) if u in data.mislabelled and int(logits[i].argmax()) != int(y[i]))
            ),
        }
        rows.append(row)
    original_test_ua = ctx.original_test_ua[which]
    for row in rows:
        row["test_ua_drop"] = original_test_ua - row["test_ua"]
        row["heldout_acc_original"] = accuracy(heldout_logits, data.heldout.targets)
    return rows


# ----------------------------------------------------------------------------- tuning


def tune(ctx: Context) -> dict[str, Any]:
    """Score every grid point on the tuning forget sets with original 0; pick the lowest score.

    Score (points, lower is better) = mean over tuning sets of the validation-speaker UA drop, plus
    ``|forget acc - honest target|``, plus 10 x the EMD (nats) between the unlearned model's
    forget-set losses and the original's losses on in-speaker held-out utterances (how far the
    forget set is from looking unseen; the Original scores about 10 points there). All three are
    measurable without a Retrain or any test speaker.
    """
    settings, data = ctx.settings, ctx.data
    original, target = ctx.originals[0].model, ctx.targets[0]
    valid_ua = ctx.original_valid_ua[0]
    log = []
    for changes in tqdm(settings.grid, desc=f"tuning ({ctx.regime})", unit="config", leave=False):
        per_set = []
        for n in settings.tuning_sizes:
            for j in range(settings.n_tuning_sets):
                ids = forget_set(data.tuning_candidates, n=n, tag=f"tune-{ctx.regime}-{n}-{j}")
                forget = data.pool.select_ids(ids)
                config = UnlearnConfig(
                    device="cpu",
                    seed=j,
                    stop="retrain-level",
                    target_forget_acc=target,
                    **with_reference(dict(changes), ctx, 0),
                )
                result = unlearn(original, forget, method="rl_adv_ela", config=config)
                drop = (valid_ua - ua(result.model, data.valid)) * 100
                miss = abs(result.forget_acc - target) * 100
                emd = emd_1d(
                    losses(predict_logits(result.model, forget, device="cpu"), forget.targets),
                    ctx.heldout_losses[0],
                )
                per_set.append(
                    {
                        "n": n,
                        "set": j,
                        "valid_ua_drop": drop,
                        "forget_acc": result.forget_acc,
                        "target": target,
                        "steps": result.steps,
                        "emd_to_heldout": emd,
                        "cpu_seconds": result.cpu_seconds,
                        "score": drop + miss + 10 * emd,
                    }
                )
        log.append({"changes": dict(changes), "score": float(np.mean([p["score"] for p in per_set])), "sets": per_set})
    best = min(log, key=lambda entry: entry["score"])
    return {
        "chosen": best["changes"],
        "log": log,
        "criterion": (
            "mean over tuning sets of valid-UA drop + |forget acc - target| (points) "
            "+ 10 x EMD of forget-set losses to the original's in-speaker held-out losses (nats)"
        ),
    }


# ----------------------------------------------------------------------------- aggregation


def summarize(rows: list[dict[str, Any]], *, regime: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Per method: means with 95 % paired bootstrap intervals over forget sets."""
    cells = sorted({r["index"] for r in rows if r["regime"] == regime and r["n"] == n})
    by = {(r["method"], r["index"]): r for r in rows if r["regime"] == regime and r["n"] == n}
    methods = list(dict.fromkeys(r["method"] for r in rows if r["regime"] == regime and r["n"] == n))
    out = []
    for method in methods:
        have = [i for i in cells if (method, i) in by and ("retrain", i) in by and ("original", i) in by]
        if not have:
            continue

        def get(m: str, key: str, have: list = have) -> np.ndarray:
            return np.array([by[(m, i)][key] for i in have], dtype=np.float64)

        auc = paired_bootstrap(get(method, "attack_auc"), seed=seed)
        entry = {
            "N": n,
            "method": method,
            "name": METHOD_NAMES.get(method, method),
            "n_forget_sets": len(have),
            "forget_acc": paired_bootstrap(get(method, "forget_acc"), seed=seed).to_dict(),
            "retrain_forget_acc": paired_bootstrap(get("retrain", "forget_acc"), seed=seed).to_dict(),
            "forget_acc_minus_retrain": paired_bootstrap(
                get(method, "forget_acc"), reference=get("retrain", "forget_acc"), seed=seed
            ).to_dict(),
            "test_ua_drop": paired_bootstrap(get(method, "test_ua_drop"), seed=seed).to_dict(),
            "attack_auc": auc.mean,
            "attack_auc_ci_low": auc.low,
            "attack_auc_ci_high": auc.high,
            "original_attack_auc": paired_bootstrap(get("original", "attack_auc"), seed=seed).mean,
            "attack_auc_minus_original": paired_bootstrap(
                get(method, "attack_auc"), reference=get("original", "attack_auc"), seed=seed
            ).to_dict(),
            "pop_auc_inspeaker": paired_bootstrap(get(method, "pop_auc_inspeaker"), seed=seed).to_dict(),
            "pop_auc_unseen": paired_bootstrap(get(method, "pop_auc_unseen"), seed=seed).to_dict(),
            "emd_to_retrain": paired_bootstrap(get(method, "emd_to_retrain"), seed=seed).to_dict(),
            "emd_minus_original": paired_bootstrap(
                get(method, "emd_to_retrain"), reference=get("original", "emd_to_retrain"), seed=seed
            ).to_dict(),
            # Cells where an unlearning method took no step at all (its speed-up is then meaningless).
            "zero_step_cells": (
                None
                if method in ("original", "retrain")
                else int(sum(1 for i in have if by[(method, i)]["steps"] == 0))
            ),
            "stop_reasons": {
                k: sum(1 for i in have if by[(method, i)]["stop_reason"] == k)
                for k in sorted({by[(method, i)]["stop_reason"] for i in have})
            },
            "steps_median": float(np.median([by[(method, i)]["steps"] or 0 for i in have])),
        }
        if method not in ("original", "retrain"):
            cpu = speedups(get(method, "retrain_cpu_s"), get(method, "cpu_seconds"))
            wall = speedups(get(method, "retrain_s"), get(method, "seconds"))
            entry.update(
                {
                    "speedup_median": cpu["median"],
                    "speedup_ratio_of_totals": cpu["ratio_of_totals"],
                    "speedup_wall_median": wall["median"],
                    "speedup_wall_ratio_of_totals": wall["ratio_of_totals"],
                }
            )
        else:
            entry.update({"speedup_median": None, "speedup_ratio_of_totals": None})
        out.append(entry)
    return out


def check_targets(table: list[dict[str, Any]], *, method: str) -> list[dict[str, Any]]:
    """The issue's targets (memorising regime, N = 10 and 50) for one method, met or missed."""
    checks = []
    for entry in table:
        if entry["method"] != method or entry["N"] not in (10, 50):
            continue
        n, diff, drop = entry["N"], entry["forget_acc_minus_retrain"], entry["test_ua_drop"]
        checks.append(
            {
                "target": f"N={n}: forget acc within 5 points of Retrain",
                "met": abs(diff["mean"]) <= 0.05,
                "value": f"{diff['mean'] * 100:+.1f} pts [{diff['ci_low'] * 100:+.1f}, {diff['ci_high'] * 100:+.1f}]",
            }
        )
        checks.append(
            {
                "target": f"N={n}: test UA within 1.5 points of Original",
                "met": drop["mean"] <= 0.015,
                "value": f"drop {drop['mean'] * 100:.1f} pts [{drop['ci_low'] * 100:.1f}, {drop['ci_high'] * 100:.1f}]",
            }
        )
        checks.append(
            {
                "target": f"N={n}: per-example attack AUC CI upper bound <= 0.55",
                "met": entry["attack_auc_ci_high"] <= 0.55,
                "value": f"{entry['attack_auc']:.3f} [{entry['attack_auc_ci_low']:.3f}, {entry['attack_auc_ci_high']:.3f}]",
            }
        )
        if n == 10:
            checks.append(
                {
                    "target": "N=10: >= 100x faster than Retrain (median, CPU time)",
                    "met": entry["speedup_median"] >= 100,
                    "value": f"{entry['speedup_median']:.0f}x median, {entry['speedup_ratio_of_totals']:.0f}x ratio of totals",
                }
            )
    return checks


# ----------------------------------------------------------------------------- report


def _fmt(d: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    return f"{d['mean'] * scale:.{digits}f} [{d['ci_low'] * scale:.{digits}f}, {d['ci_high'] * scale:.{digits}f}]"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Forgetting benchmark (issue 10)", ""]
    lines += [
        f"- **config**: {report['config']['label']}",
        f"- **tuned_on**: {report['tuned_on']}",
        f"- **chosen changes** (frozen before evaluation): `{report['tuning']['chosen']}`",
        f"- **machine**: {report['machine']}",
        "",
    ]
    lines += [
        "Intervals are 95 % paired bootstrap intervals over forget sets. Accuracies and drops in points;",
        "AUCs 0.5 = chance. Speed-up = Retrain CPU time / unlearning CPU time (median of per-set ratios;",
        "ratio of totals in brackets). Per-example attack = U-LiRA-style shadow likelihood ratio, unlearned",
        "vs that forget set's Retrain; its value on the Original row shows the attack's power.",
        "",
    ]
    for regime in report["regimes"]:
        lines += [
            f"## {regime['regime']} regime",
            "",
            f"Original models: training accuracy {regime['original_train_acc'] * 100:.1f} %, in-speaker held-out "
            f"accuracy {regime['original_heldout_acc'] * 100:.1f} %, test UA {regime['original_test_ua'] * 100:.1f} % "
            f"(means over {len(regime['originals'])} seeds); population loss-attack AUC of pool members vs in-speaker "
            f"held-out {regime['original_member_auc_inspeaker']:.3f}, vs unseen speakers {regime['original_member_auc_unseen']:.3f}; "
            f"{regime['n_forget_sets']} forget sets per N.",
            "",
        ]
        for n in sorted({e["N"] for e in regime["table"]}):
            lines += [
                f"### N = {n}",
                "",
                "| method | forget acc | Retrain forget acc | diff to Retrain | test UA drop | per-example AUC [CI] | pop. AUC in-speaker | pop. AUC unseen | EMD to Retrain | speed-up | zero-step cells | stop reasons |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            ]
            for e in [e for e in regime["table"] if e["N"] == n]:
                speed = (
                    "-"
                    if e["speedup_median"] is None
                    else f"{e['speedup_median']:.0f}x ({e['speedup_ratio_of_totals']:.0f}x)"
                )
                lines.append(
                    f"| {e['name']} | {_fmt(e['forget_acc'])} | {_fmt(e['retrain_forget_acc'])} | {_fmt(e['forget_acc_minus_retrain'])} | "
                    f"{_fmt(e['test_ua_drop'])} | {e['attack_auc']:.3f} [{e['attack_auc_ci_low']:.3f}, {e['attack_auc_ci_high']:.3f}] | "
                    f"{_fmt(e['pop_auc_inspeaker'], 1, 3)} | {_fmt(e['pop_auc_unseen'], 1, 3)} | {_fmt(e['emd_to_retrain'], 1, 3)} | "
                    f"{speed} | {'-' if e['zero_step_cells'] is None else e['zero_step_cells']} | {', '.join(f'{k}: {v}' for k, v in e['stop_reasons'].items())} |"
                )
            lines.append("")
    lines += [
        "## Targets (memorising regime, tuned default method; met = the mean meets it, CI in brackets)",
        "",
        "| target | met | value |",
        "|---|---|---|",
    ]
    lines += [f"| {c['target']} | {'yes' if c['met'] else 'MISSED'} | {c['value']} |" for c in report["targets"]]
    lines += ["", "The landed default (for comparison):", "", "| target | met | value |", "|---|---|---|"]
    lines += [
        f"| {c['target']} | {'yes' if c['met'] else 'MISSED'} | {c['value']} |"
        for c in report["targets_landed_default"]
    ]
    lines += ["", "## Fidelity: do the papers' claims reproduce?", ""]
    lines += [f"- {line}" for line in report["fidelity"]]
    lines += ["", "## Tuning log (tuning forget sets only)", "", "| changes | score (points) |", "|---|---:|"]
    lines += [f"| `{entry['changes']}` | {entry['score']:.2f} |" for entry in report["tuning"]["log"]]
    lines += ["", "![forgetting](forgetting.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Per regime and N: per-example attack AUC and test-UA drop per method with CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(r["regime"], n) for r in report["regimes"] for n in sorted({e["N"] for e in r["table"]})]
    fig, axes = plt.subplots(2, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 7), squeeze=False)
    for col, (regime, n) in enumerate(panels):
        table = [e for r in report["regimes"] if r["regime"] == regime for e in r["table"] if e["N"] == n]
        names = [e["method"] for e in table]
        x = np.arange(len(table))
        auc = np.array([e["attack_auc"] for e in table])
        err = np.array(
            [
                [e["attack_auc"] - e["attack_auc_ci_low"] for e in table],
                [e["attack_auc_ci_high"] - e["attack_auc"] for e in table],
            ]
        )
        ax = axes[0][col]
        ax.bar(x, auc, yerr=err, capsize=3, color="tab:blue")
        ax.axhline(0.5, color="k", ls="--", lw=1, label="chance (0.5)")
        ax.axhline(0.55, color="tab:red", ls=":", lw=1, label="target CI bound 0.55")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{regime}, N = {n}")
        ax.set_ylabel("per-example attack AUC")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.legend(fontsize=7)
        drop = np.array([e["test_ua_drop"]["mean"] * 100 for e in table])
        derr = np.array(
            [
                [(e["test_ua_drop"]["mean"] - e["test_ua_drop"]["ci_low"]) * 100 for e in table],
                [(e["test_ua_drop"]["ci_high"] - e["test_ua_drop"]["mean"]) * 100 for e in table],
            ]
        )
        ax = axes[1][col]
        ax.bar(x, drop, yerr=derr, capsize=3, color="tab:orange")
        ax.axhline(1.5, color="tab:red", ls=":", lw=1, label="target 1.5 pts")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_ylabel("test UA drop vs Original (points)")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("Forgetting benchmark: 95 % paired bootstrap CIs over forget sets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- driver


class CellCache:
    """Finished cells, one JSON file each (written atomically), so several processes can share the
    work of one regime and a crash loses at most the cells in progress (resumable).

    ``fingerprint`` is written with new cells; ``also`` are older fingerprints of the very same
    computation (:meth:`Settings.accepted_fingerprints`) whose cells are read as well.
    """

    def __init__(self, folder: Path, fingerprint: str, *, also: Sequence[str] = ()) -> None:
        self.folder, self.fingerprint, self.accepted = folder, fingerprint, {fingerprint, *also}
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / (key.replace("/", "_") + ".json")

    def get(self, key: str) -> Any:
        path = self._path(key)
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        if raw.get("fingerprint") not in self.accepted or raw.get("format_version") != FORMAT_VERSION:
            return None
        return raw["value"]

    def put(self, key: str, value: Any) -> None:
        atomic_write_json(
            self._path(key), {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "value": value}
        )

    def claim(self, key: str) -> bool:
        """Whether this process may compute ``key`` (no live process is computing it)."""
        return _claim(self._path(key).with_suffix(".lock"))

    def release(self, key: str) -> None:
        self._path(key).with_suffix(".lock").unlink(missing_ok=True)


def build_context(
    regime: str, *, settings: Settings, data_root: Path, work: Path, tuned: dict[str, Any], cached_only: bool = False
) -> Context:
    data = load_regime(regime, data_root, settings)
    originals = [
        trained(work / f"original_{i}.pt", data.pool, seed=1000 + i, settings=settings, cached_only=cached_only)
        for i in tqdm(range(settings.n_originals), desc=f"originals ({regime})", leave=False)
    ]
    inside = shadow_membership(data.eval_candidates, settings.n_shadows, regime=regime)
    shadows = []
    for k in tqdm(range(settings.n_shadows), desc=f"shadows ({regime})", leave=False):
        dropped = {u for u, keep in zip(data.eval_candidates, inside[k]) if not keep}
        shadows.append(
            trained(
                work / f"shadow_{k}.pt",
                data.pool.exclude_ids(sorted(dropped)),
                seed=5000 + k,
                settings=settings,
                cached_only=cached_only,
            )
        )
    heldout_logits = [predict_logits(o.model, data.heldout, device="cpu") for o in originals]
    targets = [accuracy(logits, data.heldout.targets) for logits in heldout_logits]
    heldout_losses = [losses(logits, data.heldout.targets) for logits in heldout_logits]
    return Context(
        regime=regime,
        data=data,
        originals=originals,
        shadows=shadows,
        inside=inside,
        targets=targets,
        heldout_losses=heldout_losses,
        original_test_ua=[ua(o.model, data.test) for o in originals],
        original_valid_ua=[ua(o.model, data.valid) for o in originals],
        settings=settings,
        tuned=tuned,
    )


def regime_summary(ctx: Context, rows: list[dict[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    data = ctx.data
    per = []
    for o in ctx.originals:
        pool_logits = predict_logits(o.model, data.pool, device="cpu")
        held_logits = predict_logits(o.model, data.heldout, device="cpu")
        test_logits = predict_logits(o.model, data.test, device="cpu")
        per.append(
            {
                "train_acc": accuracy(pool_logits, data.pool.targets),
                "heldout_acc": accuracy(held_logits, data.heldout.targets),
                "test_ua": ua(o.model, data.test),
                "seconds": o.seconds,
                "cpu_seconds": o.cpu_seconds,
                "member_auc_inspeaker": population_auc(
                    pool_logits, data.pool.targets, held_logits, data.heldout.targets
                ),
                "member_auc_unseen": population_auc(pool_logits, data.pool.targets, test_logits, data.test.targets),
            }
        )
    table = [e for n in sizes for e in summarize(rows, regime=ctx.regime, n=n)]
    return {
        "regime": ctx.regime,
        "synth_config": ctx.settings.synth_config(ctx.regime).to_json(),
        "originals": per,
        "original_train_acc": float(np.mean([p["train_acc"] for p in per])),
        "original_heldout_acc": float(np.mean([p["heldout_acc"] for p in per])),
        "original_test_ua": float(np.mean([p["test_ua"] for p in per])),
        "original_member_auc_inspeaker": float(np.mean([p["member_auc_inspeaker"] for p in per])),
        "original_member_auc_unseen": float(np.mean([p["member_auc_unseen"] for p in per])),
        "honest_targets": ctx.targets,
        "n_forget_sets": max((e["n_forget_sets"] for e in table), default=0),
        "pool": len(data.pool),
        "heldout": len(data.heldout),
        "test": len(data.test),
        "valid": len(data.valid),
        "table": table,
    }


def fidelity_lines(regimes: list[dict[str, Any]]) -> list[str]:
    """Whether 'test accuracy within ~1.5 points while the forget set is forgotten' reproduces."""
    lines = []
    for regime in regimes:
        for e in regime["table"]:
            if e["method"] not in ("rl_adv_ela_zero", "l2ul"):
                continue
            drop = e["test_ua_drop"]
            verdict = "reproduces" if drop["ci_high"] <= 0.015 else "does not reproduce"
            lines.append(
                f"{regime['regime']}, N = {e['N']}, {e['name']}: forget acc {_fmt(e['forget_acc'])} %, test UA drop "
                f"{_fmt(drop)} points -> the ~1.5-point claim {verdict}; stop reasons {e['stop_reasons']}"
            )
    if not lines:
        lines.append(
            "fidelity rows (RL+Adv+Ela@zero, L2UL-faithful) not finished when this report was assembled: "
            "their cells were still computing; the papers' ~1.5-point claim is not assessed here"
        )
    return lines


BASE_METHODS = ("original", "retrain", "default", "tuned")
FIDELITY_METHODS = ("rl_adv_ela_zero", "l2ul")


def _wait_for_tuning(cache_path: Path, fingerprints: Sequence[str], *, poll_s: float = 15.0) -> dict[str, Any]:
    """The frozen tuning result written by the memorising regime's process (polls until it exists)."""
    while True:
        tuning = CellCache(cache_path, fingerprints[0], also=fingerprints[1:]).get("tuning")
        if tuning is not None:
            return tuning
        time.sleep(poll_s)


def run(
    settings: Settings,
    *,
    data_root: Path,
    work_root: Path,
    out: Path,
    progress: bool = True,
    only_regime: str | None = None,
    report_only: bool = False,
) -> dict[str, Any] | None:
    """The benchmark; returns the report (also written as JSON + Markdown + PNG under ``out``).

    ``only_regime`` computes one regime's cells and returns ``None`` (several processes can share
    the work; the generalising regime waits for the memorising regime's frozen tuning).
    ``report_only`` computes nothing: it assembles the report from the cached cells (forget sets
    not computed yet are left out, and ``n_forget_sets`` says how many were).
    """
    torch.set_num_threads(1)
    start = time.perf_counter()
    work_root.mkdir(parents=True, exist_ok=True)
    fingerprint, *older = settings.accepted_fingerprints()
    tuning_cache = CellCache(work_root / "memorising" / "cells", fingerprint, also=older)
    tuning = tuning_cache.get("tuning")
    contexts: dict[str, Context] = {}
    if tuning is None and only_regime in (None, "memorising") and not report_only and tuning_cache.claim("tuning"):
        # Tuning first, in the memorising regime, with tuning speakers and validation speakers only.
        try:
            contexts["memorising"] = build_context(
                "memorising", settings=settings, data_root=data_root, work=work_root / "memorising", tuned={}
            )
            tuning = tune(contexts["memorising"])
            tuning_cache.put("tuning", tuning)
        finally:
            tuning_cache.release("tuning")
    regimes = []
    for regime in settings.regimes:
        if only_regime is not None and regime != only_regime:
            continue
        cache = CellCache(work_root / regime / "cells", fingerprint, also=older)
        try:
            ctx = contexts.get(regime) or build_context(
                regime,
                settings=settings,
                data_root=data_root,
                work=work_root / regime,
                tuned={},
                cached_only=report_only,
            )
        except NotCached:
            continue
        if tuning is None:
            if report_only:
                raise NotCached("no tuning result yet")
            tuning = _wait_for_tuning(work_root / "memorising" / "cells", (fingerprint, *older))
        ctx.tuned = tuning["chosen"]
        sizes = settings.sizes if regime == "memorising" else settings.generalising_sizes
        # Base rows of every forget set first, then the (costly) fidelity rows: an interrupted run
        # still has complete main tables.
        plan = [
            (f"n{n}/{i}", n, i, tuple(m for m in BASE_METHODS if m != "default" or n in settings.landed_default_sizes))
            for i in range(settings.n_eval_sets)
            for n in sizes
        ]
        plan += [
            (f"n{n}/{i}/fidelity", n, i, FIDELITY_METHODS)
            for i in range(min(settings.n_fidelity_sets, settings.n_eval_sets))
            for n in sizes
            if n in settings.fidelity_sizes
        ]
        if not report_only:
            for key, n, i, methods in tqdm(plan, desc=f"forget sets ({regime})", unit="cell", disable=not progress):
                if cache.get(key) is not None or not cache.claim(key):
                    continue  # done, or another process is computing it
                try:
                    cache.put(key, run_cell(ctx, n=n, index=i, methods=methods, work=work_root / regime))
                finally:
                    cache.release(key)
        rows = [row for key, *_ in plan for row in (cache.get(key) or [])]
        regimes.append(regime_summary(ctx, rows, sizes))
    if only_regime is not None:
        return None
    memorising = next((r for r in regimes if r["regime"] == "memorising"), None)
    report = {
        "format_version": FORMAT_VERSION,
        "config": {
            "label": (
                "REDUCED configuration (fewer forget sets and shadows; not the full protocol)"
                if settings.reduced
                else "full configuration"
            ),
            **asdict(settings),
        },
        "regime": [r["regime"] for r in regimes],
        "original_train_acc": {r["regime"]: r["original_train_acc"] for r in regimes},
        "n_forget_sets": {
            f"{r['regime']}/N={e['N']}": e["n_forget_sets"]
            for r in regimes
            for e in r["table"]
            if e["method"] == "original"
        },
        "tuned_on": (
            f"{settings.n_tuning_sets} tuning forget sets per N in {list(settings.tuning_sizes)} from "
            f"{settings.tuning_speakers} tuning speakers (seeds tune-*), scored with validation-speaker UA; "
            "evaluation forget sets use seeds eval-* from the other training speakers"
        ),
        "tuning": tuning,
        "regimes": regimes,
        "targets": check_targets(memorising["table"], method="tuned") if memorising else [],
        "targets_landed_default": check_targets(memorising["table"], method="default") if memorising else [],
        "fidelity": fidelity_lines(regimes),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, 1 thread",
        "wall_seconds_this_invocation": time.perf_counter() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = "forgetting"
    atomic_write_json(out / f"{stem}.json", report)
    atomic_write_json(out / f"{stem}_tuning.json", tuning)
    atomic_write_text(out / f"{stem}.md", markdown(report))
    plot(report, out / f"{stem}.png")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_forgetting"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--reduced", action="store_true", help="the labelled reduced configuration")
    parser.add_argument(
        "--regime", choices=tuple(REGIMES), help="compute only this regime's cells (parallel processes)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="assemble the report from cached cells, compute nothing"
    )
    parser.add_argument(
        "--prefetch-retrains", choices=tuple(REGIMES), help="only train that regime's shadows and Retrain models"
    )
    parser.add_argument(
        "--prefetch-originals", choices=tuple(REGIMES), help="only train that regime's originals (last first)"
    )
    args = parser.parse_args(argv)
    settings = REDUCED if args.reduced else FULL
    if args.prefetch_originals:
        torch.set_num_threads(1)
        data = load_regime(args.prefetch_originals, args.data_root, settings)
        work = args.work_dir / ("reduced" if args.reduced else "full") / args.prefetch_originals
        for i in reversed(range(settings.n_originals)):
            trained(work / f"original_{i}.pt", data.pool, seed=1000 + i, settings=settings)
        return 0
    if args.prefetch_retrains:
        prefetch_retrains(
            settings,
            regime=args.prefetch_retrains,
            data_root=args.data_root,
            work_root=args.work_dir / ("reduced" if args.reduced else "full"),
        )
        return 0
    report = run(
        settings,
        data_root=args.data_root,
        work_root=args.work_dir / ("reduced" if args.reduced else "full"),
        out=args.out,
        only_regime=args.regime,
        report_only=args.report_only,
    )
    if report is None:
        return 0
    for check in report["targets"]:
        print(f"{'MET   ' if check['met'] else 'MISSED'} {check['target']}: {check['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
