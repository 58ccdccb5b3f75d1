"""The compact default SER model: log-mel front end + small CNN, waveform in, logits out.

Why this shape: it trains in minutes on 2 CPU cores, keeps the front end inside the module (one
graph for training, PGD attacks in the waveform domain and ONNX export), and uses GroupNorm
instead of BatchNorm so that the forward pass never depends on the rest of the batch. That matters
here: unlearning and federated updates run on tiny batches (a 10-utterance forget set) whose
statistics would otherwise overwrite running BatchNorm buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from serforget.common.models.frontend import LogMel
from serforget.common.validation import FieldError


@dataclass(frozen=True)
class CNNConfig:
    """Architecture settings stored in checkpoints so a model can be rebuilt exactly."""

    sample_rate: int = 16_000
    n_mels: int = 40
    n_fft: int = 400
    hop_length: int = 160
    channels: tuple[int, ...] = (16, 32, 48, 64)
    hidden: int = 64
    dropout: float = 0.2
    groups: int = 4

    def __post_init__(self) -> None:
        """Refuse a shape no model can have, naming the field (the run config names the key)."""
        for name in ("sample_rate", "n_mels", "n_fft", "hop_length", "hidden", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FieldError("CNNConfig", name, "must be a positive integer")
        if not self.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels):
            raise FieldError("CNNConfig", "channels", "must be one or more positive integers")
        if isinstance(self.dropout, bool) or not 0.0 <= self.dropout < 1.0:
            raise FieldError("CNNConfig", "dropout", "must lie in [0, 1)")

    @classmethod
    def from_dict(cls, raw: dict) -> "CNNConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown logmel_cnn config keys: {unknown}")
        values = dict(raw)
        if "channels" in values:
            values["channels"] = tuple(int(c) for c in values["channels"])
        return cls(**values)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["channels"] = list(self.channels)
        return out


def _conv_block(c_in: int, c_out: int, groups: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(min(groups, c_out), c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class LogMelCNN(nn.Module):
    """``forward(waveform[batch, samples]) -> logits[batch, n_classes]``."""

    arch = "logmel_cnn"

    def __init__(self, *, n_classes: int, config: CNNConfig = CNNConfig()) -> None:
        super().__init__()
        self.config = config
        self.n_classes = n_classes
        self.frontend = LogMel(
            sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length, n_mels=config.n_mels
        )
        blocks = []
        c_in = 1
        for i, c_out in enumerate(config.channels):
            blocks.append(_conv_block(c_in, c_out, config.groups, pool=i < len(config.channels) - 1))
            c_in = c_out
        self.encoder = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Linear(2 * c_in, config.hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, n_classes),
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.frontend(waveform))

    def classify_features(self, logmel: torch.Tensor) -> torch.Tensor:
        """Logits from the front end's output ``[batch, n_mels, frames]`` (the front end has no
        parameters, so training may compute it once: ``TrainConfig.cache_frontend``)."""
        feats = self.encoder(logmel.unsqueeze(1))
        pooled = torch.cat([feats.mean(dim=(2, 3)), feats.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)

    def spec(self) -> dict:
        return {"arch": self.arch, "config": self.config.to_dict()}
