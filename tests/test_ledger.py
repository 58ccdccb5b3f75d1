"""Tests of the deletion ledger: life cycle, idempotence, durability and the purge."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import serforget.client.purge as purge_module
from serforget.client.ledger import (
    APPLIED,
    PENDING,
    PURGED,
    SCHEMA_VERSION,
    UNLEARNED,
    Ledger,
    LedgerError,
)
from serforget.client.purge import RECEIPT_VERSION, purge_request
from serforget.common.fsutil import sha256_bytes
from serforget.common.manifest import Utterance, read_manifest, write_manifest
from tests.helpers.ledger import KNOWN, applied_request, make_node

REPO_ROOT = Path(__file__).resolve().parents[1]
#: A ledger call made on one request id (for parametrised transition tests).
Action = Callable[[Ledger, str], object]


@pytest.fixture()
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.sqlite") as opened:
        yield opened


# -- recording requests ---------------------------------------------------------------------


def test_new_request_is_pending_and_excluded_from_training_at_once(ledger: Ledger) -> None:
    request = ledger.request_forget(utt_ids=["spk1_002", "spk1_001"], known_utt_ids=KNOWN)
    assert request.state == PENDING
    assert request.utt_ids == ("spk1_001", "spk1_002")
    assert not request.whole_speaker
    assert (request.envelope_id, request.base_version, request.release_version, request.receipt) == (
        None,
        None,
        None,
        None,
    )
    assert len(request.request_id) == 32
    assert ledger.pending() == [request]
    assert ledger.forgotten_utt_ids() == {"spk1_001", "spk1_002"}


def test_same_ask_returns_the_same_request(ledger: Ledger) -> None:
    first = ledger.request_forget(utt_ids=["spk1_001", "spk1_002"], known_utt_ids=KNOWN)
    again = ledger.request_forget(utt_ids=["spk1_002", "spk1_001", "spk1_001"], known_utt_ids=KNOWN)
    assert again == first
    assert len(ledger.all()) == 1


def test_same_ask_after_unlearning_still_returns_the_open_request(ledger: Ledger) -> None:
    first = ledger.request_forget(utt_ids=["spk1_001"], known_utt_ids=KNOWN)
    ledger.mark_unlearned(first.request_id, envelope_id="env", base_version=0)
    again = ledger.request_forget(utt_ids=["spk1_001"], known_utt_ids=KNOWN)
    assert again.request_id == first.request_id
    assert again.state == UNLEARNED


def test_subset_of_an_open_request_returns_that_request(ledger: Ledger) -> None:
    first = ledger.request_forget(utt_ids=["spk1_001", "spk1_002", "spk1_003"], known_utt_ids=KNOWN)
    assert ledger.request_forget(utt_ids=["spk1_003"], known_utt_ids=KNOWN) == first
    assert len(ledger.all()) == 1


def test_partial_overlap_records_only_the_new_ids(ledger: Ledger) -> None:
    first = ledger.request_forget(utt_ids=["spk1_001"], known_utt_ids=KNOWN)
    second = ledger.request_forget(utt_ids=["spk1_001", "spk1_002"], known_utt_ids=KNOWN)
    assert second.request_id != first.request_id
    assert second.utt_ids == ("spk1_002",)
    assert ledger.get(first.request_id).utt_ids == ("spk1_001",)
    assert ledger.forgotten_utt_ids() == {"spk1_001", "spk1_002"}
    assert ledger.history(second.request_id)[0].detail["already_covered"] == ["spk1_001"]


def test_ask_fully_covered_by_several_requests_is_rejected(ledger: Ledger) -> None:
    first = ledger.request_forget(utt_ids=["spk1_001"], known_utt_ids=KNOWN)
    second = ledger.request_forget(utt_ids=["spk1_002"], known_utt_ids=KNOWN)
    with pytest.raises(LedgerError, match="already covered") as error:
        ledger.request_forget(utt_ids=["spk1_001", "spk1_002"], known_utt_ids=KNOWN)
    assert first.request_id in str(error.value) and second.request_id in str(error.value)
    assert len(ledger.all()) == 2


def test_whole_speaker_covers_every_known_utt(ledger: Ledger) -> None:
    request = ledger.request_forget(whole_speaker=True, known_utt_ids=set(KNOWN))
    assert request.whole_speaker
    assert request.utt_ids == tuple(sorted(KNOWN))
    assert ledger.forgotten_utt_ids() == set(KNOWN)
    assert ledger.request_forget(whole_speaker=True, known_utt_ids=KNOWN) == request


def test_whole_speaker_after_a_single_utt_request_takes_the_rest_idempotently(ledger: Ledger) -> None:
    single = ledger.request_forget(utt_ids=["spk1_003"], known_utt_ids=KNOWN)
    everything = ledger.request_forget(whole_speaker=True, known_utt_ids=KNOWN)
    assert everything.utt_ids == ("spk1_001", "spk1_002", "spk1_004")
    assert ledger.request_forget(whole_speaker=True, known_utt_ids=KNOWN) == everything
    assert ledger.forgotten_utt_ids() == set(KNOWN)
    assert {r.request_id for r in ledger.all()} == {single.request_id, everything.request_id}


def test_unknown_utt_ids_are_named_and_nothing_is_stored(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="unknown utt ids.*nope_1, nope_2"):
        ledger.request_forget(utt_ids=["spk1_001", "nope_2", "nope_1"], known_utt_ids=KNOWN)
    assert ledger.all() == []
    assert ledger.forgotten_utt_ids() == set()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give utt_ids or whole_speaker"),
        ({"utt_ids": ["spk1_001"], "whole_speaker": True}, "not both"),
        ({"utt_ids": []}, "empty"),
        ({"utt_ids": "spk1_001"}, "got the string"),
        ({"utt_ids": [1]}, "must be strings"),
    ],
)
def test_malformed_forget_arguments_are_refused(ledger: Ledger, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LedgerError, match=message):
        ledger.request_forget(known_utt_ids=KNOWN, **kwargs)
    assert ledger.all() == []


def test_whole_speaker_on_a_node_without_utterances_is_refused(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="knows no utterances"):
        ledger.request_forget(whole_speaker=True, known_utt_ids=[])


# -- life cycle -----------------------------------------------------------------------------


def test_full_life_cycle_with_a_retry(ledger: Ledger) -> None:
    request = ledger.request_forget(utt_ids=["spk1_001"], known_utt_ids=KNOWN)
    rid = request.request_id

    sent = ledger.mark_unlearned(rid, envelope_id="env-a", base_version=2)
    assert (sent.state, sent.envelope_id, sent.base_version) == (UNLEARNED, "env-a", 2)
    assert ledger.pending() == []

    retried = ledger.mark_retry(rid, reason="round 3 timed out")
    assert (retried.state, retried.envelope_id, retried.base_version) == (PENDING, None, None)
    assert ledger.pending() == [retried]

    ledger.mark_unlearned(rid, envelope_id="env-b", base_version=3)
    [applied] = ledger.mark_applied([rid], release_version=4)
    assert (applied.state, applied.release_version, applied.envelope_id) == (APPLIED, 4, "env-b")

    purged = ledger.mark_purged(rid, receipt={"request_id": rid, "files": []})
    assert purged.state == PURGED
    assert purged.receipt == {"request_id": rid, "files": []}
    assert purged.updated_at >= purged.created_at
    assert ledger.forgotten_utt_ids() == {"spk1_001"}

    history = ledger.history(rid)
    assert [(e.from_state, e.to_state) for e in history] == [
        (None, PENDING),
        (PENDING, UNLEARNED),
        (UNLEARNED, PENDING),
        (PENDING, UNLEARNED),
        (UNLEARNED, APPLIED),
        (APPLIED, PURGED),
    ]
    assert history[2].detail == {"reason": "round 3 timed out", "envelope_id": "env-a", "base_version": 2}


def _to_state(ledger: Ledger, state: str) -> str:
    rid = ledger.request_forget(utt_ids=["spk1_001"], known_utt_ids=KNOWN).request_id
    if state in (UNLEARNED, APPLIED, PURGED):
        ledger.mark_unlearned(rid, envelope_id="env", base_version=1)
    if state in (APPLIED, PURGED):
        ledger.mark_applied([rid], release_version=2)
    if state == PURGED:
        ledger.mark_purged(rid, receipt={"files": []})
    return rid


ILLEGAL = [
    (PENDING, APPLIED, lambda led, rid: led.mark_applied([rid], release_version=5)),
    (PENDING, PURGED, lambda led, rid: led.mark_purged(rid, receipt={})),
    (PENDING, PENDING, lambda led, rid: led.mark_retry(rid, reason="x")),
    (UNLEARNED, PURGED, lambda led, rid: led.mark_purged(rid, receipt={})),
    (APPLIED, PENDING, lambda led, rid: led.mark_retry(rid, reason="x")),
    (APPLIED, UNLEARNED, lambda led, rid: led.mark_unlearned(rid, envelope_id="e2", base_version=1)),
    (PURGED, UNLEARNED, lambda led, rid: led.mark_unlearned(rid, envelope_id="e2", base_version=1)),
    (PURGED, PENDING, lambda led, rid: led.mark_retry(rid, reason="x")),
    (PURGED, APPLIED, lambda led, rid: led.mark_applied([rid], release_version=9)),
]


@pytest.mark.parametrize(("start", "target", "action"), ILLEGAL)
def test_illegal_transitions_name_the_request_and_states(
    ledger: Ledger, start: str, target: str, action: Action
) -> None:
    rid = _to_state(ledger, start)
    before, history = ledger.get(rid), ledger.history(rid)
    with pytest.raises(LedgerError) as error:
        action(ledger, rid)
    message = str(error.value)
    assert rid in message and f"{start} -> {target}" in message
    assert ledger.get(rid) == before
    assert ledger.history(rid) == history


def test_repeating_a_transition_with_the_same_arguments_changes_nothing(ledger: Ledger) -> None:
    rid = _to_state(ledger, UNLEARNED)
    first = ledger.get(rid)
    assert ledger.mark_unlearned(rid, envelope_id="env", base_version=1) == first
    with pytest.raises(LedgerError, match=f"{rid}: illegal transition unlearned -> unlearned"):
        ledger.mark_unlearned(rid, envelope_id="other-env", base_version=1)

    [applied] = ledger.mark_applied([rid], release_version=2)
    assert ledger.mark_applied([rid], release_version=2) == [applied]
    with pytest.raises(LedgerError, match="applied -> applied"):
        ledger.mark_applied([rid], release_version=3)

    purged = ledger.mark_purged(rid, receipt={"files": [1]})
    assert ledger.mark_purged(rid, receipt={"files": [1]}) == purged
    with pytest.raises(LedgerError, match="purged -> purged"):
        ledger.mark_purged(rid, receipt={"files": [2]})
    assert len(ledger.history(rid)) == 4


def test_mark_applied_changes_all_requests_or_none(ledger: Ledger) -> None:
    sent = ledger.request_forget(utt_ids=["spk1_001"], known_utt_ids=KNOWN).request_id
    ledger.mark_unlearned(sent, envelope_id="env", base_version=0)
    unsent = ledger.request_forget(utt_ids=["spk1_002"], known_utt_ids=KNOWN).request_id
    with pytest.raises(LedgerError, match=f"{unsent}: illegal transition pending -> applied"):
        ledger.mark_applied([sent, unsent], release_version=1)
    assert ledger.get(sent).state == UNLEARNED
    assert [r.state for r in ledger.mark_applied([sent], release_version=1)] == [APPLIED]


def test_release_must_be_newer_than_the_delta_base(ledger: Ledger) -> None:
    rid = _to_state(ledger, UNLEARNED)
    with pytest.raises(LedgerError, match="release_version 1 is not newer than its base_version 1"):
        ledger.mark_applied([rid], release_version=1)
    assert ledger.get(rid).state == UNLEARNED


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda led, rid: led.mark_unlearned(rid, envelope_id="", base_version=1), "envelope_id"),
        (lambda led, rid: led.mark_unlearned(rid, envelope_id="e", base_version=-1), "base_version"),
        (lambda led, rid: led.mark_unlearned(rid, envelope_id="e", base_version=True), "base_version"),
        (lambda led, rid: led.mark_applied(rid, release_version=2), "got the string"),
        (lambda led, rid: led.mark_unlearned("nope", envelope_id="e", base_version=1), "no deletion request 'nope'"),
    ],
)
def test_bad_transition_arguments_are_refused(ledger: Ledger, call: Action, message: str) -> None:
    rid = _to_state(ledger, PENDING)
    with pytest.raises(LedgerError, match=message):
        call(ledger, rid)
    assert ledger.get(rid).state == PENDING


def test_receipt_must_be_storable_and_belong_to_the_request(ledger: Ledger) -> None:
    rid = _to_state(ledger, APPLIED)
    with pytest.raises(LedgerError, match="names another request"):
        ledger.mark_purged(rid, receipt={"request_id": "someone-else"})
    with pytest.raises(LedgerError, match="not JSON-serialisable"):
        ledger.mark_purged(rid, receipt={"when": object()})
    assert ledger.get(rid).state == APPLIED


# -- durability -----------------------------------------------------------------------------


def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as first:
        a = first.request_forget(utt_ids=["spk1_001"], known_utt_ids=KNOWN)
        first.mark_unlearned(a.request_id, envelope_id="env", base_version=7)
        b = first.request_forget(utt_ids=["spk1_002", "spk1_003"], known_utt_ids=KNOWN)
        before = first.all()
        history = first.history(a.request_id)
    with Ledger(path) as reopened:
        assert reopened.all() == before
        assert reopened.pending() == [reopened.get(b.request_id)]
        assert reopened.history(a.request_id) == history
        assert reopened.forgotten_utt_ids() == {"spk1_001", "spk1_002", "spk1_003"}
        assert reopened.request_forget(utt_ids=["spk1_001"], known_utt_ids=KNOWN).request_id == a.request_id
        modes = (
            reopened._conn.execute("PRAGMA journal_mode").fetchone()[0],
            reopened._conn.execute("PRAGMA synchronous").fetchone()[0],
        )
        assert modes == ("wal", 2)  # 2 = FULL


_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from serforget.client.ledger import Ledger

    known = ["spk1_001", "spk1_002", "spk1_003"]
    ledger = Ledger(Path(sys.argv[1]))
    ledger.request_forget(utt_ids=["spk1_001"], known_utt_ids=known)

    def hold_before_the_last_statement(sql):
        if sql.startswith("INSERT INTO events"):
            print("HOLDING", flush=True)
            sys.stdin.readline()  # the test kills this process while it waits here

    ledger._conn.set_trace_callback(hold_before_the_last_statement)
    ledger.request_forget(utt_ids=["spk1_002", "spk1_003"], known_utt_ids=known)
    print("COMMITTED", flush=True)
    """
)


def test_a_writer_killed_mid_transaction_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "HOLDING"
        # A second connection while the transaction is open sees only committed work.
        with Ledger(path) as reader:
            [committed] = reader.all()
            assert committed.utt_ids == ("spk1_001",)
            assert reader.forgotten_utt_ids() == {"spk1_001"}
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode != 0

    with Ledger(path) as recovered:
        assert recovered._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert recovered.all() == [committed]
        assert recovered.forgotten_utt_ids() == {"spk1_001"}
        assert recovered._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
        redo = recovered.request_forget(utt_ids=["spk1_002", "spk1_003"], known_utt_ids=KNOWN)
        assert redo.utt_ids == ("spk1_002", "spk1_003")


def test_schema_version_is_stored_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.close()
    with pytest.raises(LedgerError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Ledger(path)


def test_foreign_files_are_refused_and_left_intact(tmp_path: Path) -> None:
    text_file = tmp_path / "ledger.sqlite"
    text_file.write_text("not a database at all, just some text that is long enough" * 20)
    original = text_file.read_bytes()
    with pytest.raises(LedgerError, match="not a ledger database"):
        Ledger(text_file)
    assert text_file.read_bytes() == original

    other_db = tmp_path / "other.sqlite"
    with sqlite3.connect(other_db) as raw:
        raw.execute("CREATE TABLE something (x INTEGER)")
    raw.close()
    with pytest.raises(LedgerError, match="without a ledger schema_version"):
        Ledger(other_db)

    with pytest.raises(LedgerError, match="does not exist"):
        Ledger(tmp_path / "missing-folder" / "ledger.sqlite")


# -- purge ----------------------------------------------------------------------------------


def test_purge_deletes_audio_and_caches_rewrites_the_manifest_and_keeps_true_hashes(tmp_path: Path) -> None:
    data = tmp_path / "node"
    audio = make_node(data)
    with Ledger(data / "ledger.sqlite") as ledger:
        request = applied_request(ledger, ["spk1_001", "spk1_003"])
        receipt = purge_request(data_dir=data, ledger=ledger, request_id=request.request_id)

        assert not (data / "wav" / "spk1_001.wav").exists()
        assert not (data / "wav" / "spk1_003.wav").exists()
        assert (data / "wav" / "spk1_002.wav").read_bytes() == audio["spk1_002"]
        assert not (data / "cache").exists()
        assert [u.utt_id for u in read_manifest(data / "manifest.csv")] == ["spk1_002", "spk1_004"]

        assert receipt["receipt_version"] == RECEIPT_VERSION
        assert receipt["request_id"] == request.request_id
        assert receipt["release_version"] == 4
        assert receipt["files"] == [
            {
                "utt_id": utt,
                "path": f"wav/{utt}.wav",
                "sha256": sha256_bytes(audio[utt]),
                "size": len(audio[utt]),
                "status": "deleted",
            }
            for utt in ("spk1_001", "spk1_003")
        ]
        assert "cache/norm_stats.json" in receipt["cache_files"]
        assert len(receipt["cache_files"]) == len(KNOWN) + 1
        assert receipt["purged_at"] >= request.updated_at

        stored = ledger.get(request.request_id)
        assert stored.state == PURGED and stored.receipt == receipt
        assert purge_request(data_dir=data, ledger=ledger, request_id=request.request_id) == receipt


def test_purge_rerun_after_a_crash_midway_completes_with_the_original_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "node"
    audio = make_node(data)
    with Ledger(data / "ledger.sqlite") as ledger:
        request = applied_request(ledger, ["spk1_001", "spk1_002"])

        def crash(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt("simulated crash after the audio deletion")

        monkeypatch.setattr(purge_module, "_remove_cache_dir", crash)
        with pytest.raises(KeyboardInterrupt):
            purge_request(data_dir=data, ledger=ledger, request_id=request.request_id)
        monkeypatch.undo()
        assert not (data / "wav" / "spk1_001.wav").exists()
        assert ledger.get(request.request_id).state == APPLIED
        assert "spk1_001" in {u.utt_id for u in read_manifest(data / "manifest.csv")}

    with Ledger(data / "ledger.sqlite") as reopened:
        receipt = purge_request(data_dir=data, ledger=reopened, request_id=request.request_id)
        assert [(f["utt_id"], f["sha256"], f["status"]) for f in receipt["files"]] == [
            (utt, sha256_bytes(audio[utt]), "deleted") for utt in ("spk1_001", "spk1_002")
        ]
        assert not (data / "cache").exists()
        assert [u.utt_id for u in read_manifest(data / "manifest.csv")] == ["spk1_003", "spk1_004"]
        assert reopened.get(request.request_id).state == PURGED


def test_purge_records_files_already_missing_and_rows_missing_from_the_manifest(tmp_path: Path) -> None:
    data = tmp_path / "node"
    audio = make_node(data)
    (data / "wav" / "spk1_001.wav").unlink()
    with Ledger(data / "ledger.sqlite") as ledger:
        request = applied_request(ledger, ["spk1_001", "spk1_002", "spk1_003"])
        rows = read_manifest(data / "manifest.csv")
        write_manifest(data / "manifest.csv", [u for u in rows if u.utt_id != "spk1_003"])
        receipt = purge_request(data_dir=data, ledger=ledger, request_id=request.request_id)
    by_utt = {f["utt_id"]: f for f in receipt["files"]}
    assert by_utt["spk1_001"] == {
        "utt_id": "spk1_001",
        "path": "wav/spk1_001.wav",
        "sha256": None,
        "size": None,
        "status": "already_gone",
    }
    assert by_utt["spk1_002"]["sha256"] == sha256_bytes(audio["spk1_002"])
    assert by_utt["spk1_003"]["status"] == "not_in_manifest"
    assert [u.utt_id for u in read_manifest(data / "manifest.csv")] == ["spk1_004"]


def test_purge_refuses_a_request_not_yet_applied(tmp_path: Path) -> None:
    data = tmp_path / "node"
    make_node(data)
    with Ledger(data / "ledger.sqlite") as ledger:
        rid = ledger.request_forget(utt_ids=["spk1_001"], known_utt_ids=KNOWN).request_id
        ledger.mark_unlearned(rid, envelope_id="env", base_version=0)
        with pytest.raises(LedgerError, match=f"request {rid} is unlearned"):
            purge_request(data_dir=data, ledger=ledger, request_id=rid)
    assert (data / "wav" / "spk1_001.wav").exists()
    assert (data / "cache").is_dir()


def test_purge_refuses_audio_outside_the_data_dir_before_deleting_anything(tmp_path: Path) -> None:
    data = tmp_path / "node"
    make_node(data)
    shared = tmp_path / "corpus" / "shared.wav"
    shared.parent.mkdir()
    shared.write_bytes(b"shared corpus audio")
    rows = read_manifest(data / "manifest.csv")
    write_manifest(data / "manifest.csv", [Utterance("spk1_001", shared, "spk1", "happy"), *rows[1:]])
    with Ledger(data / "ledger.sqlite") as ledger:
        request = applied_request(ledger, ["spk1_001", "spk1_002"])
        with pytest.raises(LedgerError, match="outside the data dir"):
            purge_request(data_dir=data, ledger=ledger, request_id=request.request_id)
        assert ledger.get(request.request_id).state == APPLIED
    assert shared.exists()
    assert (data / "wav" / "spk1_002.wav").exists()
    assert (data / "cache").is_dir()
