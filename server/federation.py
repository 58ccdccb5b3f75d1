"""Server-side federated logic, free of Flower: provisioning, delta checks, elastic merge, releases.

The ServerApp in ``server/`` is glue around these functions. Server data directory::

    SERVER/keys/            sign.key/.pub (Ed25519, releases) + hpke.key/.pub (X25519 HPKE)
    SERVER/nodes.json       enrolled node signing keys (common.keys registry)
    SERVER/importance.safetensors  global MAS importance map (example-weighted mean of the nodes')
    SERVER/seen.json        envelope ids already accepted and when (replay protection, atomic;
                            entries older than the envelope freshness window are pruned)
    SERVER/request_owners.json  request id -> the node that first reported it (atomic)
    SERVER/releases/        the signed, append-only release registry (common.release)

Rules (also in docs/formats.md):
- a delta is accepted only if its envelope verifies (common.envelope) and it fits the global
  model: same tensor names, shapes and dtypes, finite values, and a global L2 norm at most
  ``max_delta_ratio`` x the norm of the global weights;
- a request id belongs to the node that first reported it (``query.pending`` or its first
  accepted envelope); an envelope naming another node's id, or an id another delta of the same
  round already names, is refused (that delta only);
- whatever goes wrong while opening or checking one node's delta is that delta's verdict; the
  round goes on with the others;
- several accepted deltas of one round are **summed**: forget sets of different nodes are
  disjoint, each delta removes one node's recordings, and removing all of them is the sum of
  the removals (averaging would remove only 1/k of each);
- the elastic constraint (common.unlearning.elastic) then limits each parameter's movement by
  the global importance map (``constraint_tau``, ``constraint_strength``) before the sum touches the global model;
- where the server holds a held-out set, a delta that passed those checks is still refused when
  applying it (constrained) alone lowers held-out UA by more than ``max_ua_drop`` points
  (:func:`gate_on_held_out`): the norm bound and the elastic constraint limit how far weights
  move, not what the move does, and a crafted delta inside both can still wreck the model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from serforget.common.checkpoint import state_dict_from_bytes
from serforget.common.envelope import EnvelopeError, EnvelopeHeader, open_delta, read_header_unverified
from serforget.common.fsutil import atomic_write_json
from serforget.common.keys import (
    enroll_node,
    init_keys,
    load_enrolled_nodes,
    load_hpke_private,
    load_signing_private,
    revoked_nodes,
)

#: How old an envelope may be (``created_at``) and how far ahead of the server clock, when opened.
ENVELOPE_MAX_AGE_S = 3600.0
ENVELOPE_MAX_SKEW_S = 300.0
#: An accepted envelope id must be remembered this long after acceptance; any later replay of it
#: is refused as ``expired`` by the freshness check, so the entry can go.
REPLAY_WINDOW_S = ENVELOPE_MAX_AGE_S + ENVELOPE_MAX_SKEW_S
SEEN_FORMAT_VERSION = 2
OWNERS_FORMAT_VERSION = 1


class ServerStateError(ValueError):
    """A server state file (``seen.json``, ``request_owners.json``) is malformed; the message names it."""


class DeltaError(ValueError):
    """A decrypted delta does not fit the global model; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class ServerDir:
    root: Path

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def nodes_registry(self) -> Path:
        return self.root / "nodes.json"

    @property
    def seen_path(self) -> Path:
        return self.root / "seen.json"

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    def init(self) -> "ServerDir":
        """Create the keys if missing and re-sign the release index (repairs an index left behind
        by a crash between a publish's revocation and its index update)."""
        from serforget.common.release import ReleaseRegistry

        init_keys(key_dir=self.keys_dir, role="server")
        registry = ReleaseRegistry(self.releases)
        if registry.versions() and self._index_is_stale(registry):
            registry.refresh_index(signing_key=self.signing_key())
        return self

    def _index_is_stale(self, registry) -> bool:
        """Whether the signed index misses a release or a revocation, or is past half its lifetime.

        Devices refuse an expired index (freeze protection), so every server start re-signs one
        that has used up half of its lifetime, or that carries no expiry (format 1). Read-only:
        takes no lock.
        """
        from serforget.common.keys import load_signing_public
        from serforget.common.release import DEFAULT_INDEX_LIFETIME_S

        if not registry.has_index():
            return True
        index = registry.read_index(public_key=load_signing_public(self.keys_dir / "sign.pub"))
        listed = sorted(entry.version for entry in index.releases)
        aging = index.expires is None or index.expires - time.time() < DEFAULT_INDEX_LIFETIME_S / 2
        return aging or listed != registry.versions() or index.revoked() != registry.revoked()

    def signing_key(self):
        return load_signing_private(self.keys_dir / "sign.key")

    def hpke_private(self):
        return load_hpke_private(self.keys_dir / "hpke.key")

    def enroll(self, *, node_id: str, public_key_path: Path) -> None:
        enroll_node(registry_path=self.nodes_registry, node_id=node_id, public_key_path=public_key_path)

    def node_keys(self) -> dict:
        return load_enrolled_nodes(self.nodes_registry) if self.nodes_registry.exists() else {}

    def revoked_nodes(self) -> set[str]:
        """Node ids revoked with ``serforget keys revoke`` (and not enrolled again with a new key)."""
        return revoked_nodes(self.nodes_registry)

    @property
    def importance_path(self) -> Path:
        return self.root / "importance.safetensors"

    def save_importance(self, importance: Mapping[str, torch.Tensor]) -> None:
        """Keep the global importance map so a later unlearning-only run can apply the elastic rule."""
        from serforget.common.checkpoint import state_dict_bytes
        from serforget.common.fsutil import atomic_write_bytes

        atomic_write_bytes(self.importance_path, state_dict_bytes(importance))

    def load_importance(self) -> dict[str, torch.Tensor] | None:
        if not self.importance_path.exists():
            return None
        return state_dict_from_bytes(self.importance_path.read_bytes(), source=str(self.importance_path))

    def _read_state(self, path: Path, version: int, field_name: str) -> dict | None:
        """A JSON object ``{"format_version": version, field_name: {str: ...}}``, or None if absent."""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ServerStateError(f"{path}: unreadable ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format_version") != version:
            found = raw.get("format_version") if isinstance(raw, dict) else type(raw).__name__
            raise ServerStateError(f"{path}: expected format_version {version}, found {found!r}")
        entries = raw.get(field_name)
        if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
            raise ServerStateError(f"{path}: field {field_name!r} must be an object keyed by id")
        return entries

    def seen_envelopes(self) -> dict[str, float]:
        """Accepted envelope id -> Unix time it was accepted.

        A version-1 file (ids without times) is read as accepted now, so its ids are kept one
        more full window before pruning.
        """
        try:
            raw = json.loads(self.seen_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ServerStateError(f"{self.seen_path}: unreadable ({exc})") from None
        if isinstance(raw, dict) and raw.get("format_version") == 1:
            ids = raw.get("envelope_ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ServerStateError(f"{self.seen_path}: field 'envelope_ids' must be a list of strings")
            return dict.fromkeys(ids, time.time())
        entries = self._read_state(self.seen_path, SEEN_FORMAT_VERSION, "envelopes") or {}
        for envelope_id, when in entries.items():
            if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
                raise ServerStateError(
                    f"{self.seen_path}: envelopes[{envelope_id!r}] must be a Unix time, got {when!r}"
                )
        return {k: float(v) for k, v in entries.items()}

    def seen_ids(self) -> set[str]:
        return set(self.seen_envelopes())

    def remember(self, envelope_ids: Sequence[str], *, now: float | None = None) -> None:
        """Persist accepted envelope ids before the release that applies them is published.

        Entries accepted more than :data:`REPLAY_WINDOW_S` ago are dropped in the same atomic
        write: an envelope that old is refused as ``expired`` before the replay list matters.
        """
        now = time.time() if now is None else now
        kept = {k: v for k, v in self.seen_envelopes().items() if now - v <= REPLAY_WINDOW_S}
        kept.update(dict.fromkeys(envelope_ids, now))
        atomic_write_json(self.seen_path, {"format_version": SEEN_FORMAT_VERSION, "envelopes": kept})

    @property
    def request_owners_path(self) -> Path:
        return self.root / "request_owners.json"

    def request_owners(self) -> dict[str, str]:
        """Request id -> enrolled node id that first reported it."""
        entries = self._read_state(self.request_owners_path, OWNERS_FORMAT_VERSION, "owners") or {}
        for request_id, owner in entries.items():
            if not isinstance(owner, str) or not owner:
                raise ServerStateError(
                    f"{self.request_owners_path}: owners[{request_id!r}] must be a node id, got {owner!r}"
                )
        return dict(entries)

    def bind_requests(self, claims: Mapping[str, Sequence[str]]) -> dict[str, str]:
        """Bind each request id not yet owned to the node claiming it; returns the owners after.

        ``claims`` is node id -> request ids it reports. An unowned id claimed by two nodes at
        once is bound to neither (logged by the caller as contested); an owned id never moves.
        Written atomically (a crash leaves the old or the new bindings, never a mix) and before
        any delta for the ids is asked for, so a restart keeps who owns what.
        """
        owners = self.request_owners()
        claimants: dict[str, set[str]] = {}
        for node_id, request_ids in claims.items():
            for request_id in request_ids:
                claimants.setdefault(request_id, set()).add(node_id)
        new = {rid: next(iter(nodes)) for rid, nodes in claimants.items() if rid not in owners and len(nodes) == 1}
        if new:
            owners.update(new)
            atomic_write_json(self.request_owners_path, {"format_version": OWNERS_FORMAT_VERSION, "owners": owners})
        return owners


def check_delta(
    delta: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], *, max_delta_ratio: float
) -> float:
    """Validate a decrypted delta against the global weights; returns its relative L2 norm."""
    expected = {k: v for k, v in base.items() if v.is_floating_point()}
    missing, extra = sorted(set(expected) - set(delta)), sorted(set(delta) - set(expected))
    if missing or extra:
        raise DeltaError("wrong-keys", f"missing {missing[:3]}, unexpected {extra[:3]}")
    sq_delta, sq_base = 0.0, 0.0
    for name, tensor in delta.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DeltaError("wrong-shape", f"{name}: {tuple(tensor.shape)} != {tuple(expected[name].shape)}")
        # the model's own dtype only: exotic ones (float8, complex) break the checks below
        if tensor.dtype != expected[name].dtype:
            raise DeltaError("wrong-dtype", f"{name}: {tensor.dtype} but the model holds {expected[name].dtype}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise DeltaError("non-finite", f"{name} holds NaN/Inf or is not floating point")
        sq_delta += float(tensor.double().pow(2).sum())
        sq_base += float(expected[name].double().pow(2).sum())
    ratio = math.sqrt(sq_delta) / max(math.sqrt(sq_base), 1e-12)
    if ratio > max_delta_ratio:
        raise DeltaError("too-large", f"delta norm is {ratio:.3f} x the model norm (limit {max_delta_ratio})")
    return ratio


@dataclass
class DeltaVerdict:
    node_id: str
    accepted: bool
    reason: str
    header: EnvelopeHeader | None = None
    delta: dict[str, torch.Tensor] | None = None
    relative_norm: float | None = None
    open_seconds: float = 0.0
    #: Held-out UA points lost by applying this delta alone (``None``: not measured).
    ua_drop: float | None = None


def open_and_check(
    *,
    envelope: bytes,
    claimed_node: str,
    server: ServerDir,
    base_state: Mapping[str, torch.Tensor],
    base_version: int,
    base_sha256: str,
    seen: set[str],
    max_delta_ratio: float,
    applied_request_ids: set[str] = frozenset(),
    owners: Mapping[str, str] | None = None,
    round_requests: set[str] | None = None,
) -> DeltaVerdict:
    """Verify, decrypt and check one node's envelope; every failure becomes a logged verdict.

    ``applied_request_ids`` are request ids some published release already applies: a second delta
    for them (a node that missed the announcement re-sends) is refused, so it is applied once.
    ``owners`` (request id -> node id, :meth:`ServerDir.request_owners`) refuses an envelope that
    names another node's request (``not-owner``). ``round_requests`` holds the ids accepted
    deltas of this round already name; a second delta naming one is refused
    (``duplicate-request``) and an accepted delta adds its ids to it.

    Whatever one delta makes go wrong while it is opened and checked - also an exception no
    check anticipated - is that delta's ``invalid`` verdict, never the round's end. The server's
    own keys are loaded first, outside that net: a broken server is not a node's fault.
    """
    start = time.perf_counter()
    hpke_private, node_keys, revoked = server.hpke_private(), server.node_keys(), server.revoked_nodes()
    try:
        # a revoked node is no longer in node_keys; name the reason instead of "unknown-node"
        named = read_header_unverified(envelope).node_id
        if named in revoked:
            raise DeltaError("revoked", f"node {named!r} was revoked (serforget keys revoke)")
        header, payload = open_delta(
            envelope=envelope,
            server_hpke_private=hpke_private,
            node_keys=node_keys,
            expected_base_version=base_version,
            expected_base_sha256=base_sha256,
            seen_ids=seen,
            max_age_s=ENVELOPE_MAX_AGE_S,
            max_skew_s=ENVELOPE_MAX_SKEW_S,
        )
        if header.node_id != claimed_node:
            raise DeltaError("node-mismatch", f"envelope signed by {header.node_id!r} arrived from {claimed_node!r}")
        foreign = sorted(rid for rid in header.request_ids if (owners or {}).get(rid, header.node_id) != header.node_id)
        if foreign:
            raise DeltaError("not-owner", f"requests {foreign} belong to another node")
        again = sorted(set(header.request_ids) & set(applied_request_ids))
        if again:
            raise DeltaError("already-applied", f"requests {again} are applied by an earlier release")
        twice = sorted(set(header.request_ids) & (round_requests or set()))
        if twice:
            raise DeltaError("duplicate-request", f"requests {twice} are named by another delta of this round")
        delta = state_dict_from_bytes(payload, source=f"delta from {header.node_id}")
        ratio = check_delta(delta, base_state, max_delta_ratio=max_delta_ratio)
    except (EnvelopeError, DeltaError, ValueError) as exc:
        return DeltaVerdict(
            claimed_node, False, f"{getattr(exc, 'reason', 'invalid')}: {exc}", open_seconds=time.perf_counter() - start
        )
    except Exception as exc:  # noqa: BLE001 - one hostile delta must not end the round for the others
        return DeltaVerdict(
            claimed_node, False, f"invalid: {type(exc).__name__}: {exc}", open_seconds=time.perf_counter() - start
        )
    seen.add(header.envelope_id)
    if round_requests is not None:
        round_requests.update(header.request_ids)
    return DeltaVerdict(header.node_id, True, "accepted", header, delta, ratio, time.perf_counter() - start)


def merge_deltas(
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    *,
    importance: Mapping[str, torch.Tensor] | None,
    constraint: bool,
    constraint_tau: float,
    constraint_strength: float,
) -> dict[str, torch.Tensor]:
    """New global weights: base + sum of deltas, each under the elastic constraint when ``constraint``."""
    from serforget.common.unlearning.elastic import elastic_constraint

    merged = {k: v.clone() for k, v in base.items()}
    for delta in deltas:
        applied = (
            elastic_constraint(
                dict(delta),
                dict(importance),
                constraint_tau=constraint_tau,
                constraint_strength=constraint_strength,
            )
            if constraint and importance is not None
            else delta
        )
        for name, step in applied.items():
            merged[name] = merged[name] + step.to(merged[name].dtype)
    return merged


def gate_on_held_out(
    verdicts: Sequence[DeltaVerdict],
    *,
    base: Mapping[str, torch.Tensor],
    score: Callable[[Mapping[str, torch.Tensor]], float],
    max_ua_drop: float,
    importance: Mapping[str, torch.Tensor] | None,
    constraint: bool,
    constraint_tau: float,
    constraint_strength: float,
) -> list[DeltaVerdict]:
    """Refuse accepted deltas whose application alone costs more than ``max_ua_drop`` UA points.

    ``score(state)`` is the held-out UA (0-1) of a model with those weights. Each delta is applied
    exactly as :func:`merge_deltas` would apply it (elastic constraint included), one at a time,
    so a node cannot hide a harmful delta behind another node's. An honest unlearning delta
    moves held-out UA by a fraction of a point (forget sets are a sliver of the data); a crafted
    one that fits the norm bound costs tens of points (``benchmarks/bench_malicious.py``).
    Rejected and already-refused verdicts come back with ``accepted=False``; order is kept.
    """
    if max_ua_drop < 0:
        raise ValueError(f"max_ua_drop must be >= 0 UA points, got {max_ua_drop}")
    base_ua = score(base)
    out: list[DeltaVerdict] = []
    for verdict in verdicts:
        if not verdict.accepted or verdict.delta is None:
            out.append(verdict)
            continue
        candidate = merge_deltas(
            base,
            [verdict.delta],
            importance=importance,
            constraint=constraint,
            constraint_tau=constraint_tau,
            constraint_strength=constraint_strength,
        )
        drop = (base_ua - score(candidate)) * 100
        if drop > max_ua_drop:
            out.append(
                replace(
                    verdict,
                    accepted=False,
                    ua_drop=drop,
                    reason=f"harms-held-out: held-out UA -{drop:.1f} points (limit {max_ua_drop})",
                )
            )
        else:
            out.append(replace(verdict, ua_drop=drop))
    return out


def applied_request_ids(releases: Path) -> set[str]:
    """Every request id that a published release applies (the registry is the source of truth)."""
    from serforget.common.release import ReleaseRegistry

    registry = ReleaseRegistry(releases)
    return {rid for v in registry.versions() for rid in registry.manifest(v).applied_request_ids}


def latest_release_state(server: ServerDir):
    """``(manifest, weights)`` of the newest non-revoked release, verified, or ``None``.

    Lets a deployment resume from what it published (e.g. an unlearning-only run with
    ``num-rounds = 0``) instead of a fresh model.
    """
    from serforget.common.keys import load_signing_public
    from serforget.common.release import ReleaseRegistry

    registry = ReleaseRegistry(server.releases)
    manifest = registry.latest(public_key=load_signing_public(server.keys_dir / "sign.pub"))
    if manifest is None:
        return None
    weights = registry.path(manifest.version) / "model.safetensors"
    return manifest, state_dict_from_bytes(weights.read_bytes(), source=str(weights))


def weighted_average(maps: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Example-weighted mean of per-node importance maps (the server's global importance)."""
    total = sum(w for _, w in maps)
    if not maps or total <= 0:
        raise ValueError("no importance maps with positive weight to average")
    keys = maps[0][0].keys()
    return {k: sum(m[k].float() * (w / total) for m, w in maps) for k in keys}


def publish_release(
    *,
    server: ServerDir,
    model: torch.nn.Module,
    labels: Sequence[str],
    parent: int | None,
    applied_request_ids: Sequence[str] = (),
    metrics: Mapping[str, float] | None = None,
    onnx: bool = True,
    eval_manifest: Path | None = None,
    int8_max_ua_drop: float = 1.0,
    revoke_previous: bool = False,
    reason: str = "",
):
    """Checkpoint + (optionally) ONNX exports of ``model``, published as the next signed release.

    A release that applies deletions revokes every earlier one: they still encode the audio.
    """
    import tempfile

    from serforget.common.checkpoint import save_checkpoint
    from serforget.common.release import ReleaseRegistry

    registry = ReleaseRegistry(server.releases)
    version = max(registry.versions(), default=0) + 1
    with tempfile.TemporaryDirectory(prefix="release-") as tmp:
        ckpt = save_checkpoint(
            model=model.cpu(),
            out_dir=Path(tmp) / "ckpt",
            labels=labels,
            provenance={"release_version": version, "parent": parent},
        )
        files = {"model.safetensors": ckpt / "model.safetensors", "model.json": ckpt / "model.json"}
        if onnx:
            from serforget.common.onnx_export import export_release_models

            files.update(
                export_release_models(
                    checkpoint_dir=ckpt,
                    out_dir=Path(tmp) / "onnx",
                    parity_manifest=eval_manifest,
                    release_version=version,
                    int8=True,
                    max_ua_drop=int8_max_ua_drop,
                )
            )
        manifest = registry.publish(
            files=files,
            signing_key=server.signing_key(),
            parent=parent,
            applied_request_ids=list(applied_request_ids),
            metrics=dict(metrics or {}),
            revoke_previous=revoke_previous,
            reason=reason,
        )
    if manifest.version != version:
        raise RuntimeError(f"release registry assigned v{manifest.version}, expected v{version}: concurrent publisher?")
    return manifest
