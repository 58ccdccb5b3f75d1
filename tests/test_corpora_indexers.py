"""Indexers for RAVDESS, CREMA-D, EmoDB and IEMOCAP on small trees built by the tests."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serforget.common.corpora import FORMATS, IndexResult, cremad, emodb, iemocap, index_corpus, ravdess


def _wav(path: Path, *, seconds: float = 0.05, sample_rate: int = 16000) -> Path:
    """Write a tiny valid 16-bit WAV (a quiet tone) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    sf.write(str(path), 0.1 * np.sin(2 * np.pi * 220 * t), sample_rate, subtype="PCM_16")
    return path


def _junk(path: Path, content: str = "not audio") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def _rows(result: IndexResult) -> list[tuple[str, str, str]]:
    return [(u.utt_id, u.speaker, u.emotion) for u in result.utterances]


def _reasons(result: IndexResult, root: Path) -> dict[str, str]:
    """Skipped files keyed by their path relative to the (resolved) root."""
    base = root.resolve()
    return {s.path.relative_to(base).as_posix(): s.reason for s in result.skipped}


def _check_common_invariants(result: IndexResult) -> None:
    ids = [u.utt_id for u in result.utterances]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(u.path.is_absolute() and u.path.is_file() for u in result.utterances)
    skipped_paths = [str(s.path) for s in result.skipped]
    assert skipped_paths == sorted(skipped_paths)


# ----------------------------------------------------------------------------- RAVDESS


@pytest.fixture()
def ravdess_tree(tmp_path: Path) -> Path:
    root = tmp_path / "ravdess"
    _wav(root / "Actor_01" / "03-01-05-01-01-01-01.wav")  # angry
    _wav(root / "Actor_01" / "03-01-01-01-02-02-01.wav")  # neutral
    _wav(root / "Actor_02" / "03-01-08-02-01-01-02.wav")  # surprised
    _wav(root / "Actor_01" / "01-01-05-01-01-01-01.wav")  # full-AV modality
    _wav(root / "Actor_01" / "03-02-03-01-01-01-01.wav")  # song
    _wav(root / "Actor_01" / "03-01-05-01-01-01-02.wav")  # actor field != folder
    _wav(root / "Actor_01" / "03-01-09-01-01-01-01.wav")  # unknown emotion
    _wav(root / "Actor_01" / "03-01-01-02-01-01-01.wav")  # neutral cannot be strong
    _wav(root / "Actor_01" / "03-01-04-03-01-01-01.wav")  # unknown intensity
    _wav(root / "Actor_01" / "take1.wav")  # not seven fields
    _junk(root / "Actor_01" / "03-01-06-01-01-01-01.wav")  # right name, not audio
    _junk(root / "Actor_01" / "notes.txt")
    _wav(root / "Actor_01" / "extra" / "03-01-03-01-01-01-01.wav")  # nested too deep
    _wav(root / "03-01-03-01-01-01-01.wav")  # outside any actor folder
    _wav(root / "Actor_30" / "03-01-03-01-01-01-30.wav")  # actor outside 01-24
    return root


def test_ravdess_labels_speakers_and_paths(ravdess_tree: Path) -> None:
    result = ravdess.index(ravdess_tree)
    _check_common_invariants(result)
    assert _rows(result) == [
        ("ravdess_03-01-01-01-02-02-01", "ravdess_01", "neutral"),
        ("ravdess_03-01-05-01-01-01-01", "ravdess_01", "angry"),
        ("ravdess_03-01-08-02-01-01-02", "ravdess_02", "surprised"),
    ]
    assert result.utterances[0].path == (ravdess_tree / "Actor_01" / "03-01-01-01-02-02-01.wav").resolve()


def test_ravdess_reports_every_ill_fitting_file(ravdess_tree: Path) -> None:
    reasons = _reasons(ravdess.index(ravdess_tree), ravdess_tree)
    assert set(reasons) == {
        "Actor_01/01-01-05-01-01-01-01.wav",
        "Actor_01/03-02-03-01-01-01-01.wav",
        "Actor_01/03-01-05-01-01-01-02.wav",
        "Actor_01/03-01-09-01-01-01-01.wav",
        "Actor_01/03-01-01-02-01-01-01.wav",
        "Actor_01/03-01-04-03-01-01-01.wav",
        "Actor_01/take1.wav",
        "Actor_01/03-01-06-01-01-01-01.wav",
        "Actor_01/notes.txt",
        "Actor_01/extra/03-01-03-01-01-01-01.wav",
        "03-01-03-01-01-01-01.wav",
        "Actor_30/03-01-03-01-01-01-30.wav",
    }
    assert "video" in reasons["Actor_01/01-01-05-01-01-01-01.wav"]
    assert "song" in reasons["Actor_01/03-02-03-01-01-01-01.wav"]
    assert "does not match folder" in reasons["Actor_01/03-01-05-01-01-01-02.wav"]
    assert "unknown emotion code 09" in reasons["Actor_01/03-01-09-01-01-01-01.wav"]
    assert "neutral has no strong intensity" in reasons["Actor_01/03-01-01-02-01-01-01.wav"]
    assert "unknown intensity 03" in reasons["Actor_01/03-01-04-03-01-01-01.wav"]
    assert "seven two-digit fields" in reasons["Actor_01/take1.wav"]
    assert "not a readable audio file" in reasons["Actor_01/03-01-06-01-01-01-01.wav"]
    assert "not a .wav" in reasons["Actor_01/notes.txt"]
    assert "Actor_XX" in reasons["Actor_01/extra/03-01-03-01-01-01-01.wav"]
    assert "Actor_XX" in reasons["03-01-03-01-01-01-01.wav"]
    assert "outside 01-24" in reasons["Actor_30/03-01-03-01-01-01-30.wav"]


def test_ravdess_root_without_actor_folders_is_rejected(tmp_path: Path) -> None:
    _wav(tmp_path / "03-01-05-01-01-01-01.wav")
    with pytest.raises(ValueError, match="no Actor_XX folders") as info:
        ravdess.index(tmp_path)
    assert str(tmp_path.resolve()) in str(info.value)


def test_ravdess_with_only_unusable_files_is_rejected(tmp_path: Path) -> None:
    _wav(tmp_path / "Actor_01" / "03-02-03-01-01-01-01.wav")  # song only
    with pytest.raises(ValueError, match="no usable ravdess utterances.*1 files skipped.*song"):
        ravdess.index(tmp_path)


# ----------------------------------------------------------------------------- CREMA-D


@pytest.fixture()
def cremad_tree(tmp_path: Path) -> Path:
    root = tmp_path / "crema"
    audio = root / "AudioWAV"
    _wav(audio / "1001_DFA_ANG_XX.wav")
    _wav(audio / "1091_IEO_HAP_HI.wav")
    _wav(audio / "1002_TIE_NEU_LO.wav")
    _wav(audio / "1015_WSI_DIS_MD.wav")
    _wav(audio / "1000_DFA_ANG_XX.wav")  # actor out of range
    _wav(audio / "1001_XYZ_ANG_XX.wav")  # unknown sentence
    _wav(audio / "1001_DFA_CAL_XX.wav")  # unknown emotion
    _wav(audio / "1001_DFA_ANG_ZZ.wav")  # unknown level
    _wav(audio / "1001-DFA-ANG-XX.wav")  # wrong separators
    _junk(audio / "1076_MTI_SAD_XX.wav", "")  # empty file, as in some real copies
    _junk(audio / "1001_DFA_ANG_XX.mp3")
    _wav(audio / "old" / "1003_DFA_SAD_XX.wav")  # nested
    _wav(root / "AudioMP3" / "1004_DFA_SAD_XX.wav")  # outside the audio area: not examined
    return root


def test_cremad_labels_speakers_and_skips(cremad_tree: Path) -> None:
    result = cremad.index(cremad_tree)
    _check_common_invariants(result)
    assert _rows(result) == [
        ("cremad_1001_DFA_ANG_XX", "cremad_1001", "angry"),
        ("cremad_1002_TIE_NEU_LO", "cremad_1002", "neutral"),
        ("cremad_1015_WSI_DIS_MD", "cremad_1015", "disgust"),
        ("cremad_1091_IEO_HAP_HI", "cremad_1091", "happy"),
    ]
    reasons = _reasons(result, cremad_tree)
    assert set(reasons) == {
        "AudioWAV/1000_DFA_ANG_XX.wav",
        "AudioWAV/1001_XYZ_ANG_XX.wav",
        "AudioWAV/1001_DFA_CAL_XX.wav",
        "AudioWAV/1001_DFA_ANG_ZZ.wav",
        "AudioWAV/1001-DFA-ANG-XX.wav",
        "AudioWAV/1076_MTI_SAD_XX.wav",
        "AudioWAV/1001_DFA_ANG_XX.mp3",
        "AudioWAV/old/1003_DFA_SAD_XX.wav",
    }
    assert "actor 1000 outside 1001-1091" in reasons["AudioWAV/1000_DFA_ANG_XX.wav"]
    assert "unknown sentence code XYZ" in reasons["AudioWAV/1001_XYZ_ANG_XX.wav"]
    assert "unknown emotion code CAL" in reasons["AudioWAV/1001_DFA_CAL_XX.wav"]
    assert "unknown level ZZ" in reasons["AudioWAV/1001_DFA_ANG_ZZ.wav"]
    assert "AAAA_SSS_EEE_LL" in reasons["AudioWAV/1001-DFA-ANG-XX.wav"]
    assert "not a readable audio file" in reasons["AudioWAV/1076_MTI_SAD_XX.wav"]
    assert "not a .wav" in reasons["AudioWAV/1001_DFA_ANG_XX.mp3"]
    assert "not directly inside AudioWAV" in reasons["AudioWAV/old/1003_DFA_SAD_XX.wav"]


def test_cremad_root_without_audiowav_names_the_missing_folder(tmp_path: Path) -> None:
    _wav(tmp_path / "1001_DFA_ANG_XX.wav")
    with pytest.raises(ValueError, match="AudioWAV"):
        cremad.index(tmp_path)


# ----------------------------------------------------------------------------- EmoDB


def test_emodb_labels_speakers_and_skips(tmp_path: Path) -> None:
    audio = tmp_path / "wav"
    _wav(audio / "03a01Fa.wav")
    _wav(audio / "16b10Wb.wav")
    _wav(audio / "08a02La.wav")
    _wav(audio / "11a05Ec.wav")
    _wav(audio / "04a01Fa.wav")  # not an EmoDB speaker
    _wav(audio / "03c01Fa.wav")  # text code must start with a or b
    _wav(audio / "03a08Fa.wav")  # text code out of range
    _wav(audio / "03a01Xa.wav")  # unknown emotion letter
    _wav(audio / "03a01FA.wav")  # version must be a lower-case letter
    _junk(audio / "03a01Ta.wav")  # right name, not audio
    result = emodb.index(tmp_path)
    _check_common_invariants(result)
    assert _rows(result) == [
        ("emodb_03a01Fa", "emodb_03", "happy"),
        ("emodb_08a02La", "emodb_08", "boredom"),
        ("emodb_11a05Ec", "emodb_11", "disgust"),
        ("emodb_16b10Wb", "emodb_16", "angry"),
    ]
    reasons = _reasons(result, tmp_path)
    assert "unknown speaker 04" in reasons["wav/04a01Fa.wav"]
    assert "SSTTTEV" in reasons["wav/03c01Fa.wav"]
    assert "unknown text code a08" in reasons["wav/03a08Fa.wav"]
    assert "unknown emotion letter X" in reasons["wav/03a01Xa.wav"]
    assert "SSTTTEV" in reasons["wav/03a01FA.wav"]
    assert "not a readable audio file" in reasons["wav/03a01Ta.wav"]
    assert len(reasons) == 6


# ----------------------------------------------------------------------------- IEMOCAP

_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


def _label_line(utt: str, code: str) -> str:
    return f"[6.2901 - 8.2357]\t{utt}\t{code}\t[2.5000, 2.5000, 2.5000]\nC-E1:\tNeutral;\t()\n\n"


@pytest.fixture()
def iemocap_tree(tmp_path: Path) -> Path:
    root = tmp_path / "IEMOCAP_full_release"
    s1 = root / "Session1"
    d1 = s1 / "sentences" / "wav" / "Ses01F_impro01"
    for utt in ("F000", "M001", "F002", "M003", "F004", "M005"):
        _wav(d1 / f"Ses01F_impro01_{utt}.wav")
    _wav(d1 / "Ses01F_impro02_F000.wav")  # belongs to another dialog folder
    _wav(d1 / "Ses01F_impro01_F00.wav")  # utterance number must have three digits
    _junk(d1 / "Ses01F_impro01_F000.pk")
    _wav(s1 / "sentences" / "wav" / "Ses02F_impro01" / "Ses02F_impro01_F000.wav")  # wrong session
    labels = (
        _HEADER
        + _label_line("Ses01F_impro01_F000", "neu")
        + _label_line("Ses01F_impro01_M001", "exc")
        + _label_line("Ses01F_impro01_F002", "fru")
        + _label_line("Ses01F_impro01_F004", "sur")
        + _label_line("Ses01F_impro01_M005", "zzz")
        + _label_line("Ses01F_impro01_F009", "ang")  # label without audio: ignored
        + _label_line("Ses01F_impro02_F000", "sad")
        + _label_line("Ses02F_impro01_F000", "sad")
    )
    _junk(s1 / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt", labels)
    _junk(s1 / "dialog" / "EmoEvaluation" / "Categorical" / "Ses01F_impro01_e1_cat.txt", "[not a label line")
    s2 = root / "Session2"
    _wav(s2 / "sentences" / "wav" / "Ses02M_script01_1" / "Ses02M_script01_1_F005.wav")
    _junk(
        s2 / "dialog" / "EmoEvaluation" / "Ses02M_script01_1.txt",
        _HEADER + _label_line("Ses02M_script01_1_F005", "ang"),
    )
    _junk(root / "Documentation" / "readme.wav")  # outside any session: not examined
    return root


def test_iemocap_labels_speakers_and_skips(iemocap_tree: Path) -> None:
    result = iemocap.index(iemocap_tree)
    _check_common_invariants(result)
    assert _rows(result) == [
        ("iemocap_Ses01F_impro01_F000", "iemocap_S1F", "neutral"),
        ("iemocap_Ses01F_impro01_F004", "iemocap_S1F", "surprised"),
        ("iemocap_Ses01F_impro01_M001", "iemocap_S1M", "happy"),
        ("iemocap_Ses02M_script01_1_F005", "iemocap_S2F", "angry"),
    ]
    wav = "Session1/sentences/wav"
    reasons = _reasons(result, iemocap_tree)
    assert set(reasons) == {
        f"{wav}/Ses01F_impro01/Ses01F_impro01_F002.wav",
        f"{wav}/Ses01F_impro01/Ses01F_impro01_M003.wav",
        f"{wav}/Ses01F_impro01/Ses01F_impro01_M005.wav",
        f"{wav}/Ses01F_impro01/Ses01F_impro02_F000.wav",
        f"{wav}/Ses01F_impro01/Ses01F_impro01_F00.wav",
        f"{wav}/Ses01F_impro01/Ses01F_impro01_F000.pk",
        f"{wav}/Ses02F_impro01/Ses02F_impro01_F000.wav",
    }
    assert "'fru' (frustrated) has no canonical emotion" in reasons[f"{wav}/Ses01F_impro01/Ses01F_impro01_F002.wav"]
    assert "no label line" in reasons[f"{wav}/Ses01F_impro01/Ses01F_impro01_M003.wav"]
    assert "unknown label code 'zzz'" in reasons[f"{wav}/Ses01F_impro01/Ses01F_impro01_M005.wav"]
    assert "dialog Ses01F_impro02" in reasons[f"{wav}/Ses01F_impro01/Ses01F_impro02_F000.wav"]
    assert "utterance id" in reasons[f"{wav}/Ses01F_impro01/Ses01F_impro01_F00.wav"]
    assert "not a .wav" in reasons[f"{wav}/Ses01F_impro01/Ses01F_impro01_F000.pk"]
    assert "session 2 inside Session1" in reasons[f"{wav}/Ses02F_impro01/Ses02F_impro01_F000.wav"]


def test_iemocap_malformed_label_line_names_file_and_line(iemocap_tree: Path) -> None:
    labels = iemocap_tree / "Session2" / "dialog" / "EmoEvaluation" / "Ses02M_script01_1.txt"
    labels.write_text(_HEADER + "[6.29 - 8.23] Ses02M_script01_1_F005 ang\n")
    with pytest.raises(ValueError, match=r"Ses02M_script01_1\.txt:3: malformed label line"):
        iemocap.index(iemocap_tree)


def test_iemocap_conflicting_labels_are_an_error(iemocap_tree: Path) -> None:
    extra = iemocap_tree / "Session2" / "dialog" / "EmoEvaluation" / "zz_extra.txt"
    extra.write_text(_label_line("Ses02M_script01_1_F005", "sad"))
    with pytest.raises(ValueError, match=r"zz_extra\.txt:1: Ses02M_script01_1_F005 labelled 'sad'.*'ang'"):
        iemocap.index(iemocap_tree)


def test_iemocap_session_without_labels_names_missing_folder(tmp_path: Path) -> None:
    _wav(tmp_path / "Session3" / "sentences" / "wav" / "Ses03F_impro01" / "Ses03F_impro01_F000.wav")
    with pytest.raises(ValueError, match="Session3/dialog/EmoEvaluation"):
        iemocap.index(tmp_path)


def test_iemocap_root_without_sessions_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "Session9").mkdir()
    with pytest.raises(ValueError, match="no Session1..Session5 folders"):
        iemocap.index(tmp_path)


# ----------------------------------------------------------------------------- dispatch


def test_index_corpus_dispatches_to_each_format(
    ravdess_tree: Path, cremad_tree: Path, iemocap_tree: Path, tmp_path: Path
) -> None:
    _wav(tmp_path / "emodb" / "wav" / "03a01Fa.wav")
    roots = {"ravdess": ravdess_tree, "cremad": cremad_tree, "emodb": tmp_path / "emodb", "iemocap": iemocap_tree}
    modules = {"ravdess": ravdess, "cremad": cremad, "emodb": emodb, "iemocap": iemocap}
    assert set(FORMATS) == set(roots)
    for fmt in FORMATS:
        assert index_corpus(fmt=fmt, root=roots[fmt]) == modules[fmt].index(roots[fmt])


def test_index_corpus_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown corpus format 'timit'"):
        index_corpus(fmt="timit", root=tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_root_raises_file_not_found_naming_it(fmt: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        index_corpus(fmt=fmt, root=missing)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_root_raises_value_error_naming_it(fmt: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tmp_path.resolve()))):
        index_corpus(fmt=fmt, root=tmp_path)
