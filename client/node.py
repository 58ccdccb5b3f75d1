"""A speaker's device: its data directory and everything it does with it, free of Flower.

Layout of a node data directory (``format_version`` 1 in ``node.json``)::

    DIR/node.json        {"format_version": 1, "node_id": ..., "speaker": ...}
    DIR/manifest.csv     the node's own recordings (common.manifest format)
    DIR/wav/             the audio itself - never leaves the device
    DIR/keys/            sign.key / sign.pub (Ed25519): the node signs its deltas;
                         server_hpke.pub (deltas are sealed to it) and server_sign.pub (the
                         release-signing key every announced release must verify against),
                         both pinned at enrollment and never taken from a message
    DIR/ledger.sqlite    durable deletion ledger (common.ledger)
    DIR/cache/           derived data, deleted on purge
    DIR/model/           the newest global model the node has switched to

The ClientApp handlers and the ``serforget node`` CLI both call these functions, so nothing a
device does is reachable only through Flower.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from torch import nn

from serforget.client.ledger import APPLIED, PENDING, UNLEARNED, DeletionRequest, Ledger
from serforget.client.purge import purge_request
from serforget.common.checkpoint import save_checkpoint, state_dict_bytes, state_sha256
from serforget.common.data import DEFAULT_CLIP_SECONDS, WaveformSet, load_waveforms
from serforget.common.envelope import read_header_unverified, seal_delta
from serforget.common.fsutil import atomic_write_json
from serforget.common.keys import init_keys, load_signing_private, load_signing_public
from serforget.common.manifest import IdError, Utterance, check_id, read_manifest, write_manifest
from serforget.common.protocol import SERVER_HPKE_PIN, SERVER_SIGN_PIN
from serforget.common.release import ReleaseError, ReleaseManifest, check_signed_manifest

NODE_FORMAT_VERSION = 1


class NodeError(ValueError):
    """A node data directory is missing or inconsistent; the message names the path."""


@dataclass(frozen=True)
class NodeDir:
    """Paths of one node's data directory (see the module docstring)."""

    root: Path

    @property
    def info_path(self) -> Path:
        return self.root / "node.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def info(self) -> dict:
        try:
            info = json.loads(self.info_path.read_text())
        except FileNotFoundError:
            raise NodeError(f"{self.info_path}: not a node data directory (node.json missing)") from None
        except json.JSONDecodeError as exc:
            raise NodeError(f"{self.info_path}: not valid JSON ({exc})") from None
        if info.get("format_version") != NODE_FORMAT_VERSION or "node_id" not in info:
            raise NodeError(f"{self.info_path}: unsupported node.json (format_version/node_id)")
        return info

    @property
    def node_id(self) -> str:
        return str(self.info()["node_id"])

    def utterances(self) -> list[Utterance]:
        return read_manifest(self.manifest, root=self.root)

    def open_ledger(self) -> Ledger:
        return Ledger(self.ledger_path)


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def prepare_node_dir(*, root: Path, node_id: str, speaker: str, utterances: Sequence[Utterance]) -> NodeDir:
    """Create (idempotently) a node's data directory holding its own copy of its recordings.

    The audio is hard-linked (or copied) into ``DIR/wav`` so that purging a deletion removes the
    device's copy without touching the corpus it was provisioned from.
    """
    node = NodeDir(Path(root))
    wav = node.root / "wav"
    try:
        check_id(node_id, what=f"{node.info_path}: node_id")
    except IdError as exc:
        raise NodeError(str(exc)) from None
    targets = []
    for utt in utterances:
        # the id becomes a file name: "../../x" or "/etc/x" must never leave DIR/wav
        try:
            check_id(utt.utt_id, what=f"node {node_id}: utterance")
        except IdError as exc:
            raise NodeError(str(exc)) from None
        targets.append(wav / f"{utt.utt_id}{utt.path.suffix or '.wav'}")
    if node.info_path.exists() and node.manifest.exists():
        if node.node_id != node_id:
            raise NodeError(f"{node.info_path}: holds node {node.node_id!r}, not {node_id!r}")
        return node
    local = []
    for utt, target in zip(utterances, targets):
        _link_or_copy(utt.path, target)
        local.append(Utterance(utt.utt_id, target, utt.speaker, utt.emotion))
    write_manifest(node.manifest, local)
    init_keys(key_dir=node.keys_dir, role="node")
    atomic_write_json(node.info_path, {"format_version": NODE_FORMAT_VERSION, "node_id": node_id, "speaker": speaker})
    return node


def file_deletion_request(
    *, data_dir: Path, utt_ids: Sequence[str] | None = None, whole_speaker: bool = False
) -> DeletionRequest:
    """Record a speaker's deletion request in the node's ledger (idempotent, durable)."""
    node = NodeDir(Path(data_dir))
    known = {u.utt_id for u in node.utterances()}
    with node.open_ledger() as ledger:
        return ledger.request_forget(utt_ids=utt_ids, whole_speaker=whole_speaker, known_utt_ids=known)


def load_training_set(
    node: NodeDir, *, labels: Sequence[str], clip_seconds: float = DEFAULT_CLIP_SECONDS
) -> WaveformSet:
    """The node's recordings minus every utterance named in a deletion request.

    A recording leaves local training the moment its deletion is requested, not when it is
    purged: later FedAvg rounds must not re-learn what is being unlearned.
    """
    with node.open_ledger() as ledger:
        forgotten = ledger.forgotten_utt_ids()
    keep = [u for u in node.utterances() if u.utt_id not in forgotten and u.emotion in labels]
    return load_waveforms(keep, labels=labels, clip_seconds=clip_seconds)


def requests_to_unlearn(node: NodeDir) -> list[DeletionRequest]:
    """Pending requests, plus ``unlearned`` ones whose release never reached this node.

    A node can die after sealing a delta but before its reply arrives, or miss the announcement
    of the release that applied it. An ``unlearned`` request is therefore offered again; the
    server refuses a second delta for requests it has already applied and re-announces them,
    so a delivery that happens twice is applied once.
    """
    with node.open_ledger() as ledger:
        return [r for r in ledger.all() if r.state in (PENDING, UNLEARNED)]


def load_forget_set(
    node: NodeDir,
    requests: Sequence[DeletionRequest],
    *,
    labels: Sequence[str],
    clip_seconds: float = DEFAULT_CLIP_SECONDS,
) -> WaveformSet:
    """The recordings named by ``requests`` - the only data forget-set-only unlearning may use."""
    wanted = {u for r in requests for u in r.utt_ids}
    rows = [u for u in node.utterances() if u.utt_id in wanted and u.emotion in labels]
    return load_waveforms(rows, labels=labels, clip_seconds=clip_seconds)


def weight_delta(updated: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``updated - base`` for every floating-point tensor (integer buffers are not deltas)."""
    return {
        name: (updated[name].detach().cpu() - tensor.detach().cpu())
        for name, tensor in base.items()
        if tensor.is_floating_point()
    }


@dataclass(frozen=True)
class SealedUnlearning:
    """What a node sends back for an unlearning round."""

    envelope: bytes
    envelope_id: str
    request_ids: tuple[str, ...]
    n_forget: int
    metrics: dict


def seal_unlearning_delta(
    *,
    node: NodeDir,
    requests: Sequence[DeletionRequest],
    base_state: Mapping[str, torch.Tensor],
    unlearned: nn.Module,
    base_version: int,
    server_hpke_public: object,
    n_forget: int,
    metrics: Mapping[str, float],
) -> SealedUnlearning:
    """Encrypt + sign ``unlearned - base`` and move the requests to ``unlearned`` in the ledger."""
    payload = state_dict_bytes(weight_delta(unlearned.state_dict(), base_state))
    request_ids = tuple(r.request_id for r in requests)
    envelope = seal_delta(
        payload=payload,
        node_id=node.node_id,
        request_ids=request_ids,
        base_version=base_version,
        base_sha256=state_sha256(base_state),
        server_hpke_public=server_hpke_public,
        node_signing_key=load_signing_private(node.keys_dir / "sign.key"),
    )
    envelope_id = read_header_unverified(envelope).envelope_id
    with node.open_ledger() as ledger:
        for rid in request_ids:
            if ledger.get(rid).state == UNLEARNED:
                ledger.mark_retry(rid, reason=f"re-sealed as envelope {envelope_id} (earlier delta not applied)")
            ledger.mark_unlearned(rid, envelope_id=envelope_id, base_version=base_version)
    return SealedUnlearning(envelope, envelope_id, request_ids, n_forget, dict(metrics))


def pin_server_keys(node: NodeDir, *, server_keys_dir: Path) -> None:
    """Pin the server's ``hpke.pub`` and ``sign.pub`` on the node (enrollment); existing pins are kept."""
    for source, pin in (("hpke.pub", SERVER_HPKE_PIN), ("sign.pub", SERVER_SIGN_PIN)):
        target = node.keys_dir / pin
        if not target.exists():
            shutil.copyfile(Path(server_keys_dir) / source, target)


def pinned_release_key(node: NodeDir) -> Ed25519PublicKey:
    """The server's release-signing key pinned on the device, with a clear error if it was never pinned."""
    path = node.keys_dir / SERVER_SIGN_PIN
    if not path.exists():
        raise NodeError(f"{path}: missing; pin the server's keys/sign.pub here (enrollment) before adopting releases")
    return load_signing_public(path)


def verify_announced_release(
    *,
    model: nn.Module,
    version: int,
    signed_manifests: Sequence[tuple[bytes, bytes]],
    server_public_key: Ed25519PublicKey,
) -> tuple[ReleaseManifest, frozenset[str]]:
    """Check an announced release against the server's signatures; return it and the request ids it proves applied.

    Why: the announcement travels through the SuperLink, which does not hold the release key.
    Without this, whoever can inject a ``query.release`` could make a node adopt arbitrary
    weights, or purge audio whose deletion no release applies. So the node accepts only:
    ``signed_manifests`` (manifest bytes, signature) pairs that verify against the pinned key;
    one of them for ``version`` whose ``model.safetensors`` hash equals the weights received;
    and as applied only the request ids listed by those manifests at or before ``version``.
    """
    verified: dict[int, ReleaseManifest] = {}
    for index, (manifest_bytes, signature) in enumerate(signed_manifests):
        try:
            manifest = check_signed_manifest(
                bytes(manifest_bytes),
                bytes(signature),
                public_key=server_public_key,
                source=f"announced release manifest [{index}]",
            )
        except ReleaseError as exc:
            raise NodeError(str(exc)) from None
        verified[manifest.version] = manifest
    adopted = verified.get(version)
    if adopted is None:
        raise NodeError(f"announced release v{version}: no signed manifest for it among versions {sorted(verified)}")
    weights = adopted.files.get("model.safetensors")
    if weights is None or weights["sha256"] != state_sha256(model.state_dict()):
        raise NodeError(f"announced release v{version}: the weights received do not match its signed model.safetensors")
    applied = frozenset(rid for v, manifest in verified.items() if v <= version for rid in manifest.applied_request_ids)
    return adopted, applied


def adopt_release(
    *,
    node: NodeDir,
    model: nn.Module,
    labels: Sequence[str],
    version: int,
    signed_manifests: Sequence[tuple[bytes, bytes]],
) -> list[dict]:
    """Switch the node to release ``version`` and purge the audio of the requests it applies.

    Both steps act only on what :func:`verify_announced_release` proves with the pinned
    release key: the weights must be the signed release, and a request is purged only if a
    signed manifest lists it in ``applied_request_ids``. Purging only after the release exists is
    deliberate: until then a failed round can still be retried from the forget set; afterwards
    the audio has no purpose left and must go.
    """
    _, signed_applied = verify_announced_release(
        model=model, version=version, signed_manifests=signed_manifests, server_public_key=pinned_release_key(node)
    )
    save_checkpoint(model=model, out_dir=node.model_dir, labels=labels, provenance={"release_version": version})
    receipts = []
    with node.open_ledger() as ledger:
        state = {r.request_id: r.state for r in ledger.all()}
        # an announcement repeated after a restart finds its requests already purged: skip them
        ours = [rid for rid in sorted(signed_applied) if state.get(rid) in (UNLEARNED, APPLIED)]
        if ours:
            ledger.mark_applied(ours, release_version=version)
        for rid in ours:
            receipts.append(purge_request(data_dir=node.root, ledger=ledger, request_id=rid))
    return receipts
