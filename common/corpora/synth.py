"""Synthetic acted-emotion corpus: espeak-ng speakers reading neutral sentences in four styles.

Why it exists: no real emotional-speech corpus can be downloaded here, yet every part of the
project (per-speaker Flower nodes, speaker-independent splits, unlearning one speaker) needs a
corpus with many speakers, fixed texts and acted emotions. This module renders one, fully
deterministic in its seed, with the same shape as RAVDESS: ``wav/<speaker>/<utt_id>.wav`` plus a
``manifest.csv`` (see :mod:`serforget.common.manifest`).

Design (each number below is a knob of :class:`SynthConfig` or a row of :data:`STYLES`):

* **Speakers.** An espeak-ng accent (``en-us``, ``en-gb``, ``en-gb-scotland`` ...) combined with a
  voice variant (``+m1`` .. ``+m8``, ``+f1`` .. ``+f5``), each pair used once (104 possible), plus a
  per-speaker base pitch (``-p``), base speed (``-s``) and *expressiveness* (how strongly that
  speaker acts) drawn from the seed. Variant and base pitch together span far more than the
  emotion pitch shifts, so absolute pitch does not give the emotion away across speakers.
* **Emotions through prosody.** Each style multiplies espeak's SSML ``<prosody pitch range rate>``
  (pitch level, pitch range, speaking rate) and sets a loudness change, applied after synthesis
  because espeak clips its own output when asked to be louder:

  ======= ===== ===== ===== ======== ============================================
  style   pitch range rate  loudness timbre
  ======= ===== ===== ===== ======== ============================================
  neutral 1.00  1.00  1.00   0 dB    none
  happy   1.40  1.90  1.12  +3 dB    brighter (+1.5 dB/octave above 1 kHz)
  angry   1.12  1.40  1.12  +4 dB    tanh saturation (drive 2), brighter (+1.5 dB/octave)
  sad     0.85  0.50  0.80  -4 dB    darker (-3 dB/octave), breath noise
  ======= ===== ===== ===== ======== ============================================

  A multiplier ``m`` is applied as ``m ** a`` where the *acting amount*
  ``a = emotion_strength * speaker_expressiveness * exp(N(0, jitter))``, and every prosody
  multiplier is further scaled by its own ``exp(N(0, jitter))``. So classes overlap: a weakly
  acted happy take of a slow speaker can be slower and flatter than a neutral take of another.
* **Recording.** Each take gets 50-300 ms of leading and trailing silence, a random recording
  level (``level_jitter_db``), a synthetic room (exponentially decaying noise impulse response
  with a random RT60 and wet level) and additive noise (white to pink, random colour) at a
  random SNR, so the task is not trivially separable.
* **Difficulty.** Tuned so the task is learnable but not trivial: in the generalising regime, a small
  log-mel CNN (4 conv layers, 25 epochs) on a 16/4/4 speaker-independent split reached 83 %
  unweighted accuracy, and an MLP on per-utterance log-mel mean/std 81-89 % over six splits;
  angry and sad are the easiest classes, neutral vs happy the hardest. Raise ``jitter`` or lower
  ``emotion_strength`` to make it harder. The memorising defaults below make it much harder
  for unseen speakers (measured numbers: ``docs/forgetting.md``).
* **What only memory can fit** (the *memorising* regime, the default; see
  ``docs/forgetting.md``). Real acted corpora (IEMOCAP, RAVDESS, CREMA-D) are not cleanly
  separable: actors express an emotion their own way, some renditions sit between two emotions,
  and annotators disagree (CREMA-D's crowd raters agree with the acted label on about 60-70 % of
  clips). Fine-tuned SER models fit such training sets almost perfectly while scoring far lower on
  unseen speakers, so some training utterances are fitted only by remembering them, which is
  what machine unlearning has to undo. Three seeded knobs model this, each with its own random
  stream so that setting all three to 0 renders exactly the audio and labels of the
  *generalising* regime (:data:`GENERALISING`). The default (:data:`MEMORISING`) sets only
  ``label_noise_rate`` (0.15), as chosen on validation speakers by ``benchmarks/bench_regime.py``;
  the other two stay available for harder corpora:

  - ``speaker_style_spread``: every (speaker, emotion) pair gets its own way of acting, a
    log-normal factor of standard deviation ``speaker_style_spread`` on that emotion's acting
    amount and on each prosody multiplier, plus ``speaker_style_spread * 6`` dB of loudness and
    ``speaker_style_spread * 3`` dB/octave of spectral tilt (standard deviations). One actor's
    happy can sound like another's angry; what a model learns about a training speaker's style
    transfers only partly to unseen speakers.
  - ``ambiguous_rate``: exactly ``round(rate * takes)`` takes of every speaker are rendered as a
    blend of the acted emotion with another one (drawn uniformly), blend weight uniform in
    [0.35, 0.65]: the label stays the acted emotion, the audio sits between the two classes.
  - ``label_noise_rate``: exactly ``round(rate * takes)`` takes of every speaker carry an
    *annotated* label other than the acted emotion (drawn uniformly among the others), as when
    the annotators' majority disagrees with the actor. The manifest holds the annotated label
    (what a trainer sees); ``labels.csv`` next to it lists, per take, the acted emotion, the
    annotated one and the blend, so an evaluation can tell noise from signal.

* **Output.** Resampled to 16 kHz mono by exact band-limited FFT resampling, peak-limited to
  0.99 and written as 16-bit PCM WAV with soundfile.

Determinism: every random draw comes from a generator keyed by ``(seed, purpose, indices)``,
so a take does not depend on which process renders it or in what order; all signal processing
is numpy (pocketfft), single-threaded per take. Same seed, same espeak-ng -> byte-identical WAVs
and manifest.

On-disk contract: ``synth.json`` (format name, version, full config, espeak-ng version) is
written first and claims the folder; the manifest is written last and atomically, so a folder
without ``manifest.csv`` is an unfinished run, which a call with the same config redoes and a
call with a different config refuses.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from serforget.common.fsutil import atomic_write_bytes, atomic_write_json
from serforget.common.labels import FOUR_CLASS
from serforget.common.manifest import Utterance, write_manifest

SYNTH_FORMAT = "serforget-synth-corpus"
#: Bump whenever the rendering changes, so an old corpus is never mistaken for a new one.
#: 2: speaker-specific styles, ambiguous renditions and annotation noise (``labels.csv``).
SYNTH_VERSION = 2
SAMPLE_RATE = 16000
MANIFEST_NAME = "manifest.csv"
LABELS_NAME = "labels.csv"
META_NAME = "synth.json"
WAV_DIR = "wav"
ESPEAK = "espeak-ng"

ACCENTS: tuple[str, ...] = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
#: Alternating male/female so any prefix of the speaker list is close to gender-balanced.
VARIANTS: tuple[str, ...] = ("m1", "f1", "m2", "f2", "m3", "f3", "m4", "f4", "m5", "f5", "m6", "m7", "m8")
MAX_SPEAKERS = len(ACCENTS) * len(VARIANTS)

#: Emotionally neutral sentences, so only the rendering carries the emotion.
SENTENCES: tuple[str, ...] = (
    "Kids are talking by the door.",
    "Dogs are sitting by the door.",
    "The train leaves from the station at nine.",
    "Please put the folder on the desk by the window.",
    "The meeting is scheduled for Tuesday afternoon.",
    "I think I have seen this one before.",
    "The blue car is parked on the other side of the street.",
    "We will need two more chairs for the table.",
    "It is going to rain again later this week.",
    "The package arrived at the office this morning.",
    "She wrote the numbers down on a piece of paper.",
    "They moved the boxes into the garage yesterday.",
)

ESPEAK_BASE_PITCH = 50  # espeak-ng's default -p
ESPEAK_BASE_WPM = 175  # espeak-ng's default -s
REFERENCE_RMS_DBFS = -26.0  # level every dry take is brought to before emotion and recording gains
PEAK_LIMIT = 0.99
TILT_CORNER_HZ = 1000.0
SILENCE_S = (0.05, 0.3)
# espeak-ng's SSML limits beyond which its output stops changing or degrades.
SSML_PITCH_PERCENT = (-60, 80)
SSML_RANGE_PERCENT = (10, 300)
SSML_RATE_PERCENT = (50, 200)

# Purposes of random draws; part of every generator key so two purposes never share a stream.
_SPEAKER_STREAM, _SENTENCE_STREAM, _TAKE_STREAM = 1, 2, 3
_STYLE_STREAM, _AMBIGUOUS_STREAM, _ANNOTATION_STREAM, _BLEND_STREAM = 4, 5, 6, 7
#: Standard deviations, per unit of ``speaker_style_spread``, of a speaker's own loudness (dB)
#: and spectral tilt (dB/octave) offsets for one emotion.
STYLE_GAIN_DB = 6.0
STYLE_TILT_DB = 3.0
#: Range of the weight of the other emotion in an ambiguous take.
BLEND_WEIGHT = (0.35, 0.65)


@dataclass(frozen=True)
class EmotionStyle:
    """How one emotion is acted; multipliers are relative to the speaker's neutral voice."""

    pitch: float
    pitch_range: float
    rate: float
    gain_db: float
    drive: float  # tanh saturation gain added on top of 1 (0 = clean)
    tilt_db_per_octave: float  # spectral slope above TILT_CORNER_HZ (+ brighter, - darker)
    breath: float  # breath-noise level relative to the speech envelope


STYLES: dict[str, EmotionStyle] = {
    "neutral": EmotionStyle(1.00, 1.00, 1.00, 0.0, 0.0, 0.0, 0.0),
    "happy": EmotionStyle(1.40, 1.90, 1.12, 3.0, 0.0, 1.5, 0.0),
    "angry": EmotionStyle(1.12, 1.40, 1.12, 4.0, 2.0, 1.5, 0.0),
    "sad": EmotionStyle(0.85, 0.50, 0.80, -4.0, 0.0, -3.0, 0.08),
}
_STYLE_INDEX = {name: i for i, name in enumerate(STYLES)}


class SynthCorpusError(ValueError):
    """``out_dir`` holds a different or foreign corpus, so it must not be written into."""


@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the synthetic corpus; all of it is recorded in ``synth.json``.

    Size: ``n_speakers`` (1..104), ``sentences_per_speaker`` (1..12, drawn per speaker from
    :data:`SENTENCES`), ``takes_per_emotion`` (>= 1) and ``emotions`` (subset of :data:`STYLES`)
    give ``n_speakers * sentences_per_speaker * len(emotions) * takes_per_emotion`` files.
    ``seed`` (>= 0) fixes every random draw.

    Difficulty (raise the first, lower the rest to make emotions easier to tell apart):
    ``emotion_strength`` scales how far every style moves from neutral (0 = all neutral).
    ``jitter`` is the standard deviation of the natural log of each per-take random factor
    (acting amount, pitch, range, rate); 0.2 means about +-20 %.
    ``speaker_pitch_spread`` is the half-width of the speaker base pitch around espeak's 50
    (``-p`` units, roughly 1 % of F0 each). ``speaker_rate_spread`` is the relative half-width of
    the speaker base speed around 175 words/min. ``speaker_expressiveness_spread`` is the
    relative half-width of how strongly each speaker acts.

    What only memory can fit (module docstring; all 0 gives the generalising regime):
    ``speaker_style_spread`` (>= 0) is the log-scale standard deviation of each speaker's own way
    of acting each emotion; ``ambiguous_rate`` and ``label_noise_rate`` (in [0, 1)) are the
    exact fractions of every speaker's takes rendered as a blend of two emotions and annotated
    with a label other than the acted one.

    Recording: ``level_jitter_db`` is the half-width of the uniform random recording level;
    ``snr_db`` the uniform range of the additive-noise SNR; ``reverb_rt60_s`` the uniform range of
    the room's RT60 in seconds and ``reverb_wet`` of the reverberant-to-direct energy ratio.
    """

    n_speakers: int = 24
    sentences_per_speaker: int = 8
    takes_per_emotion: int = 2
    emotions: tuple[str, ...] = FOUR_CLASS
    seed: int = 0
    emotion_strength: float = 1.0
    jitter: float = 0.2
    speaker_pitch_spread: int = 15
    speaker_rate_spread: float = 0.12
    speaker_expressiveness_spread: float = 0.35
    level_jitter_db: float = 6.0
    snr_db: tuple[float, float] = (10.0, 30.0)
    reverb_rt60_s: tuple[float, float] = (0.15, 0.6)
    reverb_wet: tuple[float, float] = (0.05, 0.4)
    speaker_style_spread: float = 0.0
    ambiguous_rate: float = 0.0
    label_noise_rate: float = 0.15

    def __post_init__(self) -> None:
        _check_int("n_speakers", self.n_speakers, low=1, high=MAX_SPEAKERS)
        _check_int("sentences_per_speaker", self.sentences_per_speaker, low=1, high=len(SENTENCES))
        _check_int("takes_per_emotion", self.takes_per_emotion, low=1)
        _check_int("seed", self.seed, low=0)
        _check_int("speaker_pitch_spread", self.speaker_pitch_spread, low=0, high=ESPEAK_BASE_PITCH - 1)
        if (
            not isinstance(self.emotions, tuple)
            or not self.emotions
            or any(e not in STYLES for e in self.emotions)
            or len(set(self.emotions)) != len(self.emotions)
        ):
            raise ValueError(
                f"SynthConfig.emotions must be a non-empty tuple of distinct names from {', '.join(STYLES)}; got {self.emotions!r}"
            )
        _check_real("emotion_strength", self.emotion_strength, low=0.0)
        _check_real("jitter", self.jitter, low=0.0)
        _check_real("speaker_rate_spread", self.speaker_rate_spread, low=0.0, below=1.0)
        _check_real("speaker_expressiveness_spread", self.speaker_expressiveness_spread, low=0.0, below=1.0)
        _check_real("level_jitter_db", self.level_jitter_db, low=0.0)
        _check_range("snr_db", self.snr_db)
        _check_range("reverb_rt60_s", self.reverb_rt60_s, low=1e-3)
        _check_range("reverb_wet", self.reverb_wet, low=0.0)
        _check_real("speaker_style_spread", self.speaker_style_spread, low=0.0)
        _check_real("ambiguous_rate", self.ambiguous_rate, low=0.0, below=1.0)
        _check_real("label_noise_rate", self.label_noise_rate, low=0.0, below=1.0)
        if len(self.emotions) < 2 and (self.ambiguous_rate > 0 or self.label_noise_rate > 0):
            raise ValueError("SynthConfig.ambiguous_rate and label_noise_rate need at least two emotions")

    @property
    def n_utterances(self) -> int:
        return self.n_speakers * self.sentences_per_speaker * len(self.emotions) * self.takes_per_emotion

    def to_json(self) -> dict[str, Any]:
        """Plain JSON form (tuples become lists), the form stored in and compared with ``synth.json``."""
        return json.loads(json.dumps(asdict(self)))


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"SynthConfig.{name} must be an integer {bounds}; got {value!r}")


def _check_real(name: str, value: object, *, low: float, below: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (below is not None and value >= below):  # type: ignore[operator]
        bounds = f"in [{low}, {below})" if below is not None else f">= {low}"
        raise ValueError(f"SynthConfig.{name} must be a finite number {bounds}; got {value!r}")


def _check_range(name: str, value: object, *, low: float | None = None) -> None:
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and value[0] <= value[1]
        and (low is None or value[0] >= low)
    )
    if not ok:
        floor = f", both >= {low}" if low is not None else ""
        raise ValueError(f"SynthConfig.{name} must be a (low, high) tuple with low <= high{floor}; got {value!r}")


#: The pre-version-2 corpus: no speaker styles, no ambiguous takes, no annotation noise. A small
#: model generalises on it (training and test accuracy close), so there is little to forget.
GENERALISING = SynthConfig(speaker_style_spread=0.0, ambiguous_rate=0.0, label_noise_rate=0.0)
#: The default: 15 % annotation disagreement. The validation-only scan of
#: ``benchmarks/bench_regime.py`` chose it: with any speaker-specific acting or ambiguous takes
#: on top, unseen speakers' UA fell below the 65-80 % of real fine-tuned SER (0.47-0.59 against
#: 0.67), while every setting memorised (training accuracy >= 0.99, in-speaker attack AUC >= 0.76).
MEMORISING = SynthConfig()
REGIMES: dict[str, SynthConfig] = {"memorising": MEMORISING, "generalising": GENERALISING}


# ----------------------------------------------------------------------------- speakers and plan


@dataclass(frozen=True)
class SpeakerVoice:
    """One synthetic speaker: espeak voice plus the personal offsets drawn from the seed."""

    name: str
    accent: str
    variant: str
    base_pitch: int  # espeak -p
    base_wpm: int  # espeak -s
    expressiveness: float  # multiplies the acting amount


def speaker_name(k: int) -> str:
    """The ``k``-th synthetic speaker's id (``synth_000``, ...): the corpus and the node count agree on it."""
    return f"synth_{k:03d}"


def speaker_voices(config: SynthConfig) -> list[SpeakerVoice]:
    """The ``config.n_speakers`` speakers, each a distinct accent/variant pair.

    Speaker ``k`` uses accent ``k % 8`` and variant ``(k % 8 + k // 8) % 13``: for a fixed accent
    the variants differ for all ``k < 104``, and consecutive speakers alternate gender.
    """
    voices = []
    for k in range(config.n_speakers):
        accent_index = k % len(ACCENTS)
        rng = _rng(config.seed, _SPEAKER_STREAM, k)
        pitch_offset = int(rng.integers(-config.speaker_pitch_spread, config.speaker_pitch_spread + 1))
        rate_factor = rng.uniform(1 - config.speaker_rate_spread, 1 + config.speaker_rate_spread)
        expressiveness = rng.uniform(1 - config.speaker_expressiveness_spread, 1 + config.speaker_expressiveness_spread)
        voices.append(
            SpeakerVoice(
                name=speaker_name(k),
                accent=ACCENTS[accent_index],
                variant=VARIANTS[(accent_index + k // len(ACCENTS)) % len(VARIANTS)],
                base_pitch=ESPEAK_BASE_PITCH + pitch_offset,
                base_wpm=round(ESPEAK_BASE_WPM * rate_factor),
                expressiveness=float(expressiveness),
            )
        )
    return voices


@dataclass(frozen=True)
class TakeJob:
    """Everything one worker needs to render and store one take."""

    utt_id: str
    path: Path
    voice: SpeakerVoice
    speaker_index: int
    sentence_index: int
    emotion: str
    take: int
    config: SynthConfig
    #: Emotion blended into this take (``ambiguous_rate``), or ``None``.
    blend_with: str | None = None
    #: The annotated label written to the manifest (differs from ``emotion`` under label noise).
    label: str = ""

    @property
    def annotated(self) -> str:
        return self.label or self.emotion


def plan_takes(config: SynthConfig, *, wav_dir: Path) -> list[TakeJob]:
    """All takes of the corpus in manifest order (speaker, sentence, emotion, take)."""
    jobs = []
    for speaker_index, voice in enumerate(speaker_voices(config)):
        sentence_rng = _rng(config.seed, _SENTENCE_STREAM, speaker_index)
        chosen = sentence_rng.choice(len(SENTENCES), size=config.sentences_per_speaker, replace=False)
        for sentence_index in sorted(int(i) for i in chosen):
            for emotion in config.emotions:
                for take in range(1, config.takes_per_emotion + 1):
                    utt_id = f"{voice.name}_sent{sentence_index:02d}_{emotion}_take{take}"
                    jobs.append(
                        TakeJob(
                            utt_id=utt_id,
                            path=wav_dir / voice.name / f"{utt_id}.wav",
                            voice=voice,
                            speaker_index=speaker_index,
                            sentence_index=sentence_index,
                            emotion=emotion,
                            take=take,
                            config=config,
                        )
                    )
    return _assign_ambiguity_and_labels(jobs, config)


def _pick_per_speaker(jobs: list[TakeJob], rate: float, *, seed: int, stream: int) -> set[int]:
    """Exactly ``round(rate * takes)`` job positions of every speaker, drawn from ``stream``."""
    picked: set[int] = set()
    by_speaker: dict[int, list[int]] = {}
    for position, job in enumerate(jobs):
        by_speaker.setdefault(job.speaker_index, []).append(position)
    for speaker_index, positions in by_speaker.items():
        count = round(rate * len(positions))
        if count:
            rng = _rng(seed, stream, speaker_index)
            picked.update(positions[int(i)] for i in rng.choice(len(positions), size=count, replace=False))
    return picked


def _other_emotion(rng: np.random.Generator, emotions: tuple[str, ...], acted: str) -> str:
    others = [e for e in emotions if e != acted]
    return others[int(rng.integers(len(others)))]


def _assign_ambiguity_and_labels(jobs: list[TakeJob], config: SynthConfig) -> list[TakeJob]:
    """Mark the ambiguous takes and the takes whose annotated label disagrees with the acting.

    The two draws are independent: a take can be both blended and mislabelled.
    """
    ambiguous = _pick_per_speaker(jobs, config.ambiguous_rate, seed=config.seed, stream=_AMBIGUOUS_STREAM)
    noisy = _pick_per_speaker(jobs, config.label_noise_rate, seed=config.seed, stream=_ANNOTATION_STREAM)
    out = []
    for position, job in enumerate(jobs):
        blend_with = label = None
        if position in ambiguous:
            blend_with = _other_emotion(
                _rng(config.seed, _AMBIGUOUS_STREAM, job.speaker_index, position), config.emotions, job.emotion
            )
        if position in noisy:
            label = _other_emotion(
                _rng(config.seed, _ANNOTATION_STREAM, job.speaker_index, position), config.emotions, job.emotion
            )
        out.append(dataclasses.replace(job, blend_with=blend_with, label=label or job.emotion))
    return out


def _rng(seed: int, stream: int, *indices: int) -> np.random.Generator:
    """Generator keyed by seed, purpose and indices: independent of rendering order and process."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *indices]))


# ----------------------------------------------------------------------------- rendering one take


@dataclass(frozen=True)
class TakeParams:
    """The drawn performance and recording conditions of one take."""

    ssml_pitch_percent: int
    ssml_range_percent: int
    ssml_rate_percent: int
    gain_db: float
    drive: float
    tilt_db_per_octave: float
    breath: float
    silence_s: tuple[float, float]
    rt60_s: float
    reverb_wet: float
    noise_colour: float  # 0 = white, 1 = pink
    snr_db: float


def draw_take(job: TakeJob) -> tuple[TakeParams, np.random.Generator]:
    """Draw the performance of one take (see the module docstring for the model).

    Also returns the take's generator, positioned after these draws, for the noise signals.
    """
    cfg = job.config
    style = _blended_style(job)
    rng = _rng(cfg.seed, _TAKE_STREAM, job.speaker_index, job.sentence_index, _STYLE_INDEX[job.emotion], job.take)
    own = _speaker_style(cfg, job.speaker_index, job.emotion)

    def wobble() -> float:
        return math.exp(rng.normal(0.0, cfg.jitter))

    amount = cfg.emotion_strength * job.voice.expressiveness * own["amount"] * wobble()
    pitch = style.pitch**amount * own["pitch"] * wobble()
    pitch_range = style.pitch_range**amount * own["pitch_range"] * wobble()
    rate = style.rate**amount * own["rate"] * wobble()
    level_db = rng.uniform(-cfg.level_jitter_db, cfg.level_jitter_db)
    params = TakeParams(
        ssml_pitch_percent=_clamp(round((pitch - 1.0) * 100), SSML_PITCH_PERCENT),
        ssml_range_percent=_clamp(round(pitch_range * 100), SSML_RANGE_PERCENT),
        ssml_rate_percent=_clamp(round(rate * 100), SSML_RATE_PERCENT),
        gain_db=style.gain_db * amount + own["gain_db"] + level_db,
        drive=style.drive * amount,
        tilt_db_per_octave=style.tilt_db_per_octave * amount + own["tilt_db"],
        breath=style.breath * amount,
        silence_s=(rng.uniform(*SILENCE_S), rng.uniform(*SILENCE_S)),
        rt60_s=rng.uniform(*cfg.reverb_rt60_s),
        reverb_wet=rng.uniform(*cfg.reverb_wet),
        noise_colour=rng.uniform(0.0, 1.0),
        snr_db=rng.uniform(*cfg.snr_db),
    )
    return params, rng


def _speaker_style(cfg: SynthConfig, speaker_index: int, emotion: str) -> dict[str, float]:
    """This speaker's own way of acting ``emotion`` (all neutral factors when the spread is 0)."""
    if cfg.speaker_style_spread == 0.0:
        return {"amount": 1.0, "pitch": 1.0, "pitch_range": 1.0, "rate": 1.0, "gain_db": 0.0, "tilt_db": 0.0}
    z = _rng(cfg.seed, _STYLE_STREAM, speaker_index, _STYLE_INDEX[emotion]).normal(0.0, 1.0, 6)
    s = cfg.speaker_style_spread
    return {
        "amount": math.exp(s * z[0]),
        "pitch": math.exp(s * z[1]),
        "pitch_range": math.exp(s * z[2]),
        "rate": math.exp(s * z[3]),
        "gain_db": s * STYLE_GAIN_DB * float(z[4]),
        "tilt_db": s * STYLE_TILT_DB * float(z[5]),
    }


def _blended_style(job: TakeJob) -> EmotionStyle:
    """The acted style, or for an ambiguous take its blend with ``job.blend_with``.

    Multipliers blend geometrically, additive settings linearly, with the weight of the other
    emotion drawn from its own stream (uniform in :data:`BLEND_WEIGHT`).
    """
    acted = STYLES[job.emotion]
    if job.blend_with is None:
        return acted
    other = STYLES[job.blend_with]
    key = (job.speaker_index, job.sentence_index, _STYLE_INDEX[job.emotion], job.take)
    w = float(_rng(job.config.seed, _BLEND_STREAM, *key).uniform(*BLEND_WEIGHT))
    return EmotionStyle(
        pitch=acted.pitch ** (1 - w) * other.pitch**w,
        pitch_range=acted.pitch_range ** (1 - w) * other.pitch_range**w,
        rate=acted.rate ** (1 - w) * other.rate**w,
        gain_db=(1 - w) * acted.gain_db + w * other.gain_db,
        drive=(1 - w) * acted.drive + w * other.drive,
        tilt_db_per_octave=(1 - w) * acted.tilt_db_per_octave + w * other.tilt_db_per_octave,
        breath=(1 - w) * acted.breath + w * other.breath,
    )


def _clamp(value: int, bounds: tuple[int, int]) -> int:
    return max(bounds[0], min(bounds[1], value))


def render_take(job: TakeJob) -> np.ndarray:
    """Render one take as 16 kHz mono float32 in [-1, 1]; a pure function of ``job``."""
    params, rng = draw_take(job)
    speech, rate = espeak_speech(job.voice, SENTENCES[job.sentence_index], params)
    speech = _to_reference_level(speech)
    speech = _saturate(speech, params.drive)
    speech = speech + _breath_noise(speech, params.breath, rate, rng)
    speech = _spectral_tilt(speech, params.tilt_db_per_octave, rate)
    speech = resample(speech, rate_in=rate, rate_out=SAMPLE_RATE)
    speech = speech * 10.0 ** (params.gain_db / 20.0)
    lead, trail = (round(s * SAMPLE_RATE) for s in params.silence_s)
    speech = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    speech = _reverberate(speech, params.rt60_s, params.reverb_wet, rng)
    speech = speech + _noise_at_snr(speech, params.snr_db, params.noise_colour, rng)
    peak = float(np.max(np.abs(speech)))
    if peak > PEAK_LIMIT:
        speech = speech * (PEAK_LIMIT / peak)
    return speech.astype(np.float32)


def espeak_speech(voice: SpeakerVoice, text: str, params: TakeParams) -> tuple[np.ndarray, int]:
    """Run espeak-ng on the SSML of one take; returns float64 samples and their sample rate."""
    ssml = (
        f'<speak><prosody pitch="{params.ssml_pitch_percent:+d}%" range="{params.ssml_range_percent}%" '
        f'rate="{params.ssml_rate_percent}%">{text}</prosody></speak>'
    )
    command = [ESPEAK, "-v", f"{voice.accent}+{voice.variant}", "-p", str(voice.base_pitch)]
    command += ["-s", str(voice.base_wpm), "-m", "--stdout", ssml]
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    return parse_espeak_wav(done.stdout, where=f"{ESPEAK} -v {voice.accent}+{voice.variant}")


def parse_espeak_wav(data: bytes, *, where: str) -> tuple[np.ndarray, int]:
    """Decode espeak-ng's ``--stdout`` WAV (16-bit mono PCM).

    Why by hand: when streaming, espeak-ng cannot know the length and writes 0x7ffff... as the
    RIFF and data sizes, so the data chunk is taken as everything after its header.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError(f"{where}: output is not a RIFF/WAVE stream")
    offset, rate = 12, None
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
        body = offset + 8
        if chunk == b"fmt ":
            fmt_tag, channels, rate = (
                int.from_bytes(data[body + a : body + b], "little") for a, b in ((0, 2), (2, 4), (4, 8))
            )
            bits = int.from_bytes(data[body + 14 : body + 16], "little")
            if (fmt_tag, channels, bits) != (1, 1, 16):
                raise RuntimeError(
                    f"{where}: expected 16-bit mono PCM, got format {fmt_tag}, {channels} ch, {bits} bit"
                )
        elif chunk == b"data":
            if rate is None:
                raise RuntimeError(f"{where}: data chunk before fmt chunk")
            payload = data[body : len(data) - (len(data) - body) % 2]
            samples = np.frombuffer(payload, dtype="<i2").astype(np.float64) / 32768.0
            if samples.size == 0 or not np.any(samples):
                raise RuntimeError(f"{where}: espeak-ng produced no audio")
            return samples, rate
        offset = body + size + (size % 2)
    raise RuntimeError(f"{where}: no data chunk in output")


def _to_reference_level(x: np.ndarray) -> np.ndarray:
    """Bring the dry take to a fixed RMS so emotion and recording gains start from one level."""
    rms = math.sqrt(float(np.mean(x**2)))
    return x * (10.0 ** (REFERENCE_RMS_DBFS / 20.0) / rms)


def _saturate(x: np.ndarray, drive: float) -> np.ndarray:
    """Peak-relative tanh saturation (angry's harsh, compressed voice); level-preserving at the peak."""
    if drive <= 0.0:
        return x
    peak = float(np.max(np.abs(x)))
    gain = 1.0 + drive
    return np.tanh(gain * x / peak) / math.tanh(gain) * peak


def _breath_noise(x: np.ndarray, breath: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Noise that follows the speech envelope (20 ms window): a breathy, airy voice."""
    if breath <= 0.0:
        return np.zeros_like(x)
    window = max(1, round(0.02 * rate))
    envelope = np.convolve(np.abs(x), np.ones(window) / window, mode="same")
    return breath * envelope * rng.normal(0.0, 1.0, x.size)


def _spectral_tilt(x: np.ndarray, db_per_octave: float, rate: int) -> np.ndarray:
    """Zero-phase spectral slope above :data:`TILT_CORNER_HZ` (brighter or darker voice)."""
    if db_per_octave == 0.0:
        return x
    freqs = np.fft.rfftfreq(x.size, d=1.0 / rate)
    octaves = np.log2(np.maximum(freqs, TILT_CORNER_HZ) / TILT_CORNER_HZ)
    return np.fft.irfft(np.fft.rfft(x) * 10.0 ** (db_per_octave * octaves / 20.0), n=x.size)


def resample(x: np.ndarray, *, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by FFT truncation (ideal low-pass at the lower Nyquist).

    The input is zero-padded to a whole number of resampling periods so the output length is
    exact; takes are padded with silence anyway, so the FFT's periodicity does no harm.
    """
    if rate_in == rate_out:
        return x
    ratio = Fraction(rate_out, rate_in)
    padded = np.concatenate([x, np.zeros((-x.size) % ratio.denominator)])
    n_out = padded.size * ratio.numerator // ratio.denominator
    spectrum = np.fft.rfft(padded)
    bins = min(spectrum.size, n_out // 2 + 1)
    kept = np.zeros(n_out // 2 + 1, dtype=complex)
    kept[:bins] = spectrum[:bins]
    return np.fft.irfft(kept, n=n_out) * (n_out / padded.size)


def _reverberate(x: np.ndarray, rt60_s: float, wet: float, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a synthetic room: direct path plus a decaying noise tail of energy ``wet``."""
    length = max(2, round(rt60_s * SAMPLE_RATE))
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.normal(0.0, 1.0, length) * np.exp(-3.0 * math.log(10.0) * t / rt60_s)  # -60 dB at rt60
    tail[0] = 0.0
    impulse = math.sqrt(wet) * tail / math.sqrt(float(np.sum(tail**2)))
    impulse[0] = 1.0
    n = x.size + length - 1
    size = 1 << (n - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(impulse, size), n=size)[:n]


def _noise_at_snr(x: np.ndarray, snr_db: float, colour: float, rng: np.random.Generator) -> np.ndarray:
    """Stationary noise, white (``colour`` 0) to pink (1), at ``snr_db`` below the take's power."""
    spectrum = np.fft.rfft(rng.normal(0.0, 1.0, x.size))
    freqs = np.fft.rfftfreq(x.size, d=1.0 / SAMPLE_RATE)
    spectrum *= np.maximum(freqs, 20.0) ** (-colour / 2.0)
    noise = np.fft.irfft(spectrum, n=x.size)
    target_power = float(np.mean(x**2)) / 10.0 ** (snr_db / 10.0)
    return noise * math.sqrt(target_power / float(np.mean(noise**2)))


def _render_and_store(job: TakeJob) -> None:
    """Worker entry point: render one take and write it durably as 16-bit PCM WAV."""
    buffer = io.BytesIO()
    sf.write(buffer, render_take(job), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    atomic_write_bytes(job.path, buffer.getvalue())


# ----------------------------------------------------------------------------- corpus


def synthesize_corpus(
    *,
    out_dir: Path,
    config: SynthConfig = SynthConfig(),
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Render the corpus described by ``config`` into ``out_dir``; returns ``out_dir/manifest.csv``.

    Idempotent: a finished corpus with the same config is returned untouched; an unfinished one
    (no manifest yet) with the same config is rendered again. ``workers`` processes render in
    parallel (default: the usable CPUs); the output does not depend on it.

    Raises :class:`SynthCorpusError` if ``out_dir`` holds a corpus of another config or version,
    or files that were not made by this function, and ``RuntimeError`` if espeak-ng is missing
    or lacks a needed voice.
    """
    out = Path(out_dir).resolve()
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    meta = {"format": SYNTH_FORMAT, "version": SYNTH_VERSION, "config": config.to_json()}
    manifest = out / MANIFEST_NAME
    if _claim_or_reuse(out, meta):
        return manifest
    espeak_version = check_espeak(speaker_voices(config))
    atomic_write_json(out / META_NAME, {**meta, "espeak_ng": espeak_version})
    jobs = plan_takes(config, wav_dir=out / WAV_DIR)
    n_workers = min(len(jobs), workers if workers is not None else len(os.sched_getaffinity(0)))
    for _ in tqdm(_run_jobs(jobs, n_workers), total=len(jobs), disable=not progress, desc="synth corpus", unit="utt"):
        pass
    write_label_table(out / LABELS_NAME, jobs)
    utterances = [Utterance(job.utt_id, job.path, job.voice.name, job.annotated) for job in jobs]
    return write_manifest(manifest, utterances)


def write_label_table(path: Path, jobs: list[TakeJob]) -> Path:
    """``labels.csv``: per take the acted emotion, the annotated label and the blended emotion."""
    lines = ["utt_id,acted,annotated,blend_with"]
    lines += [f"{job.utt_id},{job.emotion},{job.annotated},{job.blend_with or ''}" for job in jobs]
    return atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


@dataclass(frozen=True)
class TakeLabels:
    """One row of ``labels.csv``."""

    acted: str
    annotated: str
    blend_with: str | None

    @property
    def mislabelled(self) -> bool:
        return self.acted != self.annotated


def read_label_table(path: Path) -> dict[str, TakeLabels]:
    """Read ``labels.csv``; a malformed row is an error naming the file and line."""
    rows: dict[str, TakeLabels] = {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != "utt_id,acted,annotated,blend_with":
        raise SynthCorpusError(f"{path}: not a synthetic-corpus label table (bad header)")
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split(",")
        if len(parts) != 4 or parts[1] not in STYLES or parts[2] not in STYLES or (parts[3] and parts[3] not in STYLES):
            raise SynthCorpusError(f"{path}:{number}: malformed row {line!r}")
        rows[parts[0]] = TakeLabels(parts[1], parts[2], parts[3] or None)
    return rows


def _claim_or_reuse(out: Path, meta: dict[str, Any]) -> bool:
    """True if ``out`` already holds this finished corpus; raise if it holds anything else."""
    meta_path = out / META_NAME
    if not meta_path.exists():
        foreign = [p.name for p in (out / MANIFEST_NAME, out / WAV_DIR) if p.exists()]
        if foreign:
            raise SynthCorpusError(
                f"{out} already holds {', '.join(foreign)} but no {META_NAME}: not a corpus made by "
                "synthesize_corpus; refusing to write into it (choose another out_dir)"
            )
        return False
    stored = _read_meta(meta_path)
    differing = sorted(key for key in meta if stored.get(key) != meta[key])
    if differing:
        detail = _config_difference(stored.get("config"), meta["config"]) if differing == ["config"] else ""
        raise SynthCorpusError(
            f"{out} holds a synthetic corpus with a different {' and '.join(differing)}{detail}; "
            "refusing to mix corpora (use another out_dir or delete this one)"
        )
    return (out / MANIFEST_NAME).exists()


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        stored = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SynthCorpusError(f"{meta_path}: unreadable corpus description ({exc})") from None
    if not isinstance(stored, dict):
        raise SynthCorpusError(f"{meta_path}: expected a JSON object")
    return stored


def _config_difference(stored: object, wanted: dict[str, Any]) -> str:
    """`` (field: stored -> wanted, ...)`` for the config fields that differ."""
    if not isinstance(stored, dict):
        return ""
    keys = sorted(set(stored) | set(wanted))
    changes = [f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in keys if stored.get(k) != wanted.get(k)]
    return f" ({'; '.join(changes)})"


def _run_jobs(jobs: list[TakeJob], n_workers: int) -> Iterator[None]:
    """Render all jobs, yielding once per finished take (for the progress bar)."""
    if n_workers == 1:
        for job in jobs:
            _render_and_store(job)
            yield None
        return
    # spawn, not fork: the caller may already run threads (torch), which fork would copy unsafely.
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_render_and_store, jobs, chunksize=8)


def check_espeak(voices: list[SpeakerVoice]) -> str:
    """espeak-ng's version line, after checking it has every accent and variant ``voices`` use.

    Why check up front: espeak-ng silently falls back to a default voice for an unknown name,
    which would quietly merge speakers.
    """
    if shutil.which(ESPEAK) is None:
        raise RuntimeError(f"{ESPEAK} not found on PATH; install it (Debian/Ubuntu: apt-get install espeak-ng)")
    version = _espeak_output("--version").strip()
    languages = {line.split()[1] for line in _espeak_output("--voices").splitlines()[1:] if line.split()}
    variants = set(re.findall(r"!v/(\S+)", _espeak_output("--voices=variant")))
    missing = sorted({v.accent for v in voices} - languages) + sorted(
        f"+{name}" for name in {v.variant for v in voices} - variants
    )
    if missing:
        raise RuntimeError(f"{ESPEAK} ({version}) lacks voices needed by the corpus: {', '.join(missing)}")
    return version


def _espeak_output(*args: str) -> str:
    done = subprocess.run([ESPEAK, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{ESPEAK} {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout
