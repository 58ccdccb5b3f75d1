"""``query.release`` is verified against the pinned release key (issue 11, README "not protected" 3).

Attack: the announcement crosses the SuperLink, which does not hold the release key. Anyone who
can inject one used to make a node adopt arbitrary weights and purge the audio of any request id
it named, although no release applied that deletion. Now a node adopts and purges only what a
manifest signed by the pinned ``keys/server_sign.pub`` proves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from serforget.client.ledger import APPLIED, PURGED, UNLEARNED
from serforget.client.node import (
    NodeDir,
    NodeError,
    adopt_release,
    file_deletion_request,
    pin_server_keys,
    prepare_node_dir,
)
from serforget.common.audio import save_audio
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import Utterance
from serforget.common.models import build_model
from serforget.common.release import MANIFEST_NAME, ReleaseRegistry, sign_bytes
from serforget.server.federation import ServerDir, publish_release
from serforget.server.unlearning_round import signed_manifests
from tests.helpers.audio import tone

CNN = {"channels": [4, 8]}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch="logmel_cnn", config=CNN, labels=FOUR_CLASS)


@pytest.fixture
def world(tmp_path: Path) -> tuple[ServerDir, NodeDir, str]:
    """A server, an enrolled node with two recordings, and one request the node has unlearned."""
    server = ServerDir(tmp_path / "server").init()
    utts = [
        Utterance(f"spk0_{i}", save_audio(tmp_path / "corpus" / f"{i}.wav", tone(220.0 + i, 0.3)), "spk0", "happy")
        for i in range(2)
    ]
    node = prepare_node_dir(root=tmp_path / "node", node_id="node-spk0", speaker="spk0", utterances=utts)
    pin_server_keys(node, server_keys_dir=server.keys_dir)
    request = file_deletion_request(data_dir=node.root, utt_ids=["spk0_0"])
    with node.open_ledger() as ledger:
        ledger.mark_unlearned(request.request_id, envelope_id="e" * 32, base_version=1)
    publish_release(server=server, model=_model(0), labels=FOUR_CLASS, parent=None, onnx=False)
    return server, node, request.request_id


def _state(node: NodeDir, rid: str) -> str:
    with node.open_ledger() as ledger:
        return ledger.get(rid).state


def _signed(server: ServerDir, version: int) -> list[tuple[bytes, bytes]]:
    manifests, signatures = signed_manifests(server.releases, version=version, applied=[])
    return list(zip(manifests, signatures))


def test_unsigned_announcement_purges_nothing(world) -> None:
    server, node, rid = world
    forged_key = Ed25519PrivateKey.generate()
    release = ReleaseRegistry(server.releases).path(1)
    manifest = (release / MANIFEST_NAME).read_bytes()
    for announced in ([], [(manifest, sign_bytes(manifest, signing_key=forged_key))]):
        with pytest.raises(NodeError):
            adopt_release(node=node, model=_model(0), labels=FOUR_CLASS, version=1, signed_manifests=announced)
    assert _state(node, rid) == UNLEARNED
    assert (node.root / "wav" / "spk0_0.wav").exists() and not node.model_dir.exists()


def test_unsigned_ids_a_genuine_release_does_not_apply_are_not_purged(world) -> None:
    server, node, rid = world
    # release v1 is genuine and signed, but it applies no request: naming rid next to it purges nothing
    assert (
        adopt_release(node=node, model=_model(0), labels=FOUR_CLASS, version=1, signed_manifests=_signed(server, 1))
        == []
    )
    assert _state(node, rid) == UNLEARNED and (node.root / "wav" / "spk0_0.wav").exists()


def test_unsigned_weights_with_a_genuine_manifest_are_refused(world) -> None:
    server, node, rid = world
    publish_release(
        server=server,
        model=_model(1),
        labels=FOUR_CLASS,
        parent=1,
        applied_request_ids=[rid],
        onnx=False,
        revoke_previous=True,
    )
    manifests, signatures = signed_manifests(server.releases, version=2, applied=[rid])
    with pytest.raises(NodeError, match="weights received do not match"):
        adopt_release(
            node=node, model=_model(2), labels=FOUR_CLASS, version=2, signed_manifests=list(zip(manifests, signatures))
        )
    assert _state(node, rid) == UNLEARNED and (node.root / "wav" / "spk0_0.wav").exists()


def test_signed_release_that_applies_the_request_is_adopted_and_purges(world) -> None:
    server, node, rid = world
    publish_release(
        server=server,
        model=_model(1),
        labels=FOUR_CLASS,
        parent=1,
        applied_request_ids=[rid],
        onnx=False,
        revoke_previous=True,
    )
    publish_release(server=server, model=_model(3), labels=FOUR_CLASS, parent=2, onnx=False)  # a later release
    manifests, signatures = signed_manifests(server.releases, version=3, applied=[rid])
    assert len(manifests) == 2  # v3 (adopted) and v2 (the release that applied rid)
    receipts = adopt_release(
        node=node, model=_model(3), labels=FOUR_CLASS, version=3, signed_manifests=list(zip(manifests, signatures))
    )
    assert [r["request_id"] for r in receipts] == [rid] and _state(node, rid) == PURGED
    assert not (node.root / "wav" / "spk0_0.wav").exists() and (node.root / "wav" / "spk0_1.wav").exists()


def test_unsigned_announcement_without_a_pinned_key_is_refused(world) -> None:
    server, node, rid = world
    (node.keys_dir / "server_sign.pub").unlink()
    with pytest.raises(NodeError, match="server_sign.pub: missing"):
        adopt_release(node=node, model=_model(0), labels=FOUR_CLASS, version=1, signed_manifests=_signed(server, 1))
    assert _state(node, rid) not in (APPLIED, PURGED)
