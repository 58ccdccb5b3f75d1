"""Glue between Flower's Context/records and the node functions of ``serforget.client.node``.

Kept apart from the handlers so that each handler stays a few lines: resolve this node's data
directory, rebuild the model from the run config, convert records to tensors and back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from serforget.client.node import NodeDir
from serforget.common.device import resolve_device
from serforget.common.keys import load_hpke_public
from serforget.common.labels import task_labels
from serforget.common.models import build_model
from serforget.common.protocol import DEVICE, DEVICE_NOTE, FROZEN_SHA256, NODE_ID, SERVER_HPKE_PIN
from serforget.common.settings import RunSettings
from serforget.common.traffic import complete, frozen_sha256, set_trainable


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


def model_from(arrays: ArrayRecord, cfg: RunSettings, conf: ConfigRecord) -> tuple[torch.nn.Module, list[str]]:
    """The model the server sent and the keys that travel (``model.trainable``, common.traffic).

    The message carries only the travelling tensors; the rest is this device's own copy (its
    pre-trained checkpoint), which must hash as the server's does (``frozen-sha256``): a device
    with another checkpoint refuses instead of training a different model.
    """
    model = build_model(arch=cfg.model_arch, config=cfg.model_config, labels=task_labels(cfg.task))
    keys = set_trainable(model, cfg.model_trainable)
    own = model.state_dict()
    if len(keys) < len(own) and conf.get(FROZEN_SHA256) != frozen_sha256(own, keys):
        raise ValueError(
            "this device's pre-trained checkpoint (model.pretrained-dir) differs from the server's: "
            "the tensors that stay on the devices do not hash the same (frozen-sha256)"
        )
    model.load_state_dict(complete(own, arrays.to_torch_state_dict(), keys), strict=True)
    return model, keys


def pinned_server_key(node: NodeDir):
    """The server's HPKE public key pinned on the device at enrollment (never taken from a message)."""
    return load_hpke_public(node.keys_dir / SERVER_HPKE_PIN)


def node_device(cfg: RunSettings) -> tuple[str, str]:
    """The device this node computes on, and a note when it is not what the run config asked for.

    ``device = cuda`` without a visible GPU raises (``resolve_device``): never a silent CPU run.
    ``auto`` with ``gpus-per-node > 0`` but no GPU visible to this node runs on the CPU and says so.
    """
    device = str(resolve_device(cfg.device))
    note = ""
    if cfg.gpus_per_node > 0 and device == "cpu":
        note = f"gpus-per-node = {cfg.gpus_per_node:g} but no CUDA device is visible to this node: ran on the CPU"
    return device, note


def node_info(node: NodeDir, device: str, note: str) -> ConfigRecord:
    """What a reply says about where it was computed (shown per node in the report)."""
    return ConfigRecord({NODE_ID: node.node_id, DEVICE: device, DEVICE_NOTE: note})
