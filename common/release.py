"""Signed, versioned, append-only registry of model releases (format, writer, verifier).

Why: after federated training and after every unlearning round the server publishes a model
to edge devices. A release made before an applied deletion still encodes the forgotten audio,
so it must be *revoked* and never served again, and devices must be able to prove that what
they install came from the server and was not altered or replayed on the way. Hence:

* every release is a folder written once (staged, fsynced, renamed into place) whose content
  is never modified, with a canonical-JSON manifest listing each file's SHA-256 and size,
  signed with the server's Ed25519 key; when a release is revoked its model files are deleted
  and the signed manifest stays as a tombstone (the weights still encode forgotten audio);
* revocations are an append-only log of signed entries;
* a signed index (one per publish/revoke/refresh, with a strictly increasing sequence number
  and a signed expiry) lists every release, its manifest hash and whether it is revoked.
  Remote clients read it first, pin it to the manifest they download, use the sequence number
  to refuse a replayed, older index that would hide a revocation, and the expiry to refuse one
  an attacker keeps replaying (freeze);
* the signing key can be rotated: ``root/rNNNNNN.json`` is signed by the old and the new key,
  and every signature (never a manifest's content) is then replaced by the new key's.

See docs/release-distribution.md for the freshness rules and the attacks they stop.

This module must not import torch: edge devices use it with ONNX Runtime only.

On-disk layout under ``root`` (manifest format 2, which reads format 1 too; signatures,
revocations, rotations and HEAD format 1; index format 2)::

    v0001/                  one folder per release (never rewritten)
        manifest.json       canonical JSON, see ReleaseManifest
        manifest.sig        {"format_version", "algorithm", "signature"} over manifest.json's bytes
        model.safetensors   ... every file listed in the manifest, nothing else
    revocations/r000001.json   one signed entry per revoke call, created with no-clobber
    index/g000007.json         index generation 7 (canonical JSON, see ReleaseIndex)
    index/g000007.sig          its signature
    index/HEAD.json            {"format_version": 1, "generation": 7}, swapped atomically last,
                               so whoever follows HEAD finds a matching json/sig pair; it is
                               served as /index.json and /index.sig (index format 2)
    root/r000002.json          key rotation to key version 2 (version 1 is the pinned sign.pub)
    .lock                      flock serialising writers
    .staging-*                 an interrupted publish; ignored by readers, removed by the next one
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from serforget.common.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_bytes, sha256_file
from serforget.common.manifest import IdError, check_id

logger = logging.getLogger(__name__)

RELEASE_FORMAT_VERSION = 1
#: The index has its own version: format 2 added the signed ``expires`` (freeze protection).
#: Format 1 indexes still parse (``expires`` is ``None``) so a server can read what it wrote
#: before the upgrade and re-sign it; devices refuse them.
INDEX_FORMAT_VERSION = 2
SIGNATURE_ALGORITHM = "ed25519"
#: How long a signed index stays valid by default. The server re-signs it on every publish and
#: revoke, and an operator job (``serforget server refresh-index``) re-signs it in between.
DEFAULT_INDEX_LIFETIME_S = 7 * 24 * 3600.0
#: Longest lifetime a device accepts: an index signed to live for years would defeat expiry.
MAX_INDEX_LIFETIME_S = 90 * 24 * 3600.0

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
#: Names under which the current index generation is served over HTTP.
INDEX_NAME = "index.json"
INDEX_SIGNATURE_NAME = "index.sig"

_LOCK_NAME = ".lock"
_STAGING_PREFIX = ".staging-"
_INDEX_DIR = "index"
_INDEX_HEAD = "HEAD.json"
_REVOCATIONS_DIR = "revocations"
_ROOT_DIR = "root"
_ROTATION_RE = re.compile(r"r(\d{6,})\.json")

_VERSION_DIR_RE = re.compile(r"v(\d{4,})")
_GENERATION_RE = re.compile(r"g(\d{6,})\.(json|sig)")
_REVOCATION_RE = re.compile(r"r(\d{6,})\.json")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: Release file names are single path components that cannot be hidden files, so a name taken
#: from a manifest or a URL can never address anything outside its release folder.
FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
_COPY_CHUNK = 1 << 20
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class ReleaseError(ValueError):
    """A release, index or revocation entry is malformed, unsigned or tampered with; the message names it."""


# --------------------------------------------------------------------------- small helpers


def version_dirname(version: int) -> str:
    """Folder (and URL) name of a release: ``v0001``."""
    _check_version_number(version, what="version")
    return f"v{version:04d}"


def parse_version_dirname(name: str) -> int | None:
    """Inverse of :func:`version_dirname`; ``None`` for anything else (staging dirs, ``v01``, ``v00001``)."""
    match = _VERSION_DIR_RE.fullmatch(name)
    if match is None:
        return None
    version = int(match.group(1))
    return version if version >= 1 and version_dirname(version) == name else None


def canonical_json_bytes(obj: Any, *, what: str) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace, ASCII, no NaN) for signing and hashing."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
            "ascii"
        )
    except (TypeError, ValueError) as exc:
        raise ReleaseError(f"{what}: not representable as strict JSON ({exc})") from None


def check_file_name(name: str, *, what: str) -> str:
    """Refuse release file names that could escape the release folder or shadow the manifest."""
    if not isinstance(name, str) or not FILE_NAME_RE.fullmatch(name):
        raise ReleaseError(f"{what}: file name {name!r} must match {FILE_NAME_RE.pattern}")
    if name in _RESERVED_NAMES:
        raise ReleaseError(f"{what}: file name {name!r} is reserved for the release's own manifest")
    return name


def _check_version_number(value: Any, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ReleaseError(f"{what}: expected a positive integer release version, got {value!r}")
    return value


def _require_private_key(key: Any) -> Ed25519PrivateKey:
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"signing_key must be an Ed25519PrivateKey, got {type(key).__name__}")
    return key


def _require_public_key(key: Any) -> Ed25519PublicKey:
    if not isinstance(key, Ed25519PublicKey):
        raise TypeError(f"public_key must be an Ed25519PublicKey, got {type(key).__name__}")
    return key


def _load_json_object(data: bytes, *, source: str) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReleaseError(f"{source}: not valid UTF-8 JSON ({exc})") from None
    except RecursionError:
        # a few KB of "[" nest deeper than the parser's recursion limit; hostile input, not a crash
        raise ReleaseError(f"{source}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ReleaseError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _require_fields(obj: Mapping[str, Any], expected: set[str], *, source: str) -> None:
    missing = sorted(expected - obj.keys())
    unknown = sorted(obj.keys() - expected)
    if missing or unknown:
        raise ReleaseError(f"{source}: missing fields {missing}, unknown fields {unknown}")


def _require_format_version(obj: Mapping[str, Any], *, source: str) -> None:
    if obj.get("format_version") != RELEASE_FORMAT_VERSION:
        raise ReleaseError(
            f"{source}: format_version {obj.get('format_version')!r} is not supported "
            f"(this code reads {RELEASE_FORMAT_VERSION})"
        )


def _require_number(value: Any, *, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReleaseError(f"{what}: expected a finite number, got {value!r}")
    return float(value)


def _require_str(value: Any, *, what: str) -> str:
    if not isinstance(value, str):
        raise ReleaseError(f"{what}: expected a string, got {value!r}")
    return value


def _json_clone(value: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """Deep-copy caller metadata through strict JSON so what is signed is exactly what is stored."""
    if not isinstance(value, Mapping):
        raise ReleaseError(f"{what}: expected a mapping, got {type(value).__name__}")
    return json.loads(canonical_json_bytes(dict(value), what=what))


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (never overwrite) and fsync it; used only inside private staging folders."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _create_no_clobber(path: Path, data: bytes) -> None:
    """Atomically create ``path`` with ``data``; fail if it exists (append-only logs must not be rewritten)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise ReleaseError(f"{path}: already exists; append-only entries are never overwritten") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise writers across processes with ``flock``.

    Why flock: the kernel drops it when the holder dies, so a crashed publish never leaves a
    stale lock behind that would block the next (possibly privacy-critical) release.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- signatures


def sign_bytes(data: bytes, *, signing_key: Ed25519PrivateKey) -> bytes:
    """Signature file content (versioned JSON) for the exact bytes ``data``."""
    signature = _require_private_key(signing_key).sign(data)
    document = {
        "format_version": RELEASE_FORMAT_VERSION,
        "algorithm": SIGNATURE_ALGORITHM,
        "signature": signature.hex(),
    }
    return canonical_json_bytes(document, what="signature")


def verify_signature(data: bytes, signature_file: bytes, *, public_key: Ed25519PublicKey, source: str) -> None:
    """Raise :class:`ReleaseError` unless ``signature_file`` is a valid signature of ``data`` by ``public_key``."""
    _require_public_key(public_key)
    document = _load_json_object(signature_file, source=f"{source} signature")
    _require_fields(document, {"format_version", "algorithm", "signature"}, source=f"{source} signature")
    _require_format_version(document, source=f"{source} signature")
    if document["algorithm"] != SIGNATURE_ALGORITHM:
        raise ReleaseError(f"{source} signature: algorithm {document['algorithm']!r} is not {SIGNATURE_ALGORITHM!r}")
    try:
        signature = bytes.fromhex(_require_str(document["signature"], what=f"{source} signature"))
    except ValueError:
        raise ReleaseError(f"{source} signature: 'signature' is not hex") from None
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        raise ReleaseError(f"{source}: signature does not verify against the pinned public key") from None


# --------------------------------------------------------------------------- manifest


#: Version of ``manifest.json`` that :meth:`ReleaseManifest.to_bytes` writes. Format 2 renamed
#: the request list ``applies_requests`` to ``applied_request_ids`` (the project's one name for a
#: deletion request is ``request_id``). Published manifests are signed and never rewritten, so
#: every version in :data:`MANIFEST_REQUEST_FIELD` stays readable and verifiable.
MANIFEST_FORMAT_VERSION = 2
#: The name of the applied-request list in each readable manifest format.
MANIFEST_REQUEST_FIELD: dict[int, str] = {1: "applies_requests", 2: "applied_request_ids"}


@dataclass(frozen=True)
class ReleaseManifest:
    """What one release contains and why it exists; signed as canonical JSON in ``manifest.json``.

    ``files`` maps each file name to ``{"sha256": hex, "size": bytes}``. ``applied_request_ids``
    lists the deletion requests whose effect this model already includes, so an auditor can tell
    which releases may still encode forgotten audio. ``parent`` is the release it derives from.
    ``format_version`` is the layout the bytes were (or will be) written in: a manifest read from
    an older release keeps its version, so :meth:`to_bytes` gives back exactly the signed bytes.
    """

    version: int
    parent: int | None
    created_at: float
    files: dict[str, dict]
    applied_request_ids: tuple[str, ...]
    metrics: dict
    notes: dict
    format_version: int = MANIFEST_FORMAT_VERSION

    _COMMON_FIELDS = frozenset({"format_version", "version", "parent", "created_at", "files", "metrics", "notes"})

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes: the exact bytes that are signed and hashed into the index."""
        request_field = _manifest_request_field(self.format_version, source=f"release {self.version} manifest")
        document = {
            "format_version": self.format_version,
            "version": self.version,
            "parent": self.parent,
            "created_at": self.created_at,
            "files": self.files,
            request_field: list(self.applied_request_ids),
            "metrics": self.metrics,
            "notes": self.notes,
        }
        return canonical_json_bytes(document, what=f"release {self.version} manifest")

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> ReleaseManifest:
        """Parse and strictly validate manifest bytes (format 1 or 2); ``source`` names them in errors.

        Each format has exactly one name for the request list: a manifest carrying both names, the
        other format's name, or neither is refused, never read by guessing.
        """
        obj = _load_json_object(data, source=source)
        format_version = obj.get("format_version")
        request_field = _manifest_request_field(format_version, source=source)
        other = sorted(set(MANIFEST_REQUEST_FIELD.values()) - {request_field})
        misplaced = [name for name in other if name in obj]
        if misplaced:
            raise ReleaseError(
                f"{source}: field {misplaced[0]!r} does not belong to manifest format {format_version} "
                f"(its request list is {request_field!r})"
            )
        _require_fields(obj, set(cls._COMMON_FIELDS) | {request_field}, source=source)
        version = _check_version_number(obj["version"], what=f"{source}: version")
        parent = obj["parent"]
        if parent is not None:
            _check_version_number(parent, what=f"{source}: parent")
            if parent >= version:
                raise ReleaseError(f"{source}: parent {parent} must be older than version {version}")
        return cls(
            version=version,
            parent=parent,
            created_at=_require_number(obj["created_at"], what=f"{source}: created_at"),
            files=_parse_file_table(obj["files"], source=source),
            applied_request_ids=_parse_requests(obj[request_field], what=f"{source}: {request_field}"),
            metrics=_require_mapping(obj["metrics"], what=f"{source}: metrics"),
            notes=_require_mapping(obj["notes"], what=f"{source}: notes"),
            format_version=format_version,
        )


def _manifest_request_field(format_version: Any, *, source: str) -> str:
    """The request-list field of a manifest format, or :class:`ReleaseError` naming the version."""
    if type(format_version) is not int or format_version not in MANIFEST_REQUEST_FIELD:
        raise ReleaseError(
            f"{source}: format_version {format_version!r} is not supported "
            f"(this code reads manifest formats {sorted(MANIFEST_REQUEST_FIELD)})"
        )
    return MANIFEST_REQUEST_FIELD[format_version]


def _require_mapping(value: Any, *, what: str) -> dict:
    if not isinstance(value, dict):
        raise ReleaseError(f"{what}: expected a JSON object, got {value!r}")
    return value


def _parse_requests(value: Any, *, what: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ReleaseError(f"{what}: expected a list of request ids, got {value!r}")
    requests = tuple(value)
    for request in requests:
        try:
            check_id(request, what=what)
        except IdError as exc:
            raise ReleaseError(str(exc)) from None
    if len(set(requests)) != len(requests):
        raise ReleaseError(f"{what}: duplicate request ids in {list(requests)}")
    return requests


def _parse_file_table(value: Any, *, source: str) -> dict[str, dict]:
    if not isinstance(value, dict) or not value:
        raise ReleaseError(f"{source}: 'files' must be a non-empty object")
    table: dict[str, dict] = {}
    for name, entry in value.items():
        check_file_name(name, what=source)
        what = f"{source}: files[{name!r}]"
        if not isinstance(entry, dict):
            raise ReleaseError(f"{what}: expected an object with sha256 and size")
        _require_fields(entry, {"sha256", "size"}, source=what)
        digest, size = entry["sha256"], entry["size"]
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise ReleaseError(f"{what}: sha256 must be 64 lower-case hex digits, got {digest!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ReleaseError(f"{what}: size must be a non-negative integer, got {size!r}")
        table[name] = {"sha256": digest, "size": size}
    return table


def check_signed_manifest(
    manifest_bytes: bytes, signature_file: bytes, *, public_key: Ed25519PublicKey, source: str
) -> ReleaseManifest:
    """Verify the signature over the exact manifest bytes, then parse them."""
    verify_signature(manifest_bytes, signature_file, public_key=public_key, source=source)
    return ReleaseManifest.from_bytes(manifest_bytes, source=source)


def check_release_dir(folder: Path, manifest: ReleaseManifest, *, tombstone: bool = False) -> None:
    """Raise unless ``folder`` holds exactly the manifest's files with matching sizes and hashes.

    Extra files are refused too: anything in a release folder that the signature does not
    cover could be picked up by a loader and must not be trusted. With ``tombstone`` (a
    revoked release, whose model files are deleted) the manifest's files may be missing, but
    any still present must match and nothing else may be there.
    """
    expected = set(manifest.files) | _RESERVED_NAMES
    try:
        present = set(os.listdir(folder))
    except OSError as exc:
        raise ReleaseError(f"{folder}: cannot list release folder ({exc.strerror})") from None
    missing, extra = sorted(expected - present), sorted(present - expected)
    if tombstone:
        missing = sorted(_RESERVED_NAMES - present)
    if missing or extra:
        raise ReleaseError(f"{folder}: files do not match the signed manifest (missing {missing}, extra {extra})")
    for name, meta in sorted(manifest.files.items()):
        path = folder / name
        if tombstone and name not in present:
            continue
        if path.is_symlink() or not path.is_file():
            raise ReleaseError(f"{path}: not a regular file")
        size = path.stat().st_size
        if size != meta["size"]:
            raise ReleaseError(f"{path}: size {size} does not match the signed size {meta['size']}")
        if sha256_file(path) != meta["sha256"]:
            raise ReleaseError(f"{path}: SHA-256 does not match the signed manifest")


# --------------------------------------------------------------------------- index


@dataclass(frozen=True)
class IndexEntry:
    """One release as listed in the signed index; ``reason`` is empty unless ``revoked``."""

    version: int
    manifest_sha256: str
    revoked: bool
    reason: str = ""


@dataclass(frozen=True)
class ReleaseIndex:
    """Signed table of contents of a registry; ``sequence`` increases with every rewrite.

    ``expires`` (epoch seconds, signed) bounds how long a device may act on this index: past
    it a replayed index, however authentic, is refused, so an attacker who withholds new
    indexes (freeze) can keep a device on an old view for at most one lifetime. ``None`` only
    for format-1 indexes written before expiry existed; devices refuse those.
    """

    sequence: int
    generated_at: float
    releases: tuple[IndexEntry, ...]
    expires: float | None = None
    format_version: int = INDEX_FORMAT_VERSION

    def newest_available(self) -> IndexEntry | None:
        """The newest release that is not revoked, or ``None``."""
        available = [entry for entry in self.releases if not entry.revoked]
        return max(available, key=lambda entry: entry.version, default=None)

    def revoked(self) -> dict[int, str]:
        """Revoked version -> reason."""
        return {entry.version: entry.reason for entry in self.releases if entry.revoked}

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes: exactly what index.sig signs."""
        document = {
            "format_version": self.format_version,
            "sequence": self.sequence,
            "generated_at": self.generated_at,
            **({"expires": self.expires} if self.format_version >= 2 else {}),
            "releases": [
                {"version": e.version, "manifest_sha256": e.manifest_sha256, "revoked": e.revoked, "reason": e.reason}
                for e in self.releases
            ],
        }
        return canonical_json_bytes(document, what="release index")

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> ReleaseIndex:
        """Parse and strictly validate index bytes (the signature is checked by parse_signed_index)."""
        obj = _load_json_object(data, source=source)
        version = obj.get("format_version")
        if isinstance(version, bool) or version not in (1, INDEX_FORMAT_VERSION):
            raise ReleaseError(
                f"{source}: format_version {version!r} is not supported (this code reads 1 and {INDEX_FORMAT_VERSION})"
            )
        fields = {"format_version", "sequence", "generated_at", "releases"} | ({"expires"} if version >= 2 else set())
        _require_fields(obj, fields, source=source)
        generated_at = _require_number(obj["generated_at"], what=f"{source}: generated_at")
        expires = _require_number(obj["expires"], what=f"{source}: expires") if version >= 2 else None
        if expires is not None and expires <= generated_at:
            raise ReleaseError(f"{source}: expires ({expires}) is not after generated_at ({generated_at})")
        if not isinstance(obj["releases"], list):
            raise ReleaseError(f"{source}: 'releases' must be a list")
        entries = tuple(
            _parse_index_entry(raw, source=f"{source}: releases[{i}]") for i, raw in enumerate(obj["releases"])
        )
        versions = [entry.version for entry in entries]
        if len(set(versions)) != len(versions):
            raise ReleaseError(f"{source}: a version is listed twice")
        return cls(
            sequence=_check_version_number(obj["sequence"], what=f"{source}: sequence"),
            generated_at=generated_at,
            releases=entries,
            expires=expires,
            format_version=version,
        )


def _parse_index_entry(raw: Any, *, source: str) -> IndexEntry:
    if not isinstance(raw, dict):
        raise ReleaseError(f"{source}: expected an object")
    _require_fields(raw, {"version", "manifest_sha256", "revoked", "reason"}, source=source)
    digest = raw["manifest_sha256"]
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise ReleaseError(f"{source}: manifest_sha256 must be 64 lower-case hex digits")
    if not isinstance(raw["revoked"], bool):
        raise ReleaseError(f"{source}: revoked must be true or false")
    return IndexEntry(
        version=_check_version_number(raw["version"], what=f"{source}: version"),
        manifest_sha256=digest,
        revoked=raw["revoked"],
        reason=_require_str(raw["reason"], what=f"{source}: reason"),
    )


def parse_signed_index(
    index_bytes: bytes, signature_file: bytes, *, public_key: Ed25519PublicKey, source: str
) -> ReleaseIndex:
    """Verify the index signature against the pinned key, then parse it."""
    verify_signature(index_bytes, signature_file, public_key=public_key, source=source)
    return ReleaseIndex.from_bytes(index_bytes, source=source)


# --------------------------------------------------------------------------- revocations


@dataclass(frozen=True)
class Revocation:
    """One append-only, signed revocation entry."""

    sequence: int
    versions: tuple[int, ...]
    reason: str
    revoked_at: float

    def payload_bytes(self) -> bytes:
        payload = {
            "sequence": self.sequence,
            "versions": list(self.versions),
            "reason": self.reason,
            "revoked_at": self.revoked_at,
        }
        return canonical_json_bytes(payload, what=f"revocation {self.sequence}")


def _encode_revocation(entry: Revocation, *, signing_key: Ed25519PrivateKey) -> bytes:
    """One self-contained file per entry (payload + signature), so a single atomic create logs it."""
    document = {
        "format_version": RELEASE_FORMAT_VERSION,
        "entry": json.loads(entry.payload_bytes()),
        "signature": json.loads(sign_bytes(entry.payload_bytes(), signing_key=signing_key)),
    }
    return canonical_json_bytes(document, what=f"revocation {entry.sequence}")


def _decode_revocation(data: bytes, *, source: str, public_key: Ed25519PublicKey | None) -> Revocation:
    """Parse an entry; with ``public_key`` also check its signature over the canonical payload."""
    document = _load_json_object(data, source=source)
    _require_fields(document, {"format_version", "entry", "signature"}, source=source)
    _require_format_version(document, source=source)
    raw = _require_mapping(document["entry"], what=f"{source}: entry")
    _require_fields(raw, {"sequence", "versions", "reason", "revoked_at"}, source=f"{source}: entry")
    if not isinstance(raw["versions"], list) or not raw["versions"]:
        raise ReleaseError(f"{source}: entry.versions must be a non-empty list")
    entry = Revocation(
        sequence=_check_version_number(raw["sequence"], what=f"{source}: sequence"),
        versions=tuple(_check_version_number(v, what=f"{source}: versions") for v in raw["versions"]),
        reason=_require_str(raw["reason"], what=f"{source}: reason"),
        revoked_at=_require_number(raw["revoked_at"], what=f"{source}: revoked_at"),
    )
    if public_key is not None:
        signature_file = canonical_json_bytes(
            _require_mapping(document["signature"], what=f"{source}: signature"), what=source
        )
        verify_signature(entry.payload_bytes(), signature_file, public_key=public_key, source=source)
    return entry


# --------------------------------------------------------------------------- key rotation


def public_key_hex(key: Ed25519PublicKey) -> str:
    """Raw 32-byte Ed25519 public key as hex: how rotation documents and device state name a key."""
    return _require_public_key(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _public_key_from_hex(value: Any, *, what: str) -> Ed25519PublicKey:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ReleaseError(f"{what}: expected a 64-hex-digit Ed25519 public key, got {value!r:.80}")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))


def rotation_name(version: int) -> str:
    """Relative path (and URL) of the rotation document that introduces key ``version`` (>= 2)."""
    return f"{_ROOT_DIR}/r{_check_version_number(version, what='key version'):06d}.json"


def _rotation_payload(version: int, new_hex: str, previous_hex: str, rotated_at: float) -> bytes:
    payload = {"version": version, "public_key": new_hex, "previous_public_key": previous_hex, "rotated_at": rotated_at}
    return canonical_json_bytes(payload, what=f"key rotation {version}")


def encode_rotation(*, version: int, old_signing_key: Ed25519PrivateKey, new_signing_key: Ed25519PrivateKey) -> bytes:
    """A rotation document: key ``version`` is ``new_signing_key``'s public key, signed by the old and the new key.

    Both signatures, as TUF requires of a new root: the old key vouches for the change, and the
    new key proves its holder took part (nobody can rotate devices onto a key they do not hold).
    """
    new_hex = public_key_hex(_require_private_key(new_signing_key).public_key())
    previous_hex = public_key_hex(_require_private_key(old_signing_key).public_key())
    rotated_at = time.time()
    payload = _rotation_payload(version, new_hex, previous_hex, rotated_at)
    document = {
        "format_version": RELEASE_FORMAT_VERSION,
        "version": version,
        "public_key": new_hex,
        "previous_public_key": previous_hex,
        "rotated_at": rotated_at,
        "signature_by_previous": old_signing_key.sign(payload).hex(),
        "signature_by_new": new_signing_key.sign(payload).hex(),
    }
    return canonical_json_bytes(document, what=f"key rotation {version}")


def check_rotation(data: bytes, *, trusted: Ed25519PublicKey, version: int, source: str) -> Ed25519PublicKey:
    """Verify the rotation to key ``version`` from the ``trusted`` key; return the new key."""
    obj = _load_json_object(data, source=source)
    _require_fields(
        obj,
        {
            "format_version",
            "version",
            "public_key",
            "previous_public_key",
            "rotated_at",
            "signature_by_previous",
            "signature_by_new",
        },
        source=source,
    )
    _require_format_version(obj, source=source)
    if obj["version"] != version or isinstance(obj["version"], bool):
        raise ReleaseError(f"{source}: is key version {obj['version']!r}, expected {version}")
    if obj["previous_public_key"] != public_key_hex(trusted):
        raise ReleaseError(f"{source}: rotates from a key this device does not trust")
    new_key = _public_key_from_hex(obj["public_key"], what=f"{source}: public_key")
    payload = _rotation_payload(
        version,
        obj["public_key"],
        obj["previous_public_key"],
        _require_number(obj["rotated_at"], what=f"{source}: rotated_at"),
    )
    for field, key in (("signature_by_previous", trusted), ("signature_by_new", new_key)):
        try:
            key.verify(bytes.fromhex(_require_str(obj[field], what=f"{source}: {field}")), payload)
        except (InvalidSignature, ValueError):
            raise ReleaseError(f"{source}: {field} does not verify") from None
    return new_key


# --------------------------------------------------------------------------- registry


class ReleaseRegistry:
    """Append-only store of signed releases under ``root`` (see the module docstring for the layout).

    Readers never lock; writers (publish, revoke, refresh_index) hold an flock on ``root/.lock``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---------------------------------------------------------------- reading

    def path(self, version: int) -> Path:
        """Folder of a release (whether or not it exists)."""
        return self.root / version_dirname(version)

    def versions(self) -> list[int]:
        """Complete releases, oldest first; staging leftovers and stray entries are ignored."""
        if not self.root.is_dir():
            return []
        with os.scandir(self.root) as entries:
            found = [parse_version_dirname(entry.name) for entry in entries if entry.is_dir(follow_symlinks=False)]
        return sorted(version for version in found if version is not None)

    def manifest(self, version: int) -> ReleaseManifest:
        """Parse a release's manifest without checking its signature or files (cheap listing)."""
        path = self.path(version) / MANIFEST_NAME
        manifest = ReleaseManifest.from_bytes(self._read(path), source=str(path))
        self._check_manifest_version(manifest, version, path)
        return manifest

    def verify(self, version: int, *, public_key: Ed25519PublicKey) -> ReleaseManifest:
        """Check the manifest signature and every file's size and hash; return the manifest.

        A revoked release is a tombstone: its model files are deleted (or being deleted), so
        only the files still present are checked, and its signed manifest must remain.
        """
        folder = self.path(version)
        manifest_path = folder / MANIFEST_NAME
        manifest = check_signed_manifest(
            self._read(manifest_path),
            self._read(folder / SIGNATURE_NAME),
            public_key=public_key,
            source=str(manifest_path),
        )
        self._check_manifest_version(manifest, version, manifest_path)
        check_release_dir(folder, manifest, tombstone=version in self._revocation_reasons(public_key=public_key))
        return manifest

    def revoked(self) -> dict[int, str]:
        """Revoked version -> reason of the first revocation that named it (signatures not checked)."""
        return self._revocation_reasons(public_key=None)

    def latest(self, *, public_key: Ed25519PublicKey | None = None) -> ReleaseManifest | None:
        """The newest non-revoked release, or ``None``.

        With ``public_key`` the revocation log's signatures and the chosen release are fully
        verified, and tampering raises instead of silently falling back to an older release.
        """
        revoked = self._revocation_reasons(public_key=public_key)
        candidates = [version for version in self.versions() if version not in revoked]
        if not candidates:
            return None
        newest = candidates[-1]
        return self.manifest(newest) if public_key is None else self.verify(newest, public_key=public_key)

    def has_index(self) -> bool:
        """Whether an index has been signed yet (false before the first publish completes)."""
        return (self.root / _INDEX_DIR / _INDEX_HEAD).is_file()

    def read_index_files(self) -> tuple[bytes, bytes]:
        """The current ``(index.json, index.sig)`` bytes, always a matching pair."""
        head_path = self.root / _INDEX_DIR / _INDEX_HEAD
        generation = self._index_generation()
        if generation == 0:
            raise ReleaseError(f"{head_path}: registry has no index yet (nothing published)")
        stem = self.root / _INDEX_DIR / f"g{generation:06d}"
        return self._read(stem.with_suffix(".json")), self._read(stem.with_suffix(".sig"))

    def read_index(self, *, public_key: Ed25519PublicKey) -> ReleaseIndex:
        """The current index, signature-checked."""
        data, signature = self.read_index_files()
        return parse_signed_index(data, signature, public_key=public_key, source=str(self.root / _INDEX_DIR))

    # ---------------------------------------------------------------- writing

    def publish(
        self,
        *,
        files: Mapping[str, Path],
        signing_key: Ed25519PrivateKey,
        parent: int | None,
        applied_request_ids: Sequence[str] = (),
        metrics: Mapping[str, Any] = _EMPTY,
        notes: Mapping[str, Any] = _EMPTY,
        revoke_previous: bool = False,
        reason: str = "",
    ) -> ReleaseManifest:
        """Publish ``files`` (release name -> source path) as the next version and return its manifest.

        The release is staged in a private folder inside ``root`` and renamed into place in one
        step, so a crash leaves either no release or a complete one. ``revoke_previous=True``
        (for releases that apply deletions) revokes every earlier release; that revocation is
        logged *before* the new release appears, so a crash in between leaves no release live
        that still encodes the deleted audio, rather than both.
        """
        _require_private_key(signing_key)
        sources = _check_sources(files)
        requests = _parse_requests(list(applied_request_ids), what="applied_request_ids")
        metrics_doc = _json_clone(metrics, what="metrics")
        notes_doc = _json_clone(notes, what="notes")
        if reason and not revoke_previous:
            raise ReleaseError("reason is only recorded when revoke_previous=True")
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.root / _LOCK_NAME):
            self._remove_abandoned_staging()
            existing = self.versions()
            if parent is not None and parent not in existing:
                raise ReleaseError(f"{self.root}: parent release {parent!r} does not exist (have {existing})")
            version = max(existing, default=0) + 1
            staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.root))
            try:
                manifest = _stage_release(
                    staging,
                    sources,
                    signing_key=signing_key,
                    version=version,
                    parent=parent,
                    applied_request_ids=requests,
                    metrics=metrics_doc,
                    notes=notes_doc,
                )
                if revoke_previous:
                    self._revoke_earlier(version, requests, reason, signing_key=signing_key)
                    # re-sign the index now: clients that read revocations from the index must
                    # see them even if the process dies before the new release is in place
                    self._write_index(signing_key=signing_key)
                _commit_staged_release(staging, self.path(version))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._write_index(signing_key=signing_key)
            self._bury_revoked(public_key=signing_key.public_key())
        logger.info("published release %s with files %s", version_dirname(version), sorted(manifest.files))
        return manifest

    def revoke(self, *, versions: Sequence[int], reason: str, signing_key: Ed25519PrivateKey) -> None:
        """Append a signed revocation for ``versions`` and re-sign the index; already-revoked ones are skipped."""
        _require_private_key(signing_key)
        if not isinstance(reason, str) or not reason.strip():
            raise ReleaseError("revoke: a non-empty reason is required (it is shown to auditors and devices)")
        requested = [_check_version_number(v, what="revoke: versions") for v in versions]
        if not requested:
            raise ReleaseError("revoke: no versions given")
        with exclusive_lock(self.root / _LOCK_NAME):
            existing = set(self.versions())
            unknown = sorted(set(requested) - existing)
            if unknown:
                raise ReleaseError(f"{self.root}: cannot revoke unknown releases {unknown}")
            self._append_revocation(requested, reason, signing_key=signing_key)
            self._write_index(signing_key=signing_key)
            self._bury_revoked(public_key=signing_key.public_key())

    def refresh_index(
        self, *, signing_key: Ed25519PrivateKey, lifetime_s: float = DEFAULT_INDEX_LIFETIME_S
    ) -> ReleaseIndex:
        """Re-sign the index (next sequence, new expiry) from the releases and revocation log on disk.

        Why public: a crash after a release was renamed into place but before the index was
        rewritten leaves the release complete but unlisted; this repairs it without publishing.
        And since an index expires, a registry with no publish for a while must be re-signed
        periodically or devices stop accepting it (``serforget server refresh-index``).
        """
        _require_private_key(signing_key)
        if (
            isinstance(lifetime_s, bool)
            or not isinstance(lifetime_s, (int, float))
            or not 0 < lifetime_s <= MAX_INDEX_LIFETIME_S
        ):
            raise ReleaseError(
                f"refresh_index: lifetime_s must be in (0, {MAX_INDEX_LIFETIME_S:.0f}] seconds, got {lifetime_s!r}"
            )
        with exclusive_lock(self.root / _LOCK_NAME):
            index = self._write_index(signing_key=signing_key, lifetime_s=float(lifetime_s))
            self._bury_revoked(public_key=signing_key.public_key())  # finishes a burial a crash cut short
            return index

    def key_chain(self, *, pinned: Ed25519PublicKey) -> list[Ed25519PublicKey]:
        """Signing keys from ``pinned`` (key version 1) through every verified rotation, oldest first."""
        keys = [_require_public_key(pinned)]
        folder = self.root / _ROOT_DIR
        present = (
            sorted(int(m.group(1)) for m in map(_ROTATION_RE.fullmatch, os.listdir(folder)) if m)
            if folder.is_dir()
            else []
        )
        for version in present:
            if version != len(keys) + 1:
                raise ReleaseError(f"{folder}: key versions {present} have a gap before {version}")
            path = self.root / rotation_name(version)
            keys.append(check_rotation(self._read(path), trusted=keys[-1], version=version, source=str(path)))
        return keys

    def read_rotation(self, version: int) -> bytes | None:
        """The rotation document introducing key ``version``, or ``None`` if there is none (yet)."""
        path = self.root / rotation_name(version)
        return self._read(path) if path.is_file() else None

    def rotate_key(
        self, *, pinned: Ed25519PublicKey, old_signing_key: Ed25519PrivateKey, new_signing_key: Ed25519PrivateKey
    ) -> int:
        """Move the registry to ``new_signing_key``; return the new key version.

        Writes the rotation document (signed by both keys), then re-signs every manifest, every
        revocation entry and the index with the new key, so devices that follow the rotation
        trust only the new key from then on. ``pinned`` is key version 1, as devices pin it.
        Re-running after a crash finishes the re-signing (the rotation is not written twice).
        Manifest and revocation contents never change, only their signatures.
        """
        _require_private_key(old_signing_key)
        _require_private_key(new_signing_key)
        with exclusive_lock(self.root / _LOCK_NAME):
            chain = self.key_chain(pinned=pinned)
            new_hex = public_key_hex(new_signing_key.public_key())
            old_hex = public_key_hex(old_signing_key.public_key())
            current_hex = public_key_hex(chain[-1])
            if current_hex == old_hex:
                if new_hex == old_hex:
                    raise ReleaseError("rotate_key: the new key is the current key")
                folder = self.root / _ROOT_DIR
                folder.mkdir(parents=True, exist_ok=True)
                version = len(chain) + 1
                _create_no_clobber(
                    self.root / rotation_name(version),
                    encode_rotation(version=version, old_signing_key=old_signing_key, new_signing_key=new_signing_key),
                )
            elif current_hex != new_hex:
                raise ReleaseError("rotate_key: old_signing_key is not the registry's current key")
            previous_keys = [key for key in chain if public_key_hex(key) != new_hex]
            self._resign_all(previous_keys=previous_keys, signing_key=new_signing_key)
            self._write_index(signing_key=new_signing_key)
            return len(self.key_chain(pinned=pinned))

    def _resign_all(self, *, previous_keys: list[Ed25519PublicKey], signing_key: Ed25519PrivateKey) -> None:
        """Replace signatures by an older key of the chain with ``signing_key``'s (contents untouched)."""

        def signed_by(data: bytes, signature: bytes, key: Ed25519PublicKey) -> bool:
            try:
                verify_signature(data, signature, public_key=key, source="resign")
                return True
            except ReleaseError:
                return False

        new_key = signing_key.public_key()
        for version in self.versions():
            folder = self.path(version)
            data, signature = self._read(folder / MANIFEST_NAME), self._read(folder / SIGNATURE_NAME)
            if signed_by(data, signature, new_key):
                continue
            if not any(signed_by(data, signature, key) for key in previous_keys):
                raise ReleaseError(f"{folder / SIGNATURE_NAME}: signed by no key of the chain; refusing to re-sign it")
            atomic_write_bytes(folder / SIGNATURE_NAME, sign_bytes(data, signing_key=signing_key))
        folder = self.root / _REVOCATIONS_DIR
        for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
            if _REVOCATION_RE.fullmatch(name) is None:
                continue
            path = folder / name
            raw = self._read(path)
            try:
                entry = _decode_revocation(raw, source=str(path), public_key=new_key)
                continue
            except ReleaseError:
                pass
            entry = None
            for key in previous_keys:
                try:
                    entry = _decode_revocation(raw, source=str(path), public_key=key)
                    break
                except ReleaseError:
                    continue
            if entry is None:
                raise ReleaseError(f"{path}: signed by no key of the chain; refusing to re-sign it")
            atomic_write_bytes(path, _encode_revocation(entry, signing_key=signing_key))

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ReleaseError(f"{path}: missing") from None
        except OSError as exc:
            raise ReleaseError(f"{path}: cannot read ({exc.strerror})") from None

    @staticmethod
    def _check_manifest_version(manifest: ReleaseManifest, version: int, path: Path) -> None:
        if manifest.version != version:
            raise ReleaseError(
                f"{path}: manifest says version {manifest.version} but lives in {version_dirname(version)}"
            )

    def _revocation_entries(self, *, public_key: Ed25519PublicKey | None) -> list[Revocation]:
        folder = self.root / _REVOCATIONS_DIR
        if not folder.is_dir():
            return []
        entries = []
        for name in sorted(os.listdir(folder)):
            match = _REVOCATION_RE.fullmatch(name)
            if match is None:
                continue
            path = folder / name
            entry = _decode_revocation(self._read(path), source=str(path), public_key=public_key)
            if entry.sequence != int(match.group(1)):
                raise ReleaseError(f"{path}: entry sequence {entry.sequence} does not match its file name")
            entries.append(entry)
        return entries

    def _revocation_reasons(self, *, public_key: Ed25519PublicKey | None) -> dict[int, str]:
        reasons: dict[int, str] = {}
        for entry in self._revocation_entries(public_key=public_key):
            for version in entry.versions:
                reasons.setdefault(version, entry.reason)
        return reasons

    def _append_revocation(self, versions: Sequence[int], reason: str, *, signing_key: Ed25519PrivateKey) -> None:
        entries = self._revocation_entries(public_key=signing_key.public_key())
        already = {v for entry in entries for v in entry.versions}
        fresh = tuple(sorted(set(versions) - already))
        if not fresh:
            return
        sequence = max((e.sequence for e in entries), default=0) + 1
        entry = Revocation(sequence=sequence, versions=fresh, reason=reason, revoked_at=time.time())
        folder = self.root / _REVOCATIONS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        _create_no_clobber(folder / f"r{entry.sequence:06d}.json", _encode_revocation(entry, signing_key=signing_key))
        logger.info("revoked releases %s: %s", list(fresh), reason)

    def _bury_revoked(self, *, public_key: Ed25519PublicKey) -> None:
        """Delete the model files of every revoked release, keeping its signed manifest as a tombstone.

        Why: a revoked release still encodes the recordings whose deletion was requested; its
        weights must not stay on the server. The manifest (file hashes and sizes, the requests
        it applied) and its signature stay so an auditor can tell what existed and was removed.
        Called with the writer lock held, after the index that lists the revocation is signed,
        so no device is pointed at files that are gone; a crash midway is finished by the next
        publish, revoke or refresh_index.
        """
        for version in sorted(self._revocation_reasons(public_key=public_key)):
            folder = self.path(version)
            if not folder.is_dir():
                continue
            manifest = self.manifest(version)
            buried = []
            for name in sorted(manifest.files):
                path = folder / check_file_name(name, what=str(folder / MANIFEST_NAME))
                if path.exists() or path.is_symlink():
                    path.unlink()
                    buried.append(name)
            if buried:
                fsync_dir(folder)
                logger.info(
                    "deleted the files %s of revoked release %s (manifest kept as tombstone)",
                    buried,
                    version_dirname(version),
                )

    def _revoke_earlier(
        self, version: int, requests: tuple[str, ...], reason: str, *, signing_key: Ed25519PrivateKey
    ) -> None:
        earlier = [v for v in self.versions() if v < version]
        if not earlier:
            return
        if not reason:
            applied = ", ".join(requests) if requests else "none listed"
            reason = f"superseded by a release that applies deletion requests ({applied})"
        self._append_revocation(earlier, reason, signing_key=signing_key)

    def _index_generation(self) -> int:
        head_path = self.root / _INDEX_DIR / _INDEX_HEAD
        if not head_path.exists():
            return 0
        head = _load_json_object(self._read(head_path), source=str(head_path))
        _require_fields(head, {"format_version", "generation"}, source=str(head_path))
        _require_format_version(head, source=str(head_path))
        return _check_version_number(head["generation"], what=f"{head_path}: generation")

    def _write_index(
        self, *, signing_key: Ed25519PrivateKey, lifetime_s: float = DEFAULT_INDEX_LIFETIME_S
    ) -> ReleaseIndex:
        """Sign a fresh index generation, then point HEAD at it (the one atomic switch)."""
        public_key = signing_key.public_key()
        revoked = self._revocation_reasons(public_key=public_key)
        entries = []
        for version in self.versions():
            folder = self.path(version)
            manifest_bytes = self._read(folder / MANIFEST_NAME)
            # Refuse to vouch for a release whose manifest someone altered on disk.
            verify_signature(
                manifest_bytes,
                self._read(folder / SIGNATURE_NAME),
                public_key=public_key,
                source=str(folder / MANIFEST_NAME),
            )
            entries.append(
                IndexEntry(version, sha256_bytes(manifest_bytes), version in revoked, revoked.get(version, ""))
            )
        now = time.time()
        index = ReleaseIndex(
            sequence=self._index_generation() + 1, generated_at=now, releases=tuple(entries), expires=now + lifetime_s
        )
        data = index.to_bytes()
        folder = self.root / _INDEX_DIR
        stem = folder / f"g{index.sequence:06d}"
        atomic_write_bytes(stem.with_suffix(".json"), data)
        atomic_write_bytes(stem.with_suffix(".sig"), sign_bytes(data, signing_key=signing_key))
        atomic_write_json(
            folder / _INDEX_HEAD, {"format_version": RELEASE_FORMAT_VERSION, "generation": index.sequence}
        )
        self._prune_index_generations(keep_from=index.sequence - 1)
        return index

    def _prune_index_generations(self, *, keep_from: int) -> None:
        """Drop superseded generations, keeping the previous one for readers that just read HEAD."""
        for name in os.listdir(self.root / _INDEX_DIR):
            match = _GENERATION_RE.fullmatch(name)
            if match is not None and int(match.group(1)) < keep_from:
                (self.root / _INDEX_DIR / name).unlink(missing_ok=True)

    def _remove_abandoned_staging(self) -> None:
        """Delete what interrupted writers left behind (called with the writer lock held)."""
        for path in self.root.iterdir():
            if path.name.startswith(_STAGING_PREFIX) and path.is_dir() and not path.is_symlink():
                logger.warning("removing abandoned staging folder %s", path)
                shutil.rmtree(path, ignore_errors=True)
        revocations = self.root / _REVOCATIONS_DIR
        if revocations.is_dir():
            for path in revocations.glob(".*.tmp"):
                path.unlink(missing_ok=True)


def _check_sources(files: Mapping[str, Path]) -> dict[str, Path]:
    if not isinstance(files, Mapping) or not files:
        raise ReleaseError("publish: 'files' must map at least one release file name to a source path")
    sources: dict[str, Path] = {}
    for name, source in files.items():
        check_file_name(name, what="publish")
        path = Path(source)
        if not path.is_file():
            raise ReleaseError(f"{path}: source for release file {name!r} is not an existing regular file")
        sources[name] = path
    return sources


def _copy_with_digest(source: Path, target: Path) -> dict[str, Any]:
    """Copy one file into the staging folder, fsync it, and return its ``{sha256, size}``."""
    digest, size = sha256(), 0
    with open(source, "rb") as src, open(target, "xb") as dst:
        for chunk in iter(lambda: src.read(_COPY_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return {"sha256": digest.hexdigest(), "size": size}


def _stage_release(
    staging: Path,
    sources: Mapping[str, Path],
    *,
    signing_key: Ed25519PrivateKey,
    version: int,
    parent: int | None,
    applied_request_ids: tuple[str, ...],
    metrics: dict,
    notes: dict,
) -> ReleaseManifest:
    """Fill ``staging`` with the files, the canonical manifest and its signature, all fsynced."""
    table = {name: _copy_with_digest(source, staging / name) for name, source in sorted(sources.items())}
    manifest = ReleaseManifest(
        version=version,
        parent=parent,
        created_at=time.time(),
        files=table,
        applied_request_ids=applied_request_ids,
        metrics=metrics,
        notes=notes,
    )
    manifest_bytes = manifest.to_bytes()
    _write_new_file(staging / MANIFEST_NAME, manifest_bytes)
    _write_new_file(staging / SIGNATURE_NAME, sign_bytes(manifest_bytes, signing_key=signing_key))
    fsync_dir(staging)
    return manifest


def _commit_staged_release(staging: Path, target: Path) -> None:
    """Rename the finished staging folder to its version name; never replace an existing release."""
    if target.exists():
        raise ReleaseError(f"{target}: already exists; releases are append-only")
    os.rename(staging, target)
    fsync_dir(target.parent)
