"""Training and evaluation loops shared by the CLI, the ClientApp and the unlearning baselines.

One loop for every caller keeps centralized training, a node's FedAvg round and the Retrain
oracle comparable: same optimiser, same batching, same seed handling.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from serforget.common.data import WaveformSet
from serforget.common.device import resolve_device
from serforget.common.metrics import classification_report


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (mirrored by CLI flags and ``[tool.flwr.app.config]``)."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"
    #: keep the weights of the epoch with the best validation UA (when a validation set is given).
    #: False trains to the last epoch, as practitioners fine-tune an SER model to convergence on
    #: its training set (see :data:`CONVERGED`): the regime in which a model remembers utterances.
    select_best: bool = True
    #: Compute a parameter-free front end (the log-mel of ``logmel_cnn``) once for the whole
    #: training set instead of every epoch. The same arithmetic up to float summation order; it
    #: only pays off when a model is trained many times (benchmarks, shadow models).
    cache_frontend: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"TrainConfig: epochs >= 0, batch_size >= 1, lr > 0, weight_decay >= 0; got {self}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"TrainConfig.label_smoothing must lie in [0, 1); got {self.label_smoothing}")


#: Fine-tuning as practitioners do it: a fixed number of epochs, no early stopping, the last
#: weights kept. On the memorising synthetic corpus this fits the training set (>= 97 %).
CONVERGED = TrainConfig(epochs=40, select_best=False)


@dataclass
class TrainHistory:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_valid_ua: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def iterate_batches(n: int, batch_size: int, *, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Index batches over ``n`` items, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def train_epoch(
    model: nn.Module,
    data: WaveformSet,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    """One pass over ``data``; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for idx in iterate_batches(len(data), batch_size, generator=generator):
        x = data.waves[idx].to(device)
        y = data.targets[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)


def cached_frontend(
    model: nn.Module, data: WaveformSet, *, device: torch.device, batch_size: int = 64
) -> WaveformSet | None:
    """``data`` with its waveforms replaced by the model's front-end output, or ``None``.

    ``None`` when the model has no separable, parameter-free front end (``frontend`` plus
    ``classify_features``), so the caller falls back to waveforms.
    """
    frontend = getattr(model, "frontend", None)
    if frontend is None or not hasattr(model, "classify_features") or any(True for _ in frontend.parameters()):
        return None
    with torch.no_grad():
        feats = [frontend(data.waves[idx].to(device)).cpu() for idx in iterate_batches(len(data), batch_size)]
    return WaveformSet(waves=torch.cat(feats), targets=data.targets, utt_ids=data.utt_ids, speakers=data.speakers)


class _FeatureHead(nn.Module):
    """The model after its front end, sharing its parameters (train mode follows the model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model.classify_features(feats)


def train_model(
    model: nn.Module,
    train: WaveformSet,
    *,
    config: TrainConfig = TrainConfig(),
    valid: WaveformSet | None = None,
    labels: Sequence[str] | None = None,
    progress: bool = True,
) -> TrainHistory:
    """Train ``model`` in place with AdamW; with ``valid`` the best-UA epoch's weights are kept."""
    if len(train) == 0:
        raise ValueError("training set is empty")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history = TrainHistory()
    best_state = None
    start = time.perf_counter()
    stepped, data = model, train
    if config.cache_frontend:
        features = cached_frontend(model, train, device=device)
        if features is not None:
            stepped, data = _FeatureHead(model), features
    bar = tqdm(range(config.epochs), desc="training", unit="epoch", disable=not progress)
    for epoch in bar:
        loss = train_epoch(
            stepped,
            data,
            optimizer=optimizer,
            loss_fn=loss_fn,
            batch_size=config.batch_size,
            generator=generator,
            device=device,
        )
        scheduler.step()
        row: dict = {"epoch": epoch + 1, "train_loss": loss}
        if valid is not None and len(valid):
            report = evaluate_model(model, valid, labels=labels or _index_labels(train, valid), device=device)
            row["valid_ua"] = report["ua"]
            if history.best_valid_ua is None or report["ua"] > history.best_valid_ua:
                history.best_valid_ua, history.best_epoch = report["ua"], epoch + 1
                best_state = copy.deepcopy(model.state_dict())
        history.epochs.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "epoch"})
    if config.select_best and best_state is not None:
        model.load_state_dict(best_state)
    history.seconds = time.perf_counter() - start
    model.eval()
    return history


def _index_labels(*sets: WaveformSet) -> list[str]:
    n = int(max(int(s.targets.max()) for s in sets if len(s))) + 1
    return [str(i) for i in range(n)]


@torch.no_grad()
def predict_logits(
    model: nn.Module, data: WaveformSet, *, batch_size: int = 64, device: str | torch.device = "auto"
) -> torch.Tensor:
    """Logits ``[N, C]`` on the CPU, computed in eval mode (the model's mode is restored)."""
    dev = resolve_device(device)
    was_training = model.training
    model.eval().to(dev)
    outs = [model(data.waves[idx].to(dev)).float().cpu() for idx in iterate_batches(len(data), batch_size)]
    model.train(was_training)
    if not outs:
        return torch.zeros(0, 0)
    return torch.cat(outs)


def evaluate_model(
    model: nn.Module,
    data: WaveformSet,
    *,
    labels: Sequence[str],
    batch_size: int = 64,
    device: str | torch.device = "auto",
) -> dict:
    """UA, WA, macro-F1, per-class recall and confusion matrix of ``model`` on ``data``."""
    logits = predict_logits(model, data, batch_size=batch_size, device=device)
    preds = logits.argmax(dim=1) if len(data) else torch.zeros(0, dtype=torch.long)
    return classification_report(data.targets.tolist(), preds.tolist(), labels=labels)
