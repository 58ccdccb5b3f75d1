"""Property-based fuzzing of the parsers that read untrusted bytes: only documented errors escape.

hypothesis drives every target (atheris is not a project dependency, and coverage-guided fuzzing
would not fit a seconds-long unit suite). Targets and their one allowed error type:

* audio loaders (``serforget.common.audio.load_audio`` -> AudioError, edge ``read_audio`` -> EdgeAudioError):
  arbitrary bytes and single-byte mutations of a valid WAV;
* manifest parser (``read_manifest`` -> ManifestError): CSV-shaped text built from the characters
  that matter (separators, quotes, newlines, labels). NUL bytes and fields over 131072 characters
  are left out: they are the known defects shown by strict xfails in tests/test_hostile_inputs.py;
* envelope parser (``open_delta`` -> EnvelopeError): validly encrypted and signed envelopes whose
  header fields hold arbitrary JSON values (a rogue enrolled node). Raw and mutated bytes are
  fuzzed in tests/test_envelope.py;
* safetensors payloads (``state_dict_from_bytes`` -> CheckpointError): arbitrary bytes and
  mutations of a valid delta;
* release manifest / index documents (``ReleaseManifest.from_bytes``, ``ReleaseIndex.from_bytes``
  -> ReleaseError): arbitrary JSON values in every field.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serforget.common.audio import AudioError, load_audio
from serforget.common.checkpoint import CheckpointError, state_dict_bytes, state_dict_from_bytes
from serforget.common.edge.runtime import EdgeAudioError, read_audio
from serforget.common.envelope import REASONS, EnvelopeError
from serforget.common.manifest import ManifestError, read_manifest
from serforget.common.release import ReleaseError, ReleaseIndex, ReleaseManifest
from tests.helpers.envelopes import PAYLOAD, WORLD, forge, header_json, open_, seal

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _scratch(suffix: str) -> Path:
    """A fresh file path per example (hypothesis runs many examples inside one test call)."""
    handle = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    handle.close()
    return Path(handle.name)


# --------------------------------------------------------------------------- audio

_WAV = io.BytesIO()
sf.write(_WAV, (0.2 * np.sin(np.arange(800) / 7.0)).astype(np.float32), 16_000, format="WAV", subtype="PCM_16")
VALID_WAV = _WAV.getvalue()


def _decode_both(data: bytes) -> None:
    path = _scratch(".wav")
    try:
        path.write_bytes(data)
        for decode, error in (
            (lambda p: load_audio(p).numpy(), AudioError),
            (lambda p: read_audio(p, sample_rate=16_000), EdgeAudioError),
        ):
            try:
                wave = decode(path)
            except error as exc:
                assert str(path) in str(exc)
                continue
            assert wave.ndim == 1 and wave.shape[0] > 0 and np.isfinite(wave).all()
    finally:
        path.unlink(missing_ok=True)


@FUZZ
@given(data=st.binary(max_size=1024))
def test_audio_loaders_on_arbitrary_bytes(data: bytes) -> None:
    _decode_both(data)


@FUZZ
@given(
    position=st.integers(min_value=0, max_value=len(VALID_WAV) - 1),
    value=st.integers(min_value=0, max_value=255),
    cut=st.integers(min_value=1, max_value=len(VALID_WAV)),
)
def test_audio_loaders_on_mutated_wav(position: int, value: int, cut: int) -> None:
    data = bytearray(VALID_WAV)
    data[position] = value
    _decode_both(bytes(data[:cut]))


# --------------------------------------------------------------------------- manifest

CELL = st.one_of(
    st.sampled_from(
        [
            "u1",
            "u2",
            "a.wav",
            "../x.wav",
            "/abs.wav",
            "s1",
            "happy",
            "sad",
            "HAPPY",
            "exc",
            "",
            " ",
            "utt_id",
            "path",
            "speaker",
            "emotion",
        ]
    ),
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12),
)
ROW = st.lists(CELL, min_size=0, max_size=6).map(lambda cells: ",".join(cells))
SEPARATORS = st.sampled_from(["\n", "\r\n", "\r", '"', '",', "\n\n"])


@FUZZ
@given(
    header=st.one_of(st.just("utt_id,path,speaker,emotion"), ROW), rows=st.lists(st.tuples(ROW, SEPARATORS), max_size=6)
)
def test_manifest_parser_on_csv_shaped_text(header: str, rows: list[tuple[str, str]]) -> None:
    path = _scratch(".csv")
    try:
        path.write_text(header + "\n" + "".join(row + sep for row, sep in rows), encoding="utf-8")
        try:
            utterances = read_manifest(path, root=path.parent)
        except ManifestError as exc:
            assert str(path) in str(exc)
            return
        assert len({u.utt_id for u in utterances}) == len(utterances)
        assert all(u.path.is_relative_to(path.parent.resolve()) for u in utterances)
    finally:
        path.unlink(missing_ok=True)


@FUZZ
@given(data=st.binary(max_size=512).filter(lambda b: b"\x00" not in b))
def test_manifest_parser_on_arbitrary_bytes(data: bytes) -> None:
    path = _scratch(".csv")
    try:
        path.write_bytes(b"utt_id,path,speaker,emotion\n" + data)
        try:
            read_manifest(path)
        except ManifestError:
            pass
    finally:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- envelope header fields

_HEADER = header_json(seal(WORLD))


@FUZZ
@given(field=st.sampled_from(sorted(_HEADER)), value=JSON_VALUES)
def test_signed_envelopes_with_arbitrary_header_values(field: str, value: Any) -> None:
    fields = {**_HEADER, field: value}
    envelope = forge(WORLD, fields, PAYLOAD, WORLD.node1)
    try:
        header, payload = open_(WORLD, envelope)
    except EnvelopeError as exc:
        assert exc.reason in REASONS
        return
    # only a value equal to the original can pass every check
    assert getattr(header, field) in (
        _HEADER[field],
        tuple(_HEADER[field]) if isinstance(_HEADER[field], list) else None,
    )
    assert payload == PAYLOAD


# --------------------------------------------------------------------------- safetensors payloads

VALID_DELTA = state_dict_bytes({"w": torch.arange(6.0).reshape(3, 2), "b": torch.zeros(2, dtype=torch.float16)})


@FUZZ
@given(data=st.binary(max_size=512))
def test_delta_payload_parser_on_arbitrary_bytes(data: bytes) -> None:
    try:
        state_dict_from_bytes(data, source="fuzz")
    except CheckpointError as exc:
        assert "fuzz" in str(exc)


@FUZZ
@given(
    position=st.integers(min_value=0, max_value=len(VALID_DELTA) - 1),
    value=st.integers(min_value=0, max_value=255),
    cut=st.integers(min_value=0, max_value=len(VALID_DELTA)),
)
def test_delta_payload_parser_on_mutated_safetensors(position: int, value: int, cut: int) -> None:
    data = bytearray(VALID_DELTA)
    data[position] = value
    try:
        tensors = state_dict_from_bytes(bytes(data[:cut]), source="fuzz")
    except CheckpointError:
        return
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


# --------------------------------------------------------------------------- release documents

MANIFEST = {
    "format_version": 2,
    "version": 2,
    "parent": 1,
    "created_at": 1.5,
    "applied_request_ids": ["r1"],
    "files": {"model.onnx": {"sha256": "0" * 64, "size": 3}},
    "metrics": {},
    "notes": {},
}
#: the same manifest as an earlier serforget wrote it (format 1: the request list was ``applies_requests``)
MANIFEST_FORMAT_1 = {
    **{k: v for k, v in MANIFEST.items() if k != "applied_request_ids"},
    "format_version": 1,
    "applies_requests": ["r1"],
}
INDEX = {
    "format_version": 2,
    "sequence": 3,
    "generated_at": 2.0,
    "expires": 3.0,
    "releases": [{"version": 1, "manifest_sha256": "0" * 64, "revoked": False, "reason": ""}],
}


@pytest.mark.parametrize(
    ("document", "parse"),
    [
        (MANIFEST, ReleaseManifest.from_bytes),
        (MANIFEST_FORMAT_1, ReleaseManifest.from_bytes),
        (INDEX, ReleaseIndex.from_bytes),
    ],
    ids=["manifest", "manifest-format-1", "index"],
)
def test_release_documents_parse_when_unchanged(document: dict, parse: Any) -> None:
    parse(json.dumps(document).encode(), source="doc")


@FUZZ
@given(
    which=st.sampled_from(["manifest", "manifest-format-1", "index"]),
    pick=st.integers(min_value=0, max_value=7),
    value=JSON_VALUES,
    drop=st.booleans(),
)
def test_release_documents_with_arbitrary_field_values(which: str, pick: int, value: Any, drop: bool) -> None:
    document, parse = {
        "manifest": (MANIFEST, ReleaseManifest.from_bytes),
        "manifest-format-1": (MANIFEST_FORMAT_1, ReleaseManifest.from_bytes),
        "index": (INDEX, ReleaseIndex.from_bytes),
    }[which]
    keys = sorted(document)
    name = keys[pick % len(keys)]
    changed = {k: v for k, v in document.items() if not (drop and k == name)}
    if not drop:
        changed[name] = value
    try:
        parse(json.dumps(changed).encode(), source="doc")
    except ReleaseError as exc:
        assert "doc" in str(exc)


@FUZZ
@given(data=st.binary(max_size=256))
def test_release_documents_on_arbitrary_bytes(data: bytes) -> None:
    for parse in (ReleaseManifest.from_bytes, ReleaseIndex.from_bytes):
        try:
            parse(data, source="doc")
        except ReleaseError:
            pass
