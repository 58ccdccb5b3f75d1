"""Speaker split protocols: random (default), fixed speaker lists, IEMOCAP leave-one-session-out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serforget.cli.simulate import simulation_nodes
from serforget.common.corpora import index_corpus
from serforget.common.manifest import SplitSpec, Utterance, read_manifest, speaker_split, write_manifest
from serforget.common.pipeline import make_splits, training_speakers
from serforget.common.settings import RunSettings, SettingsError

_CODES = {"neutral": "neu", "happy": "hap", "angry": "ang", "sad": "sad"}


def _utts(speakers: list[str]) -> list[Utterance]:
    return [Utterance(f"{s}_{e}", Path(f"/x/{s}_{e}.wav"), s, e) for s in speakers for e in _CODES]


def _iemocap_tree(root: Path) -> Path:
    """Five sessions, one dialog each, two takes per emotion per speaker (IEMOCAP's layout, tiny audio)."""
    t = np.arange(800) / 16000
    for session in range(1, 6):
        dialog = f"Ses0{session}F_impro01"
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"]
        for gender in "FM":
            for k, code in enumerate(list(_CODES.values()) * 2):
                utt = f"{dialog}_{gender}{k:03d}"
                wav = root / f"Session{session}" / "sentences" / "wav" / dialog / f"{utt}.wav"
                wav.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(wav), 0.1 * np.sin(2 * np.pi * (200 + 40 * k) * t), 16000, subtype="PCM_16")
                lines.append(f"[1.0 - 2.0]\t{utt}\t{code}\t[2.5, 2.5, 2.5]\n\n")
        labels = root / f"Session{session}" / "dialog" / "EmoEvaluation" / f"{dialog}.txt"
        labels.parent.mkdir(parents=True, exist_ok=True)
        labels.write_text("".join(lines))
    return root


@pytest.fixture()
def iemocap_manifest(tmp_path: Path) -> Path:
    out = tmp_path / "iemocap.csv"
    write_manifest(out, index_corpus(fmt="iemocap", root=_iemocap_tree(tmp_path / "IEMOCAP")).utterances)
    return out


def test_fixed_speaker_lists_hold_out_exactly_those_speakers() -> None:
    utts = _utts([f"spk{i}" for i in range(6)])
    split = speaker_split(utts, SplitSpec(protocol="speakers", valid=("spk4",), test=("spk0", "spk5")))
    assert split.speakers("valid") == ["spk4"] and split.speakers("test") == ["spk0", "spk5"]
    assert split.speakers("train") == ["spk1", "spk2", "spk3"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (SplitSpec(protocol="speakers", valid=("spk9",), test=("spk0",)), r"split\.valid-list: speaker\(s\) spk9 not"),
        (SplitSpec(protocol="speakers", valid=("spk1",), test=()), r"split\.test-list: .* needs at least one"),
        (SplitSpec(protocol="speakers", valid=("spk1",), test=("spk1",)), "share spk1"),
        (SplitSpec(protocol="speakers", valid=("spk0", "spk1"), test=("spk2",)), "no training speaker"),
        (SplitSpec(protocol="iemocap-loso", fold=1), "needs IEMOCAP speakers"),
        (SplitSpec(protocol="loso"), "split.protocol: must be one of"),
    ],
)
def test_a_split_that_cannot_be_made_says_which_setting(spec: SplitSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        speaker_split(_utts(["spk0", "spk1", "spk2"]), spec)


def test_iemocap_leave_one_session_out_holds_out_the_fold_session(iemocap_manifest: Path, tmp_path: Path) -> None:
    for fold in range(1, 6):
        spec = SplitSpec(protocol="iemocap-loso", fold=fold)
        train = training_speakers(manifest=iemocap_manifest, split=spec)
        assert len(train) == 8 and not any(s.startswith(f"iemocap_S{fold}") for s in train)
        splits = make_splits(manifest=iemocap_manifest, out_dir=tmp_path / f"fold{fold}", split=spec)
        assert {u.speaker for u in read_manifest(splits["valid"])} == {f"iemocap_S{fold}F"}
        assert {u.speaker for u in read_manifest(splits["test"])} == {f"iemocap_S{fold}M"}
    with pytest.raises(ValueError, match=r"split\.fold: IEMOCAP has sessions 1-5, got 6"):
        training_speakers(manifest=iemocap_manifest, split=SplitSpec(protocol="iemocap-loso", fold=6))


def test_changing_the_protocol_rewrites_the_splits_and_the_random_stamp_keeps_its_fields(
    iemocap_manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "splits"
    make_splits(manifest=iemocap_manifest, out_dir=out, split=SplitSpec(n_valid=1, n_test=2))
    stamp = json.loads((out / "split.json").read_text())
    assert set(stamp) == {"manifest", "task", "n_valid", "n_test", "seed"}  # splits stamped before protocols stay valid
    make_splits(manifest=iemocap_manifest, out_dir=out, split=SplitSpec(protocol="iemocap-loso", fold=2))
    assert {u.speaker for u in read_manifest(out / "test.csv")} == {"iemocap_S2M"}


def test_run_config_split_table_reaches_the_simulation_size(iemocap_manifest: Path) -> None:
    cfg = RunSettings.from_mapping(
        {"split.protocol": "speakers", "split.valid-list": "synth_001, synth_002", "split.test-list": "synth_000"}
    )
    assert cfg.split_spec.valid == ("synth_001", "synth_002") and cfg.split_spec.test == ("synth_000",)
    assert simulation_nodes(cfg) == 24 - 3
    loso = RunSettings.from_mapping(
        {"data-manifest": str(iemocap_manifest), "split.protocol": "iemocap-loso", "split.fold": 4}
    )
    assert simulation_nodes(loso) == 8
    with pytest.raises(ValueError, match=r"split\.valid-list: speaker\(s\) nobody not in the corpus"):
        simulation_nodes(
            RunSettings.from_mapping(
                {"split.protocol": "speakers", "split.valid-list": "nobody", "split.test-list": "synth_000"}
            )
        )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"split.protocol": "loso"}, r"^split\.protocol: must be one of random, speakers, iemocap-loso"),
        ({"split.valid-list": "a"}, r"^split\.valid-list: set, but split\.protocol = 'random'"),
        ({"split.fold": 3}, r"^split\.fold: set, but split\.protocol = 'random'"),
        ({"split.protocol": "iemocap-loso", "split.fold": 0}, r"^split\.fold: must be >= 1"),
    ],
)
def test_bad_split_settings_are_refused_naming_the_key(raw: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_mapping(raw)
