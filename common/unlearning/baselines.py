"""Remaining-data baselines the seed paper compares against, and the Retrain oracle.

They all see the remaining data (``remain`` = training set minus forget set), which a device in
the federated system does not hold for other speakers; they exist to show what the
forget-set-only method gives up, or does not.

- FT: fine-tune on the remaining data only (forgetting by catastrophic interference).
- NegGrad+ (Kurmanji et al., 2023): every step descends on a remaining batch and ascends on a
  forget batch, ``alpha * CE(remain) - (1 - alpha) * CE(forget)``.
- SCRUB (Kurmanji et al., 2023): a student initialised from the original (the teacher) alternates
  max-steps (move away from the teacher on the forget set, ``-KL(teacher || student)``) and
  min-steps (stay with the teacher and the labels on the remaining data,
  ``KL(teacher || student) + alpha * CE``); max-steps only in the first ``scrub_max_epochs``.
- Retrain: train from scratch on the remaining data with the original's recipe (the oracle).

Each baseline runs under the same stop rule as the forget-set-only methods (checked after every
epoch); FT and SCRUB are bounded by ``remain_epochs``, NegGrad+ (whose epochs are passes over the
small forget set) by ``max_epochs``.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from serforget.common.data import WaveformSet
from serforget.common.models import build_model, model_spec
from serforget.common.training import TrainConfig, TrainHistory, iterate_batches, train_model
from serforget.common.unlearning.config import UnlearnConfig
from serforget.common.unlearning.stopping import LoopOutcome, StopRule, run_until_stop


class _RemainSampler:
    """Remaining-data batches on the model's device, reshuffled every pass, seeded."""

    def __init__(self, remain: WaveformSet, *, batch_size: int, generator: torch.Generator, device: torch.device):
        self.remain, self.batch_size, self.generator, self.device = remain, batch_size, generator, device
        self._pending: list[torch.Tensor] = []

    def epoch(self, max_steps: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One pass (or ``max_steps`` batches, continuing the current shuffle) of remaining data."""
        n_batches = -(-len(self.remain) // self.batch_size)
        count = n_batches if max_steps is None else max_steps
        return [self.next() for _ in range(count)]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._pending:
            self._pending = iterate_batches(len(self.remain), self.batch_size, generator=self.generator)
        idx = self._pending.pop(0)
        return self.remain.waves[idx].to(self.device), self.remain.targets[idx].to(self.device)


def _adam(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def finetune(
    model: nn.Module,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    remain: WaveformSet,
    *,
    config: UnlearnConfig,
    generator: torch.Generator,
    progress: bool = False,
) -> LoopOutcome:
    """FT: cross-entropy on the remaining data for up to ``remain_epochs`` epochs, in place."""
    device = forget_x.device
    sampler = _RemainSampler(remain, batch_size=config.batch_size, generator=generator, device=device)
    optimizer = _adam(model, config.remain_lr)

    def run_epoch() -> int:
        model.train()
        batches = sampler.epoch(config.remain_steps_per_epoch)
        for x, y in batches:
            _step(optimizer, nn.functional.cross_entropy(model(x), y))
        return len(batches)

    rule = StopRule.from_config(config, max_epochs=config.remain_epochs)
    return run_until_stop(
        model,
        rule=rule,
        forget_waves=forget_x,
        forget_targets=forget_y,
        run_epoch=run_epoch,
        progress=progress,
        desc="FT",
    )


def neggrad_plus(
    model: nn.Module,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    remain: WaveformSet,
    *,
    config: UnlearnConfig,
    generator: torch.Generator,
    progress: bool = False,
) -> LoopOutcome:
    """NegGrad+: each forget batch is paired with a fresh remaining batch; up to ``max_epochs``."""
    device = forget_x.device
    sampler = _RemainSampler(remain, batch_size=config.batch_size, generator=generator, device=device)
    optimizer = _adam(model, config.remain_lr)
    alpha = config.neggrad_plus_alpha

    def run_epoch() -> int:
        model.train()
        batches = iterate_batches(len(forget_y), config.batch_size, generator=generator)
        for idx in batches:
            xr, yr = sampler.next()
            logits = model(torch.cat([xr, forget_x[idx]]))
            loss_remain = nn.functional.cross_entropy(logits[: len(yr)], yr)
            loss_forget = nn.functional.cross_entropy(logits[len(yr) :], forget_y[idx])
            _step(optimizer, alpha * loss_remain - (1.0 - alpha) * loss_forget)
        return len(batches)

    rule = StopRule.from_config(config)
    return run_until_stop(
        model,
        rule=rule,
        forget_waves=forget_x,
        forget_targets=forget_y,
        run_epoch=run_epoch,
        progress=progress,
        desc="NegGrad+",
    )


def _distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(teacher || student)`` at temperature T, scaled by T^2 (Hinton et al.)."""
    log_student = nn.functional.log_softmax(student_logits / temperature, dim=1)
    log_teacher = nn.functional.log_softmax(teacher_logits / temperature, dim=1)
    kl = nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def scrub(
    model: nn.Module,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    remain: WaveformSet,
    *,
    config: UnlearnConfig,
    generator: torch.Generator,
    progress: bool = False,
) -> LoopOutcome:
    """SCRUB: max-steps on the forget set (first ``scrub_max_epochs`` epochs) then min-steps on remain."""
    device = forget_x.device
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    sampler = _RemainSampler(remain, batch_size=config.batch_size, generator=generator, device=device)
    optimizer = _adam(model, config.remain_lr)
    temperature, alpha = config.scrub_temperature, config.scrub_alpha
    epoch_counter = [0]

    def run_epoch() -> int:
        epoch_counter[0] += 1
        model.train()
        steps = 0
        if epoch_counter[0] <= config.scrub_max_epochs:
            for idx in iterate_batches(len(forget_y), config.batch_size, generator=generator):
                with torch.no_grad():
                    teacher_logits = teacher(forget_x[idx])
                _step(optimizer, -_distill_kl(model(forget_x[idx]), teacher_logits, temperature))
                steps += 1
        for x, y in sampler.epoch(config.remain_steps_per_epoch):
            with torch.no_grad():
                teacher_logits = teacher(x)
            logits = model(x)
            loss = _distill_kl(logits, teacher_logits, temperature) + alpha * nn.functional.cross_entropy(logits, y)
            _step(optimizer, loss)
            steps += 1
        return steps

    rule = StopRule.from_config(config, max_epochs=config.remain_epochs)
    return run_until_stop(
        model,
        rule=rule,
        forget_waves=forget_x,
        forget_targets=forget_y,
        run_epoch=run_epoch,
        progress=progress,
        desc="SCRUB",
    )


REMAIN_LOOPS = {"ft": finetune, "neggrad_plus": neggrad_plus, "scrub": scrub}


def retrain_from_scratch(
    original: nn.Module,
    remain: WaveformSet,
    *,
    labels: Sequence[str],
    train_config: TrainConfig = TrainConfig(),
    valid: WaveformSet | None = None,
    progress: bool = False,
) -> tuple[nn.Module, TrainHistory]:
    """The Retrain oracle: the original's architecture, freshly initialised, trained on ``remain``.

    The initialisation is seeded with ``train_config.seed`` (inside a forked RNG, so the caller's
    random state is untouched) so that retraining is reproducible.
    """
    spec = model_spec(original)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_config.seed)
        model = build_model(arch=spec["arch"], config=spec["config"], labels=labels)
    history = train_model(model, remain, config=train_config, valid=valid, labels=labels, progress=progress)
    return model, history
