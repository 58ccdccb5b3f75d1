"""Encrypted, signed envelope that carries a node's unlearning delta to the ServerApp.

Why: when a speaker deletes recordings, their device unlearns locally and sends the weight delta
(unlearned - global) through the Flower SuperLink. The SuperLink relays bytes but must be able to
read nothing, and the ServerApp must be sure which enrolled node produced a delta, for which
deletion requests, against which global model, and that it has not seen it before.

Construction (encrypt-then-sign, with the header bound into both layers):

1. The header (below) is serialized canonically.
2. The payload is HPKE-sealed (RFC 9180, base mode, single shot) to the ServerApp's public key
   with the serialized header as HPKE ``info``. ``info`` enters the HPKE key schedule, so the
   ciphertext only decrypts under exactly this header.
3. The node signs every byte before the signature field (magic, version, header, HPKE output)
   with its Ed25519 key.

Why encrypt-then-sign: the SuperLink sees only ciphertext and a signature over ciphertext, never
plaintext; the ServerApp can reject unknown nodes, forged, stale, replayed or wrong-base
envelopes *before* spending an HPKE decryption on them (anyone may encrypt to the server's public
key, so decryption must not be the first gate). The classic weakness of encrypt-then-sign is that
an attacker can strip the signature and re-sign the ciphertext as their own; here that fails
because the claimed ``node_id`` sits in the header that is HPKE ``info``: keeping the victim's
``node_id`` fails signature verification against the victim's enrolled key, and writing one's
own ``node_id`` changes ``info`` so decryption fails. Sign-then-encrypt would hide the node id
from the SuperLink but force decryption before authentication and leave the routing header
unauthenticated; the SuperLink already knows which node sent a message, so hiding it gains little.

Binary framing, version 1 (all integers big-endian, every length checked, no trailing bytes)::

    offset      size  field
    0           4     magic            b"SFDE" (serforget delta envelope)
    4           1     format version   1
    5           4     header_len       u32, 1..MAX_HEADER_BYTES
    9           H     header           canonical JSON, ASCII (see below)
    9+H         8     sealed_len       u64
    17+H        S     sealed           HPKE enc || AEAD ciphertext (payload + 16-byte tag)
    17+H+S      64    signature        Ed25519 over bytes [0, 17+H+S)

Header: a JSON object with exactly these keys, serialized with sorted keys, no whitespace and
ASCII escapes (the parser re-serializes and requires identical bytes, so a header has exactly one
encoding and cannot be varied under a fixed signature):

``version`` (int)
    Envelope format version, must equal the framing byte (1). Signed, so no downgrade.
``suite`` (str)
    ``"x25519"`` (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM) or ``"mlkem768-x25519"``
    (hybrid post-quantum ML-KEM-768 + X25519 KEM, HKDF-SHA256, AES-256-GCM).
``node_id`` (str)
    Enrolled node that signed; selects the verification key. 1-128 chars ``[A-Za-z0-9._:@-]``.
``request_ids`` (list of str, non-empty, unique)
    Deletion requests this delta fulfils, so the server can mark exactly those as done.
``base_version`` (int >= 0) and ``base_sha256`` (64 lowercase hex)
    Global model round and the SHA-256 of its weights the delta was computed against; a delta
    applied to another base would corrupt the model.
``created_at`` (float, Unix seconds)
    Node clock at sealing; bounds how long ``envelope_id`` must be remembered for replay checks.
``envelope_id`` (32 lowercase hex)
    Random 128-bit id; the server rejects ids it has already accepted (replay protection).
``payload_sha256`` (64 lowercase hex)
    SHA-256 of the plaintext payload, checked after decryption. It puts the node's signature
    directly on the delta's content, so the server's audit log can show an auditor which exact
    delta a node signed without handing over the server's HPKE private key. The SuperLink learns
    only this hash: it can test equality with a guessed delta, which for float weight deltas is
    no practical leak (a resent identical envelope is already caught by ``envelope_id``).

The payload is opaque bytes (callers put a safetensors-serialized delta in it). Every failure of
:func:`open_delta` is an :class:`EnvelopeError` with a machine-readable ``reason``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import struct
import time
from collections.abc import Container, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, get_args

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519

from serforget.common.keys import (
    NODE_ID_PATTERN,
    SUITE_X25519,
    SUITES,
    HpkePrivateKey,
    HpkePublicKey,
    check_suite,
    hpke_suite_of,
)

MAGIC: Final = b"SFDE"
ENVELOPE_VERSION: Final = 1
MAX_HEADER_BYTES: Final = 64 * 1024
DEFAULT_MAX_PAYLOAD_BYTES: Final = 256 * 1024 * 1024
SIGNATURE_BYTES: Final = 64
AEAD_TAG_BYTES: Final = 16
#: Largest HPKE ``enc`` of any suite: ML-KEM-768 ciphertext (1088) + X25519 share (32).
MAX_ENC_BYTES: Final = 1088 + 32

_PREFIX = struct.Struct(">4sBI")  # magic, version, header_len
_SEALED_LEN = struct.Struct(">Q")
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_HEX32 = re.compile(r"[0-9a-f]{32}", re.ASCII)
_HEADER_KEYS: Final = frozenset(
    {
        "version",
        "suite",
        "node_id",
        "request_ids",
        "base_version",
        "base_sha256",
        "created_at",
        "envelope_id",
        "payload_sha256",
    }
)

Reason = Literal[
    "malformed",
    "too-large",
    "wrong-suite",
    "unknown-node",
    "bad-signature",
    "wrong-base",
    "replay",
    "expired",
    "future",
    "decrypt-failed",
    "payload-mismatch",
]
REASONS: Final[frozenset[str]] = frozenset(get_args(Reason))


class EnvelopeError(ValueError):
    """An envelope was rejected (or could not be built); ``reason`` says why, for metrics and logs.

    Reasons: ``malformed`` (framing or a header field; ``field`` names it), ``too-large``,
    ``wrong-suite`` (header suite differs from the server key's), ``unknown-node``,
    ``bad-signature``, ``wrong-base``, ``replay``, ``expired`` (older than ``max_age_s``),
    ``future`` (``created_at`` beyond ``max_skew_s`` ahead), ``decrypt-failed`` and
    ``payload-mismatch`` (decrypted payload differs from the signed ``payload_sha256``).
    """

    def __init__(self, reason: Reason, message: str, *, field: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown envelope error reason {reason!r}")
        self.reason: Reason = reason
        self.field = field
        super().__init__(f"{reason}: {message}")


def _malformed(field: str, message: str) -> EnvelopeError:
    return EnvelopeError("malformed", f"{field}: {message}", field=field)


# --------------------------------------------------------------------------- header


def _check_identifier(field: str, value: object) -> None:
    if not isinstance(value, str) or not NODE_ID_PATTERN.fullmatch(value):
        raise _malformed(field, f"must be 1-128 chars of [A-Za-z0-9._:@-] starting alphanumeric, got {value!r}")


def _check_hex(field: str, value: object, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _malformed(field, f"must be {what}, got {value!r}")


def _check_int(field: str, value: object, *, minimum: int) -> None:
    if type(value) is not int or value < minimum:
        raise _malformed(field, f"must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class EnvelopeHeader:
    """The signed, cleartext part of an envelope; validated on construction (see module doc)."""

    version: int
    suite: str
    node_id: str
    request_ids: tuple[str, ...]
    base_version: int
    base_sha256: str
    created_at: float
    envelope_id: str
    payload_sha256: str

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version != ENVELOPE_VERSION:
            raise _malformed("version", f"must be {ENVELOPE_VERSION}, got {self.version!r}")
        if self.suite not in SUITES:
            raise _malformed("suite", f"must be one of {', '.join(SUITES)}, got {self.suite!r}")
        _check_identifier("node_id", self.node_id)
        self._check_request_ids()
        _check_int("base_version", self.base_version, minimum=0)
        _check_hex("base_sha256", self.base_sha256, _HEX64, "64 lowercase hex chars")
        if type(self.created_at) is not float or not math.isfinite(self.created_at) or self.created_at < 0:
            raise _malformed("created_at", f"must be a finite non-negative float, got {self.created_at!r}")
        _check_hex("envelope_id", self.envelope_id, _HEX32, "32 lowercase hex chars")
        _check_hex("payload_sha256", self.payload_sha256, _HEX64, "64 lowercase hex chars")

    def _check_request_ids(self) -> None:
        if not isinstance(self.request_ids, tuple) or not self.request_ids:
            raise _malformed("request_ids", f"must be a non-empty tuple, got {self.request_ids!r}")
        for index, request_id in enumerate(self.request_ids):
            _check_identifier(f"request_ids[{index}]", request_id)
        if len(set(self.request_ids)) != len(self.request_ids):
            raise _malformed("request_ids", "contains duplicates")


def _encode_header(header: EnvelopeHeader) -> bytes:
    """The one canonical byte form of a header (what is signed and used as HPKE info)."""
    fields: dict[str, Any] = asdict(header)
    fields["request_ids"] = list(header.request_ids)
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise _malformed("header", f"duplicate keys {duplicates}")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise _malformed("header", f"non-finite number {name}")


def _decode_header(data: bytes) -> EnvelopeHeader:
    try:
        fields = json.loads(
            data.decode("ascii"), object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except EnvelopeError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _malformed("header", f"not ASCII JSON ({type(exc).__name__})") from None
    if not isinstance(fields, dict):
        raise _malformed("header", "must be a JSON object")
    missing, extra = _HEADER_KEYS - fields.keys(), fields.keys() - _HEADER_KEYS
    if missing or extra:
        raise _malformed("header", f"missing keys {sorted(missing)}, unexpected keys {sorted(extra)}")
    if not isinstance(fields["request_ids"], list):
        raise _malformed("request_ids", f"must be a list, got {type(fields['request_ids']).__name__}")
    header = EnvelopeHeader(**{**fields, "request_ids": tuple(fields["request_ids"])})
    if _encode_header(header) != data:
        raise _malformed("header", "not in canonical form (sorted keys, no whitespace, ASCII escapes)")
    return header


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True)
class _Frame:
    """Views into one envelope buffer (no copies of the possibly large ciphertext)."""

    header_bytes: bytes
    sealed: memoryview
    signed: memoryview
    signature: bytes


def _parse_frame(envelope: bytes) -> _Frame:
    """Split an envelope into its fields, checking every length against the actual size."""
    if not isinstance(envelope, (bytes, bytearray, memoryview)):
        raise _malformed("envelope", f"must be bytes, got {type(envelope).__name__}")
    try:
        data = memoryview(envelope).cast("B")
    except (TypeError, ValueError) as exc:
        raise _malformed("envelope", f"not a contiguous byte buffer ({exc})") from None
    if len(data) < _PREFIX.size:
        raise _malformed("envelope", f"{len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise _malformed("magic", f"expected {MAGIC!r}, got {magic!r}")
    if version != ENVELOPE_VERSION:
        raise _malformed("version", f"unsupported envelope format version {version} (expected {ENVELOPE_VERSION})")
    if not 1 <= header_len <= MAX_HEADER_BYTES:
        raise _malformed("header_len", f"{header_len} is outside 1..{MAX_HEADER_BYTES}")
    sealed_len_at = _PREFIX.size + header_len
    if len(data) < sealed_len_at + _SEALED_LEN.size:
        raise _malformed("header_len", f"{header_len} runs past the end of a {len(data)}-byte envelope")
    (sealed_len,) = _SEALED_LEN.unpack_from(data, sealed_len_at)
    sealed_at = sealed_len_at + _SEALED_LEN.size
    expected_total = sealed_at + sealed_len + SIGNATURE_BYTES
    if expected_total != len(data):
        raise _malformed("sealed_len", f"{sealed_len} implies a {expected_total}-byte envelope, got {len(data)} bytes")
    signature_at = sealed_at + sealed_len
    return _Frame(
        header_bytes=bytes(data[_PREFIX.size : sealed_len_at]),
        sealed=data[sealed_at:signature_at],
        signed=data[:signature_at],
        signature=bytes(data[signature_at:]),
    )


def _frame_prefix(header_bytes: bytes, sealed_len: int) -> tuple[bytes, bytes]:
    return _PREFIX.pack(MAGIC, ENVELOPE_VERSION, len(header_bytes)), _SEALED_LEN.pack(sealed_len)


def read_header_unverified(envelope: bytes) -> EnvelopeHeader:
    """Parse the header without verifying anything: for logging and routing only.

    Nothing in the result is authenticated; decisions must use the header :func:`open_delta`
    returns.
    """
    return _decode_header(_parse_frame(envelope).header_bytes)


# --------------------------------------------------------------------------- HPKE suites


def _kem(suite: str) -> hpke.KEM:
    """The HPKE KEM of a suite; raises UnsupportedSuiteError if this build cannot run it."""
    check_suite(suite)
    return hpke.KEM.X25519 if suite == SUITE_X25519 else hpke.KEM.MLKEM768_X25519


def _hpke_suite(suite: str) -> hpke.Suite:
    return hpke.Suite(_kem(suite), hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


# --------------------------------------------------------------------------- seal


def seal_delta(
    *,
    payload: bytes,
    node_id: str,
    request_ids: Sequence[str],
    base_version: int,
    base_sha256: str,
    server_hpke_public: HpkePublicKey,
    node_signing_key: ed25519.Ed25519PrivateKey,
    created_at: float | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> bytes:
    """Encrypt ``payload`` to the ServerApp and sign it as ``node_id``; returns the envelope bytes.

    The suite follows from the type of ``server_hpke_public`` (X25519 or the ML-KEM-768+X25519
    hybrid), so a node can never announce one suite and encrypt with another. ``created_at``
    defaults to now; it is a parameter so tests and replays of recorded runs can pin the clock.
    Invalid fields raise :class:`EnvelopeError` (``malformed``/``too-large``) naming the field.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise _malformed("payload", f"must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > max_payload_bytes:
        raise EnvelopeError(
            "too-large", f"payload of {len(payload)} bytes exceeds {max_payload_bytes}", field="payload"
        )
    if isinstance(request_ids, str) or not isinstance(request_ids, Sequence):
        raise _malformed("request_ids", f"must be a sequence of strings, got {type(request_ids).__name__}")
    if not isinstance(node_signing_key, ed25519.Ed25519PrivateKey):
        raise TypeError(f"node_signing_key must be an Ed25519PrivateKey, got {type(node_signing_key).__name__}")
    suite = hpke_suite_of(server_hpke_public)
    header = EnvelopeHeader(
        version=ENVELOPE_VERSION,
        suite=suite,
        node_id=node_id,
        request_ids=tuple(request_ids),
        base_version=base_version,
        base_sha256=base_sha256,
        created_at=float(time.time() if created_at is None else created_at),
        envelope_id=secrets.token_hex(16),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
    )
    header_bytes = _encode_header(header)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise _malformed("header", f"{len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES} (too many request_ids?)")
    sealed = _hpke_suite(suite).encrypt(payload, server_hpke_public, info=header_bytes)
    prefix, sealed_len = _frame_prefix(header_bytes, len(sealed))
    signed = b"".join((prefix, header_bytes, sealed_len, sealed))
    return signed + node_signing_key.sign(signed)


# --------------------------------------------------------------------------- open


def _check_open_limits(max_age_s: float, max_skew_s: float, max_payload_bytes: int) -> None:
    if not max_age_s > 0:
        raise ValueError(f"max_age_s must be > 0, got {max_age_s!r}")
    if not max_skew_s >= 0:
        raise ValueError(f"max_skew_s must be >= 0, got {max_skew_s!r}")
    if type(max_payload_bytes) is not int or max_payload_bytes < 0:
        raise ValueError(f"max_payload_bytes must be a non-negative int, got {max_payload_bytes!r}")


def _reject_oversized_envelope(envelope: object, max_payload_bytes: int) -> None:
    """Refuse a huge envelope by its length alone, before any parsing or hashing."""
    fixed = _PREFIX.size + MAX_HEADER_BYTES + _SEALED_LEN.size + MAX_ENC_BYTES + AEAD_TAG_BYTES + SIGNATURE_BYTES
    if isinstance(envelope, (bytes, bytearray, memoryview)) and len(envelope) > fixed + max_payload_bytes:
        raise EnvelopeError(
            "too-large",
            f"envelope of {len(envelope)} bytes cannot hold a payload <= {max_payload_bytes}",
            field="envelope",
        )


def _check_size(frame: _Frame, header: EnvelopeHeader, max_payload_bytes: int) -> None:
    overhead = _kem(header.suite).enc_length() + AEAD_TAG_BYTES
    if len(frame.sealed) < overhead:
        raise _malformed("sealed", f"{len(frame.sealed)} bytes is shorter than the {overhead}-byte HPKE overhead")
    payload_len = len(frame.sealed) - overhead
    if payload_len > max_payload_bytes:
        raise EnvelopeError("too-large", f"payload of {payload_len} bytes exceeds {max_payload_bytes}", field="sealed")


def _verify_signature(frame: _Frame, header: EnvelopeHeader, node_keys: Mapping[str, ed25519.Ed25519PublicKey]) -> None:
    key = node_keys.get(header.node_id)
    if key is None:
        raise EnvelopeError("unknown-node", f"node_id {header.node_id!r} is not enrolled", field="node_id")
    try:
        key.verify(frame.signature, frame.signed)
    except InvalidSignature:
        raise EnvelopeError(
            "bad-signature",
            f"signature does not verify with the key enrolled for node {header.node_id!r}",
            field="signature",
        ) from None


def _check_base(header: EnvelopeHeader, expected_base_version: int, expected_base_sha256: str) -> None:
    if header.base_version != expected_base_version:
        raise EnvelopeError(
            "wrong-base",
            f"base_version {header.base_version} != expected {expected_base_version}",
            field="base_version",
        )
    if header.base_sha256 != expected_base_sha256:
        raise EnvelopeError(
            "wrong-base",
            f"base_sha256 {header.base_sha256} != expected {expected_base_sha256}",
            field="base_sha256",
        )


def _check_freshness(header: EnvelopeHeader, now: float, max_age_s: float, max_skew_s: float) -> None:
    age = now - header.created_at
    if age > max_age_s:
        raise EnvelopeError("expired", f"created_at is {age:.0f} s old (max {max_age_s:g} s)", field="created_at")
    if -age > max_skew_s:
        raise EnvelopeError(
            "future", f"created_at is {-age:.0f} s in the future (max skew {max_skew_s:g} s)", field="created_at"
        )


def _decrypt(frame: _Frame, header: EnvelopeHeader, server_hpke_private: HpkePrivateKey) -> bytes:
    try:
        payload = _hpke_suite(header.suite).decrypt(frame.sealed, server_hpke_private, info=frame.header_bytes)
    except (InvalidTag, ValueError):
        raise EnvelopeError(
            "decrypt-failed", "HPKE decryption failed (not encrypted to this server key, or altered)", field="sealed"
        ) from None
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise EnvelopeError(
            "payload-mismatch", "decrypted payload does not match payload_sha256", field="payload_sha256"
        )
    return payload


def open_delta(
    *,
    envelope: bytes,
    server_hpke_private: HpkePrivateKey,
    node_keys: Mapping[str, ed25519.Ed25519PublicKey],
    expected_base_version: int,
    expected_base_sha256: str,
    seen_ids: Container[str],
    now: float | None = None,
    max_age_s: float = 3600.0,
    max_skew_s: float = 300.0,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[EnvelopeHeader, bytes]:
    """Verify and decrypt an envelope; returns the authenticated header and the payload.

    Checks run in this order, so that nothing unauthenticated reaches HPKE decryption: framing
    and header syntax, suite, size, enrolled node, signature, base model, replay, freshness;
    only then HPKE decryption and the payload hash. Any failure in the envelope raises
    :class:`EnvelopeError` and nothing else (a ``ValueError`` only for invalid limits passed
    by the caller, a ``TypeError`` for a server key of the wrong type).

    Replay protection is the caller's half of the contract: after accepting a delta, persist
    ``header.envelope_id`` in ``seen_ids``. Ids only need keeping for ``max_age_s + max_skew_s``
    because older envelopes are rejected as ``expired`` anyway.
    """
    _check_open_limits(max_age_s, max_skew_s, max_payload_bytes)
    _reject_oversized_envelope(envelope, max_payload_bytes)
    frame = _parse_frame(envelope)
    header = _decode_header(frame.header_bytes)
    server_suite = hpke_suite_of(server_hpke_private)
    if header.suite != server_suite:
        raise EnvelopeError(
            "wrong-suite", f"envelope suite {header.suite!r} but the server key is {server_suite!r}", field="suite"
        )
    _check_size(frame, header, max_payload_bytes)
    _verify_signature(frame, header, node_keys)
    _check_base(header, expected_base_version, expected_base_sha256)
    if header.envelope_id in seen_ids:
        raise EnvelopeError("replay", f"envelope_id {header.envelope_id} was already accepted", field="envelope_id")
    _check_freshness(header, time.time() if now is None else now, max_age_s, max_skew_s)
    return header, _decrypt(frame, header, server_hpke_private)
