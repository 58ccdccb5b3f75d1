"""Targeted PGD in the waveform domain: adversarial examples that stand in for the remaining data.

Why they help (Cha et al., AAAI 2024): an example pushed from a forget utterance across the
original model's decision boundary toward class ``t`` and labelled with what the *original*
model says about it pins that boundary where the remaining data put it. Training on them next to
the forgetting term keeps the other classes' regions in place although no remaining utterance is
ever seen.

Conventions:
- the ball is relative to each clip: ``||delta|| <= eps * ||x||`` in the attack's norm (L2 or
  Linf), so the same setting means the same signal-to-perturbation ratio at any recording gain;
- ``step`` is the per-iteration step as a fraction of the radius;
- adversarial waveforms are clamped to the audio range [-1, 1];
- the model is attacked in eval mode (no dropout), its parameters receive no gradient, and its
  training mode is restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from serforget.common.training import iterate_batches

_TINY = 1e-12
AUDIO_MIN, AUDIO_MAX = -1.0, 1.0


@dataclass
class AdversarialSet:
    """``waves[M, samples]`` labelled ``targets[M]`` by the original model; ``source[M]`` indexes the forget set."""

    waves: torch.Tensor
    targets: torch.Tensor
    source: torch.Tensor
    attack_targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def rows_for(self, forget_index: torch.Tensor) -> torch.Tensor:
        """Indices of the adversarial examples generated from the given forget rows."""
        return torch.nonzero(torch.isin(self.source, forget_index.to(self.source.device))).flatten()


def _clip_norms(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-clip norm ``[B, 1]`` in the attack's norm (floored so a silent clip gives no NaN)."""
    if norm == "l2":
        values = x.flatten(1).norm(p=2, dim=1)
    elif norm == "linf":
        values = x.flatten(1).abs().amax(dim=1)
    else:
        raise ValueError(f"unknown PGD norm {norm!r}; use l2 or linf")
    return values.clamp_min(_TINY).unsqueeze(1)


def _random_start(x: torch.Tensor, radius: torch.Tensor, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A random point inside each clip's ball (uniform radius along a random direction for L2)."""
    if norm == "linf":
        unit = torch.rand(x.shape, generator=generator, device="cpu").to(x.device) * 2 - 1
        return unit * radius
    direction = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    direction = direction / direction.flatten(1).norm(dim=1, keepdim=True).clamp_min(_TINY)
    scale = torch.rand((x.shape[0], 1), generator=generator, device="cpu").to(x.device)
    return direction * scale * radius


def _project(delta: torch.Tensor, radius: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, radius), -radius)
    norms = delta.flatten(1).norm(dim=1, keepdim=True).clamp_min(_TINY)
    return delta * torch.clamp(radius / norms, max=1.0)


def _descent_step(grad: torch.Tensor, step: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-descent step of size ``step`` in the attack's norm (toward lower target loss)."""
    if norm == "linf":
        return -step * grad.sign()
    return -step * grad / grad.flatten(1).norm(dim=1, keepdim=True).clamp_min(_TINY)


def pgd_targeted(
    model: nn.Module,
    waves: torch.Tensor,
    attack_targets: torch.Tensor,
    *,
    norm: str = "l2",
    eps: float = 0.05,
    step: float = 0.5,
    steps: int = 5,
    rand_init: bool = True,
    generator: torch.Generator,
) -> torch.Tensor:
    """Targeted PGD: minimise the cross-entropy toward ``attack_targets`` inside the ball.

    ``waves`` and ``attack_targets`` must be on the model's device; returns the adversarial
    waveforms on that device (detached).
    """
    if eps <= 0 or step <= 0 or steps < 1:
        raise ValueError(f"PGD needs eps > 0, step > 0 and steps >= 1 (got {eps}, {step}, {steps})")
    was_training = model.training
    model.eval()
    radius = eps * _clip_norms(waves, norm)
    step_size = step * radius
    delta = _random_start(waves, radius, norm, generator) if rand_init else torch.zeros_like(waves)
    delta = (waves + delta).clamp(AUDIO_MIN, AUDIO_MAX) - waves
    try:
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = nn.functional.cross_entropy(model(waves + delta), attack_targets)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = _project(delta + _descent_step(grad, step_size, norm), radius, norm)
                delta = (waves + delta).clamp(AUDIO_MIN, AUDIO_MAX) - waves
    finally:
        model.train(was_training)
    return (waves + delta).detach()


@torch.no_grad()
def _predict(model: nn.Module, waves: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(waves).argmax(dim=1)
    finally:
        model.train(was_training)


def make_adversarial_set(
    model: nn.Module,
    waves: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_classes: int,
    k: int,
    norm: str,
    eps: float,
    step: float,
    steps: int,
    rand_init: bool,
    drop_unflipped: bool,
    generator: torch.Generator,
    batch_size: int = 64,
) -> AdversarialSet:
    """``k`` targeted adversarial examples per forget utterance, labelled by ``model``.

    Each copy of utterance ``i`` is attacked toward its own random class other than
    ``targets[i]``; the label kept is the original model's prediction on the result (equal to the
    attack target when the attack succeeds). With ``drop_unflipped`` the examples the model still
    assigns to ``targets[i]`` are discarded (see :class:`UnlearnConfig.adv_drop_unflipped`).
    ``waves`` live on the model's device; so does the result.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = waves.device
    source = torch.arange(len(targets), device=device).repeat_interleave(k)
    offsets = torch.randint(1, n_classes, (len(source),), generator=generator).to(device)
    attack_targets = (targets.to(device)[source] + offsets) % n_classes
    adv_parts, label_parts = [], []
    for idx in iterate_batches(len(source), batch_size):
        idx = idx.to(device)
        adv = pgd_targeted(
            model,
            waves[source[idx]],
            attack_targets[idx],
            norm=norm,
            eps=eps,
            step=step,
            steps=steps,
            rand_init=rand_init,
            generator=generator,
        )
        adv_parts.append(adv)
        label_parts.append(_predict(model, adv))
    adv_waves = torch.cat(adv_parts) if adv_parts else waves.new_zeros((0, waves.shape[1]))
    labels = torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.long, device=device)
    keep = labels != targets.to(device)[source] if drop_unflipped else torch.ones_like(labels, dtype=torch.bool)
    return AdversarialSet(
        waves=adv_waves[keep], targets=labels[keep], source=source[keep], attack_targets=attack_targets[keep]
    )
