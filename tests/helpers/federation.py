"""A server dir with enrolled nodes, and sealing/opening deltas as a node would (no Flower)."""

from __future__ import annotations

from pathlib import Path

import torch

from serforget.common.checkpoint import state_dict_bytes, state_sha256
from serforget.common.envelope import seal_delta
from serforget.common.keys import init_keys, load_hpke_public, load_signing_private
from serforget.server.federation import ServerDir, open_and_check

BASE = {"w": torch.ones(3, 2), "b": torch.zeros(2), "steps": torch.tensor(3)}


def make_server(tmp_path: Path) -> ServerDir:
    """A server dir with two enrolled nodes, ``node-a`` and ``node-b`` (their keys under ``tmp_path``)."""
    srv = ServerDir(tmp_path / "server").init()
    for name in ("node-a", "node-b"):
        keys = init_keys(key_dir=tmp_path / name, role="node")
        srv.enroll(node_id=name, public_key_path=keys.sign_public)
    return srv


def seal_as(
    server: ServerDir,
    tmp_path: Path,
    delta: dict,
    *,
    node: str = "node-a",
    signer: str | None = None,
    base_version: int = 1,
    base_sha: str | None = None,
) -> bytes:
    return seal_delta(
        payload=state_dict_bytes(delta),
        node_id=node,
        request_ids=["r1"],
        base_version=base_version,
        base_sha256=base_sha or state_sha256(BASE),
        server_hpke_public=load_hpke_public(server.keys_dir / "hpke.pub"),
        node_signing_key=load_signing_private(tmp_path / (signer or node) / "sign.key"),
    )


def open_as(server: ServerDir, envelope: bytes, seen: set, *, claimed: str = "node-a", ratio: float = 0.5):
    return open_and_check(
        envelope=envelope,
        claimed_node=claimed,
        server=server,
        base_state=BASE,
        base_version=1,
        base_sha256=state_sha256(BASE),
        seen=seen,
        max_delta_ratio=ratio,
    )
