"""Synthetic acted-emotion corpus: determinism, manifest contents, audio format, idempotence."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serforget.common.corpora import synth
from serforget.common.corpora.synth import (
    MAX_SPEAKERS,
    SAMPLE_RATE,
    SynthConfig,
    SynthCorpusError,
    parse_espeak_wav,
    resample,
    speaker_voices,
    synthesize_corpus,
)
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import read_manifest

#: The generalising regime (no speaker styles, ambiguity or label noise): every label is the acted one.
TINY = SynthConfig(
    n_speakers=2,
    sentences_per_speaker=1,
    takes_per_emotion=1,
    seed=7,
    speaker_style_spread=0.0,
    ambiguous_rate=0.0,
    label_noise_rate=0.0,
)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny corpus shared by the read-only tests (rendering costs about a second)."""
    out = tmp_path_factory.mktemp("synth") / "corpus"
    return synthesize_corpus(out_dir=out, config=TINY, progress=False, workers=1)


def _wav_bytes(manifest: Path) -> dict[str, bytes]:
    return {p.relative_to(manifest.parent).as_posix(): p.read_bytes() for p in sorted(manifest.parent.rglob("*.wav"))}


def test_manifest_has_every_speaker_emotion_and_take(tiny_corpus: Path) -> None:
    utts = read_manifest(tiny_corpus, root=tiny_corpus.parent)
    assert len(utts) == TINY.n_utterances == 8
    assert sorted({u.speaker for u in utts}) == ["synth_000", "synth_001"]
    for speaker in ("synth_000", "synth_001"):
        assert sorted(u.emotion for u in utts if u.speaker == speaker) == sorted(FOUR_CLASS)
    for u in utts:
        assert u.path == tiny_corpus.parent / "wav" / u.speaker / f"{u.utt_id}.wav"
        assert u.utt_id.startswith(f"{u.speaker}_sent") and f"_{u.emotion}_take1" in u.utt_id
    assert tiny_corpus.read_text().splitlines()[1].split(",")[1].startswith("wav/"), "paths stored relative"


def test_wavs_are_16k_mono_pcm16_with_sane_durations_and_levels(tiny_corpus: Path) -> None:
    for u in read_manifest(tiny_corpus):
        info = sf.info(str(u.path))
        assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
        assert 0.8 < info.duration < 8.0, f"{u.utt_id}: {info.duration:.2f} s"
        audio, _ = sf.read(str(u.path), dtype="float32")
        peak, rms = float(np.max(np.abs(audio))), float(np.sqrt(np.mean(audio**2)))
        assert peak <= 0.99 + 1e-4 and rms > 1e-3, f"{u.utt_id}: peak {peak}, rms {rms}"


def test_emotions_differ_in_the_audio(tiny_corpus: Path) -> None:
    """The four renderings of one sentence by one speaker are distinct recordings."""
    utts = [u for u in read_manifest(tiny_corpus) if u.speaker == "synth_000"]
    contents = {u.path.read_bytes() for u in utts}
    assert len(contents) == len(FOUR_CLASS)
    durations = {u.emotion: sf.info(str(u.path)).duration for u in utts}
    assert durations["sad"] > durations["angry"], "sad is rendered slower than angry at this seed"


def test_same_seed_gives_byte_identical_corpus(tiny_corpus: Path, tmp_path: Path) -> None:
    """Rendered again in a two-process pool (the fixture rendered in-process): same bytes."""
    again = synthesize_corpus(out_dir=tmp_path / "again", config=TINY, progress=False, workers=2)
    assert again.read_bytes() == tiny_corpus.read_bytes()
    assert _wav_bytes(again) == _wav_bytes(tiny_corpus)


def test_other_seed_gives_other_audio(tiny_corpus: Path, tmp_path: Path) -> None:
    other = synthesize_corpus(out_dir=tmp_path / "other", config=replace(TINY, seed=8), progress=False)
    assert set(_wav_bytes(other).values()).isdisjoint(_wav_bytes(tiny_corpus).values())


def test_finished_corpus_is_returned_without_rework(tiny_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_corpus.parent.rglob("*") if p.is_file()}

    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a finished corpus must not be rendered again")

    monkeypatch.setattr(synth, "_render_and_store", fail)
    assert synthesize_corpus(out_dir=tiny_corpus.parent, config=TINY, progress=False, workers=1) == tiny_corpus
    assert {p: p.stat().st_mtime_ns for p in tiny_corpus.parent.rglob("*") if p.is_file()} == before


def test_different_config_is_refused_and_nothing_is_touched(tiny_corpus: Path) -> None:
    before = {p: p.read_bytes() for p in tiny_corpus.parent.rglob("*") if p.is_file()}
    with pytest.raises(SynthCorpusError, match=r"different config.*jitter: 0\.2 -> 0\.5"):
        synthesize_corpus(out_dir=tiny_corpus.parent, config=replace(TINY, jitter=0.5), progress=False)
    assert {p: p.read_bytes() for p in tiny_corpus.parent.rglob("*") if p.is_file()} == before


def test_crash_mid_run_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rendered: list[str] = []
    real = synth._render_and_store

    def die_on_third(job: synth.TakeJob) -> None:
        if len(rendered) == 2:
            raise RuntimeError("simulated crash")
        rendered.append(job.utt_id)
        real(job)

    monkeypatch.setattr(synth, "_render_and_store", die_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthesize_corpus(out_dir=tmp_path, config=TINY, progress=False, workers=1)
    assert (tmp_path / "synth.json").exists() and not (tmp_path / "manifest.csv").exists()
    assert len(list(tmp_path.rglob("*.wav"))) == 2


def test_unfinished_run_is_redone_and_matches(tiny_corpus: Path, tmp_path: Path) -> None:
    """A run that died before its manifest is completed by the next call with the same config."""
    out = tmp_path / "unfinished"
    out.mkdir()
    (out / "synth.json").write_bytes((tiny_corpus.parent / "synth.json").read_bytes())
    damaged = out / "wav" / "synth_000"
    damaged.mkdir(parents=True)
    first_wav = sorted((tiny_corpus.parent / "wav" / "synth_000").iterdir())[0].name
    (damaged / first_wav).write_bytes(b"RIFF truncated")
    manifest = synthesize_corpus(out_dir=out, config=TINY, progress=False)
    assert _wav_bytes(manifest) == _wav_bytes(tiny_corpus)


def test_unfinished_run_with_other_config_is_refused(tiny_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "unfinished"
    out.mkdir()
    (out / "synth.json").write_bytes((tiny_corpus.parent / "synth.json").read_bytes())
    with pytest.raises(SynthCorpusError, match="n_speakers: 2 -> 3"):
        synthesize_corpus(out_dir=out, config=replace(TINY, n_speakers=3), progress=False)


def test_folder_with_foreign_data_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("utt_id,path,speaker,emotion\n")
    with pytest.raises(SynthCorpusError, match="no synth.json"):
        synthesize_corpus(out_dir=tmp_path, config=TINY, progress=False)
    assert not (tmp_path / "synth.json").exists()


def test_corrupt_description_is_reported(tmp_path: Path) -> None:
    (tmp_path / "synth.json").write_text("{not json")
    with pytest.raises(SynthCorpusError, match=r"synth\.json: unreadable"):
        synthesize_corpus(out_dir=tmp_path, config=TINY, progress=False)


def test_description_records_format_version_and_config(tiny_corpus: Path) -> None:
    meta = json.loads((tiny_corpus.parent / "synth.json").read_text())
    assert meta["format"] == synth.SYNTH_FORMAT and meta["version"] == synth.SYNTH_VERSION
    assert meta["config"] == TINY.to_json() and meta["espeak_ng"].startswith("eSpeak NG")


def test_default_speakers_are_distinct_voices_balanced_by_gender() -> None:
    voices = speaker_voices(SynthConfig())
    assert len(voices) == 24 and len({(v.accent, v.variant) for v in voices}) == 24
    assert sum(v.variant.startswith("f") for v in voices) == 12
    every = speaker_voices(SynthConfig(n_speakers=MAX_SPEAKERS))
    assert len({(v.accent, v.variant) for v in every}) == MAX_SPEAKERS


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n_speakers": 0}, "n_speakers"),
        ({"n_speakers": MAX_SPEAKERS + 1}, "n_speakers"),
        ({"sentences_per_speaker": 13}, "sentences_per_speaker"),
        ({"emotions": ("neutral", "bored")}, "emotions"),
        ({"emotions": ("sad", "sad")}, "emotions"),
        ({"jitter": -0.1}, "jitter"),
        ({"seed": -1}, "seed"),
        ({"snr_db": (30.0, 10.0)}, "snr_db"),
        ({"reverb_rt60_s": (0.0, 0.5)}, "reverb_rt60_s"),
        ({"speaker_rate_spread": 1.0}, "speaker_rate_spread"),
        ({"speaker_style_spread": -0.1}, "speaker_style_spread"),
        ({"ambiguous_rate": 1.0}, "ambiguous_rate"),
        ({"label_noise_rate": -0.01}, "label_noise_rate"),
        ({"emotions": ("sad",)}, "ambiguous_rate"),
    ],
)
def test_invalid_config_names_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"SynthConfig.{field}"):
        replace(SynthConfig(), **change)


def test_resample_keeps_a_tone_and_gives_the_exact_length() -> None:
    rate_in = 22050
    t = np.arange(rate_in) / rate_in
    out = resample(np.sin(2 * np.pi * 440 * t), rate_in=rate_in, rate_out=SAMPLE_RATE)
    assert out.size == SAMPLE_RATE
    expected = np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)
    assert np.max(np.abs(out[100:-100] - expected[100:-100])) < 1e-3


def test_parse_espeak_wav_rejects_non_wav_and_stereo() -> None:
    with pytest.raises(RuntimeError, match="not a RIFF/WAVE"):
        parse_espeak_wav(b"hello world!", where="test")
    fmt = (1).to_bytes(2, "little") + (2).to_bytes(2, "little") + (22050).to_bytes(4, "little")
    fmt += (88200).to_bytes(4, "little") + (4).to_bytes(2, "little") + (16).to_bytes(2, "little")
    stereo = (
        b"RIFF\xff\xff\xff\x7fWAVEfmt " + (16).to_bytes(4, "little") + fmt + b"data\xff\xff\xff\x7f" + b"\x01\x00" * 8
    )
    with pytest.raises(RuntimeError, match="expected 16-bit mono PCM"):
        parse_espeak_wav(stereo, where="test")
