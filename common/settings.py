"""Run settings of the federated app: one dataclass, read from ``[tool.flwr.app.config]``.

Defaults live here and are mirrored verbatim in pyproject.toml (a test keeps the two equal), so
``flwr run .`` with no arguments and a library call without settings behave the same.
Keys are the dataclass fields with ``_`` written as ``-``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class RunSettings:
    # "simulation": the ServerApp provisions a synthetic federation under work-dir;
    # "deployment": real SuperNodes bring their own data dirs (node config "data-dir")
    mode: str = "simulation"
    # where the simulated devices, the server and the report live
    work_dir: str = "~/.serforget/sim"
    # deployment: the server's data dir (default: work-dir/server), an optional held-out manifest
    # for central evaluation, and how many SuperNodes to wait for
    server_dir: str = ""
    eval_manifest: str = ""
    min_nodes: int = 2
    task: str = "4class"
    arch: str = "logmel_cnn"
    model_json: str = "{}"
    seed: int = 0
    device: str = "auto"
    clip_seconds: float = 3.0
    # simulated federation (the synthetic corpus; one node per training speaker)
    synth_speakers: int = 24
    synth_sentences: int = 8
    synth_takes: int = 2
    # what only memory can fit (common.corpora.synth; all three 0 = the generalising regime):
    # each speaker's own way of acting an emotion, ambiguous takes, annotation disagreement
    synth_style_spread: float = 0.0
    synth_ambiguous_rate: float = 0.0
    synth_label_noise: float = 0.15
    valid_speakers: int = 3
    test_speakers: int = 5
    # simulation on an indexed corpus (``serforget corpus index``) instead of the synthetic one:
    # its speakers are split by the same random speaker split (valid/test held out for central
    # evaluation, the retrain-level target and the utility gate); every training speaker is a node
    data_manifest: str = ""
    # GPU share of every simulated node (Flower's client-resources.num-gpus; 0.25 = four nodes per
    # GPU). Ray hides the GPU from a node that asked for none, so ``device = auto`` needs this > 0
    gpus_per_node: float = 0.0
    # FedAvg; resume = start from the newest non-revoked release (num-rounds = 0: unlearning only)
    resume: bool = False
    num_rounds: int = 15
    local_epochs: int = 2
    lr: float = 0.002
    batch_size: int = 16
    fraction_evaluate: float = 0.5
    importance_max_utts: int = 64
    round_timeout: float = 900.0
    # unlearning round
    unlearn_method: str = "rl_adv_ela"
    unlearn_stop: str = "retrain-level"
    unlearn_json: str = "{}"
    unlearn_timeout: float = 900.0
    elastic: bool = True
    elastic_tau: float = 0.05
    elastic_strength: float = 0.8
    max_delta_ratio: float = 0.05
    # utility gate: refuse a delta that alone costs more held-out (validation) UA points than this
    max_ua_drop: float = 2.0
    # default scenario: deletion requests filed on two nodes before the unlearning round
    scenario: bool = True
    scenario_partial_node: int = 1
    scenario_partial_n: int = 10
    scenario_whole_node: int = 2
    # federated retrain oracle (the report's exact-unlearning reference): FedAvg again from the same
    # initialisation, rounds and seeds, every node leaving out the scenario's deleted recordings.
    # Runs only where that is an oracle: scenario requests filed in this run, fresh initialisation
    retrain_oracle: bool = True
    # releases
    onnx_export: bool = True
    int8_max_ua_drop: float = 1.0

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RunSettings":
        """Parse a Flower run config; unknown keys and wrong types name the key."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"unknown run-config key(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            f = known[key]
            kind = type(f.default)
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"run-config {key!r} must be true/false, got {value!r}")
            if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind):
                raise ValueError(f"run-config {key!r} must be {kind.__name__}, got {value!r}")
            values[f.name] = value
        settings = cls(**values)
        if not 0.0 <= settings.gpus_per_node <= 64.0:
            raise ValueError(f"run-config 'gpus-per-node' must be between 0 and 64, got {settings.gpus_per_node!r}")
        if settings.mode not in ("simulation", "deployment"):
            raise ValueError(f"run-config 'mode' must be 'simulation' or 'deployment', got {settings.mode!r}")
        for name in ("model_json", "unlearn_json"):
            settings._json(name)
        return settings

    def _json(self, name: str) -> dict:
        try:
            value = json.loads(getattr(self, name))
        except json.JSONDecodeError as exc:
            raise ValueError(f"run-config {name.replace('_', '-')!r} is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ValueError(f"run-config {name.replace('_', '-')!r} must be a JSON object")
        return value

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir).expanduser().resolve()

    @property
    def server_path(self) -> Path:
        return Path(self.server_dir).expanduser().resolve() if self.server_dir else self.work_path / "server"

    @property
    def data_manifest_path(self) -> Path | None:
        """The indexed corpus of a simulation (None: synthesize one)."""
        return Path(self.data_manifest).expanduser().resolve() if self.data_manifest else None

    @property
    def model_config(self) -> dict:
        return self._json("model_json")

    @property
    def unlearn_overrides(self) -> dict:
        return self._json("unlearn_json")

    def to_toml_lines(self) -> list[str]:
        """``key = value`` lines for pyproject's ``[tool.flwr.app.config]``."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
            out.append(f"{f.name.replace('_', '-')} = {text}")
        return out
