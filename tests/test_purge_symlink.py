"""Purge never leaves the data dir (issue 11): symlinked ``wav/`` and ``cache/``, tampered plans.

Attack 1: after a crash with a stored purge plan, ``wav/`` is swapped for a symlink to another
folder holding files of the same names; the rerun used to delete those foreign files.
Attack 2: ``cache/`` is a symlink; the purge used to delete the audio, then fail on every rerun,
leaving the request stuck in ``applied``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import serforget.client.purge as purge_module
from serforget.client.ledger import APPLIED, PURGED, Ledger, LedgerError
from serforget.client.purge import purge_request
from tests.helpers.ledger import applied_request, make_node


def _outside(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"someone else's file")
    return folder


def test_symlink_wav_swapped_after_a_crash_deletes_nothing_outside_and_retry_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "node"
    make_node(data)
    outside = _outside(tmp_path, ["spk1_001.wav", "spk1_002.wav"])
    with Ledger(data / "ledger.sqlite") as ledger:
        request = applied_request(ledger, ["spk1_001", "spk1_002"])

        def crash(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt("simulated crash after the plan was stored")

        monkeypatch.setattr(purge_module, "_delete_audio", crash)
        with pytest.raises(KeyboardInterrupt):
            purge_request(data_dir=data, ledger=ledger, request_id=request.request_id)
        monkeypatch.undo()

        (data / "wav").rename(data / "wav-real")
        (data / "wav").symlink_to(outside, target_is_directory=True)
        with pytest.raises(LedgerError, match=r"wav: is a symlink or not a folder"):
            purge_request(data_dir=data, ledger=ledger, request_id=request.request_id)
        assert sorted(p.name for p in outside.iterdir()) == ["spk1_001.wav", "spk1_002.wav"]
        assert ledger.get(request.request_id).state == APPLIED

        (data / "wav").unlink()
        (data / "wav-real").rename(data / "wav")
        receipt = purge_request(data_dir=data, ledger=ledger, request_id=request.request_id)
        assert ledger.get(request.request_id).state == PURGED
        assert [f["status"] for f in receipt["files"]] == ["deleted", "deleted"]
        assert not (data / "wav" / "spk1_001.wav").exists() and (data / "wav" / "spk1_003.wav").exists()
    assert sorted(p.name for p in outside.iterdir()) == ["spk1_001.wav", "spk1_002.wav"]


def test_symlink_cache_is_unlinked_not_followed_and_the_purge_completes(tmp_path: Path) -> None:
    data = tmp_path / "node"
    make_node(data)
    outside = _outside(tmp_path, ["precious.npy"])
    shutil.rmtree(data / "cache")
    (data / "cache").symlink_to(outside, target_is_directory=True)
    with Ledger(data / "ledger.sqlite") as ledger:
        request = applied_request(ledger, ["spk1_001"])
        receipt = purge_request(data_dir=data, ledger=ledger, request_id=request.request_id)
        assert ledger.get(request.request_id).state == PURGED
    assert receipt["cache_files"] == []
    assert not (data / "cache").exists() and not (data / "cache").is_symlink()
    assert (outside / "precious.npy").read_bytes() == b"someone else's file"
    assert not (data / "wav" / "spk1_001.wav").exists()


def test_symlink_inside_cache_is_not_followed(tmp_path: Path) -> None:
    data = tmp_path / "node"
    make_node(data)
    outside = _outside(tmp_path, ["precious.npy"])
    (data / "cache" / "link").symlink_to(outside, target_is_directory=True)
    with Ledger(data / "ledger.sqlite") as ledger:
        request = applied_request(ledger, ["spk1_001"])
        receipt = purge_request(data_dir=data, ledger=ledger, request_id=request.request_id)
    assert not any(name.startswith("cache/link/") for name in receipt["cache_files"])
    assert (outside / "precious.npy").exists() and not (data / "cache").exists()


@pytest.mark.parametrize("planted", ["../outside/spk1_001.wav", "ABSOLUTE", "wav/../../outside/spk1_001.wav"])
def test_symlink_free_escape_through_a_tampered_plan_is_refused(tmp_path: Path, planted: str) -> None:
    data = tmp_path / "node"
    make_node(data)
    outside = _outside(tmp_path, ["spk1_001.wav"])
    # never a system path: the unfixed code would really delete it (tests may run as root)
    planted = str(outside / "spk1_001.wav") if planted == "ABSOLUTE" else planted
    with Ledger(data / "ledger.sqlite") as ledger:
        request = applied_request(ledger, ["spk1_001"])
        plan = ledger.stage_purge_plan(
            request.request_id, plan=purge_module._survey(request, root=data.resolve(), manifest=data / "manifest.csv")
        )
        plan["files"][0]["path"] = planted
        ledger._conn.execute(
            "UPDATE requests SET purge_plan = ? WHERE request_id = ?", (json.dumps(plan), request.request_id)
        )
        with pytest.raises(LedgerError, match="does not stay inside the data dir"):
            purge_request(data_dir=data, ledger=ledger, request_id=request.request_id)
        assert ledger.get(request.request_id).state == APPLIED
    assert (outside / "spk1_001.wav").exists()
