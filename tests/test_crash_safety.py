"""Crash safety: SIGKILL during release publishes, ledger transitions, replay-list and request-owner updates.

The trial machinery lives in :mod:`benchmarks.bench_crash` (which also writes the committed
figures); these tests run it and require zero lost or corrupted records. A short run keeps the
fast suite honest; the full 50-trials-per-store run is marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_crash import ledger_trials, owners_trials, release_trials, run_all, seen_trials


def _assert_clean(result) -> None:
    assert result.ok, f"{result.store}: {result.problems}"
    assert result.lost == 0 and result.corrupted == 0 and result.recovery_failures == 0


def test_a_few_kills_of_each_writer_lose_and_corrupt_nothing(tmp_path: Path) -> None:
    for trials, folder in (
        (release_trials, "release"),
        (ledger_trials, "ledger"),
        (seen_trials, "seen"),
        (owners_trials, "owners"),
    ):
        (tmp_path / folder).mkdir()
        result = trials(work=tmp_path / folder, trials=4, seed=7)
        _assert_clean(result)
        assert result.trials == 4
        # the writers really committed work between kills, so the checks had something to check
        assert result.committed_logged + result.unlogged_in_flight > 0


@pytest.mark.slow
def test_fifty_kills_per_store_lose_and_corrupt_nothing(tmp_path: Path) -> None:
    results = run_all(work=tmp_path, trials=50, seed=0)
    assert [r.store for r in results] == [
        "release registry",
        "deletion ledger",
        "replay list (seen.json)",
        "request owners (request_owners.json)",
    ]
    for result in results:
        _assert_clean(result)
        assert result.trials == 50
        assert result.committed_logged >= 50  # on average at least one committed operation per trial


def test_the_checks_detect_lost_and_corrupted_records(tmp_path: Path) -> None:
    """The verifiers are not vacuous: a tampered release, a missing release/transition/id are found."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from benchmarks.bench_crash import StoreResult, _check_ledger, _check_releases, _check_seen
    from serforget.client.ledger import Ledger
    from serforget.common.release import ReleaseRegistry
    from serforget.server.federation import ServerDir

    key = Ed25519PrivateKey.generate()
    source = tmp_path / "model.onnx"
    source.write_bytes(b"weights")
    registry = ReleaseRegistry(tmp_path / "releases")
    registry.publish(files={"model.onnx": source}, signing_key=key, parent=None)
    (registry.path(1) / "model.onnx").write_bytes(b"weightz")
    releases = StoreResult(store="release registry")
    _check_releases(registry, key.public_key(), ["1", "2"], set(), releases)
    assert releases.corrupted == 1 and releases.lost == 1

    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.request_forget(utt_ids=["u1"], known_utt_ids=["u1"])
    ledger_result = StoreResult(store="deletion ledger")
    _check_ledger(tmp_path / "ledger.sqlite", ["no-such-request pending"], 0, ledger_result)
    assert ledger_result.lost == 1

    server = ServerDir(tmp_path / "server")
    server.root.mkdir()
    server.remember(["a" * 32])
    seen_result = StoreResult(store="replay list")
    _check_seen(server, ["b" * 32], set(), seen_result)
    assert seen_result.lost == 1 and not seen_result.ok

    from benchmarks.bench_crash import _check_owners

    server.bind_requests({"node-a": ["c" * 32]})
    owners_result = StoreResult(store="request owners")
    _check_owners(server, ["c" * 32 + " node-b", "d" * 32 + " node-a"], {}, owners_result)
    assert owners_result.corrupted == 1 and owners_result.lost == 1


def test_an_interrupted_revoking_publish_leaves_the_revocation_in_the_signed_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import serforget.common.release as release

    key = Ed25519PrivateKey.generate()
    source = tmp_path / "model.onnx"
    source.write_bytes(b"weights")
    registry = release.ReleaseRegistry(tmp_path / "releases")
    registry.publish(files={"model.onnx": source}, signing_key=key, parent=None)

    def killed(staging: Path, target: Path) -> None:
        raise KeyboardInterrupt("simulated crash between the revocation and the rename")

    monkeypatch.setattr(release, "_commit_staged_release", killed)
    with pytest.raises(KeyboardInterrupt):
        registry.publish(
            files={"model.onnx": source}, signing_key=key, parent=1, applied_request_ids=["r1"], revoke_previous=True
        )
    assert 1 in registry.revoked()  # the log already revokes v1 ...
    assert 1 in registry.read_index(public_key=key.public_key()).revoked()  # ... the index must say so too
