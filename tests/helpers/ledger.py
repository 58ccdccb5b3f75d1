"""A node data dir with fake audio and caches, and requests driven to ``applied`` (ledger and purge tests)."""

from __future__ import annotations

from pathlib import Path

from serforget.client.ledger import DeletionRequest, Ledger
from serforget.common.manifest import Utterance, write_manifest

KNOWN = ("spk1_001", "spk1_002", "spk1_003", "spk1_004")


def make_node(data_dir: Path, utt_ids: tuple[str, ...] = KNOWN) -> dict[str, bytes]:
    """A node data dir: distinct audio bytes per utt, a manifest, per-utt and pooled caches."""
    audio: dict[str, bytes] = {}
    rows = []
    for index, utt in enumerate(utt_ids):
        content = f"RIFF-fake-audio-{utt}".encode() * (index + 1)
        path = data_dir / "wav" / f"{utt}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        audio[utt] = content
        rows.append(Utterance(utt, path, "spk1", "happy"))
    write_manifest(data_dir / "manifest.csv", rows)
    cache = data_dir / "cache"
    (cache / "features").mkdir(parents=True)
    for utt in utt_ids:
        (cache / "features" / f"{utt}.npy").write_bytes(b"features")
    (cache / "norm_stats.json").write_text("{}")
    return audio


def applied_request(ledger: Ledger, utt_ids: list[str], *, known: tuple[str, ...] = KNOWN) -> DeletionRequest:
    request = ledger.request_forget(utt_ids=utt_ids, known_utt_ids=known)
    ledger.mark_unlearned(request.request_id, envelope_id="env-1", base_version=3)
    return ledger.mark_applied([request.request_id], release_version=4)[0]
