"""Checkpoints: ``model.safetensors`` + ``model.json`` (architecture, labels, provenance, hash).

Why safetensors + JSON: weights load without unpickling code (a checkpoint may come from a
device or a release server), and the JSON alone tells what the weights are. The JSON records the
SHA-256 of the weights file; loading recomputes it, so a tampered or truncated file is rejected
before a single tensor is used.

``model.json`` (format_version 1): ``format_version``, ``arch``, ``config`` (rebuilds the module via
:func:`serforget.common.models.build_model`), ``labels``, ``sample_rate``, ``weights_file``,
``weights_sha256``, ``n_parameters``, ``provenance`` (free-form: data, settings, metrics, time).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from serforget.common.fsutil import atomic_write_bytes, atomic_write_json, sha256_bytes
from serforget.common.models import build_model, model_spec

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
_REQUIRED = ("format_version", "arch", "config", "labels", "sample_rate", "weights_file", "weights_sha256")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, tampered with or does not fit its architecture."""


@dataclass(frozen=True)
class CheckpointMeta:
    arch: str
    config: dict
    labels: tuple[str, ...]
    sample_rate: int
    weights_sha256: str
    provenance: dict

    def to_json(self, n_parameters: int) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "config": self.config,
            "labels": list(self.labels),
            "sample_rate": self.sample_rate,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": self.weights_sha256,
            "n_parameters": n_parameters,
            "provenance": self.provenance,
        }


def state_dict_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise tensors to safetensors bytes (CPU, contiguous) - also the wire format of deltas."""
    return save_safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Identity of a global model: the SHA-256 of its safetensors serialisation."""
    return sha256_bytes(state_dict_bytes(state))


def state_dict_from_bytes(data: bytes, *, source: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes, naming ``source`` in the error if they are malformed."""
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: not a valid safetensors file ({exc})") from None


def save_checkpoint(
    *,
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    labels: Sequence[str],
    sample_rate: int = 16_000,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write weights then metadata (each atomically); the metadata is the commit point."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    data = state_dict_bytes(model.state_dict())
    spec = model_spec(model)
    meta = CheckpointMeta(
        arch=spec["arch"],
        config=spec["config"],
        labels=tuple(labels),
        sample_rate=sample_rate,
        weights_sha256=sha256_bytes(data),
        provenance={"saved_at": time.time(), **dict(provenance or {})},
    )
    atomic_write_bytes(directory / WEIGHTS_FILE, data)
    n_params = sum(p.numel() for p in model.parameters())
    atomic_write_json(directory / META_FILE, meta.to_json(n_params))
    return directory


def read_checkpoint_meta(ckpt_dir: str | os.PathLike[str]) -> CheckpointMeta:
    """Parse and validate ``model.json`` without touching the weights."""
    meta_path = Path(ckpt_dir) / META_FILE
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: checkpoint metadata not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise CheckpointError(f"{meta_path}: missing field(s) {missing}")
    if raw["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unsupported format_version {raw['format_version']!r}")
    if raw["weights_file"] != WEIGHTS_FILE:
        raise CheckpointError(f"{meta_path}: field weights_file must be {WEIGHTS_FILE!r}")
    labels = raw["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise CheckpointError(f"{meta_path}: field labels must be a non-empty list of strings")
    expected_types = {"arch": str, "config": dict, "sample_rate": int, "weights_sha256": str}
    for name, kind in expected_types.items():
        if not isinstance(raw[name], kind) or isinstance(raw[name], bool):
            raise CheckpointError(f"{meta_path}: field {name} must be {kind.__name__}, got {raw[name]!r:.60}")
    provenance = raw.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise CheckpointError(f"{meta_path}: field provenance must be an object")
    return CheckpointMeta(
        arch=raw["arch"],
        config=raw["config"],
        labels=tuple(labels),
        sample_rate=raw["sample_rate"],
        weights_sha256=raw["weights_sha256"],
        provenance=provenance,
    )


def load_checkpoint(
    ckpt_dir: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model and load verified weights; the model is returned in eval mode."""
    directory = Path(ckpt_dir)
    meta = read_checkpoint_meta(directory)
    weights_path = directory / WEIGHTS_FILE
    try:
        data = weights_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: weights file not found") from None
    if sha256_bytes(data) != meta.weights_sha256:
        raise CheckpointError(f"{weights_path}: sha256 does not match {META_FILE} (tampered or truncated)")
    state = state_dict_from_bytes(data, source=str(weights_path))
    try:
        model = build_model(arch=meta.arch, config=meta.config, labels=meta.labels)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / META_FILE}: cannot build {meta.arch!r} from its config ({exc})") from None
    load_weights(model, state, source=str(weights_path))
    return model.to(device).eval(), meta


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Strictly load ``state``, turning key/shape mismatches into a clear :class:`CheckpointError`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the architecture; missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(dict(state), strict=True)
