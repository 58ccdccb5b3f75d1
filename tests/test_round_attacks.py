"""One hostile node against the unlearning round (issue 11): ``float8`` deltas, request-id ``squat``.

Nodes are scripted functions behind the in-process Grid (no training): Alice files a deletion
and sends an honest delta; Bob is hostile. Every test checks that the attack is refused with a
reason and that Alice's deletion is still published - in the same round or the next one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from serforget.common.checkpoint import state_dict_bytes, state_sha256
from serforget.common.envelope import seal_delta
from serforget.common.keys import init_keys, load_hpke_public, load_signing_private
from serforget.common.release import ReleaseRegistry
from serforget.common.settings import RunSettings
from serforget.server.federation import ServerDir, ServerStateError, open_and_check
from serforget.server.inprocess import InProcessGrid
from serforget.server.unlearning_round import announce_release, retry_by_node, run_unlearning_round

BASE = {"w": torch.ones(3, 2), "b": torch.zeros(2), "steps": torch.tensor(3)}
HONEST = {"w": torch.full((3, 2), 0.01), "b": torch.full((2,), 0.01)}
CFG = RunSettings.from_mapping({"round-timeout": 5.0, "unlearn.timeout": 5.0})
ALICE_RID = "a" * 32


class Node:
    """A scripted node: what it reports as pending, what it sends for ``query.unlearn``."""

    def __init__(self, name: str, keys_dir: Path, server: ServerDir) -> None:
        self.name, self.keys_dir, self.server = name, keys_dir, server
        self.pending: list[str] = []
        self.names: list[str] | None = None  # request ids its envelope names (default: its pending)
        self.delta: dict | None = HONEST
        self.fail_unlearn = False  # its delta never arrives (a timeout, as far as the server can tell)
        self.released: list[dict] = []

    def envelope(self, *, base_version: int, base_sha256: str) -> bytes:
        return seal_delta(
            payload=state_dict_bytes(self.delta),
            node_id=self.name,
            request_ids=self.names or self.pending,
            base_version=base_version,
            base_sha256=base_sha256,
            server_hpke_public=load_hpke_public(self.server.keys_dir / "hpke.pub"),
            node_signing_key=load_signing_private(self.keys_dir / "sign.key"),
        )

    def __call__(self, msg: Message) -> Message:
        kind = msg.metadata.message_type
        if kind == "query.pending":
            return Message(
                RecordDict({"pending": ConfigRecord({"node-id": self.name, "request-ids": self.pending or [""]})}),
                reply_to=msg,
            )
        if kind == "query.unlearn":
            if self.fail_unlearn:
                raise TimeoutError("no reply")
            conf = msg.content["config"]
            env = self.envelope(base_version=int(conf["base-version"]), base_sha256=str(conf["base-sha256"]))
            return Message(
                RecordDict(
                    {
                        "envelope": ConfigRecord({"envelope": env, "node-id": self.name}),
                        "metrics": MetricRecord({"n-forget": 1}),
                    }
                ),
                reply_to=msg,
            )
        if kind == "query.release":
            self.released.append({k: list(v) if isinstance(v, list) else v for k, v in msg.content["config"].items()})
            return Message(RecordDict({"metrics": MetricRecord({"retried": 0})}), reply_to=msg)
        raise ValueError(kind)


@pytest.fixture
def federation(tmp_path: Path):
    server = ServerDir(tmp_path / "server").init()
    nodes = {}
    for name in ("bob", "alice"):  # Bob answers first: his delta is opened before Alice's
        keys = init_keys(key_dir=tmp_path / name, role="node")
        server.enroll(node_id=name, public_key_path=keys.sign_public)
        nodes[name] = Node(name, tmp_path / name, server)
    order = list(nodes.values())
    app: Callable = lambda msg, context: order[context.node_id - 1000](msg)
    grid = InProcessGrid(app, run_config={}, n_nodes=len(order))
    return server, grid, nodes["alice"], nodes["bob"]


def _round(server: ServerDir, grid: InProcessGrid, *, version: int):
    """One unlearning round as the ServerApp runs it: verdicts, publish, per-node announcement."""
    outcome = run_unlearning_round(
        grid,
        cfg=CFG,
        server=server,
        base_state=BASE,
        base_version=version,
        target_forget_acc=0.0,
        importance=None,
        n_nodes=2,
    )
    registry = ReleaseRegistry(server.releases)
    if outcome.merged is not None:
        weights = server.root / "weights.bin"
        weights.write_bytes(state_dict_bytes(outcome.merged))
        registry.publish(
            files={"model.safetensors": weights},
            signing_key=server.signing_key(),
            parent=None,
            applied_request_ids=outcome.applied_request_ids,
            revoke_previous=True,
            reason="test",
        )
    applied = {rid for v in registry.versions() for rid in registry.manifest(v).applied_request_ids}
    announce_release(
        grid,
        cfg=CFG,
        state=BASE,
        version=version,
        applied=sorted(applied),
        retry=retry_by_node(outcome, applied),
        releases=server.releases,
    )
    return outcome, registry


def _reasons(outcome) -> dict[str, str]:
    return {v.node_id: v.reason for v in outcome.verdicts}


def _published(registry: ReleaseRegistry) -> list[tuple[str, ...]]:
    return [registry.manifest(v).applied_request_ids for v in registry.versions()]


# ---------------------------------------------------------------- float8: one node cannot abort the round


def test_float8_delta_is_refused_and_the_honest_delta_is_still_published(federation) -> None:
    server, grid, alice, bob = federation
    alice.pending = [ALICE_RID]
    bob.pending = ["b" * 32]
    bob.delta = {"w": torch.zeros(3, 2).to(torch.float8_e5m2), "b": torch.zeros(2).to(torch.float8_e5m2)}
    outcome, registry = _round(server, grid, version=1)
    reasons = _reasons(outcome)
    assert reasons["bob"].startswith("wrong-dtype"), reasons
    assert reasons["alice"] == "accepted"
    assert _published(registry) == [(ALICE_RID,)]


def test_float8_any_unexpected_error_in_one_delta_is_that_deltas_verdict(federation, monkeypatch) -> None:
    """Not only the failures the checks anticipate: whatever one delta raises stays its verdict."""
    import serforget.server.federation as federation_module

    server, grid, alice, bob = federation
    alice.pending, bob.pending = [ALICE_RID], ["b" * 32]
    real = federation_module.state_dict_from_bytes

    def explode_on_bob(data: bytes, *, source: str):
        if "bob" in source:
            raise NotImplementedError("isfinite is not implemented for Float8_e5m2")
        return real(data, source=source)

    monkeypatch.setattr(federation_module, "state_dict_from_bytes", explode_on_bob)
    outcome, registry = _round(server, grid, version=1)
    assert _reasons(outcome)["bob"].startswith("invalid: NotImplementedError")
    assert _published(registry) == [(ALICE_RID,)]


# ---------------------------------------------------------------- squat: request ids belong to their first reporter


def test_squat_across_rounds_on_a_request_whose_delta_timed_out(federation) -> None:
    server, grid, alice, bob = federation
    # round 1: Alice reports her request, her delta never arrives
    alice.pending, alice.fail_unlearn = [ALICE_RID], True
    outcome, registry = _round(server, grid, version=1)
    assert not any(v.accepted for v in outcome.verdicts) and _published(registry) == []
    # nobody but Alice is told her id (it used to go to every node as retry-request-ids)
    assert bob.released[-1]["retry-request-ids"] == [""]
    assert alice.released[-1]["retry-request-ids"] == [ALICE_RID]
    assert server.request_owners() == {ALICE_RID: "alice"}
    # round 2: Bob (who got the id anyway) claims it and sends an all-zero delta naming it, ahead of Alice
    alice.fail_unlearn = False
    bob.pending = [ALICE_RID]
    bob.delta = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    outcome, registry = _round(server, grid, version=1)
    reasons = _reasons(outcome)
    assert reasons["bob"].startswith("not-owner"), reasons
    assert reasons["alice"] == "accepted"
    assert _published(registry) == [(ALICE_RID,)]
    assert server.request_owners() == {ALICE_RID: "alice"}


def test_squat_in_the_same_round_is_a_per_delta_verdict_not_a_failed_publish(federation) -> None:
    server, grid, alice, bob = federation
    alice.pending = [ALICE_RID]
    bob.pending, bob.names = ["b" * 32], ["b" * 32, ALICE_RID]
    bob.delta = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    outcome, registry = _round(server, grid, version=1)
    reasons = _reasons(outcome)
    assert reasons["bob"].startswith("not-owner"), reasons
    assert reasons["alice"] == "accepted"
    assert _published(registry) == [(ALICE_RID,)]
    # Bob's own request was not applied by his refused delta, and he is told to re-offer it
    assert bob.released[-1]["retry-request-ids"] == ["b" * 32]


def test_squat_contested_first_report_is_owned_by_nobody_and_applied_by_nobody(federation) -> None:
    server, grid, alice, bob = federation
    alice.pending = bob.pending = [ALICE_RID]
    outcome, registry = _round(server, grid, version=1)
    assert all(r.startswith("not-owner") for r in _reasons(outcome).values()), _reasons(outcome)
    assert _published(registry) == [] and server.request_owners() == {}


def test_squat_duplicate_request_within_one_round_is_refused_per_delta(federation) -> None:
    server, _, alice, _ = federation
    alice.pending = [ALICE_RID]
    sha = state_sha256(BASE)
    first, second = (alice.envelope(base_version=1, base_sha256=sha) for _ in range(2))
    seen, round_requests = set(), set()
    verdicts = [
        open_and_check(
            envelope=env,
            claimed_node="alice",
            server=server,
            base_state=BASE,
            base_version=1,
            base_sha256=sha,
            seen=seen,
            max_delta_ratio=0.5,
            owners={ALICE_RID: "alice"},
            round_requests=round_requests,
        )
        for env in (first, second)
    ]
    assert verdicts[0].accepted and verdicts[1].reason.startswith("duplicate-request")
    assert round_requests == {ALICE_RID}


def test_squat_request_owners_survive_a_restart_and_a_malformed_file_is_named(tmp_path: Path) -> None:
    server = ServerDir(tmp_path / "server")
    assert server.bind_requests({"alice": [ALICE_RID]}) == {ALICE_RID: "alice"}
    # a later claim by another node never moves it, also from a fresh ServerDir (a restarted ServerApp)
    assert ServerDir(tmp_path / "server").bind_requests({"bob": [ALICE_RID, "c" * 32]}) == {
        ALICE_RID: "alice",
        "c" * 32: "bob",
    }
    server.request_owners_path.write_text(json.dumps({"format_version": 1, "owners": [ALICE_RID]}))
    with pytest.raises(ServerStateError, match="request_owners.json"):
        server.request_owners()


@pytest.mark.slow
@pytest.mark.parametrize(
    "tamper",
    [
        lambda state: {**state, "extra.weight": torch.zeros(3)},  # e.g. an old node sending the whole model
        lambda state: {k: (torch.zeros(7) if i == 0 else v) for i, (k, v) in enumerate(state.items())},
        lambda state: dict(list(state.items())[1:]),
    ],
    ids=["extra-tensor", "wrong-shape", "missing-tensor"],
)
def test_a_train_reply_with_other_tensors_is_that_nodes_error_and_fedavg_goes_on(tmp_path: Path, tamper) -> None:
    """A FedAvg reply that does not return exactly the tensors sent is left out; the other nodes' round goes on."""
    from flwr.app import ArrayRecord, Context, RecordDict

    from serforget.client.app import app as client_app
    from serforget.common.manifest import by_speaker, read_manifest
    from serforget.server.app import app as server_app
    from tests.helpers.scenario import TINY

    def hostile(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        if msg.metadata.message_type == "train" and int(context.node_config["partition-id"]) == 0:
            reply.content["arrays"] = ArrayRecord(tamper(reply.content["arrays"].to_torch_state_dict()))
        return reply

    work = tmp_path / "sim"
    config = {**TINY, "work-dir": str(work), "retrain-oracle": False}
    grid = InProcessGrid(hostile, run_config=config, n_nodes=4)
    server_app(grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    report = json.loads((work / "report" / "report.json").read_text())
    assert report["releases"]["trained"] == 1 and report["releases"]["unlearned"] == 2
    sizes = [len(u) for u in by_speaker(read_manifest(work / "splits" / "train.csv")).values()]
    per_round = report["retrain_oracle"]["fedavg_examples_per_round"]
    assert set(per_round.values()) == {sum(sizes) - sizes[0]}  # node 0's reply was averaged in no round
