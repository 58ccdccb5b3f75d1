"""The unlearning round: find pending deletions, collect sealed deltas, verify, merge elastically.

Every node's reply is hostile input: a malformed reply or delta is that node's verdict, and the
round goes on with the others. Request ids are bound to the node that first reports them
(``ServerDir.bind_requests``) and a node is only ever told its own ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from serforget.common.checkpoint import state_sha256
from serforget.common.protocol import (
    APPLIED_REQUEST_IDS,
    ARRAYS,
    BASE_SHA256,
    BASE_VERSION,
    CONFIG,
    DEVICE,
    DEVICE_NOTE,
    ENVELOPE,
    FROZEN_SHA256,
    METRICS,
    NODE_ID,
    PENDING,
    QUERY_PENDING,
    QUERY_RELEASE,
    QUERY_UNLEARN,
    RELEASE_MANIFESTS,
    RELEASE_SIGNATURES,
    RELEASE_VERSION,
    REQUEST_IDS,
    RETRY_REQUEST_IDS,
    TARGET_FORGET_ACC,
)
from serforget.common.release import MANIFEST_NAME, SIGNATURE_NAME, ReleaseRegistry
from serforget.common.settings import RunSettings
from serforget.common.traffic import Traffic
from serforget.server.federation import (
    DeltaVerdict,
    ServerDir,
    applied_request_ids,
    gate_on_held_out,
    merge_deltas,
    open_and_check,
)
from serforget.server.strategy import node_device

log = logging.getLogger("serforget.server")


@dataclass
class RoundOutcome:
    pending: dict[int, list[str]] = field(default_factory=dict)
    node_names: dict[int, str] = field(default_factory=dict)
    verdicts: list[DeltaVerdict] = field(default_factory=list)
    node_metrics: dict[str, dict] = field(default_factory=dict)
    merged: dict[str, torch.Tensor] | None = None
    #: the same deltas summed without the elastic constraint (reported as the ablation)
    merged_unconstrained: dict[str, torch.Tensor] | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0

    @property
    def applied_request_ids(self) -> list[str]:
        return [rid for v in self.verdicts if v.accepted for rid in v.header.request_ids]


def _query(grid: Grid, node_ids: list[int], kind: str, content: RecordDict, timeout: float) -> list[Message]:
    messages = [Message(content=content, message_type=f"query.{kind}", dst_node_id=n) for n in node_ids]
    return list(grid.send_and_receive(messages, timeout=timeout))


def wait_for_nodes(grid: Grid, *, n_nodes: int, timeout: float) -> list[int]:
    """The connected node ids once ``n_nodes`` are online (or whatever is online at ``timeout``).

    An unlearning-only run has no FedAvg round to wait for devices; without this it would ask
    only the devices that happened to be connected at its first instant.
    """
    deadline = time.monotonic() + timeout
    ids = list(grid.get_node_ids())
    while len(ids) < n_nodes and time.monotonic() < deadline:
        time.sleep(1.0)
        ids = list(grid.get_node_ids())
    if len(ids) < n_nodes:
        log.warning("only %d of %d nodes online after %.0f s; asking those", len(ids), n_nodes, timeout)
    return ids


def find_pending(grid: Grid, *, timeout: float) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Flower node id -> pending request ids (nodes that have some), and -> node name (all that answer)."""
    replies = _query(grid, list(grid.get_node_ids()), QUERY_PENDING, RecordDict({CONFIG: ConfigRecord({})}), timeout)
    pending, names = {}, {}
    for reply in replies:
        src = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("query.pending failed on node %s: %s", src, reply.error.reason)
            continue
        try:
            name = reply.content[PENDING][NODE_ID]
            ids = [r for r in reply.content[PENDING][REQUEST_IDS] if r]
            if not isinstance(name, str) or not all(isinstance(r, str) for r in ids):
                raise TypeError("node-id and request-ids must be strings")
        except Exception as exc:  # noqa: BLE001 - a malformed reply costs that node its turn, not the round
            log.warning("query.pending reply of node %s is malformed: %s: %s", src, type(exc).__name__, exc)
            continue
        names[src] = name
        if ids:
            pending[src] = list(dict.fromkeys(ids))
    return pending, names


def bind_pending(server: ServerDir, pending: Mapping[int, list[str]], names: Mapping[int, str]) -> dict[str, str]:
    """Bind every reported request id to the node that first reported it; returns all owners.

    A node reporting an id another node owns is logged; its delta naming it will be refused. An
    id first reported by two nodes in the same round is owned by nobody (``""``) this round.
    """
    claims: dict[str, list[str]] = {}
    for src, ids in pending.items():
        claims.setdefault(names[src], []).extend(ids)
    owners = server.bind_requests(claims)
    for node, ids in claims.items():
        foreign = sorted(rid for rid in ids if owners.get(rid) != node)
        if foreign:
            log.warning("node %s reports requests it does not own (or contested): %s", node, foreign)
    # an id two nodes first reported at once belongs to nobody yet: every delta naming it is refused
    contested = {rid for ids in claims.values() for rid in ids if rid not in owners}
    return {**owners, **dict.fromkeys(contested, "")}


def run_unlearning_round(
    grid: Grid,
    *,
    cfg: RunSettings,
    server: ServerDir,
    base_state: Mapping[str, torch.Tensor],
    base_version: int,
    target_forget_acc: float,
    importance: Mapping[str, torch.Tensor] | None,
    n_nodes: int,
    score: Callable[[Mapping[str, torch.Tensor]], float] | None = None,
    traffic: Traffic | None = None,
) -> RoundOutcome:
    """Ask nodes with pending deletions to unlearn; accept only verifiable, well-formed, harmless deltas.

    ``score`` (held-out UA of given weights) enables the utility gate; without it the gate is off.
    ``traffic`` (``model.trainable``): nodes get and return only the travelling tensors; deltas are
    checked against those and merged into the full ``base_state`` (default: everything travels).
    """
    traffic = traffic or Traffic.everything(base_state)
    start = time.perf_counter()
    wait_for_nodes(grid, n_nodes=n_nodes, timeout=cfg.round_timeout)
    pending, names = find_pending(grid, timeout=cfg.round_timeout)
    outcome = RoundOutcome(pending=pending, node_names=names)
    if not outcome.pending:
        return outcome
    owners = bind_pending(server, pending, names)
    sent = traffic.send(base_state)
    arrays = ArrayRecord(sent)
    config = ConfigRecord(
        {
            BASE_VERSION: base_version,
            BASE_SHA256: state_sha256(sent),
            FROZEN_SHA256: traffic.frozen,
            TARGET_FORGET_ACC: float(target_forget_acc),
        }
    )
    replies = _query(
        grid, list(outcome.pending), QUERY_UNLEARN, RecordDict({ARRAYS: arrays, CONFIG: config}), cfg.unlearn_timeout
    )
    outcome.bytes_sent = len(outcome.pending) * traffic.travelling_bytes
    seen = server.seen_ids()
    already = applied_request_ids(server.releases)
    round_requests: set[str] = set()
    for reply in replies:
        src = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("query.unlearn failed on node %s: %s", src, reply.error.reason)
            outcome.verdicts.append(DeltaVerdict(names.get(src, str(src)), False, f"node-error: {reply.error.reason}"))
            continue
        try:
            envelope = bytes(reply.content[ENVELOPE][ENVELOPE])
            metrics = dict(reply.content[METRICS])
        except Exception as exc:  # noqa: BLE001 - a malformed reply is that node's verdict
            outcome.verdicts.append(
                DeltaVerdict(names.get(src, str(src)), False, f"invalid: reply: {type(exc).__name__}: {exc}")
            )
            continue
        outcome.bytes_received += len(envelope)
        verdict = open_and_check(
            envelope=envelope,
            claimed_node=names.get(src, ""),
            server=server,
            base_state=sent,
            base_version=base_version,
            base_sha256=config[BASE_SHA256],
            seen=seen,
            max_delta_ratio=cfg.max_delta_ratio,
            applied_request_ids=already,
            owners=owners,
            round_requests=round_requests,
        )
        log.info("delta from %s: %s", verdict.node_id, verdict.reason)
        outcome.verdicts.append(verdict)
        info = node_device(reply)
        if info is not None:
            metrics.update({DEVICE: info["device"], DEVICE_NOTE: info["note"]})
        outcome.node_metrics[verdict.node_id] = metrics
    merge = dict(
        importance=importance,
        constraint=cfg.constraint,
        constraint_tau=cfg.constraint_tau,
        constraint_strength=cfg.constraint_strength,
    )
    if score is not None:
        gated = gate_on_held_out(outcome.verdicts, base=base_state, score=score, max_ua_drop=cfg.max_ua_drop, **merge)
        for before, after in zip(outcome.verdicts, gated):
            if before.accepted and not after.accepted:
                log.warning("delta from %s refused: %s", after.node_id, after.reason)
        outcome.verdicts = gated
    else:
        log.warning("no held-out set on the server: deltas are not gated on held-out UA")
    accepted = [v for v in outcome.verdicts if v.accepted]
    if accepted:
        # an id first named by an accepted envelope (not reported in query.pending) is its signer's
        server.bind_requests({v.header.node_id: list(v.header.request_ids) for v in accepted})
        server.remember([v.header.envelope_id for v in accepted])
        deltas = [v.delta for v in accepted]
        outcome.merged = merge_deltas(base_state, deltas, **merge)
        outcome.merged_unconstrained = merge_deltas(
            base_state, deltas, importance=None, constraint=False, constraint_tau=1.0, constraint_strength=0.0
        )
    outcome.seconds = time.perf_counter() - start
    return outcome


def retry_by_node(outcome: RoundOutcome, applied: set[str]) -> dict[int, list[str]]:
    """Flower node id -> its own pending request ids that no release applies (to re-offer)."""
    return {src: [rid for rid in ids if rid not in applied] for src, ids in outcome.pending.items()}


def signed_manifests(releases: Path, *, version: int, applied: list[str]) -> tuple[list[bytes], list[bytes]]:
    """Manifest and signature bytes of release ``version`` and of every release applying one of ``applied``.

    Nodes adopt weights and purge audio only on what these signatures prove (``query.release``
    crosses the SuperLink, which does not hold the release key).
    """
    registry = ReleaseRegistry(releases)
    wanted = set(applied)
    versions = [
        v for v in registry.versions() if v == version or wanted & set(registry.manifest(v).applied_request_ids)
    ]
    pairs = [(registry.path(v) / MANIFEST_NAME, registry.path(v) / SIGNATURE_NAME) for v in versions]
    return [m.read_bytes() for m, _ in pairs], [s.read_bytes() for _, s in pairs]


def announce_release(
    grid: Grid,
    *,
    cfg: RunSettings,
    state: Mapping[str, torch.Tensor],
    version: int,
    applied: list[str],
    retry: Mapping[int, list[str]],
    releases: Path,
    traffic: Traffic | None = None,
) -> list[Message]:
    """``query.release`` to every node: adopt ``version``; purge applied requests, retry rejected ones.

    ``retry`` is per node: each node is sent only the ids it reported itself, never another
    node's (a leaked id is what a squatter needs). The signed manifests let a node check the
    weights and the applied ids against the release key it pinned before it adopts or purges.
    """
    manifests, signatures = signed_manifests(releases, version=version, applied=applied)
    traffic = traffic or Traffic.everything(state)
    arrays = ArrayRecord(traffic.send(state))  # a node completes and verifies the whole model against the manifest
    messages = [
        Message(
            content=RecordDict(
                {
                    ARRAYS: arrays,
                    CONFIG: ConfigRecord(
                        {
                            RELEASE_VERSION: version,
                            APPLIED_REQUEST_IDS: applied or [""],
                            RETRY_REQUEST_IDS: list(retry.get(node, [])) or [""],
                            RELEASE_MANIFESTS: manifests,
                            RELEASE_SIGNATURES: signatures,
                            FROZEN_SHA256: traffic.frozen,
                        }
                    ),
                }
            ),
            message_type=f"query.{QUERY_RELEASE}",
            dst_node_id=node,
        )
        for node in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    for reply in replies:
        if reply.has_error():
            log.warning("query.release failed on node %s: %s", reply.metadata.src_node_id, reply.error.reason)
    return replies
