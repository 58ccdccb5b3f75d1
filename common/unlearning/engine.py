"""``unlearn()``: the one entry point the CLI, the benchmarks and the Flower ClientApp call.

The forget-set-only methods are one code path with three switches, so every ablation row of the
paper's table is the same loop with components on or off:

    loss = forget_weight * F(forget batch)                      F = RL (random labels) or -CE
         + adv_weight    * CE(adversarial batch, original labels)        if Adv
         + lambda * sum_i (1 - imp_i) (theta_i - theta0_i)^2             if Ela

Order of work (all of it inside the timed, memory-metered region, so the speed-up against
retraining is honest): copy the model; with Ela compute the forget-set importance with the
original weights; with Adv generate the adversarial examples with the original weights; draw the
random labels; then Adam epochs over the forget set until the stop rule fires. With
``relabel_scope`` ``needed`` (the default under ``retrain-level``) an epoch trains only the forget
utterances that must flip to reach the target, least confident first; once chosen an utterance
stays in the forgetting term.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from serforget.common.data import WaveformSet
from serforget.common.device import resolve_device
from serforget.common.training import iterate_batches
from serforget.common.unlearning.adversarial import AdversarialSet, make_adversarial_set
from serforget.common.unlearning.baselines import REMAIN_LOOPS
from serforget.common.unlearning.config import FORGET_ONLY_METHODS, METHODS, REMAIN_METHODS, UnlearnConfig
from serforget.common.unlearning.elastic import ElasticPenalty, penalty_weights
from serforget.common.unlearning.forgetting import needed_rows, negative_ce_loss, random_other_labels, relabel_loss
from serforget.common.unlearning.importance import ImportanceMap, compute_importance, minmax_normalize
from serforget.common.unlearning.measure import ResourceMeter
from serforget.common.unlearning.stopping import LoopOutcome, StopRule, forget_accuracy, forget_logits, run_until_stop


@dataclass(frozen=True)
class Recipe:
    """Which components a forget-set-only method switches on."""

    forgetting: str  # "relabel" | "negative"
    adversarial: bool
    elastic: bool


RECIPES: dict[str, Recipe] = {
    "rl": Recipe("relabel", adversarial=False, elastic=False),
    "rl_adv": Recipe("relabel", adversarial=True, elastic=False),
    "rl_ela": Recipe("relabel", adversarial=False, elastic=True),
    "rl_adv_ela": Recipe("relabel", adversarial=True, elastic=True),
    "neggrad": Recipe("negative", adversarial=False, elastic=False),
    # Cha et al.'s L2UL: -CE on the forget set, CE on adversarial examples, elastic weights.
    "neggrad_adv_ela": Recipe("negative", adversarial=True, elastic=True),
}


@dataclass
class UnlearnResult:
    """The unlearned model (a copy) and how it was obtained."""

    model: nn.Module
    method: str
    config: UnlearnConfig
    stop_reason: str
    epochs: int
    steps: int
    #: Forget accuracy before training, then after every epoch.
    forget_acc_trajectory: list[float]
    #: Wall time of the whole call, including importance and adversarial generation.
    seconds: float
    #: CPU time of the process over the call (all threads; steadier than wall time under load).
    cpu_seconds: float
    peak_memory_bytes: int
    memory_measure: str
    #: Seconds per phase: ``importance``, ``adversarial``, ``training`` (what ran).
    phase_seconds: dict[str, float] = field(default_factory=dict)
    #: Forget-set importance (MAS or Fisher, per ``config.importance``), min-max normalised per
    #: tensor, on the CPU; ``None`` for methods without the elastic term, and when the stop rule
    #: held before any step (then nothing is prepared).
    importance: ImportanceMap | None = None
    n_forget: int = 0
    n_adversarial: int = 0

    @property
    def forget_acc(self) -> float:
        return self.forget_acc_trajectory[-1]

    def summary(self) -> dict[str, Any]:
        """JSON-able description (no tensors): stored in checkpoint provenance and reports."""
        return {
            "method": self.method,
            "config": self.config.to_dict(),
            "stop_reason": self.stop_reason,
            "epochs": self.epochs,
            "steps": self.steps,
            "forget_acc_trajectory": list(self.forget_acc_trajectory),
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "phase_seconds": dict(self.phase_seconds),
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_measure": self.memory_measure,
            "n_forget": self.n_forget,
            "n_adversarial": self.n_adversarial,
        }


def unlearn(
    model: nn.Module,
    forget: WaveformSet,
    *,
    method: str = "rl_adv_ela",
    config: UnlearnConfig = UnlearnConfig(),
    remain: WaveformSet | None = None,
    progress: bool = False,
) -> UnlearnResult:
    """Unlearn ``forget`` from a copy of ``model``; ``model`` itself is not modified.

    ``method`` is one of :data:`~common.unlearning.config.METHODS`. The forget-set-only methods
    (``rl_adv_ela`` and its ablations, ``neggrad``) refuse ``remain``: they must not see it, and
    refusing makes a caller's mistake visible instead of silently ignoring data. The
    remaining-data baselines (``ft``, ``neggrad_plus``, ``scrub``) require it. Deterministic in
    ``config.seed`` (the caller's global RNG state is restored afterwards).
    """
    _check_call(method, forget, remain)
    device = resolve_device(config.device)
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        with ResourceMeter(device) as meter:
            work = copy.deepcopy(model).to(device)
            forget_x, forget_y = forget.waves.to(device), forget.targets.to(device)
            if method in RECIPES:
                outcome, phases, importance, n_adv = _run_forget_only(
                    work,
                    forget,
                    forget_x,
                    forget_y,
                    recipe=RECIPES[method],
                    config=config,
                    generator=generator,
                    device=device,
                    progress=progress,
                )
            else:
                start = time.perf_counter()
                outcome = REMAIN_LOOPS[method](
                    work, forget_x, forget_y, remain, config=config, generator=generator, progress=progress
                )
                phases, importance, n_adv = {"training": time.perf_counter() - start}, None, 0
    work.eval()
    return UnlearnResult(
        model=work,
        method=method,
        config=config,
        stop_reason=outcome.stop_reason,
        epochs=outcome.epochs,
        steps=outcome.steps,
        forget_acc_trajectory=outcome.forget_acc,
        seconds=meter.result.seconds,
        cpu_seconds=meter.result.cpu_seconds,
        peak_memory_bytes=meter.result.peak_bytes,
        memory_measure=meter.result.how,
        phase_seconds=phases,
        importance=importance,
        n_forget=len(forget),
        n_adversarial=n_adv,
    )


def _check_call(method: str, forget: WaveformSet, remain: WaveformSet | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; known: {', '.join(METHODS)}")
    if len(forget) == 0:
        raise ValueError("the forget set is empty: nothing to unlearn")
    if method in FORGET_ONLY_METHODS and remain is not None:
        raise ValueError(
            f"method {method!r} unlearns from the forget set alone and must not be given remaining data (remain=None)"
        )
    if method in REMAIN_METHODS and (remain is None or len(remain) == 0):
        raise ValueError(f"method {method!r} is a remaining-data baseline: pass a non-empty remain set")


def _n_classes(model: nn.Module, probe: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(probe[:1]).shape[1])
    finally:
        model.train(was_training)


def make_optimizer(model: nn.Module, *, kind: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam or SGD with momentum 0.9 over the trainable parameters (weight decay 0 by default)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; use adam or sgd")


def _run_forget_only(
    work: nn.Module,
    forget: WaveformSet,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    *,
    recipe: Recipe,
    config: UnlearnConfig,
    generator: torch.Generator,
    device: torch.device,
    progress: bool,
) -> tuple[LoopOutcome, dict[str, float], ImportanceMap | None, int]:
    """Prepare the components with the original weights, then train until the stop rule fires.

    The rule is checked first: when the original model already meets it (common with the
    ``retrain-level`` rule), nothing is prepared and no step is taken.
    """
    rule = StopRule.from_config(config)
    initial = forget_accuracy(work, forget_x, forget_y)
    reason = rule.decide(epoch=0, forget_acc=initial)
    if reason is not None:
        return LoopOutcome(stop_reason=reason, forget_acc=[initial]), {}, None, 0
    phases: dict[str, float] = {}
    n_classes = _n_classes(work, forget_x)
    original_logits = forget_logits(work, forget_x, batch_size=config.batch_size)
    penalty, importance = None, None
    importance_rows: torch.Tensor | None = None
    reference = copy.deepcopy(work) if recipe.elastic and config.importance_scope == "trained" else None

    def refresh_elastic(rows: torch.Tensor | None) -> None:
        """(Re)build the penalty from importance on ``rows`` (all forget rows when ``None``),
        measured with the original weights; the penalty always pulls toward the original."""
        nonlocal penalty, importance
        start = time.perf_counter()
        source = reference if reference is not None else work
        data = forget if rows is None else forget.subset(rows.cpu())
        raw = compute_importance(source, data, kind=config.importance, device=device)
        importance = minmax_normalize(raw)
        weights = penalty_weights(raw, penalty_tau=config.penalty_tau, penalty_lambda=config.penalty_lambda)
        penalty = ElasticPenalty(source, weights) if reference is not None else ElasticPenalty(work, weights)
        phases["importance"] = phases.get("importance", 0.0) + time.perf_counter() - start

    if recipe.elastic and config.importance_scope == "forget":
        refresh_elastic(None)
    adversarial = None
    if recipe.adversarial:
        start = time.perf_counter()
        adversarial = make_adversarial_set(
            work,
            forget_x,
            forget_y,
            n_classes=n_classes,
            k=config.pgd_k,
            norm=config.pgd_norm,
            eps=config.pgd_eps,
            step=config.pgd_step,
            steps=config.pgd_steps,
            rand_init=config.pgd_rand_init,
            drop_unflipped=config.adv_drop_unflipped,
            generator=generator,
        )
        if config.adv_label == "attack_target":
            adversarial = dataclasses.replace(adversarial, targets=adversarial.attack_targets)
        phases["adversarial"] = time.perf_counter() - start
    relabels = random_other_labels(forget_y, n_classes=n_classes, generator=generator).to(device)
    if config.relabel_to == "runner_up":
        relabels = runner_up_labels(original_logits, forget_y).to(device)
    anchor = (
        _anchor_set(forget_x, original_logits, config=config, generator=generator) if config.anchor_weight > 0 else None
    )
    loss_targets = (
        loss_match_targets(original_logits, forget_y, config.reference_losses)
        if config.loss_match_weight > 0 and config.reference_losses is not None
        else None
    )
    optimizer = make_optimizer(work, kind=config.optimizer, lr=config.lr, weight_decay=config.weight_decay)

    chosen = torch.zeros(len(forget_y), dtype=torch.bool)

    def run_epoch() -> int:
        nonlocal importance_rows
        chosen[_rows_to_forget(work, forget_x, forget_y, config=config, rule=rule)] = True
        rows = chosen.nonzero().flatten()
        if (
            recipe.elastic
            and config.importance_scope == "trained"
            and (importance_rows is None or not torch.equal(importance_rows, rows))
        ):
            importance_rows = rows.clone()
            refresh_elastic(rows)
        work.train()
        batches = [rows[idx] for idx in iterate_batches(len(rows), config.batch_size, generator=generator)]
        steps = 0
        for idx in batches:
            loss = _forget_only_loss(
                work,
                idx.to(device),
                forget_x,
                forget_y,
                relabels,
                recipe=recipe,
                config=config,
                adversarial=adversarial,
                penalty=penalty,
            )
            if anchor is not None:
                loss = loss + config.anchor_weight * _anchor_loss(work, anchor, keep=~chosen)
            if loss_targets is not None:
                loss = loss + config.loss_match_weight * _loss_match(work, forget_x, forget_y, loss_targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if config.stop_check == "step" and rule.reached(forget_accuracy(work, forget_x, forget_y)):
                break
        return steps

    start = time.perf_counter()
    outcome = run_until_stop(
        work,
        rule=rule,
        forget_waves=forget_x,
        forget_targets=forget_y,
        run_epoch=run_epoch,
        initial_forget_acc=initial,
        progress=progress,
    )
    phases["training"] = time.perf_counter() - start
    return outcome, phases, importance, len(adversarial) if adversarial is not None else 0


def runner_up_labels(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the class with the highest logit other than the target (``relabel_to="runner_up"``)."""
    others = logits.detach().clone()
    others[torch.arange(len(targets), device=logits.device), targets.to(logits.device)] = -math.inf
    return others.argmax(dim=1).cpu()


def loss_match_targets(
    original_logits: torch.Tensor, targets: torch.Tensor, reference: tuple[float, ...]
) -> torch.Tensor:
    """Per forget row, the loss to pull it toward (``loss_match_weight``).

    Rank-preserving quantile matching: the row with the k-th smallest original cross-entropy
    gets the ``(k + 0.5) / n`` quantile of ``reference``. Among all maps from the forget losses
    onto the reference distribution it moves the losses least (the 1-D optimal transport), and
    the utterances the original found hardest get the highest targets, as a model that never saw
    them would.
    """
    ce = nn.functional.cross_entropy(
        original_logits.detach().float(), targets.to(original_logits.device), reduction="none"
    )
    ranks = torch.empty(len(ce), dtype=torch.long)
    ranks[ce.cpu().argsort(stable=True)] = torch.arange(len(ce))
    levels = (ranks.double() + 0.5) / len(ce)
    reference_t = torch.tensor(sorted(reference), dtype=torch.float64)
    return torch.quantile(reference_t, levels).float().to(original_logits.device)


def _loss_match(
    model: nn.Module, forget_x: torch.Tensor, forget_y: torch.Tensor, loss_targets: torch.Tensor
) -> torch.Tensor:
    """Smooth-L1 distance of every forget row's cross-entropy to its target (``loss_match_targets``)."""
    ce = nn.functional.cross_entropy(model(forget_x), forget_y, reduction="none")
    return nn.functional.smooth_l1_loss(ce, loss_targets, beta=0.1)


@dataclass(frozen=True)
class AnchorSet:
    """Noisy copies of the forget utterances and the original model's log-probabilities on them."""

    waves: torch.Tensor
    log_probs: torch.Tensor
    source: torch.Tensor


@torch.no_grad()
def _anchor_set(
    forget_x: torch.Tensor, original_logits: torch.Tensor, *, config: UnlearnConfig, generator: torch.Generator
) -> AnchorSet:
    """``anchor_copies`` white-noise copies of every forget utterance at ``anchor_snr_db``.

    The targets are the original model's outputs on the *clean* utterance: the copies ask the
    model to keep answering as before in a small neighbourhood of the utterances it keeps.
    """
    source = torch.arange(len(forget_x)).repeat_interleave(config.anchor_copies)
    clean = forget_x[source.to(forget_x.device)]
    power = clean.pow(2).mean(dim=1, keepdim=True)
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    noisy = clean + noise * torch.sqrt(power / 10.0 ** (config.anchor_snr_db / 10.0))
    log_probs = torch.log_softmax(original_logits[source.to(original_logits.device)], dim=1)
    return AnchorSet(waves=noisy.clamp(-1.0, 1.0), log_probs=log_probs, source=source)


def _anchor_loss(model: nn.Module, anchor: AnchorSet, *, keep: torch.Tensor) -> torch.Tensor:
    """KL(original || model) on the noisy copies of the forget rows in ``keep`` (0 if none)."""
    rows = keep[anchor.source].nonzero().flatten()
    if len(rows) == 0:
        return torch.zeros((), device=anchor.waves.device)
    rows = rows.to(anchor.waves.device)
    log_q = torch.log_softmax(model(anchor.waves[rows]), dim=1)
    return nn.functional.kl_div(log_q, anchor.log_probs[rows], log_target=True, reduction="batchmean")


def _rows_to_forget(
    model: nn.Module, forget_x: torch.Tensor, forget_y: torch.Tensor, *, config: UnlearnConfig, rule: StopRule
) -> torch.Tensor:
    """Forget rows to add to the training rows this epoch: all of them, or those :func:`needed_rows` picks.

    The caller keeps every row it ever added: an utterance that has flipped stays in the
    forgetting term, so it cannot drift back and make the selection oscillate.
    """
    if not config.trains_only_needed:
        return torch.arange(len(forget_y))
    return needed_rows(forget_logits(model, forget_x, batch_size=config.batch_size), forget_y, target_acc=rule.target)


def _forget_only_loss(
    model: nn.Module,
    idx: torch.Tensor,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    relabels: torch.Tensor,
    *,
    recipe: Recipe,
    config: UnlearnConfig,
    adversarial: AdversarialSet | None,
    penalty: ElasticPenalty | None,
) -> torch.Tensor:
    """One batch: the forget rows and their adversarial examples go through a single forward pass."""
    inputs = [forget_x[idx]]
    adv_rows = None
    if adversarial is not None:
        adv_rows = adversarial.rows_for(idx)
        inputs.append(adversarial.waves[adv_rows])
    logits = model(torch.cat(inputs))
    logits_forget = logits[: len(idx)]
    n_adv = len(adv_rows) if adv_rows is not None else 0
    share_f, share_adv = (
        (len(idx) / (len(idx) + n_adv), n_adv / (len(idx) + n_adv))
        if (config.loss_weighting == "set_size")
        else (1.0, 1.0)
    )
    if recipe.forgetting == "relabel":
        loss = share_f * config.forget_weight * relabel_loss(logits_forget, relabels[idx])
    else:
        loss = share_f * config.forget_weight * negative_ce_loss(logits_forget, forget_y[idx])
    if adv_rows is not None and len(adv_rows):
        adv_loss = nn.functional.cross_entropy(logits[len(idx) :], adversarial.targets[adv_rows])
        loss = loss + share_adv * config.adv_weight * adv_loss
    if penalty is not None:
        loss = loss + penalty(model)
    return loss
