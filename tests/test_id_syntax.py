"""One id syntax everywhere ids enter (issue 11): traversal ids, absolute ids, padded ids.

Attack: a manifest (or a provisioning list) naming an utterance ``../../../x`` made
``prepare_node_dir`` write audio outside the node folder, and ``" a"`` was silently trimmed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serforget.client.ledger import Ledger, LedgerError
from serforget.client.node import NodeError, prepare_node_dir
from serforget.common.audio import save_audio
from serforget.common.keys import NODE_ID_PATTERN
from serforget.common.manifest import ID_PATTERN, IdError, ManifestError, Utterance, check_id, read_manifest
from serforget.common.release import ReleaseError, ReleaseRegistry
from tests.helpers.audio import tone

REPO_ROOT = Path(__file__).resolve().parents[1]
HOSTILE_IDS = ["../../../escaped", "/tmp/absolute", "..", ".hidden", "a/b", "a\\b", "x" * 129, "", "a\x00b", "é"]
PADDED_IDS = [" spk0_a", "spk0_a ", "\tspk0_a", "spk0_a\n"]


@pytest.mark.parametrize("bad", HOSTILE_IDS + PADDED_IDS)
def test_check_id_refuses(bad: str) -> None:
    with pytest.raises(IdError, match="whitespace" if bad != bad.strip() and bad.strip() else "must be"):
        check_id(bad, what="test")


def test_check_id_accepts_corpus_ids() -> None:
    for good in ["iemocap_Ses01F_impro01_F000", "ravdess_03-01-05-01-02-01-12", "a", "node:7@site", "0" * 128]:
        assert check_id(good, what="test") == good
    assert NODE_ID_PATTERN is ID_PATTERN  # node ids and envelope request ids share the one syntax


@pytest.mark.parametrize("bad", ["../../../escaped", "/tmp/serforget-absolute-escape", "../wav2/x"])
def test_traversal_utt_id_cannot_write_outside_the_node_dir(tmp_path: Path, bad: str) -> None:
    audio = save_audio(tmp_path / "corpus" / "clip.wav", tone(220.0, 0.2))
    root = tmp_path / "a" / "b" / "node"
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(NodeError, match="must be"):
        prepare_node_dir(root=root, node_id="n0", speaker="spk0", utterances=[Utterance(bad, audio, "spk0", "happy")])
    assert {p for p in tmp_path.rglob("*")} == before  # nothing created anywhere, inside or out
    assert not Path("/tmp/serforget-absolute-escape.wav").exists()


def _write_manifest(path: Path, utt_id: str, audio: Path) -> Path:
    path.write_text(f"utt_id,path,speaker,emotion\n{utt_id},{audio.name},spk0,happy\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("bad", ["../../x", "/abs/x", '" spk0_a"', '"spk0_a "'])
def test_manifest_refuses_traversal_and_padded_ids(tmp_path: Path, bad: str) -> None:
    audio = save_audio(tmp_path / "clip.wav", tone(220.0, 0.2))
    manifest = _write_manifest(tmp_path / "manifest.csv", bad, audio)
    with pytest.raises(ManifestError, match=r"manifest.csv:2: utt_id: id .* (must be|has surrounding whitespace)"):
        read_manifest(manifest)


def test_ledger_refuses_hostile_request_and_utt_ids(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        with pytest.raises(LedgerError, match="must be"):
            ledger.get("../../x")
        with pytest.raises(LedgerError, match="whitespace"):
            ledger.request_forget(utt_ids=[" a"], known_utt_ids={" a", "a"})
        with pytest.raises(LedgerError, match="must be"):
            ledger.mark_applied(["/etc/passwd"], release_version=3)


def test_release_refuses_padded_request_ids(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    registry = ReleaseRegistry(tmp_path / "releases")
    with pytest.raises(ReleaseError, match="whitespace"):
        registry.publish(
            files={"model.onnx": tmp_path / "m.onnx"},
            signing_key=Ed25519PrivateKey.generate(),
            parent=None,
            applied_request_ids=["req-1 "],
        )
    assert registry.versions() == []


def test_node_forget_cli_refuses_a_traversal_id_in_one_line(tmp_path: Path) -> None:
    audio = save_audio(tmp_path / "corpus" / "clip.wav", tone(220.0, 0.2))
    node = prepare_node_dir(
        root=tmp_path / "node", node_id="n0", speaker="spk0", utterances=[Utterance("spk0_a", audio, "spk0", "happy")]
    )
    run = subprocess.run(
        [sys.executable, "-m", "serforget", "node", "forget", "--data-dir", str(node.root), "--utt", "../../etc/x"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "'../../etc/x' must be 1-128 chars" in run.stderr
