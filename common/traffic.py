"""What trains and travels (run config ``model.trainable``): only those tensors cross the network.

A pre-trained backbone (wav2vec2, HuBERT) is on every device already: the run's
``model.pretrained-dir``. Fine-tuning changes only part of it (SUPERB and SpeechBrain recipes freeze
the convolutional feature encoder; a linear probe trains only the head), so FedAvg messages,
importance maps, unlearning deltas and release announcements carry only the trainable tensors and
each side completes the model from its own copy of the frozen rest. Both sides check that the
frozen rest is the same (:func:`frozen_sha256`), so a device with another checkpoint fails loudly
instead of averaging weights of two different models.

* ``all``: every trainable tensor (the frozen feature encoder stays home);
* ``head``: the classification head only (projector and classifier);
* ``top-N``: the head and the last N transformer layers.

The log-mel CNN has no pre-trained base on the devices: its whole state always travels.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from serforget.common.checkpoint import state_sha256

log = logging.getLogger("serforget.traffic")
_SCOPE = re.compile(r"all|head|top-([1-9]\d*)")
_HEAD = re.compile(r"backbone\.(projector|classifier)\.|backbone\.layer_weights$")
_LAYER = re.compile(r"backbone\.\w+\.encoder\.layers\.(\d+)\.")


def check_trainable(scope: str) -> str:
    """``scope`` if it is ``all``, ``head`` or ``top-N`` (N >= 1); otherwise a ValueError saying so."""
    if not isinstance(scope, str) or not _SCOPE.fullmatch(scope):
        raise ValueError(f"must be 'all', 'head' or 'top-N' (N >= 1 transformer layers and the head), got {scope!r}")
    return scope


def set_trainable(model: nn.Module, scope: str) -> list[str]:
    """Freeze what ``scope`` leaves out; return the state-dict keys that travel, in state-dict order.

    For a model without a pre-trained base (no ``backbone``) only ``all`` is valid and every
    state-dict entry travels (buffers included), as before this setting existed.
    """
    check_trainable(scope)
    state_keys = list(model.state_dict())
    if not hasattr(model, "backbone"):
        if scope != "all":
            raise ValueError(f"model.trainable = {scope!r} needs a pre-trained backbone (wav2vec2/hubert)")
        return state_keys
    keep = _selector(model, scope)
    for name, param in model.named_parameters():
        if not keep(name):
            param.requires_grad_(False)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    if not trainable:
        raise ValueError(f"model.trainable = {scope!r} leaves no trainable tensor in this model")
    return [k for k in state_keys if k in trainable]


def _selector(model: nn.Module, scope: str):
    if scope == "all":
        return lambda name: True
    if scope == "head":
        return lambda name: bool(_HEAD.match(name))
    n_top = int(scope.split("-", 1)[1])
    layers = sorted({int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER.match(name))})
    if n_top > len(layers):
        raise ValueError(f"model.trainable = {scope!r}: the model has only {len(layers)} transformer layers")
    top = set(layers[-n_top:])
    return lambda name: bool(_HEAD.match(name)) or ((m := _LAYER.match(name)) is not None and int(m.group(1)) in top)


def travelling(state: Mapping[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """The part of ``state`` that crosses the network."""
    return {k: state[k] for k in keys}


def frozen_sha256(state: Mapping[str, torch.Tensor], keys: list[str]) -> str:
    """Hash of what stays home: both sides must hold the same frozen rest."""
    moving = set(keys)
    return state_sha256({k: v for k, v in state.items() if k not in moving})


def complete(full: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], keys: list[str]) -> dict:
    """``full`` with the travelling tensors replaced by ``received`` (exactly ``keys``, same shapes)."""
    if set(received) != set(keys):
        missing, extra = sorted(set(keys) - set(received)), sorted(set(received) - set(keys))
        raise ValueError(
            f"received tensors do not match model.trainable: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k in keys:
        if tuple(received[k].shape) != tuple(full[k].shape):
            raise ValueError(f"received tensor {k}: shape {tuple(received[k].shape)} != {tuple(full[k].shape)}")
    return {k: (received[k] if k in received else v) for k, v in full.items()}


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass(frozen=True)
class Traffic:
    """The server's side of ``model.trainable``: what it sends, and how it completes what comes back."""

    scope: str
    keys: list[str]
    #: :func:`frozen_sha256` of the server's model: every message carries it (``frozen-sha256``)
    frozen: str
    full_bytes: int
    travelling_bytes: int

    @classmethod
    def of(cls, model: nn.Module, scope: str, state: Mapping[str, torch.Tensor]) -> "Traffic":
        """For ``model``'s architecture under ``scope``; ``state`` is the full global model (its frozen rest counts)."""
        keys = set_trainable(model, scope)
        return cls(
            scope=scope,
            keys=keys,
            frozen=frozen_sha256(state, keys),
            full_bytes=state_bytes(state),
            travelling_bytes=state_bytes(travelling(state, keys)),
        )

    @classmethod
    def everything(cls, state: Mapping[str, torch.Tensor]) -> "Traffic":
        """The whole state travels (the log-mel CNN; callers that hold no model)."""
        keys = list(state)
        return cls("all", keys, frozen_sha256(state, keys), state_bytes(state), state_bytes(state))

    def send(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return travelling(state, self.keys)

    def complete(self, full: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> dict:
        return complete(full, received, self.keys)

    def restrict(self, importance: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """A stored importance map cut to the travelling tensors.

        A map saved by a FedAvg run under a wider ``model.trainable`` names tensors no delta of
        this run carries; the elastic constraint would refuse the whole merge over them.
        """
        if importance is None:
            return None
        moving = set(self.keys)
        dropped = sorted(set(importance) - moving)
        if dropped:
            log.warning("importance map: %d tensors outside model.trainable = %s left out", len(dropped), self.scope)
        return {k: v for k, v in importance.items() if k in moving}

    def summary(self, *, n_nodes: int) -> dict[str, Any]:
        """The report's ``traffic``: tensors and bytes per model, and per FedAvg round (down and up)."""
        return {
            "trainable": self.scope,
            "tensors": len(self.keys),
            "bytes_per_model": self.travelling_bytes,
            "full_model_bytes": self.full_bytes,
            "fedavg_bytes_per_round": 2 * n_nodes * self.travelling_bytes,
        }
