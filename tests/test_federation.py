"""Server-side checks of sealed deltas and the merge rule (no Flower involved)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serforget.client.node import weight_delta
from serforget.server.federation import (
    DeltaError,
    DeltaVerdict,
    ServerDir,
    check_delta,
    gate_on_held_out,
    merge_deltas,
    weighted_average,
)
from tests.helpers.federation import BASE, open_as, seal_as


def test_accepts_a_valid_delta_once(server: ServerDir, tmp_path: Path) -> None:
    delta = {"w": torch.full((3, 2), 0.01), "b": torch.full((2,), 0.01)}
    env, seen = seal_as(server, tmp_path, delta), set()
    verdict = open_as(server, env, seen)
    assert verdict.accepted and torch.equal(verdict.delta["w"], delta["w"])
    replay = open_as(server, env, seen)
    assert not replay.accepted and replay.reason.startswith("replay")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("wrong-version", "wrong-base"),
        ("wrong-hash", "wrong-base"),
        ("other-node-key", "bad-signature"),
        ("claimed-by-other", "node-mismatch"),
        ("tampered", ""),
        ("huge", "too-large"),
        ("nan", "non-finite"),
        ("shape", "wrong-shape"),
        ("keys", "wrong-keys"),
    ],
)
def test_rejects_bad_envelopes_and_deltas(server: ServerDir, tmp_path: Path, case: str, expected: str) -> None:
    good = {"w": torch.full((3, 2), 0.01), "b": torch.full((2,), 0.01)}
    claimed = "node-a"
    if case == "wrong-version":
        env = seal_as(server, tmp_path, good, base_version=2)
    elif case == "wrong-hash":
        env = seal_as(server, tmp_path, good, base_sha="0" * 64)
    elif case == "other-node-key":
        env = seal_as(server, tmp_path, good, signer="node-b")
    elif case == "claimed-by-other":
        env, claimed = seal_as(server, tmp_path, good), "node-b"
    elif case == "tampered":
        raw = bytearray(seal_as(server, tmp_path, good))
        raw[len(raw) // 2] ^= 0xFF
        env = bytes(raw)
    elif case == "huge":
        env = seal_as(server, tmp_path, {"w": torch.full((3, 2), 10.0), "b": torch.zeros(2)})
    elif case == "nan":
        env = seal_as(server, tmp_path, {"w": torch.full((3, 2), float("nan")), "b": torch.zeros(2)})
    elif case == "shape":
        env = seal_as(server, tmp_path, {"w": torch.zeros(2, 3), "b": torch.zeros(2)})
    else:
        env = seal_as(server, tmp_path, {"w": torch.zeros(3, 2)})
    seen: set = set()
    verdict = open_as(server, env, seen, claimed=claimed)
    assert not verdict.accepted and verdict.delta is None
    assert verdict.reason.startswith(expected), verdict.reason
    assert seen == set()  # a rejected envelope changes nothing


def test_check_delta_ignores_integer_buffers_and_bounds_norm() -> None:
    assert check_delta({"w": torch.zeros(3, 2), "b": torch.zeros(2)}, BASE, max_delta_ratio=0.1) == 0.0
    with pytest.raises(DeltaError, match="too-large"):
        check_delta({"w": torch.ones(3, 2), "b": torch.zeros(2)}, BASE, max_delta_ratio=0.1)


def test_merge_sums_deltas_and_elastic_rule_limits_important_weights() -> None:
    d1 = {"w": torch.full((3, 2), 0.1), "b": torch.zeros(2)}
    d2 = {"w": torch.full((3, 2), 0.2), "b": torch.full((2,), 0.1)}
    merged = merge_deltas(
        BASE, [d1, d2], importance=None, constraint=False, constraint_tau=0.1, constraint_strength=1.0
    )
    assert torch.allclose(merged["w"], torch.full((3, 2), 1.3)) and torch.allclose(merged["b"], torch.full((2,), 0.1))
    assert torch.equal(merged["steps"], BASE["steps"])
    importance = {"w": torch.tensor([[1.0, 0.0]] * 3), "b": torch.zeros(2)}
    constrained = merge_deltas(
        BASE, [d1], importance=importance, constraint=True, constraint_tau=1.0, constraint_strength=1.0
    )
    moved = (constrained["w"] - BASE["w"]).abs()
    assert (moved[:, 0] < moved[:, 1]).all()  # the important column moves less


def test_held_out_gate_refuses_only_the_delta_that_costs_too_much_ua() -> None:
    # a stand-in score: held-out UA falls as the bias moves away from 0 (a crafted delta pushes it far)
    score = lambda state: 0.8 - float(state["b"].abs().sum())
    honest = DeltaVerdict(
        "node-a", True, "accepted", delta={"w": torch.full((3, 2), 0.01), "b": torch.full((2,), 0.002)}
    )
    harmful = DeltaVerdict("node-b", True, "accepted", delta={"w": torch.zeros(3, 2), "b": torch.full((2,), 0.05)})
    refused = DeltaVerdict("node-c", False, "too-large")
    gated = gate_on_held_out(
        [honest, harmful, refused],
        base=BASE,
        score=score,
        max_ua_drop=2.0,
        importance=None,
        constraint=False,
        constraint_tau=0.05,
        constraint_strength=1.0,
    )
    assert [v.node_id for v in gated] == ["node-a", "node-b", "node-c"]
    assert gated[0].accepted and gated[0].ua_drop == pytest.approx(0.4)
    assert (
        not gated[1].accepted
        and gated[1].reason.startswith("harms-held-out")
        and gated[1].ua_drop == pytest.approx(10.0)
    )
    assert gated[2] is refused
    # the elastic constraint is applied before scoring, exactly as the merge will apply it
    on_important = DeltaVerdict(
        "node-b", True, "accepted", delta={"w": torch.zeros(3, 2), "b": torch.tensor([0.05, 0.0])}
    )
    importance = {"w": torch.zeros(3, 2), "b": torch.tensor([1.0, 0.0])}
    gate = dict(
        base=BASE, score=score, max_ua_drop=2.0, importance=importance, constraint_tau=0.05, constraint_strength=1.0
    )
    assert not gate_on_held_out([on_important], constraint=False, **gate)[0].accepted
    constrained = gate_on_held_out([on_important], constraint=True, **gate)[0]
    assert constrained.accepted and constrained.ua_drop == pytest.approx(0.0)
    with pytest.raises(ValueError, match="max_ua_drop"):
        gate_on_held_out(
            [honest],
            base=BASE,
            score=score,
            max_ua_drop=-1.0,
            importance=None,
            constraint=False,
            constraint_tau=0.05,
            constraint_strength=1.0,
        )


def test_weighted_average_of_importance() -> None:
    avg = weighted_average([({"w": torch.ones(2)}, 1.0), ({"w": torch.zeros(2)}, 3.0)])
    assert torch.allclose(avg["w"], torch.full((2,), 0.25))
    with pytest.raises(ValueError):
        weighted_average([])


def test_weight_delta_skips_integer_buffers() -> None:
    updated = {k: v + 1 for k, v in BASE.items()}
    assert set(weight_delta(updated, BASE)) == {"w", "b"}


def test_server_start_repairs_a_stale_index_without_locking_a_current_one(
    server: ServerDir, tmp_path: Path, monkeypatch
) -> None:
    import fcntl
    import os
    import threading

    from serforget.common.keys import load_signing_public
    from serforget.common.release import ReleaseRegistry

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    registry = ReleaseRegistry(server.releases)
    registry.publish(files={"model.safetensors": weights}, signing_key=server.signing_key(), parent=None)
    public = load_signing_public(server.keys_dir / "sign.pub")
    # a current index: start-up must not wait for the registry lock another writer holds
    lock = os.open(server.releases / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    starter = threading.Thread(target=ServerDir(server.root).init, daemon=True)
    starter.start()
    starter.join(timeout=30)
    os.close(lock)
    assert not starter.is_alive()
    # a revocation whose index update was lost (a crash): start-up re-signs the index
    monkeypatch.setattr(ReleaseRegistry, "_write_index", lambda self, *, signing_key: None)
    registry.revoke(versions=[1], reason="test", signing_key=server.signing_key())
    monkeypatch.undo()
    assert registry.read_index(public_key=public).revoked() == {}
    ServerDir(server.root).init()
    assert registry.read_index(public_key=public).revoked() == {1: "test"}


def test_server_start_re_signs_an_index_past_half_its_lifetime(server: ServerDir, tmp_path: Path, monkeypatch) -> None:
    """freeze: devices refuse an expired index, so the server renews one that is aging before it expires."""
    import time

    from serforget.common import release as release_module
    from serforget.common.keys import load_signing_public

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    registry = release_module.ReleaseRegistry(server.releases)
    registry.publish(files={"model.safetensors": weights}, signing_key=server.signing_key(), parent=None)
    public = load_signing_public(server.keys_dir / "sign.pub")
    first = registry.read_index(public_key=public)
    ServerDir(server.root).init()  # fresh index: left alone
    assert registry.read_index(public_key=public).sequence == first.sequence
    lifetime = release_module.DEFAULT_INDEX_LIFETIME_S
    later = time.time() + 0.6 * lifetime
    monkeypatch.setattr(time, "time", lambda: later)
    ServerDir(server.root).init()
    renewed = registry.read_index(public_key=public)
    assert renewed.sequence == first.sequence + 1 and renewed.expires > first.expires
