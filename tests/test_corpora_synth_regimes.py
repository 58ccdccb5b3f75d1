"""The memorising regime's knobs: speaker styles, ambiguous takes, annotation noise (exact rates)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from serforget.common.corpora.synth import (
    GENERALISING,
    LABELS_NAME,
    MEMORISING,
    REGIMES,
    SynthConfig,
    SynthCorpusError,
    draw_take,
    plan_takes,
    read_label_table,
    synthesize_corpus,
)
from serforget.common.manifest import read_manifest

#: 2 speakers x 2 sentences x 4 emotions x 2 takes = 16 takes per speaker.
SMALL = dict(n_speakers=2, sentences_per_speaker=2, takes_per_emotion=2, seed=3)


def test_regimes_differ_only_in_the_three_knobs() -> None:
    assert set(REGIMES) == {"memorising", "generalising"} and MEMORISING == SynthConfig()
    assert replace(MEMORISING, speaker_style_spread=0.0, ambiguous_rate=0.0, label_noise_rate=0.0) == GENERALISING
    assert MEMORISING.label_noise_rate > 0


def test_rates_are_exact_per_speaker_and_seeded() -> None:
    config = SynthConfig(**SMALL, ambiguous_rate=0.25, label_noise_rate=0.25)
    jobs = plan_takes(config, wav_dir=Path("/nonexistent"))
    for speaker in range(2):
        own = [j for j in jobs if j.speaker_index == speaker]
        assert sum(j.blend_with is not None for j in own) == 4
        assert sum(j.annotated != j.emotion for j in own) == 4
    assert all(j.blend_with != j.emotion for j in jobs) and all(j.label for j in jobs)
    again = plan_takes(config, wav_dir=Path("/nonexistent"))
    assert [(j.blend_with, j.annotated) for j in again] == [(j.blend_with, j.annotated) for j in jobs]
    other = plan_takes(replace(config, seed=4), wav_dir=Path("/nonexistent"))
    assert [(j.blend_with, j.annotated) for j in other] != [(j.blend_with, j.annotated) for j in jobs]


def test_knobs_at_zero_leave_the_generalising_draws_untouched() -> None:
    """Each knob has its own random stream: switching one on changes only what it is about."""
    base = plan_takes(
        SynthConfig(**SMALL, speaker_style_spread=0.0, ambiguous_rate=0.0, label_noise_rate=0.0), wav_dir=Path("/x")
    )
    noisy = plan_takes(
        SynthConfig(**SMALL, speaker_style_spread=0.0, ambiguous_rate=0.0, label_noise_rate=0.5), wav_dir=Path("/x")
    )
    assert [draw_take(j)[0] for j in base] == [draw_take(j)[0] for j in noisy], "label noise must not change audio"
    styled = plan_takes(
        SynthConfig(**SMALL, speaker_style_spread=0.5, ambiguous_rate=0.0, label_noise_rate=0.0), wav_dir=Path("/x")
    )
    changed = sum(draw_take(a)[0] != draw_take(b)[0] for a, b in zip(base, styled))
    assert changed == len(base), "every take is acted in its speaker's own way"
    ambiguous = plan_takes(
        SynthConfig(**SMALL, speaker_style_spread=0.0, ambiguous_rate=0.25, label_noise_rate=0.0), wav_dir=Path("/x")
    )
    for a, b in zip(base, ambiguous):
        same = draw_take(a)[0] == draw_take(b)[0]
        assert same == (b.blend_with is None)


def test_speaker_styles_are_per_speaker_and_emotion() -> None:
    config = SynthConfig(**SMALL, speaker_style_spread=0.5, ambiguous_rate=0.0, label_noise_rate=0.0)
    jobs = [j for j in plan_takes(config, wav_dir=Path("/x")) if j.emotion == "happy" and j.take == 1]
    rates = {(j.speaker_index, j.sentence_index): draw_take(j)[0].ssml_rate_percent for j in jobs}
    assert len(set(rates.values())) > 1


def test_corpus_writes_annotated_labels_and_the_label_table(tmp_path: Path) -> None:
    config = SynthConfig(
        n_speakers=1, sentences_per_speaker=1, takes_per_emotion=2, seed=5, ambiguous_rate=0.25, label_noise_rate=0.25
    )
    manifest = synthesize_corpus(out_dir=tmp_path / "c", config=config, progress=False, workers=1)
    table = read_label_table(manifest.parent / LABELS_NAME)
    utts = read_manifest(manifest)
    assert len(table) == len(utts) == 8
    assert all(table[u.utt_id].annotated == u.emotion for u in utts), "the manifest holds the annotated label"
    assert (
        sum(t.mislabelled for t in table.values()) == 2 and sum(t.blend_with is not None for t in table.values()) == 2
    )
    assert Counter(t.acted for t in table.values()) == Counter({e: 2 for e in config.emotions})


def test_malformed_label_table_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / LABELS_NAME
    path.write_text("utt_id,acted,annotated,blend_with\nu1,happy,bored,\n")
    with pytest.raises(SynthCorpusError, match=r"labels.csv:2"):
        read_label_table(path)
    path.write_text("id,x\n")
    with pytest.raises(SynthCorpusError, match="bad header"):
        read_label_table(path)
