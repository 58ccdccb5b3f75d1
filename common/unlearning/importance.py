"""Per-parameter importance maps: which weights the outputs on some data depend on.

- MAS (Aljundi et al., 2018), the default: for each utterance the gradient of the squared L2
  norm of the logits, ``|d ||f(x)||^2 / d theta|``, averaged over the utterances. It needs no
  labels, and accumulating absolute values per utterance keeps two utterances that pull a weight
  in opposite directions from cancelling out.
- Fisher (diagonal, empirical): ``(d log p(y|x) / d theta)^2`` averaged over the utterances.

Both maps are *raw* means over utterances: a weighted mean of two nodes' maps is the map of their
union, which is what lets the server aggregate them. :func:`minmax_normalize` turns a map into
[0, 1] per tensor, and :func:`clip_importance` applies the clipping value ``tau``.

Maps are computed in eval mode (no dropout) with the given model, returned detached on the CPU
(they are stored and sent), keyed like ``model.named_parameters()``; frozen parameters are left out.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from serforget.common.data import WaveformSet
from serforget.common.device import resolve_device

ImportanceMap = dict[str, torch.Tensor]
_TINY = 1e-12


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _per_utterance_average(
    model: nn.Module,
    data: WaveformSet,
    *,
    device: str | torch.device,
    per_utterance: Callable[[torch.Tensor, torch.Tensor, dict[str, nn.Parameter]], ImportanceMap],
) -> ImportanceMap:
    """Average ``per_utterance(x[1, samples], y[1], params)`` over ``data`` in eval mode."""
    if len(data) == 0:
        raise ValueError("cannot compute importance on an empty set")
    dev = resolve_device(device)
    model.to(dev)
    params = _trainable(model)
    if not params:
        raise ValueError("model has no trainable parameters")
    was_training = model.training
    model.eval()
    total = {name: torch.zeros_like(p, device=p.device) for name, p in params.items()}
    try:
        for i in range(len(data)):
            x = data.waves[i : i + 1].to(dev)
            y = data.targets[i : i + 1].to(dev)
            for name, value in per_utterance(x, y, params).items():
                total[name] += value
    finally:
        model.train(was_training)
    return {name: (value / len(data)).detach().cpu() for name, value in total.items()}


def mas_importance(model: nn.Module, data: WaveformSet, *, device: str | torch.device = "auto") -> ImportanceMap:
    """Raw MAS importance: mean over utterances of ``|grad ||logits||_2^2|`` per parameter.

    The model is moved to ``device`` (like :func:`serforget.common.training.predict_logits`); labels in
    ``data`` are not used.
    """

    def one(x: torch.Tensor, _y: torch.Tensor, params: dict[str, nn.Parameter]) -> ImportanceMap:
        out = model(x)
        grads = torch.autograd.grad(out.pow(2).sum(), list(params.values()), allow_unused=True)
        return {n: (g.abs() if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}

    return _per_utterance_average(model, data, device=device, per_utterance=one)


def fisher_importance(model: nn.Module, data: WaveformSet, *, device: str | torch.device = "auto") -> ImportanceMap:
    """Raw diagonal empirical Fisher: mean over utterances of ``(grad log p(y|x))^2``."""

    def one(x: torch.Tensor, y: torch.Tensor, params: dict[str, nn.Parameter]) -> ImportanceMap:
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return {n: (g.pow(2) if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}

    return _per_utterance_average(model, data, device=device, per_utterance=one)


def compute_importance(
    model: nn.Module, data: WaveformSet, *, kind: str, device: str | torch.device = "auto"
) -> ImportanceMap:
    """Dispatch on ``kind`` (``mas`` or ``fisher``)."""
    if kind == "mas":
        return mas_importance(model, data, device=device)
    if kind == "fisher":
        return fisher_importance(model, data, device=device)
    raise ValueError(f"unknown importance kind {kind!r}; use mas or fisher")


def minmax_normalize(importance: ImportanceMap) -> ImportanceMap:
    """Per tensor ``(I - min) / (max - min)`` in [0, 1]; a constant tensor maps to all zeros.

    Per tensor (not global) because gradient scales differ by orders of magnitude between layers;
    a global scale would leave whole layers at 0 (free) or at 1.
    """
    out = {}
    for name, value in importance.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"importance of {name!r} holds NaN or infinite values")
        low, high = value.min(), value.max()
        span = high - low
        out[name] = (value - low) / span if float(span) > _TINY else torch.zeros_like(value)
    return out


def clip_importance(normalized: ImportanceMap, *, tau: float) -> ImportanceMap:
    """``min(I / tau, 1)``: importance at or above ``tau`` of the tensor's range counts as full.

    ``tau = 1`` leaves the min-max map unchanged (Cha et al.). Inputs must already be in [0, 1].
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    return {name: torch.clamp(value / tau, max=1.0) for name, value in normalized.items()}
