"""Forgetting terms: what the loss asks of the forget set itself.

- Random relabeling (RL, the seed paper's term): every forget utterance gets a label drawn
  uniformly from the *other* classes, once, and is trained toward it with cross-entropy. Unlike
  gradient ascent the loss is bounded below, so the model is pushed to a definite wrong answer
  rather than to ever larger logits.
- Negative cross-entropy (NegGrad, Cha et al.'s term): gradient ascent on the true labels.

Either term can be restricted to the utterances that must flip to meet the stop target
(:func:`needed_rows`, the ``relabel_scope="needed"`` setting).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def random_other_labels(targets: torch.Tensor, *, n_classes: int, generator: torch.Generator) -> torch.Tensor:
    """For each target, a class drawn uniformly from the ``n_classes - 1`` other classes.

    Drawing an offset in ``[1, n_classes)`` and adding it modulo ``n_classes`` guarantees the
    new label differs from the old one without rejection sampling.
    """
    if n_classes < 2:
        raise ValueError(f"random relabeling needs at least 2 classes, got {n_classes}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= n_classes):
        raise ValueError(f"targets hold a class index outside [0, {n_classes})")
    offsets = torch.randint(1, n_classes, targets.shape, generator=generator)
    return (targets.cpu() + offsets) % n_classes


def relabel_loss(logits: torch.Tensor, relabels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy toward the random labels (the RL forgetting term)."""
    return nn.functional.cross_entropy(logits, relabels)


def negative_ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negated cross-entropy on the true labels (gradient ascent, the NegGrad term)."""
    return -nn.functional.cross_entropy(logits, targets)


@torch.no_grad()
def needed_rows(logits: torch.Tensor, targets: torch.Tensor, *, target_acc: float) -> torch.Tensor:
    """Indices of the fewest correctly classified rows whose flip brings accuracy to ``target_acc``.

    The least confident go first (smallest margin of the true class's logit over the best other
    class): they are the utterances a model that never saw them would most likely get wrong, and
    the ones that move the fewest weights to flip. Empty when accuracy is already at the target.
    """
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {targets.shape[0]} targets")
    rows = torch.arange(len(targets), device=logits.device)
    true_logit = logits[rows, targets]
    others = logits.clone()
    others[rows, targets] = -math.inf
    margin = true_logit - others.max(dim=1).values
    correct = logits.argmax(dim=1) == targets
    allowed = math.floor(target_acc * len(targets) + 1e-9)
    n_needed = max(int(correct.sum()) - allowed, 0)
    margin[~correct] = math.inf
    return margin.argsort()[:n_needed].cpu()
