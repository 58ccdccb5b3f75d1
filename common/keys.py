"""Node and server key files, and the server's registry of enrolled nodes.

Why this module exists: a node that unlearns sends its weight delta to the ServerApp through the
Flower SuperLink, which must learn nothing from it. The delta is therefore encrypted to the
ServerApp's HPKE key and signed with the node's Ed25519 key (see :mod:`serforget.common.envelope`). This
module owns every key *file*: generating, writing (atomically, private keys mode 0600) and strictly
loading them, plus the server-side registry that says which Ed25519 key speaks for which node.

Files written by :func:`init_keys` in ``key_dir``:

``sign.key`` / ``sign.pub`` (both roles)
    Ed25519 signing key: PEM PKCS#8 private key (mode 0600) and PEM SubjectPublicKeyInfo.
``hpke.key`` / ``hpke.pub`` (server only)
    The ServerApp's HPKE recipient key. Suite ``"x25519"``: one X25519 PEM block.
    Suite ``"mlkem768-x25519"`` (hybrid post-quantum KEM, RFC 9180 HPKE with the ML-KEM-768 +
    X25519 KEM): two PEM blocks in one file, the ML-KEM-768 key first, then the X25519 key.
    The installed ``cryptography`` has no serialization for the combined hybrid key object, so the
    file stores its two standard components; PKCS#8/SPKI carry algorithm OIDs, which makes each
    block self-describing and lets the loader tell the suites apart without a side channel.

Key files use the standard, self-versioned PKCS#8 / SubjectPublicKeyInfo encodings. The node
registry is a project format and carries ``format`` and ``version`` fields::

    {"format": "serforget-node-registry", "version": 1,
     "nodes": {"<node_id>": {"fingerprint": "<16 hex>", "public_key_pem": "-----BEGIN ..."}}}

Every loading error is a :class:`KeyFileError` naming the file, so a misconfigured deployment
fails at start-up with a message an operator can act on, not deep inside a training round.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from serforget.common.fsutil import atomic_write_bytes, atomic_write_json
from serforget.common.manifest import ID_PATTERN

SUITE_X25519 = "x25519"
SUITE_MLKEM768_X25519 = "mlkem768-x25519"
SUITES: tuple[str, ...] = (SUITE_X25519, SUITE_MLKEM768_X25519)

SIGN_PRIVATE_NAME = "sign.key"
SIGN_PUBLIC_NAME = "sign.pub"
HPKE_PRIVATE_NAME = "hpke.key"
HPKE_PUBLIC_NAME = "hpke.pub"

REGISTRY_FORMAT = "serforget-node-registry"
REGISTRY_VERSION = 1

#: Node ids appear in file names, logs and envelope headers, so they are restricted to a
#: conservative ASCII alphabet (Flower's integer node ids and readable device names both fit).
#: Node ids follow the one id syntax of :func:`serforget.common.manifest.check_id`.
NODE_ID_PATTERN = ID_PATTERN

PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644

# The hybrid HPKE key classes only exist in cryptography builds that ship the PQ KEMs; looking
# them up lazily keeps the classic X25519 suite usable on builds without them.
_HYBRID_PRIVATE_CLASS: Any = getattr(hpke, "MLKEM768X25519PrivateKey", None)
_HYBRID_PUBLIC_CLASS: Any = getattr(hpke, "MLKEM768X25519PublicKey", None)

HpkePrivateKey = Union[x25519.X25519PrivateKey, "hpke.MLKEM768X25519PrivateKey"]
HpkePublicKey = Union[x25519.X25519PublicKey, "hpke.MLKEM768X25519PublicKey"]
RawPublicKey = Union[ed25519.Ed25519PublicKey, x25519.X25519PublicKey, mlkem.MLKEM768PublicKey]
Role = Literal["server", "node"]

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)
_LOAD_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm)


class KeyFileError(ValueError):
    """A key or registry file is missing, unreadable, of the wrong kind or inconsistent.

    The message always starts with the offending path.
    """


class UnsupportedSuiteError(ValueError):
    """The requested HPKE suite is known but the installed ``cryptography`` cannot run it."""


class EnrollmentError(ValueError):
    """An enrollment would silently change which key speaks for a node; refused."""


@dataclass(frozen=True)
class KeyPaths:
    """Where :func:`init_keys` put (or found) a role's key files.

    ``hpke_private``/``hpke_public`` are ``None`` for nodes, which only sign; they encrypt to the
    server's published ``hpke.pub`` instead.
    """

    key_dir: Path
    role: Role
    suite: str
    sign_private: Path
    sign_public: Path
    hpke_private: Path | None
    hpke_public: Path | None


# --------------------------------------------------------------------------- suites


@functools.cache
def pq_hybrid_available() -> bool:
    """Whether this ``cryptography`` build offers HPKE with the ML-KEM-768 + X25519 KEM.

    Probed by generating an ML-KEM key because support depends on the OpenSSL/AWS-LC backend the
    wheel was built against, not only on the Python package version.
    """
    if _HYBRID_PRIVATE_CLASS is None or not hasattr(hpke.KEM, "MLKEM768_X25519"):
        return False
    try:
        mlkem.MLKEM768PrivateKey.generate()
    except UnsupportedAlgorithm:
        return False
    return True


def check_suite(suite: str) -> str:
    """Return ``suite`` if it is known and runnable here, else raise a clear error.

    ``ValueError`` for a name that is not a suite at all; :class:`UnsupportedSuiteError` for the
    post-quantum hybrid on a build without ML-KEM, so an operator knows to upgrade rather than to
    fix a typo.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown HPKE suite {suite!r}; expected one of {', '.join(SUITES)}")
    if suite == SUITE_MLKEM768_X25519 and not pq_hybrid_available():
        raise UnsupportedSuiteError(
            f"HPKE suite {suite!r} needs ML-KEM-768+X25519 support, which the installed cryptography "
            "build does not offer; upgrade cryptography or use suite 'x25519'"
        )
    return suite


def hpke_suite_of(key: object) -> str:
    """Name the suite an HPKE private or public key object belongs to."""
    if isinstance(key, (x25519.X25519PrivateKey, x25519.X25519PublicKey)):
        return SUITE_X25519
    hybrid = tuple(c for c in (_HYBRID_PRIVATE_CLASS, _HYBRID_PUBLIC_CLASS) if c is not None)
    if hybrid and isinstance(key, hybrid):
        return SUITE_MLKEM768_X25519
    raise TypeError(f"not an HPKE key of a supported suite: {type(key).__name__}")


# --------------------------------------------------------------------------- generation and saving


def generate_signing_key() -> ed25519.Ed25519PrivateKey:
    """A fresh Ed25519 key for signing delta envelopes (nodes) or server messages."""
    return ed25519.Ed25519PrivateKey.generate()


def _private_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_single_key(key: object, *, private: bool) -> None:
    """Reject the hybrid HPKE objects, which cannot be serialized as one key (see module doc)."""
    kinds = (
        (ed25519.Ed25519PrivateKey, x25519.X25519PrivateKey, mlkem.MLKEM768PrivateKey)
        if private
        else (ed25519.Ed25519PublicKey, x25519.X25519PublicKey, mlkem.MLKEM768PublicKey)
    )
    if not isinstance(key, kinds):
        names = ", ".join(k.__name__ for k in kinds)
        raise TypeError(f"cannot save {type(key).__name__}; expected one of {names}")


def save_private_key(path: str | os.PathLike[str], key: Any) -> Path:
    """Write ``key`` as unencrypted PEM PKCS#8 with mode 0600, atomically.

    Unencrypted because nodes and the ServerApp start unattended; the file mode (checked again on
    load) is what keeps other local users out. Atomic so a crash never leaves a truncated key.
    """
    _check_single_key(key, private=True)
    return atomic_write_bytes(path, _private_pem(key), mode=PRIVATE_KEY_MODE)


def save_public_key(path: str | os.PathLike[str], key: Any) -> Path:
    """Write ``key`` as PEM SubjectPublicKeyInfo, atomically and world-readable."""
    _check_single_key(key, private=False)
    return atomic_write_bytes(path, _public_pem(key), mode=PUBLIC_KEY_MODE)


def _save_hybrid_private(path: Path, mlkem_key: mlkem.MLKEM768PrivateKey, x_key: x25519.X25519PrivateKey) -> None:
    atomic_write_bytes(path, _private_pem(mlkem_key) + _private_pem(x_key), mode=PRIVATE_KEY_MODE)


def _save_hybrid_public(path: Path, mlkem_key: mlkem.MLKEM768PublicKey, x_key: x25519.X25519PublicKey) -> None:
    atomic_write_bytes(path, _public_pem(mlkem_key) + _public_pem(x_key), mode=PUBLIC_KEY_MODE)


# --------------------------------------------------------------------------- loading


def _read_key_file(path: Path, *, private: bool) -> bytes:
    try:
        info = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    if private and stat.S_IMODE(info.st_mode) & 0o077:
        raise KeyFileError(
            f"{path}: private key is accessible by group/others (mode {stat.S_IMODE(info.st_mode):04o}); "
            "run chmod 600 on it"
        )
    return data


def read_private_key_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a private key file, refused (:class:`KeyFileError`) if group or others may read it.

    The one file-mode policy for every private key of the project (signing, HPKE, TLS, SuperNode).
    """
    return _read_key_file(Path(path), private=True)


def _pem_blocks(path: Path, data: bytes) -> list[bytes]:
    """Split a file into PEM blocks, refusing any stray content between or around them."""
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(data)]
    leftover = _PEM_BLOCK.sub(b"", data)
    if not blocks:
        raise KeyFileError(f"{path}: no PEM block found")
    if leftover.strip():
        raise KeyFileError(f"{path}: unexpected content outside the PEM blocks")
    return blocks


def _load_private_blocks(path: Path) -> list[Any]:
    data = _read_key_file(path, private=True)
    keys = []
    for index, block in enumerate(_pem_blocks(path, data), start=1):
        try:
            keys.append(serialization.load_pem_private_key(block, password=None))
        except _LOAD_ERRORS as exc:
            raise KeyFileError(f"{path}: PEM block {index} is not a readable unencrypted private key ({exc})") from None
    return keys


def _load_public_blocks(path: Path) -> list[Any]:
    data = _read_key_file(path, private=False)
    keys = []
    for index, block in enumerate(_pem_blocks(path, data), start=1):
        try:
            keys.append(serialization.load_pem_public_key(block))
        except _LOAD_ERRORS as exc:
            raise KeyFileError(f"{path}: PEM block {index} is not a readable public key ({exc})") from None
    return keys


def _single(path: Path, keys: list[Any], kind: type, what: str) -> Any:
    if len(keys) != 1 or not isinstance(keys[0], kind):
        found = ", ".join(type(k).__name__ for k in keys)
        raise KeyFileError(f"{path}: expected one {what}, found {found}")
    return keys[0]


def load_signing_private(path: str | os.PathLike[str]) -> ed25519.Ed25519PrivateKey:
    """Load a node's or the server's Ed25519 private key (``sign.key``)."""
    file = Path(path)
    return _single(file, _load_private_blocks(file), ed25519.Ed25519PrivateKey, "Ed25519 private key")


def load_signing_public(path: str | os.PathLike[str]) -> ed25519.Ed25519PublicKey:
    """Load an Ed25519 public key (``sign.pub``)."""
    file = Path(path)
    return _single(file, _load_public_blocks(file), ed25519.Ed25519PublicKey, "Ed25519 public key")


def _hpke_parts(path: Path, keys: list[Any], x_kind: type, pq_kind: type, what: str) -> tuple[Any, Any | None]:
    """Classify an HPKE key file's blocks as ``(x25519, None)`` or ``(x25519, mlkem768)``."""
    kinds = [type(k).__name__ for k in keys]
    if len(keys) == 1 and isinstance(keys[0], x_kind):
        return keys[0], None
    if len(keys) == 2 and isinstance(keys[0], pq_kind) and isinstance(keys[1], x_kind):
        check_suite(SUITE_MLKEM768_X25519)
        return keys[1], keys[0]
    raise KeyFileError(
        f"{path}: expected an X25519 {what} (suite x25519) or ML-KEM-768 then X25519 {what}s "
        f"(suite mlkem768-x25519), found {', '.join(kinds)}"
    )


def _load_hpke_private_parts(path: Path) -> tuple[x25519.X25519PrivateKey, mlkem.MLKEM768PrivateKey | None]:
    return _hpke_parts(
        path, _load_private_blocks(path), x25519.X25519PrivateKey, mlkem.MLKEM768PrivateKey, "private key"
    )


def _load_hpke_public_parts(path: Path) -> tuple[x25519.X25519PublicKey, mlkem.MLKEM768PublicKey | None]:
    return _hpke_parts(path, _load_public_blocks(path), x25519.X25519PublicKey, mlkem.MLKEM768PublicKey, "public key")


def load_hpke_private(path: str | os.PathLike[str]) -> HpkePrivateKey:
    """Load the ServerApp's HPKE private key; the suite follows from the file's key types."""
    x_key, pq_key = _load_hpke_private_parts(Path(path))
    return x_key if pq_key is None else _HYBRID_PRIVATE_CLASS(pq_key, x_key)


def load_hpke_public(path: str | os.PathLike[str]) -> HpkePublicKey:
    """Load the ServerApp's HPKE public key (``hpke.pub``) that nodes encrypt deltas to."""
    x_key, pq_key = _load_hpke_public_parts(Path(path))
    return x_key if pq_key is None else _HYBRID_PUBLIC_CLASS(pq_key, x_key)


# --------------------------------------------------------------------------- fingerprints


def fingerprint(public_key: RawPublicKey) -> str:
    """First 16 hex chars of SHA-256 over the raw public key bytes, for logs and out-of-band checks.

    The combined hybrid HPKE key object exposes no bytes; use :func:`public_key_file_fingerprint`
    on its ``hpke.pub`` file instead.
    """
    if not isinstance(public_key, (ed25519.Ed25519PublicKey, x25519.X25519PublicKey, mlkem.MLKEM768PublicKey)):
        raise TypeError(
            f"cannot fingerprint {type(public_key).__name__}; for a hybrid HPKE key use "
            "public_key_file_fingerprint(path)"
        )
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:16]


def public_key_file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Fingerprint of any public key file this module writes, hybrid ``hpke.pub`` included.

    For the hybrid suite the hashed bytes are the ML-KEM-768 public key followed by the X25519
    public key, the order the hybrid KEM itself concatenates them in.
    """
    file = Path(path)
    keys = _load_public_blocks(file)
    if len(keys) == 1:
        return fingerprint(keys[0])
    x_key, pq_key = _load_hpke_public_parts(file)
    assert pq_key is not None  # two blocks only classify as the hybrid pair
    return hashlib.sha256(pq_key.public_bytes_raw() + x_key.public_bytes_raw()).hexdigest()[:16]


# --------------------------------------------------------------------------- init_keys


def _key_paths(key_dir: Path, role: Role, suite: str) -> KeyPaths:
    server = role == "server"
    return KeyPaths(
        key_dir=key_dir,
        role=role,
        suite=suite,
        sign_private=key_dir / SIGN_PRIVATE_NAME,
        sign_public=key_dir / SIGN_PUBLIC_NAME,
        hpke_private=key_dir / HPKE_PRIVATE_NAME if server else None,
        hpke_public=key_dir / HPKE_PUBLIC_NAME if server else None,
    )


def _check_signing_pair(paths: KeyPaths) -> None:
    """Existing signing files must load and match, else refuse to treat them as a valid set."""
    private = load_signing_private(paths.sign_private)
    if not paths.sign_public.exists():
        save_public_key(paths.sign_public, private.public_key())  # finish an interrupted init
        return
    public = load_signing_public(paths.sign_public)
    if public.public_bytes_raw() != private.public_key().public_bytes_raw():
        raise KeyFileError(f"{paths.sign_public}: does not match the private key in {paths.sign_private}")


def _hpke_public_bytes(x_key: x25519.X25519PublicKey, pq_key: mlkem.MLKEM768PublicKey | None) -> bytes:
    return (pq_key.public_bytes_raw() if pq_key is not None else b"") + x_key.public_bytes_raw()


def _check_hpke_pair(paths: KeyPaths) -> None:
    assert paths.hpke_private is not None and paths.hpke_public is not None
    x_priv, pq_priv = _load_hpke_private_parts(paths.hpke_private)
    existing_suite = SUITE_X25519 if pq_priv is None else SUITE_MLKEM768_X25519
    if existing_suite != paths.suite:
        raise KeyFileError(
            f"{paths.hpke_private}: holds a {existing_suite!r} key but suite {paths.suite!r} was requested; "
            "pass overwrite=True to replace it"
        )
    x_pub, pq_pub = x_priv.public_key(), pq_priv.public_key() if pq_priv is not None else None
    if not paths.hpke_public.exists():
        if pq_pub is None:
            save_public_key(paths.hpke_public, x_pub)
        else:
            _save_hybrid_public(paths.hpke_public, pq_pub, x_pub)
        return
    stored_x, stored_pq = _load_hpke_public_parts(paths.hpke_public)
    if _hpke_public_bytes(stored_x, stored_pq) != _hpke_public_bytes(x_pub, pq_pub):
        raise KeyFileError(f"{paths.hpke_public}: does not match the private key in {paths.hpke_private}")


def _write_signing_pair(paths: KeyPaths) -> None:
    key = generate_signing_key()
    save_private_key(paths.sign_private, key)
    save_public_key(paths.sign_public, key.public_key())


def _write_hpke_pair(paths: KeyPaths) -> None:
    assert paths.hpke_private is not None and paths.hpke_public is not None
    x_key = x25519.X25519PrivateKey.generate()
    if paths.suite == SUITE_X25519:
        save_private_key(paths.hpke_private, x_key)
        save_public_key(paths.hpke_public, x_key.public_key())
        return
    pq_key = mlkem.MLKEM768PrivateKey.generate()
    _save_hybrid_private(paths.hpke_private, pq_key, x_key)
    _save_hybrid_public(paths.hpke_public, pq_key.public_key(), x_key.public_key())


def _reuse_existing(paths: KeyPaths, private: Path, public: Path | None, check: Callable[[KeyPaths], None]) -> bool:
    """Decide whether a key pair already on disk is kept (True) or must be generated (False).

    A private key whose public half is missing is an interrupted earlier run: the public file is
    re-derived. A public file without its private key cannot be repaired and is refused, because
    generating a new pair would silently invalidate a key that may already be distributed.
    """
    if private.exists():
        check(paths)
        return True
    if public is not None and public.exists():
        raise KeyFileError(f"{public}: exists without its private key {private}; pass overwrite=True to replace both")
    return False


def init_keys(*, key_dir: Path, role: Role, suite: str = SUITE_X25519, overwrite: bool = False) -> KeyPaths:
    """Create the key files for a node or the server, or return the ones already there.

    Without ``overwrite`` existing keys are never replaced: a re-run validates them (loadable,
    private and public halves match, HPKE suite as requested) and returns their paths, so
    deployment scripts can call this unconditionally. ``overwrite=True`` rotates every key of the
    role; each file is replaced atomically. For a node, ``suite`` writes nothing extra but is
    still checked, because the node must be able to encrypt to a server of that suite.
    """
    if role not in ("server", "node"):
        raise ValueError(f"role must be 'server' or 'node', got {role!r}")
    check_suite(suite)
    paths = _key_paths(Path(key_dir), role, suite)
    # the folder of private keys is the owner's alone (a 0755 folder lists them and their rotations)
    Path(key_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(key_dir, 0o700)
    if overwrite or not _reuse_existing(paths, paths.sign_private, paths.sign_public, _check_signing_pair):
        _write_signing_pair(paths)
    if role == "server":
        assert paths.hpke_private is not None
        if overwrite or not _reuse_existing(paths, paths.hpke_private, paths.hpke_public, _check_hpke_pair):
            _write_hpke_pair(paths)
    return paths


# --------------------------------------------------------------------------- node registry


def _check_node_id(node_id: object) -> str:
    if not isinstance(node_id, str) or not NODE_ID_PATTERN.fullmatch(node_id):
        raise ValueError(
            f"node_id must be 1-128 chars of [A-Za-z0-9._:@-] starting with a letter or digit, got {node_id!r}"
        )
    return node_id


@contextmanager
def _registry_lock(registry_path: Path) -> Iterator[None]:
    """Serialize read-modify-write of the registry so two enrollments cannot drop each other."""
    registry_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = registry_path.with_name(f".{registry_path.name}.lock")
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_registry(
    registry_path: Path,
) -> tuple[dict[str, dict[str, str]], dict[str, ed25519.Ed25519PublicKey]]:
    """Parse and validate the registry: its raw entries and the public key of each node."""
    try:
        document = json.loads(registry_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyFileError(f"{registry_path}: node registry not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyFileError(f"{registry_path}: unreadable node registry ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != REGISTRY_FORMAT:
        raise KeyFileError(f"{registry_path}: not a node registry (field 'format' must be {REGISTRY_FORMAT!r})")
    if document.get("version") != REGISTRY_VERSION:
        raise KeyFileError(
            f"{registry_path}: unsupported registry version {document.get('version')!r} (expected {REGISTRY_VERSION})"
        )
    nodes = document.get("nodes")
    if not isinstance(nodes, dict):
        raise KeyFileError(f"{registry_path}: field 'nodes' must be an object")
    keys = {node_id: _check_registry_entry(registry_path, node_id, entry) for node_id, entry in nodes.items()}
    return nodes, keys


def _read_revoked(registry_path: Path) -> dict[str, dict]:
    """Revoked key fingerprint -> ``{"node_id", "revoked_at"}`` (absent field: none revoked)."""
    document = json.loads(registry_path.read_text(encoding="utf-8"))  # _read_registry validated it
    revoked = document.get("revoked", {})
    if not isinstance(revoked, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("node_id"), str) for v in revoked.values()
    ):
        raise KeyFileError(f"{registry_path}: field 'revoked' must map fingerprints to {{'node_id', 'revoked_at'}}")
    return revoked


def revoked_nodes(registry_path: str | os.PathLike[str]) -> set[str]:
    """Node ids whose key was revoked and that hold no new key since (their envelopes are refused)."""
    registry = Path(registry_path)
    if not registry.exists():
        return set()
    nodes, _ = _read_registry(registry)
    return {entry["node_id"] for entry in _read_revoked(registry).values()} - set(nodes)


def revoke_node(*, registry_path: Path, node_id: str) -> str:
    """Stop trusting ``node_id``'s signing key: it leaves the registry and may never be enrolled again.

    For a lost, stolen or misbehaving device. The server refuses its envelopes from then on
    (``revoked``). Its key's fingerprint is kept under ``revoked`` so the same key cannot be
    enrolled again, for this or any node id; the node id itself may later be enrolled with a
    new key (a replacement device). Returns the revoked key's fingerprint.
    """
    _check_node_id(node_id)
    registry = Path(registry_path)
    with _registry_lock(registry):
        nodes = _read_registry(registry)[0]
        if node_id not in nodes:
            raise EnrollmentError(f"{registry}: node {node_id!r} is not enrolled")
        revoked = _read_revoked(registry)
        entry = nodes.pop(node_id)
        revoked[entry["fingerprint"]] = {"node_id": node_id, "revoked_at": time.time()}
        atomic_write_json(
            registry, {"format": REGISTRY_FORMAT, "version": REGISTRY_VERSION, "nodes": nodes, "revoked": revoked}
        )
    return entry["fingerprint"]


def _check_registry_entry(registry_path: Path, node_id: str, entry: object) -> ed25519.Ed25519PublicKey:
    where = f"{registry_path}: nodes[{node_id!r}]"
    try:
        _check_node_id(node_id)
    except ValueError as exc:
        raise KeyFileError(f"{where}: {exc}") from None
    if not isinstance(entry, dict) or set(entry) != {"fingerprint", "public_key_pem"}:
        raise KeyFileError(f"{where}: must be an object with exactly 'fingerprint' and 'public_key_pem'")
    pem = entry["public_key_pem"]
    if not isinstance(pem, str):
        raise KeyFileError(f"{where}.public_key_pem: must be a string")
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (*_LOAD_ERRORS, UnicodeEncodeError) as exc:
        raise KeyFileError(f"{where}.public_key_pem: unreadable public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{where}.public_key_pem: expected an Ed25519 key, found {type(key).__name__}")
    if entry["fingerprint"] != fingerprint(key):
        raise KeyFileError(f"{where}.fingerprint: does not match public_key_pem (registry edited by hand?)")
    return key


def load_enrolled_nodes(registry_path: str | os.PathLike[str]) -> dict[str, ed25519.Ed25519PublicKey]:
    """The server's view of which Ed25519 key speaks for which node, fully validated."""
    _, keys = _read_registry(Path(registry_path))
    return keys


def enroll_node(*, registry_path: Path, node_id: str, public_key_path: Path, replace: bool = False) -> None:
    """Record that ``node_id`` signs with the Ed25519 key in ``public_key_path``.

    Re-enrolling the same key is a no-op (no write). A different key for an enrolled node is an
    :class:`EnrollmentError` unless ``replace=True`` (key rotation must be deliberate: the new key
    is trusted for every future delta of that node). One key may not speak for two node ids,
    because deltas and deletion requests are attributed to nodes by their key.

    The read-modify-write runs under an exclusive ``flock`` on ``.<registry name>.lock`` in the
    same folder, so concurrent enrollments cannot drop each other's entries.
    """
    _check_node_id(node_id)
    registry = Path(registry_path)
    key = load_signing_public(public_key_path)
    entry = {"fingerprint": fingerprint(key), "public_key_pem": _public_pem(key).decode("ascii")}
    with _registry_lock(registry):
        nodes = _read_registry(registry)[0] if registry.exists() else {}
        revoked = _read_revoked(registry) if registry.exists() else {}
        if entry["fingerprint"] in revoked:
            raise EnrollmentError(
                f"{registry}: key {entry['fingerprint']} from {public_key_path} was revoked "
                f"(node {revoked[entry['fingerprint']]['node_id']!r}); enroll a new key"
            )
        current = nodes.get(node_id)
        if current == entry:
            return
        if current is not None and not replace:
            raise EnrollmentError(
                f"{registry}: node {node_id!r} is enrolled with key {current['fingerprint']}, "
                f"not {entry['fingerprint']}; pass replace=True to rotate its key"
            )
        for other_id, other in nodes.items():
            if other_id != node_id and other["public_key_pem"] == entry["public_key_pem"]:
                raise EnrollmentError(
                    f"{registry}: key {entry['fingerprint']} from {public_key_path} is already enrolled for node {other_id!r}"
                )
        nodes[node_id] = entry
        document = {"format": REGISTRY_FORMAT, "version": REGISTRY_VERSION, "nodes": nodes}
        atomic_write_json(registry, {**document, "revoked": revoked} if revoked else document)
