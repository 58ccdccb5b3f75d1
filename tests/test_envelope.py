"""Delta envelope: round trips, every rejection reason, and robustness to arbitrary bytes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from serforget.common import keys
from serforget.common.envelope import (
    REASONS,
    EnvelopeError,
    read_header_unverified,
)
from serforget.common.keys import UnsupportedSuiteError
from tests.helpers.envelopes import (
    BASE_SHA,
    NOW,
    PAYLOAD,
    WORLD,
    World,
    canonical,
    forge,
    frame,
    header_json,
    make_world,
    open_,
    rejected,
    seal,
    split,
)


def test_round_trip(world: World) -> None:
    envelope = seal(world)
    header, payload = open_(world, envelope)
    assert payload == PAYLOAD
    assert header.node_id == "node-1" and header.request_ids == ("req-a", "req-b")
    assert (header.base_version, header.base_sha256, header.created_at) == (3, BASE_SHA, NOW)
    assert header.suite == "x25519" and header.version == 1
    assert header.payload_sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert len(header.envelope_id) == 32 and header.envelope_id != read_header_unverified(seal(world)).envelope_id
    assert read_header_unverified(envelope) == header


def test_superlink_sees_no_plaintext(world: World) -> None:
    payload = b"SECRET-DELTA-" * 1000
    envelope = seal(world, payload=payload)
    assert b"SECRET-DELTA" not in envelope


def test_empty_payload_round_trip(world: World) -> None:
    assert open_(world, seal(world, payload=b""))[1] == b""


def test_envelope_matches_documented_layout(world: World) -> None:
    envelope = seal(world)
    header, sealed, signature = split(envelope)
    assert envelope[:5] == b"SFDE\x01" and len(signature) == 64
    assert len(sealed) == 32 + len(PAYLOAD) + 16  # X25519 enc + ciphertext + GCM tag
    assert header == canonical(header_json(envelope))
    world.node1.public_key().verify(signature, envelope[:-64])


# --------------------------------------------------------------------------- tampering


def test_tampered_header_is_bad_signature(world: World) -> None:
    envelope = seal(world)
    header, sealed, signature = split(envelope)
    fields = json.loads(header)
    fields["request_ids"] = ["req-a", "req-c"]  # same length, still a valid header
    rejected("bad-signature", world, frame(canonical(fields), sealed, None, signature))


def test_tampered_ciphertext_is_bad_signature(world: World) -> None:
    envelope = bytearray(seal(world))
    envelope[-64 - 100] ^= 1  # inside the AEAD ciphertext, before the signature
    rejected("bad-signature", world, bytes(envelope))


def test_tampered_signature_is_bad_signature(world: World) -> None:
    envelope = bytearray(seal(world))
    envelope[-1] ^= 0x80
    rejected("bad-signature", world, bytes(envelope))


def test_altered_ciphertext_resigned_by_node_fails_decryption(world: World) -> None:
    header, sealed, _ = split(seal(world))
    altered = bytearray(sealed)
    altered[40] ^= 1
    rejected("decrypt-failed", world, frame(header, bytes(altered), world.node1))


def test_another_node_cannot_claim_the_delta(world: World) -> None:
    """Stripping node-1's signature and re-signing as node-2 fails: node_id is bound as HPKE info."""
    header, sealed, _ = split(seal(world))
    fields = json.loads(header)
    fields["node_id"] = "node-2"
    rejected("decrypt-failed", world, frame(canonical(fields), sealed, world.node2))
    rejected("bad-signature", world, frame(header, sealed, world.node2))


def test_signed_by_key_of_another_node(world: World) -> None:
    err = rejected("bad-signature", world, seal(world, node_signing_key=world.node2))
    assert "node-1" in str(err)


def test_unknown_node(world: World) -> None:
    err = rejected("unknown-node", world, seal(world, node_id="node-9"))
    assert err.field == "node_id" and "node-9" in str(err)


def test_wrong_server_key_is_decrypt_failed(world: World) -> None:
    rejected("decrypt-failed", world, seal(world), server_hpke_private=x25519.X25519PrivateKey.generate())


def test_payload_hash_mismatch(world: World) -> None:
    fields = header_json(seal(world))
    fields["payload_sha256"] = hashlib.sha256(b"something else").hexdigest()
    rejected("payload-mismatch", world, forge(world, fields, PAYLOAD, world.node1))


# --------------------------------------------------------------------------- context checks


def test_wrong_base_version(world: World) -> None:
    err = rejected("wrong-base", world, seal(world), expected_base_version=4)
    assert err.field == "base_version"


def test_wrong_base_hash(world: World) -> None:
    err = rejected("wrong-base", world, seal(world), expected_base_sha256="0" * 64)
    assert err.field == "base_sha256"


def test_replay(world: World) -> None:
    envelope = seal(world)
    header, _ = open_(world, envelope)
    rejected("replay", world, envelope, seen_ids={header.envelope_id})


def test_expired(world: World) -> None:
    envelope = seal(world)
    assert open_(world, envelope, now=NOW + 3600)[1] == PAYLOAD
    rejected("expired", world, envelope, now=NOW + 3601)
    rejected("expired", world, envelope, now=NOW + 61, max_age_s=60)


def test_future_timestamp(world: World) -> None:
    envelope = seal(world)
    assert open_(world, envelope, now=NOW - 300)[1] == PAYLOAD
    rejected("future", world, envelope, now=NOW - 301)


def test_oversized_payload(world: World) -> None:
    envelope = seal(world)
    assert open_(world, envelope, max_payload_bytes=len(PAYLOAD))[1] == PAYLOAD
    rejected("too-large", world, envelope, max_payload_bytes=len(PAYLOAD) - 1)
    rejected("too-large", world, envelope, max_payload_bytes=0)  # caught by length before parsing
    with pytest.raises(EnvelopeError) as info:
        seal(world, max_payload_bytes=len(PAYLOAD) - 1)
    assert info.value.reason == "too-large"


def test_open_limits_are_validated(world: World) -> None:
    with pytest.raises(ValueError, match="max_age_s"):
        open_(world, seal(world), max_age_s=0)


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda e: e[:3], "envelope"),
        (lambda e: b"XXXX" + e[4:], "magic"),
        (lambda e: e[:4] + b"\x02" + e[5:], "version"),
        (lambda e: e[:5] + b"\x00\x00\x00\x00" + e[9:], "header_len"),
        (lambda e: e[:5] + b"\xff\xff\xff\xff" + e[9:], "header_len"),
        (lambda e: e + b"\x00", "sealed_len"),
        (lambda e: e[:-1], "sealed_len"),
    ],
)
def test_malformed_framing(world: World, mutate: Any, field: str) -> None:
    err = rejected("malformed", world, mutate(seal(world)))
    assert err.field == field and field in str(err)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"base_version": True}, "base_version"),
        ({"base_version": -1}, "base_version"),
        ({"created_at": 1_700_000_000}, "created_at"),
        ({"suite": "rsa"}, "suite"),
        ({"version": 2}, "version"),
        ({"node_id": "../x"}, "node_id"),
        ({"request_ids": []}, "request_ids"),
        ({"request_ids": "req-a"}, "request_ids"),
        ({"request_ids": ["a", "a"]}, "request_ids"),
        ({"request_ids": ["a", 5]}, "request_ids[1]"),
        ({"envelope_id": "A" * 32}, "envelope_id"),
        ({"base_sha256": "abc"}, "base_sha256"),
        ({"extra": 1}, "header"),
    ],
)
def test_malformed_header_fields(world: World, change: dict[str, Any], field: str) -> None:
    fields = {**header_json(seal(world)), **change}
    err = rejected("malformed", world, forge(world, fields, PAYLOAD, world.node1))
    assert err.field == field, str(err)


def test_missing_header_field(world: World) -> None:
    fields = header_json(seal(world))
    del fields["envelope_id"]
    err = rejected("malformed", world, forge(world, fields, PAYLOAD, world.node1))
    assert "missing keys ['envelope_id']" in str(err)


def test_non_canonical_header_is_malformed(world: World) -> None:
    """A second encoding of the same header must not be accepted (no malleability)."""
    header, sealed, _ = split(seal(world))
    spaced = json.dumps(json.loads(header), sort_keys=True).encode()
    err = rejected("malformed", world, frame(spaced, sealed, world.node1))
    assert "canonical" in str(err)


def test_duplicate_header_key_is_malformed(world: World) -> None:
    header, sealed, _ = split(seal(world))
    doubled = b'{"base_version":3,' + header[1:]
    err = rejected("malformed", world, frame(doubled, sealed, world.node1))
    assert "duplicate keys ['base_version']" in str(err)


def test_seal_validates_fields(world: World) -> None:
    with pytest.raises(EnvelopeError, match="base_sha256") as info:
        seal(world, base_sha256="XYZ")
    assert info.value.reason == "malformed"
    with pytest.raises(EnvelopeError, match="request_ids"):
        seal(world, request_ids="req-a")
    with pytest.raises(EnvelopeError, match="node_id"):
        seal(world, node_id="")


def test_error_reason_must_be_known() -> None:
    with pytest.raises(ValueError, match="unknown envelope error reason"):
        EnvelopeError("oops", "x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- post-quantum suite


def test_pq_hybrid_round_trip_or_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    if not keys.pq_hybrid_available():
        with pytest.raises(UnsupportedSuiteError):
            keys.check_suite("mlkem768-x25519")
        return
    pq = make_world("mlkem768-x25519")
    envelope = seal(pq)
    header, payload = open_(pq, envelope)
    assert header.suite == "mlkem768-x25519" and payload == PAYLOAD
    assert len(split(envelope)[1]) == 1120 + len(PAYLOAD) + 16
    rejected("decrypt-failed", pq, envelope, server_hpke_private=make_world("mlkem768-x25519").server_private)
    monkeypatch.setattr(keys, "pq_hybrid_available", lambda: False)
    with pytest.raises(UnsupportedSuiteError, match="mlkem768-x25519"):
        seal(pq)


def test_suite_mismatch_with_server_key(world: World) -> None:
    if not keys.pq_hybrid_available():
        pytest.skip("ML-KEM hybrid not offered by this cryptography build")
    pq = make_world("mlkem768-x25519")
    err = rejected("wrong-suite", world, seal(pq))
    assert err.field == "suite"


# --------------------------------------------------------------------------- robustness properties

PROPERTY = settings(max_examples=150, deadline=None)


def _only_envelope_errors(data: bytes) -> None:
    with pytest.raises(EnvelopeError) as info:
        open_(WORLD, data)
    assert info.value.reason in REASONS


@PROPERTY
@given(data=st.binary(max_size=2048))
def test_random_bytes_only_raise_envelope_error(data: bytes) -> None:
    _only_envelope_errors(data)


@PROPERTY
@given(data=st.binary(max_size=512))
def test_random_bytes_after_valid_prefix_only_raise_envelope_error(data: bytes) -> None:
    _only_envelope_errors(b"SFDE\x01" + data)


_VALID = seal(WORLD, payload=b"delta" * 20)


def test_unmutated_property_envelope_is_valid() -> None:
    assert open_(WORLD, _VALID)[1] == b"delta" * 20


@PROPERTY
@given(
    position=st.integers(min_value=0, max_value=len(_VALID) - 1),
    kind=st.sampled_from(["flip", "delete", "insert", "truncate"]),
    byte=st.integers(min_value=0, max_value=255),
)
def test_mutated_envelope_only_raises_envelope_error(position: int, kind: str, byte: int) -> None:
    data = bytearray(_VALID)
    if kind == "flip":
        data[position] ^= byte or 1
    elif kind == "delete":
        del data[position]
    elif kind == "insert":
        data.insert(position, byte)
    else:
        del data[position:]
    _only_envelope_errors(bytes(data))


@PROPERTY
@given(
    payload=st.binary(max_size=4096),
    request_ids=st.lists(
        st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True), min_size=1, max_size=5, unique=True
    ),
    base_version=st.integers(min_value=0, max_value=2**62),
)
def test_seal_open_round_trip_property(payload: bytes, request_ids: list[str], base_version: int) -> None:
    envelope = seal(WORLD, payload=payload, request_ids=request_ids, base_version=base_version)
    header, opened = open_(WORLD, envelope, expected_base_version=base_version)
    assert opened == payload and header.request_ids == tuple(request_ids)
