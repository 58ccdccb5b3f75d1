"""Elastic weights: hold the weights the forget set does not need, free the ones it does.

Client side (the Ela term of the loss), with ``I`` the forget-set importance (MAS or Fisher)
computed with the original model, ``Ī = minmax(I)`` per tensor and ``τ`` the clipping value:

    imp_i  = min(Ī_i / τ, 1)                       (clip_importance)
    R(θ)   = λ · Σ_i (1 - imp_i) · (θ_i - θ0_i)²

so a weight with zero importance for the forget set is held at its original value θ0 with full
strength λ, and a weight whose importance reaches τ of its tensor's maximum moves freely. What
τ clips is therefore the *normalised importance* (equivalently the penalty weight 1 - imp_i,
floored at 0 from Ī_i = τ on), not the update. Without clipping (τ = 1) the heavy tail of MAS
maps leaves almost every weight with 1 - imp ≈ 1, and forgetting has to fight the whole
regulariser; a τ that is too small frees so many weights that the term no longer protects the
remaining knowledge. That is the sensitivity the seed paper reports.

Server side (:func:`elastic_constraint`): before applying a node's delta, the server scales each
parameter's movement down by the *global* (task) importance, so weights important to the task move
little. It clips importance the same way, but it is a different setting with its own scale and
defaults, so the two never share a name: the device's penalty is ``penalty_lambda`` (λ >= 0) and
``penalty_tau`` (:class:`~serforget.common.unlearning.config.UnlearnConfig`), the server's
constraint is ``constraint_strength`` (in [0, 1]) and ``constraint_tau`` (run config
``constraint.*``).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from serforget.common.unlearning.importance import ImportanceMap, clip_importance, minmax_normalize


def penalty_weights(importance: ImportanceMap, *, penalty_tau: float, penalty_lambda: float) -> ImportanceMap:
    """Per-parameter penalty weights ``lambda * (1 - min(minmax(I) / tau, 1))`` from a raw map."""
    if penalty_lambda < 0:
        raise ValueError(f"penalty_lambda must be >= 0, got {penalty_lambda}")
    clipped = clip_importance(minmax_normalize(importance), tau=penalty_tau)
    return {name: penalty_lambda * (1.0 - value) for name, value in clipped.items()}


class ElasticPenalty:
    """``R(θ) = Σ_i w_i (θ_i - θ0_i)²`` with anchors θ0 taken from ``model`` at construction.

    Weights and anchors live on the model's device. A trainable parameter missing from
    ``weights`` is an error: silently leaving it unregularised would let it drift.
    """

    def __init__(self, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        self._anchors: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name not in weights:
                raise ValueError(f"elastic weights have no entry for parameter {name!r}")
            if tuple(weights[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"elastic weight {name!r} has shape {tuple(weights[name].shape)}, parameter has {tuple(param.shape)}"
                )
            self._anchors[name] = param.detach().clone()
            self._weights[name] = weights[name].detach().to(device=param.device, dtype=param.dtype)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        terms = [
            (self._weights[name] * (param - self._anchors[name]).pow(2)).sum()
            for name, param in model.named_parameters()
            if name in self._anchors
        ]
        return torch.stack(terms).sum()


def elastic_constraint(
    delta: Mapping[str, torch.Tensor],
    importance: Mapping[str, torch.Tensor],
    *,
    constraint_tau: float,
    constraint_strength: float,
) -> dict[str, torch.Tensor]:
    """Scale a node's update by the global importance map before the server applies it.

    Rule, per parameter entry ``i`` of every tensor named in ``importance``:

        imp_i   = min(minmax(I)_i / constraint_tau, 1)    (per tensor; raw or normalised maps alike)
        scale_i = clip(1 - constraint_strength * imp_i, 0, 1)
        delta'_i = scale_i * delta_i

    ``constraint_strength`` in [0, 1] keeps a fraction ``1 - constraint_strength`` of the movement
    of fully important weights (1 freezes them; 0 disables the constraint); unimportant weights
    (imp 0) always move freely. Scaling, not norm clipping, keeps the update's direction for every
    weight and never enlarges it. Entries of ``delta`` without importance (buffers, integer
    counters) pass through unchanged; an importance entry with no matching delta, or a shape
    mismatch, is a ``ValueError`` naming the tensor (the map belongs to another model).
    """
    if constraint_strength < 0:
        raise ValueError(f"constraint_strength must be >= 0, got {constraint_strength}")
    missing = sorted(set(importance) - set(delta))
    if missing:
        raise ValueError(f"importance map names tensors absent from the delta: {missing[:5]}")
    for name, value in importance.items():
        if tuple(value.shape) != tuple(delta[name].shape):
            raise ValueError(
                f"importance {name!r} has shape {tuple(value.shape)}, delta has {tuple(delta[name].shape)}"
            )
    clipped = clip_importance(
        minmax_normalize({k: v.detach().float().cpu() for k, v in importance.items()}), tau=constraint_tau
    )
    out: dict[str, torch.Tensor] = {}
    for name, value in delta.items():
        if name not in clipped or not value.is_floating_point():
            out[name] = value.clone()
            continue
        scale = torch.clamp(1.0 - constraint_strength * clipped[name], 0.0, 1.0).to(
            device=value.device, dtype=value.dtype
        )
        out[name] = value * scale
    return out
