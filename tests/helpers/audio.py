"""Test audio made on the fly (nothing is downloaded)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from serforget.common.manifest import Utterance, write_manifest


def tone(freq: float, seconds: float, *, sr: int = 16_000, seed: int = 0, amp: float = 0.3) -> np.ndarray:
    """A noisy tone: a tiny, learnable stand-in for an emotional utterance."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


#: espeak-ng prosody per emotion (pitch 0-99, words per minute, amplitude): crude acted emotions.
_ESPEAK_STYLE = {"neutral": (50, 170, 100), "happy": (80, 220, 130), "angry": (60, 200, 180), "sad": (25, 110, 70)}
_SENTENCES = ("the kids are talking by the door", "dogs are sitting by the door")


def write_espeak_corpus(folder: Path, *, speakers: tuple[str, ...] = ("en-us", "en-gb")) -> Path:
    """Real synthesized speech (22.05 kHz WAVs, so loading resamples) with a manifest; returns its path."""
    utterances = []
    for speaker in speakers:
        for emotion, (pitch, speed, amplitude) in _ESPEAK_STYLE.items():
            for take, sentence in enumerate(_SENTENCES):
                utt_id = f"{speaker}_{emotion}_{take}"
                path = folder / "wav" / f"{utt_id}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(
                    [
                        "espeak-ng",
                        "-v",
                        speaker,
                        "-p",
                        str(pitch),
                        "-s",
                        str(speed),
                        "-a",
                        str(amplitude),
                        "-w",
                        str(path),
                        sentence,
                    ],
                    check=True,
                    capture_output=True,
                )
                utterances.append(Utterance(utt_id, path, speaker, emotion))
    return write_manifest(folder / "manifest.csv", utterances)


#: RAVDESS emotion codes of the 4-class task (neutral, happy, sad, angry)
_RAVDESS_4CLASS = {"01": 200.0, "03": 330.0, "04": 150.0, "05": 260.0}


def write_ravdess_tree(root: Path, *, actors: int = 12, seconds: float = 1.0, sr: int = 16_000) -> Path:
    """A RAVDESS-layout tree (``Actor_XX/03-01-EE-II-SS-RR-XX.wav``) of noisy tones, 8 takes per actor.

    Audio-only speech of the four 4-class emotions, normal intensity, both statements, first
    repetition; each actor's pitch is shifted so speakers differ. One song file per actor is
    written too: the indexer must skip it, as with the real corpus.
    """
    import soundfile as sf

    for a in range(1, actors + 1):
        folder = root / f"Actor_{a:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for e, (code, freq) in enumerate(_RAVDESS_4CLASS.items()):
            for statement in ("01", "02"):
                wave = tone(freq * (1.0 + 0.03 * a), seconds, sr=sr, seed=a * 100 + e * 10 + int(statement))
                sf.write(str(folder / f"03-01-{code}-01-{statement}-01-{a:02d}.wav"), wave, sr, subtype="PCM_16")
        sf.write(str(folder / f"03-02-03-01-01-01-{a:02d}.wav"), tone(300.0, seconds, sr=sr), sr, subtype="PCM_16")
    return root
