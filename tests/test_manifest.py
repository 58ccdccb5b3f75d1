from pathlib import Path

import pytest

from serforget.common.manifest import (
    ManifestError,
    SplitSpec,
    Utterance,
    by_speaker,
    filter_labels,
    read_manifest,
    speaker_split,
    write_manifest,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_round_trip_relative_paths(tmp_path: Path) -> None:
    utts = [
        Utterance(f"u{i}", tmp_path / "wav" / f"u{i}.wav", f"s{i % 3}", "happy" if i % 2 else "sad") for i in range(6)
    ]
    write_manifest(tmp_path / "m.csv", utts)
    assert "wav/u0.wav" in (tmp_path / "m.csv").read_text()
    back = read_manifest(tmp_path / "m.csv")
    assert [u.utt_id for u in back] == [u.utt_id for u in utts]
    assert back[0].path == (tmp_path / "wav" / "u0.wav").resolve()
    assert list(by_speaker(back)) == ["s0", "s1", "s2"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file"),
        ("utt_id,path,speaker\nu1,a.wav,s1\n", "missing \\['emotion'\\]"),
        ("utt_id,path,speaker,emotion,extra\n", "unexpected \\['extra'\\]"),
        ("utt_id,path,speaker,emotion\nu1,a.wav,s1,joyful\n", ":2: unknown emotion label 'joyful'"),
        ("utt_id,path,speaker,emotion\nu1,a.wav,s1,happy\nu1,b.wav,s1,sad\n", ":3: duplicate utt_id"),
        ("utt_id,path,speaker,emotion\nu1,,s1,happy\n", ":2: empty field 'path'"),
        ("utt_id,path,speaker,emotion\nu1,a.wav,s1\n", ":2: expected 4 fields"),
    ],
)
def test_malformed_manifests_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(_write(tmp_path / "bad.csv", text))
    assert "bad.csv" in str(info.value)


def test_paths_outside_root_rejected(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    m = _write(tmp_path / "root" / "m.csv", "utt_id,path,speaker,emotion\nu1,../../etc/passwd,s1,happy\n")
    with pytest.raises(ManifestError, match="outside the data root"):
        read_manifest(m, root=tmp_path / "root")
    assert read_manifest(m)[0].utt_id == "u1"


def test_speaker_split_is_speaker_independent_and_deterministic(tmp_path: Path) -> None:
    utts = [Utterance(f"u{i}", tmp_path / f"{i}.wav", f"s{i % 10}", "neutral") for i in range(100)]
    a = speaker_split(utts, SplitSpec(n_valid=2, n_test=3, seed=7))
    b = speaker_split(utts, SplitSpec(n_valid=2, n_test=3, seed=7))
    assert a == b
    parts = [set(a.speakers(p)) for p in ("train", "valid", "test")]
    assert [len(p) for p in parts] == [5, 2, 3]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(a.train) + len(a.valid) + len(a.test) == 100
    assert speaker_split(utts, SplitSpec(n_valid=2, n_test=3, seed=8)) != a
    with pytest.raises(ValueError, match="cannot hold out"):
        speaker_split(utts, SplitSpec(n_valid=5, n_test=5))


def test_filter_labels(tmp_path: Path) -> None:
    utts = [Utterance("a", tmp_path, "s", "happy"), Utterance("b", tmp_path, "s", "calm")]
    assert [u.utt_id for u in filter_labels(utts, ["happy", "sad"])] == ["a"]
