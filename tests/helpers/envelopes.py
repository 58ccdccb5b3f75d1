"""A sealed-envelope world (server and node keys) and forging helpers shared by the envelope tests."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from serforget.common.envelope import (
    EnvelopeError,
    EnvelopeHeader,
    open_delta,
    seal_delta,
)

BASE_SHA = hashlib.sha256(b"global model v3").hexdigest()
NOW = 1_700_000_000.0
PAYLOAD = bytes(range(256)) * 40


@dataclass(frozen=True)
class World:
    """A server HPKE key pair and two enrolled nodes."""

    server_private: Any
    server_public: Any
    node1: ed25519.Ed25519PrivateKey
    node2: ed25519.Ed25519PrivateKey

    @property
    def node_keys(self) -> dict[str, ed25519.Ed25519PublicKey]:
        return {"node-1": self.node1.public_key(), "node-2": self.node2.public_key()}


def make_world(suite: str) -> World:
    """A fresh server key pair of HPKE ``suite`` and two node signing keys."""
    x_key = x25519.X25519PrivateKey.generate()
    private: Any = x_key
    if suite == "mlkem768-x25519":
        private = hpke.MLKEM768X25519PrivateKey(mlkem.MLKEM768PrivateKey.generate(), x_key)
    return World(
        private, private.public_key(), ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    )


WORLD = make_world("x25519")


def seal(world: World, **overrides: Any) -> bytes:
    args: dict[str, Any] = dict(
        payload=PAYLOAD,
        node_id="node-1",
        request_ids=["req-a", "req-b"],
        base_version=3,
        base_sha256=BASE_SHA,
        server_hpke_public=world.server_public,
        node_signing_key=world.node1,
        created_at=NOW,
    )
    args.update(overrides)
    return seal_delta(**args)


def open_(world: World, envelope: bytes, **overrides: Any) -> tuple[EnvelopeHeader, bytes]:
    args: dict[str, Any] = dict(
        envelope=envelope,
        server_hpke_private=world.server_private,
        node_keys=world.node_keys,
        expected_base_version=3,
        expected_base_sha256=BASE_SHA,
        seen_ids=set(),
        now=NOW + 10,
    )
    args.update(overrides)
    return open_delta(**args)


def rejected(reason: str, world: World, envelope: bytes, **overrides: Any) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        open_(world, envelope, **overrides)
    assert info.value.reason == reason, str(info.value)
    return info.value


# --- an independent encoder of the documented v1 framing, to forge envelopes a node could send


def split(envelope: bytes) -> tuple[bytes, bytes, bytes]:
    """(header, sealed, signature) per the documented layout."""
    (header_len,) = struct.unpack_from(">I", envelope, 5)
    header = envelope[9 : 9 + header_len]
    (sealed_len,) = struct.unpack_from(">Q", envelope, 9 + header_len)
    sealed = envelope[17 + header_len : 17 + header_len + sealed_len]
    return header, sealed, envelope[17 + header_len + sealed_len :]


def frame(header: bytes, sealed: bytes, signer: ed25519.Ed25519PrivateKey | None, signature: bytes = b"") -> bytes:
    signed = b"SFDE" + bytes([1]) + struct.pack(">I", len(header)) + header + struct.pack(">Q", len(sealed)) + sealed
    return signed + (signer.sign(signed) if signer is not None else signature)


def header_json(envelope: bytes) -> dict[str, Any]:
    return json.loads(split(envelope)[0])


def canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def forge(world: World, fields: dict[str, Any], payload: bytes, signer: ed25519.Ed25519PrivateKey) -> bytes:
    """A correctly encrypted and signed envelope with an arbitrary header (what a rogue node can build)."""
    header = canonical(fields)
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    return frame(header, suite.encrypt(payload, world.server_public, info=header), signer)


# --------------------------------------------------------------------------- accept
