"""Model registry: one place that turns ``(arch, config, labels)`` into a module.

Every model follows one contract: ``forward(waveform[batch, samples] float32 @ 16 kHz) -> logits``
with feature extraction inside, and ``spec() -> {"arch": ..., ...}`` which, stored in a checkpoint,
rebuilds the same architecture.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from serforget.common.models.cnn import CNNConfig, LogMelCNN

ARCHS: tuple[str, ...] = ("logmel_cnn", "wav2vec2", "hubert")


def build_model(*, arch: str, config: dict, labels: Sequence[str]) -> nn.Module:
    """Build a fresh (or, for transformers with ``pretrained_dir``, pre-trained) model."""
    if arch == "logmel_cnn":
        return LogMelCNN(n_classes=len(labels), config=CNNConfig.from_dict(config))
    if arch in ("wav2vec2", "hubert"):
        from serforget.common.models.hf import build_hf_model

        return build_hf_model(arch=arch, labels=labels, config=config)
    raise ValueError(f"unknown model arch {arch!r}; known: {', '.join(ARCHS)}")


def model_spec(model: nn.Module) -> dict:
    """The JSON-serialisable ``{"arch", "config"}`` that :func:`build_model` accepts back."""
    spec = model.spec()
    if "config" not in spec:
        spec = {"arch": spec["arch"], "config": {k: v for k, v in spec.items() if k != "arch"}}
    return spec
