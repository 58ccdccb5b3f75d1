"""When to stop unlearning, checked on the forget set after every epoch (and before the first).

Two rules:
- ``zero`` (the papers' protocol): stop once no forget utterance is classified correctly.
- ``retrain-level``: stop once forget accuracy is at or below a target - in the federated system
  the held-out accuracy the server sends. A model that gets *every* forget utterance wrong is as
  conspicuous to a membership-inference attacker as one that gets them all right; stopping at
  the accuracy of unseen data makes the forget set look unseen.
Both end at ``max_epochs`` at the latest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from serforget.common.training import iterate_batches
from serforget.common.unlearning.config import STOP_RULES, UnlearnConfig

#: ``UnlearnResult.stop_reason`` values.
REASON_ZERO = "forget_acc_zero"
REASON_TARGET = "reached_target"
REASON_MAX_EPOCHS = "max_epochs"


@dataclass(frozen=True)
class StopRule:
    """Decides after each epoch whether to stop, and why."""

    kind: str
    target: float
    max_epochs: int

    def __post_init__(self) -> None:
        if self.kind not in STOP_RULES:
            raise ValueError(f"unknown stop rule {self.kind!r}; use one of {STOP_RULES}")
        if not 0.0 <= self.target <= 1.0:
            raise ValueError(f"stop target must lie in [0, 1], got {self.target}")
        if self.max_epochs < 0:
            raise ValueError(f"max_epochs must be >= 0, got {self.max_epochs}")

    @classmethod
    def from_config(cls, config: UnlearnConfig, *, max_epochs: int | None = None) -> "StopRule":
        """The rule a config asks for (``max_epochs`` overrides the config's, for baselines)."""
        target = 0.0 if config.stop == "zero" else float(config.target_forget_acc)  # validated by the config
        return cls(kind=config.stop, target=target, max_epochs=config.max_epochs if max_epochs is None else max_epochs)

    def reached(self, forget_acc: float) -> bool:
        """Whether ``forget_acc`` satisfies the rule (a tiny tolerance absorbs float rounding)."""
        return forget_acc <= self.target + 1e-9

    def decide(self, *, epoch: int, forget_acc: float) -> str | None:
        """Stop reason after ``epoch`` epochs (0 = before training) with that forget accuracy, or ``None``."""
        if self.reached(forget_acc):
            return REASON_ZERO if self.kind == "zero" else REASON_TARGET
        if epoch >= self.max_epochs:
            return REASON_MAX_EPOCHS
        return None


@torch.no_grad()
def forget_logits(model: nn.Module, waves: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) for every row of ``waves``, in batches; mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(waves[idx]) for idx in iterate_batches(len(waves), batch_size)])
    finally:
        model.train(was_training)


def forget_accuracy(model: nn.Module, waves: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 64) -> float:
    """Fraction of ``waves`` that ``model`` (in eval mode) assigns to ``targets``; mode is restored."""
    if len(targets) == 0:
        raise ValueError("forget accuracy of an empty set is undefined")
    predictions = forget_logits(model, waves, batch_size=batch_size).argmax(dim=1)
    return int((predictions == targets).sum()) / len(targets)


@dataclass
class LoopOutcome:
    """What a stop-ruled loop did: epochs and optimiser steps taken, why it stopped, the trajectory."""

    epochs: int = 0
    steps: int = 0
    stop_reason: str = ""
    forget_acc: list[float] = field(default_factory=list)


def run_until_stop(
    model: nn.Module,
    *,
    rule: StopRule,
    forget_waves: torch.Tensor,
    forget_targets: torch.Tensor,
    run_epoch: Callable[[], int],
    initial_forget_acc: float | None = None,
    progress: bool = False,
    desc: str = "unlearning",
) -> LoopOutcome:
    """Check the rule before training and after every epoch; ``run_epoch()`` returns its step count.

    The first check happens before any update: a forget set the model already gets wrong enough
    costs no step at all. ``initial_forget_acc`` saves recomputing an accuracy the caller has.
    """
    if initial_forget_acc is None:
        initial_forget_acc = forget_accuracy(model, forget_waves, forget_targets)
    outcome = LoopOutcome(forget_acc=[initial_forget_acc])
    reason = rule.decide(epoch=0, forget_acc=outcome.forget_acc[0])
    bar = tqdm(total=rule.max_epochs, desc=desc, unit="epoch", disable=not progress, leave=False)
    try:
        while reason is None:
            outcome.steps += run_epoch()
            outcome.epochs += 1
            outcome.forget_acc.append(forget_accuracy(model, forget_waves, forget_targets))
            reason = rule.decide(epoch=outcome.epochs, forget_acc=outcome.forget_acc[-1])
            bar.update(1)
            bar.set_postfix(forget_acc=f"{outcome.forget_acc[-1]:.3f}")
    finally:
        bar.close()
    outcome.stop_reason = reason
    return outcome
