"""Glue between Flower's Context/records and the node functions of ``serforget.client.node``.

Kept apart from the handlers so that each handler stays a few lines: resolve this node's data
directory, rebuild the model from the run config, convert records to tensors and back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context

from serforget.common.keys import load_hpke_public
from serforget.common.labels import task_labels
from serforget.common.models import build_model
from serforget.client.node import NodeDir
from serforget.common.protocol import SERVER_HPKE_PIN
from serforget.common.settings import RunSettings


def settings(context: Context) -> RunSettings:
    return RunSettings.from_mapping(context.run_config)


def node_dir(context: Context, cfg: RunSettings) -> NodeDir:
    """``data-dir`` from the node config (deployment) or the partition's folder (simulation)."""
    if "data-dir" in context.node_config:
        return NodeDir(Path(str(context.node_config["data-dir"])).expanduser())
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    root = cfg.work_path / "nodes" / f"{pid:03d}"
    if not (root / "node.json").exists():
        raise ValueError(f"simulation node {pid}/{n}: {root} is not provisioned (the ServerApp provisions it first)")
    return NodeDir(root)


def model_from(arrays: ArrayRecord, cfg: RunSettings) -> torch.nn.Module:
    model = build_model(arch=cfg.arch, config=cfg.model_config, labels=task_labels(cfg.task))
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def pinned_server_key(node: NodeDir):
    """The server's HPKE public key pinned on the device at enrollment (never taken from a message)."""
    return load_hpke_public(node.keys_dir / SERVER_HPKE_PIN)
