"""Edge side of model distribution: pull the newest signed, non-revoked release and install it.

Why this is careful: an edge device must run only models the server signed, must stop using
(and delete) any release the server revoked because it still encodes audio whose deletion was
requested, and must never be left without a working model because a download was cut off or
tampered with. So everything is verified against the server's pinned Ed25519 public key before
it is used, downloads land in a private folder that is swapped into place atomically, and a
failed pull leaves the previously installed release untouched (unless that release itself is
revoked: privacy wins over availability).

Local layout, format version 1, under ``dest``::

    current.json            {"format_version": 2, "version", "path", "manifest_sha256",
                             "index_sequence", "index_sha256", "key_version", "key_hex",
                             "updated_at"}; written atomically (format 1, without the index
                             hash and key fields, is still read)
    releases/v0003/         installed releases (manifest.json, manifest.sig, files)
    .incoming-* .trash-*    interrupted downloads / replacements, removed by the next pull
    .lock                   flock so two pulls never interleave

``index_sequence``/``index_sha256`` are the newest signed index this device accepted; they are
persisted as soon as an index verifies, before anything is downloaded. Freshness rules (the
properties TUF's timestamp role gives, see docs/release-distribution.md):

* an index with a lower sequence is refused (rollback: a replayed index could hide a later
  revocation); one with the same sequence only if it is byte-identical (nothing changed), never
  a different document under a sequence already seen;
* an index past its signed ``expires`` is refused (freeze: an attacker withholding new
  indexes keeps a device on an old view for at most one index lifetime); so is one without
  an expiry, one whose lifetime exceeds ``MAX_INDEX_LIFETIME_S``, and one generated in the
  future beyond ``MAX_CLOCK_SKEW_S``;
* a fresh device has no history, so it starts from a trust anchor shipped with it: the pinned
  key and ``min_sequence`` (the sequence current when the device image was built); expiry
  bounds the rest.

This module must not import torch: edge devices run ONNX Runtime only.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tqdm import tqdm

from serforget.common.fsutil import atomic_write_json, fsync_dir, sha256_bytes
from serforget.common.release import (
    INDEX_NAME,
    INDEX_SIGNATURE_NAME,
    MANIFEST_NAME,
    MAX_INDEX_LIFETIME_S,
    SIGNATURE_NAME,
    IndexEntry,
    ReleaseError,
    ReleaseIndex,
    ReleaseManifest,
    ReleaseRegistry,
    check_release_dir,
    check_rotation,
    check_signed_manifest,
    exclusive_lock,
    parse_signed_index,
    parse_version_dirname,
    public_key_hex,
    rotation_name,
    version_dirname,
)

logger = logging.getLogger(__name__)

CURRENT_NAME = "current.json"
RELEASES_DIR = "releases"
MAX_INDEX_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 4 << 20
MAX_SIGNATURE_BYTES = 4 << 10
DEFAULT_TIMEOUT_S = 60.0
#: How far in the future an index's generated_at may lie before the device blames its clock.
MAX_CLOCK_SKEW_S = 300.0
_STATE_FORMAT_VERSION = 2
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: Slowest transfer rate (bytes/s) a download may average before its deadline cuts it off.
DEFAULT_MIN_RATE = 64 << 10

_INCOMING_PREFIX = ".incoming-"
_TRASH_PREFIX = ".trash-"
_LOCK_NAME = ".lock"
_CHUNK = 1 << 20
#: The index and its signature are two requests; a publish landing between them yields a
#: mismatched pair once, so one re-fetch is allowed before the signature failure is final.
_INDEX_ATTEMPTS = 2
#: Key rotations followed in one pull (each is a small signed document); more is an attack.
_MAX_ROTATIONS_PER_PULL = 64


class PullError(ValueError):
    """A pull was refused or failed; the message names the source, release or file at fault."""


class _Missing(Exception):
    """A file the protocol allows to be absent (the next key rotation) is not there."""


@dataclass(frozen=True)
class PullResult:
    """Outcome of :func:`pull_release`: the release now current and what changed locally."""

    version: int
    path: Path
    removed_revoked: list[int]
    changed: bool


@dataclass(frozen=True)
class _LocalState:
    """Parsed ``current.json``; ``version`` is ``None`` when no usable release is installed."""

    version: int | None
    manifest_sha256: str | None
    index_sequence: int
    index_sha256: str | None = None
    #: key version this device trusts (1: the pinned key) and, after a rotation, that key as hex
    key_version: int = 1
    key_hex: str | None = None


# --------------------------------------------------------------------------- sources


class _Source(Protocol):
    def read_small(self, relpath: str, *, limit: int) -> bytes: ...

    def download(
        self, relpath: str, target: Path, *, expected_size: int, on_bytes: Callable[[int], object]
    ) -> None: ...

    def read_index(self) -> tuple[bytes, bytes]: ...

    def read_rotation(self, version: int) -> bytes | None: ...


def _copy_limited(
    reader: BinaryIO, target: Path, *, expected_size: int, what: str, on_bytes: Callable[[int], object]
) -> None:
    """Stream ``reader`` into a new file, refusing more bytes than the signed size."""
    written = 0
    with open(target, "xb") as out:
        for chunk in iter(lambda: reader.read(_CHUNK), b""):
            written += len(chunk)
            if written > expected_size:
                raise PullError(f"{what}: larger than the signed size {expected_size}")
            out.write(chunk)
            on_bytes(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    if written != expected_size:
        raise PullError(f"{what}: got {written} bytes, the signed size is {expected_size}")


def _read_limited(reader: BinaryIO, *, limit: int, what: str) -> bytes:
    data = reader.read(limit + 1)
    if len(data) > limit:
        raise PullError(f"{what}: larger than the {limit}-byte limit")
    return data


class _DirectorySource:
    """A registry root on a local or mounted file system."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def _open(self, relpath: str) -> BinaryIO:
        path = self.root / relpath
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise PullError(f"{path}: missing from the registry") from None
        except OSError as exc:
            raise PullError(f"{path}: cannot read ({exc.strerror})") from None

    def read_small(self, relpath: str, *, limit: int) -> bytes:
        with self._open(relpath) as handle:
            return _read_limited(handle, limit=limit, what=str(self.root / relpath))

    def download(self, relpath: str, target: Path, *, expected_size: int, on_bytes: Callable[[int], object]) -> None:
        with self._open(relpath) as handle:
            _copy_limited(handle, target, expected_size=expected_size, what=str(self.root / relpath), on_bytes=on_bytes)

    def read_index(self) -> tuple[bytes, bytes]:
        try:
            return ReleaseRegistry(self.root).read_index_files()
        except ReleaseError as exc:
            raise PullError(str(exc)) from None

    def read_rotation(self, version: int) -> bytes | None:
        path = self.root / rotation_name(version)
        if not path.exists():
            return None
        return self.read_small(rotation_name(version), limit=MAX_SIGNATURE_BYTES)


class _HttpSource:
    """A server started with :func:`serforget.server.release_http.serve_releases`.

    Why not ``urlopen``: its timeout bounds each socket read, not a download, so a server that
    sends one byte just before every timeout holds a pull forever (slow retrieval). Here every
    file gets a total deadline, ``timeout_s`` plus its size budget divided by ``min_rate``,
    enforced by a timer that shuts the socket down, so connecting, headers and body together
    can never take longer. The size budget is the signed size for release files and a fixed
    limit for the index, manifest and signatures; a ``Content-Length`` above it is refused
    before the body is read, and a body that runs past it is cut off (endless data).
    Redirects are not followed: a release server has no reason to send one.
    """

    def __init__(self, base_url: str, *, timeout_s: float, min_rate: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.min_rate = min_rate
        parts = urllib.parse.urlsplit(self.base_url)
        if not parts.hostname:
            raise PullError(f"{base_url}: URL has no host")
        self._https = parts.scheme == "https"
        self._host, self._port, self._path = parts.hostname, parts.port, parts.path

    def __str__(self) -> str:
        return self.base_url

    def _deadline_s(self, budget: int) -> float:
        return self.timeout_s + budget / self.min_rate

    def _chunks(
        self, relpath: str, *, budget: int, budget_name: str, out: Callable[[bytes], None], missing_ok: bool = False
    ) -> None:
        """GET ``relpath`` and pass its body to ``out`` chunk by chunk, within the budget and deadline."""
        url = f"{self.base_url}/{relpath}"
        deadline_s = self._deadline_s(budget)
        connection_class = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = connection_class(self._host, self._port, timeout=self.timeout_s)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            sock = connection.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(deadline_s, expire)
        timer.daemon = True
        timer.start()
        try:
            connection.request("GET", f"{self._path}/{relpath}", headers={"Accept-Encoding": "identity"})
            if expired.is_set():  # the timer fired while connecting, before there was a socket to shut
                raise OSError("deadline passed while connecting")
            response = connection.getresponse()
            if response.status == 410:
                raise PullError(f"{url}: release is revoked (410 Gone)")
            if response.status == 404 and missing_ok:
                raise _Missing(url)
            if response.status != 200:
                raise PullError(f"{url}: HTTP {response.status} {response.reason}")
            if response.length is not None and response.length > budget:
                raise PullError(f"{url}: larger than {budget_name} (announces {response.length} bytes)")
            received = 0
            while not expired.is_set():
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                if received > budget:
                    raise PullError(f"{url}: larger than {budget_name}")
                out(chunk)
            if expired.is_set():
                raise PullError(f"{url}: not received within its {deadline_s:.1f}-s deadline (slow retrieval)")
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set():
                raise PullError(
                    f"{url}: not received within its {deadline_s:.1f}-s deadline (slow retrieval)"
                ) from None
            raise PullError(f"{url}: cannot fetch ({exc})") from None
        finally:
            timer.cancel()
            connection.close()

    def read_small(self, relpath: str, *, limit: int) -> bytes:
        parts: list[bytes] = []
        self._chunks(relpath, budget=limit, budget_name=f"the {limit}-byte limit", out=parts.append)
        return b"".join(parts)

    def download(self, relpath: str, target: Path, *, expected_size: int, on_bytes: Callable[[int], object]) -> None:
        url = f"{self.base_url}/{relpath}"

        def write(chunk: bytes) -> None:
            handle.write(chunk)
            on_bytes(len(chunk))

        with open(target, "xb") as handle:
            self._chunks(relpath, budget=expected_size, budget_name=f"the signed size {expected_size}", out=write)
            written = handle.tell()
            handle.flush()
            os.fsync(handle.fileno())
        if written != expected_size:
            raise PullError(f"{url}: got {written} bytes, the signed size is {expected_size}")

    def read_index(self) -> tuple[bytes, bytes]:
        return (
            self.read_small(INDEX_NAME, limit=MAX_INDEX_BYTES),
            self.read_small(INDEX_SIGNATURE_NAME, limit=MAX_SIGNATURE_BYTES),
        )

    def read_rotation(self, version: int) -> bytes | None:
        parts: list[bytes] = []
        try:
            self._chunks(
                rotation_name(version),
                budget=MAX_SIGNATURE_BYTES,
                budget_name=f"the {MAX_SIGNATURE_BYTES}-byte limit",
                out=parts.append,
                missing_ok=True,
            )
        except _Missing:
            return None
        return b"".join(parts)


def _open_source(
    source: str | os.PathLike[str], *, timeout_s: float, min_rate: float
) -> _DirectorySource | _HttpSource:
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        return _HttpSource(text, timeout_s=timeout_s, min_rate=min_rate)
    root = Path(text)
    if not root.is_dir():
        raise PullError(f"{text}: source is neither an existing registry folder nor an http(s):// URL")
    return _DirectorySource(root)


# --------------------------------------------------------------------------- local state


def _read_state(dest: Path) -> _LocalState:
    path = dest / CURRENT_NAME
    if not path.exists():
        return _LocalState(version=None, manifest_sha256=None, index_sequence=0, index_sha256=None)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PullError(f"{path}: unreadable ({exc})") from None
    if (
        not isinstance(doc, dict)
        or doc.get("format_version") not in (1, _STATE_FORMAT_VERSION)
        or isinstance(doc.get("format_version"), bool)
    ):
        raise PullError(
            f"{path}: format_version {doc.get('format_version') if isinstance(doc, dict) else doc!r} is not supported"
        )
    expected = {"format_version", "version", "path", "manifest_sha256", "index_sequence", "updated_at"}
    if doc["format_version"] >= 2:
        expected |= {"index_sha256", "key_version", "key_hex"}
    if set(doc) != expected:
        raise PullError(f"{path}: expected exactly the fields {sorted(expected)}")
    index_digest = doc.get("index_sha256")
    if index_digest is not None and not (isinstance(index_digest, str) and _SHA256_HEX.fullmatch(index_digest)):
        raise PullError(f"{path}: index_sha256 must be 64 lower-case hex digits or null")
    version, sequence = doc["version"], doc["index_sequence"]
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise PullError(f"{path}: version must be a positive integer or null, got {version!r}")
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise PullError(f"{path}: index_sequence must be a non-negative integer, got {sequence!r}")
    digest = doc["manifest_sha256"]
    if (version is None) != (digest is None) or not (digest is None or isinstance(digest, str)):
        raise PullError(f"{path}: manifest_sha256 must be a string exactly when version is set")
    key_version, key_hex = doc.get("key_version", 1), doc.get("key_hex")
    if isinstance(key_version, bool) or not isinstance(key_version, int) or key_version < 1:
        raise PullError(f"{path}: key_version must be a positive integer, got {key_version!r}")
    if (key_version == 1) != (key_hex is None) or not (
        key_hex is None or (isinstance(key_hex, str) and _SHA256_HEX.fullmatch(key_hex))
    ):
        raise PullError(f"{path}: key_hex must be 64 hex digits exactly when key_version > 1")
    return _LocalState(
        version=version,
        manifest_sha256=digest,
        index_sequence=sequence,
        index_sha256=index_digest,
        key_version=key_version,
        key_hex=key_hex,
    )


def _write_state(dest: Path, state: _LocalState) -> None:
    relpath = f"{RELEASES_DIR}/{version_dirname(state.version)}" if state.version is not None else None
    atomic_write_json(
        dest / CURRENT_NAME,
        {
            "format_version": _STATE_FORMAT_VERSION,
            "version": state.version,
            "path": relpath,
            "manifest_sha256": state.manifest_sha256,
            "index_sequence": state.index_sequence,
            "index_sha256": state.index_sha256,
            "key_version": state.key_version,
            "key_hex": state.key_hex,
            "updated_at": time.time(),
        },
    )


def current_release(dest: Path) -> Path | None:
    """Folder of the release the device should run, or ``None`` if none is installed."""
    dest = Path(dest)
    state = _read_state(dest)
    if state.version is None:
        return None
    folder = dest / RELEASES_DIR / version_dirname(state.version)
    if not folder.is_dir():
        raise PullError(f"{dest / CURRENT_NAME}: points to {folder}, which is missing")
    return folder


def _remove_leftovers(dest: Path) -> None:
    """Delete folders that an interrupted pull left behind (lock held)."""
    for entry in os.scandir(dest):
        if entry.name.startswith((_INCOMING_PREFIX, _TRASH_PREFIX)) and entry.is_dir(follow_symlinks=False):
            logger.warning("removing leftover folder %s", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)


def _discard_folder(dest: Path, folder: Path) -> None:
    """Move ``folder`` out of ``releases/`` in one rename, then delete it.

    Why the rename first: a deletion cut off half-way must not leave a partial folder under a
    release name, where it would look installed.
    """
    trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=dest))
    os.rename(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash)


def _withdraw_revoked(dest: Path, state: _LocalState, revoked: set[int]) -> list[int]:
    """Stop pointing at a revoked release, then delete every local copy of a revoked release."""
    if state.version in revoked:
        _write_state(dest, replace(state, version=None, manifest_sha256=None))
    removed = []
    releases = dest / RELEASES_DIR
    if releases.is_dir():
        for entry in sorted(os.scandir(releases), key=lambda e: e.name):
            version = parse_version_dirname(entry.name)
            if version in revoked:
                _discard_folder(dest, Path(entry.path))
                removed.append(version)
    if removed:
        logger.info("deleted revoked local releases %s", removed)
    return removed


# --------------------------------------------------------------------------- verification


def _fetch_index(
    origin: _Source, *, public_key: Ed25519PublicKey, state: _LocalState, min_sequence: int
) -> tuple[ReleaseIndex, str]:
    """The verified, fresh index and its SHA-256 (see the module docstring for the rules)."""
    failure: ReleaseError | None = None
    for _ in range(_INDEX_ATTEMPTS):
        index_bytes, signature = origin.read_index()
        try:
            index = parse_signed_index(index_bytes, signature, public_key=public_key, source=f"{origin} index")
            break
        except ReleaseError as exc:
            failure = exc
    else:
        raise PullError(str(failure)) from failure
    digest = sha256_bytes(index_bytes)
    where = f"{origin} index (sequence {index.sequence})"
    floor = max(state.index_sequence, min_sequence)
    if index.sequence < floor:
        raise PullError(
            f"{where}: older than sequence {floor}, already seen or required by the trust anchor; "
            "refusing a replayed index that could hide revocations (rollback)"
        )
    if index.sequence == state.index_sequence and state.index_sha256 is not None and digest != state.index_sha256:
        raise PullError(f"{where}: differs from the index already accepted under this sequence; refusing it")
    now = time.time()
    if index.expires is None:
        raise PullError(f"{where}: has no signed expiry (index format 1); the server must re-sign it")
    if index.expires - index.generated_at > MAX_INDEX_LIFETIME_S:
        raise PullError(
            f"{where}: signed to live {index.expires - index.generated_at:.0f} s, more than {MAX_INDEX_LIFETIME_S:.0f} s"
        )
    if index.generated_at > now + MAX_CLOCK_SKEW_S:
        raise PullError(f"{where}: generated {index.generated_at - now:.0f} s in the future; check this device's clock")
    if now > index.expires:
        raise PullError(
            f"{where}: expired {now - index.expires:.0f} s ago; refusing a stale index (freeze) - "
            "the server must re-sign it (serforget server refresh-index)"
        )
    return index, digest


def _follow_rotations(
    origin: _Source, dest: Path, state: _LocalState, *, pinned: Ed25519PublicKey
) -> tuple[Ed25519PublicKey, _LocalState]:
    """The signing key to trust now: the pinned one, moved along every verified rotation.

    Each rotation must be signed by the key trusted so far and by the new key; the newest key
    reached is persisted at once, so from then on nothing signed by an older key - say one that
    leaked, which is why it was rotated - is accepted, even from a mirror that hides the rotation.
    """
    if state.key_hex is None:
        trusted = pinned
    else:
        trusted = Ed25519PublicKey.from_public_bytes(bytes.fromhex(state.key_hex))
    version = state.key_version
    for _ in range(_MAX_ROTATIONS_PER_PULL):
        data = origin.read_rotation(version + 1)
        if data is None:
            break
        try:
            trusted = check_rotation(
                data, trusted=trusted, version=version + 1, source=f"{origin}/{rotation_name(version + 1)}"
            )
        except ReleaseError as exc:
            raise PullError(str(exc)) from None
        version += 1
    else:
        raise PullError(
            f"{origin}: more than {_MAX_ROTATIONS_PER_PULL} key rotations in one pull; refusing (endless data)"
        )
    if version != state.key_version:
        state = replace(state, key_version=version, key_hex=public_key_hex(trusted))
        _write_state(dest, state)
        logger.info("now trusting release key version %d", version)
    return trusted, state


def _check_manifest(
    manifest_bytes: bytes, signature: bytes, entry: IndexEntry, *, public_key: Ed25519PublicKey, where: str
) -> ReleaseManifest:
    """A manifest is accepted only if the signed index names exactly these bytes and the signature holds."""
    if sha256_bytes(manifest_bytes) != entry.manifest_sha256:
        raise PullError(f"{where}: manifest does not match the hash in the signed index")
    try:
        manifest = check_signed_manifest(manifest_bytes, signature, public_key=public_key, source=where)
    except ReleaseError as exc:
        raise PullError(str(exc)) from None
    if manifest.version != entry.version:
        raise PullError(f"{where}: manifest is for version {manifest.version}, expected {entry.version}")
    return manifest


def _verify_installed(folder: Path, entry: IndexEntry, *, public_key: Ed25519PublicKey) -> None:
    """Raise :class:`PullError` unless ``folder`` is an intact copy of the release ``entry`` names."""
    try:
        manifest_bytes = (folder / MANIFEST_NAME).read_bytes()
        signature = (folder / SIGNATURE_NAME).read_bytes()
    except OSError as exc:
        raise PullError(f"{folder}: incomplete installed release ({exc.strerror})") from None
    manifest = _check_manifest(
        manifest_bytes, signature, entry, public_key=public_key, where=str(folder / MANIFEST_NAME)
    )
    try:
        check_release_dir(folder, manifest)
    except ReleaseError as exc:
        raise PullError(str(exc)) from None


def _download_release(
    origin: _Source, dest: Path, entry: IndexEntry, *, public_key: Ed25519PublicKey, progress: bool
) -> Path:
    """Fetch and verify a release into a private folder under ``dest`` and return that folder."""
    name = version_dirname(entry.version)
    manifest_bytes = origin.read_small(f"{name}/{MANIFEST_NAME}", limit=MAX_MANIFEST_BYTES)
    signature = origin.read_small(f"{name}/{SIGNATURE_NAME}", limit=MAX_SIGNATURE_BYTES)
    manifest = _check_manifest(
        manifest_bytes, signature, entry, public_key=public_key, where=f"{origin}/{name}/{MANIFEST_NAME}"
    )
    incoming = Path(tempfile.mkdtemp(prefix=_INCOMING_PREFIX, dir=dest))
    try:
        (incoming / MANIFEST_NAME).write_bytes(manifest_bytes)
        (incoming / SIGNATURE_NAME).write_bytes(signature)
        total = sum(meta["size"] for meta in manifest.files.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"pulling {name}", disable=not progress) as bar:
            for file_name, meta in sorted(manifest.files.items()):
                origin.download(
                    f"{name}/{file_name}", incoming / file_name, expected_size=meta["size"], on_bytes=bar.update
                )
        _verify_installed(incoming, entry, public_key=public_key)
        fsync_dir(incoming)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    return incoming


def _install(dest: Path, incoming: Path, version: int) -> Path:
    """Rename a verified download to ``releases/vNNNN``, replacing a damaged copy if one is there."""
    releases = dest / RELEASES_DIR
    releases.mkdir(exist_ok=True)
    target = releases / version_dirname(version)
    if target.exists():
        _discard_folder(dest, target)
    os.rename(incoming, target)
    fsync_dir(releases)
    return target


def _ensure_installed(
    origin: _Source, dest: Path, entry: IndexEntry, *, public_key: Ed25519PublicKey, progress: bool
) -> tuple[Path, bool]:
    """Return the verified local folder for ``entry`` and whether it had to be downloaded."""
    target = dest / RELEASES_DIR / version_dirname(entry.version)
    if target.is_dir():
        try:
            _verify_installed(target, entry, public_key=public_key)
            return target, False
        except PullError as exc:
            logger.warning("installed copy failed verification, downloading again: %s", exc)
    incoming = _download_release(origin, dest, entry, public_key=public_key, progress=progress)
    return _install(dest, incoming, entry.version), True


# --------------------------------------------------------------------------- entry point


def pull_release(
    *,
    source: str | os.PathLike[str],
    dest: Path,
    server_public_key: Ed25519PublicKey,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    min_rate: float = DEFAULT_MIN_RATE,
    min_sequence: int = 0,
    progress: bool = False,
) -> PullResult:
    """Install the newest non-revoked release from ``source`` into ``dest`` and make it current.

    ``source`` is a registry folder or the ``http(s)://`` URL of :func:`serforget.server.release_http.serve_releases`;
    ``server_public_key`` is the pinned key (key version 1); every index and manifest must be
    signed with it or with the key a chain of verified rotations (``root/rNNNNNN.json``) leads
    to, which the device then trusts instead.
    ``min_sequence`` is the trust anchor of a fresh device: the oldest index sequence it may
    accept (the device's own history raises that floor with every pull). ``progress`` shows a
    byte-level progress bar on stderr while release files download.
    Over HTTP each file must arrive within ``timeout_s`` plus its size budget at ``min_rate``
    bytes per second, or the pull fails (a slow-retrieval attacker cannot hold it).
    Any verification failure raises :class:`PullError` and keeps the installed release, except
    that releases the (authentic) index lists as revoked are always deleted locally.
    """
    if not isinstance(server_public_key, Ed25519PublicKey):
        raise TypeError(f"server_public_key must be an Ed25519PublicKey, got {type(server_public_key).__name__}")
    dest = Path(dest)
    if not (math.isfinite(timeout_s) and timeout_s > 0 and math.isfinite(min_rate) and min_rate > 0):
        raise PullError(f"timeout_s ({timeout_s!r}) and min_rate ({min_rate!r}) must be positive")
    if isinstance(min_sequence, bool) or not isinstance(min_sequence, int) or min_sequence < 0:
        raise PullError(f"min_sequence must be a non-negative integer, got {min_sequence!r}")
    origin = _open_source(source, timeout_s=timeout_s, min_rate=min_rate)
    dest.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(dest / _LOCK_NAME):
        _remove_leftovers(dest)
        state = _read_state(dest)
        trusted, state = _follow_rotations(origin, dest, state, pinned=server_public_key)
        index, index_digest = _fetch_index(origin, public_key=trusted, state=state, min_sequence=min_sequence)
        if (index.sequence, index_digest) != (state.index_sequence, state.index_sha256):
            # remember the newest verified index before downloading: the floor only ever rises
            state = replace(state, index_sequence=index.sequence, index_sha256=index_digest)
            _write_state(dest, state)
        revoked = set(index.revoked())
        newest = index.newest_available()
        try:
            if newest is None:
                raise PullError(f"{origin} index: every release is revoked; nothing to install")
            folder, downloaded = _ensure_installed(origin, dest, newest, public_key=trusted, progress=progress)
        except PullError:
            _withdraw_revoked(dest, state, revoked)
            raise
        new_state = replace(state, version=newest.version, manifest_sha256=newest.manifest_sha256)
        _write_state(dest, new_state)
        removed = _withdraw_revoked(dest, new_state, revoked)
    changed = downloaded or state.version != newest.version
    return PullResult(version=newest.version, path=folder, removed_revoked=removed, changed=changed)
