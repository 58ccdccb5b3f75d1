"""RAVDESS indexer: ``Actor_XX/MM-VV-EE-II-SS-RR-AA.wav`` -> canonical utterances.

Layout (Livingstone & Russo, 2018): one folder per actor, file names made of seven two-digit
fields: modality (01 full-AV, 02 video-only, 03 audio-only), vocal channel (01 speech, 02 song),
emotion (01 neutral, 02 calm, 03 happy, 04 sad, 05 angry, 06 fearful, 07 disgust, 08 surprised),
intensity (01 normal, 02 strong; neutral has no strong take), statement (01/02), repetition
(01/02) and actor (01-24, equal to the folder's number). Only audio-only speech is indexed; every
other file under the root is reported as skipped with the field that rules it out, because a
guessed label or speaker would silently corrupt what a model learns or forgets.
"""

from __future__ import annotations

import re
from pathlib import Path

from serforget.common.corpora._common import (
    WAV_SUFFIX,
    IndexResult,
    classify_files,
    files_under,
    finish,
    make_utterance,
    resolve_root,
    unreadable_audio_reason,
)
from serforget.common.manifest import Utterance

FMT = "ravdess"

EMOTIONS: dict[str, str] = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}
AUDIO_ONLY = "03"
VIDEO_MODALITIES = {"01": "full-AV", "02": "video-only"}
SPEECH = "01"
SONG = "02"
TWO_LEVELS = ("01", "02")
ACTORS = frozenset(f"{n:02d}" for n in range(1, 25))

_FOLDER = re.compile(r"Actor_(\d{2})")
_NAME = re.compile(r"(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})")


def index(root: Path) -> IndexResult:
    """Index a RAVDESS root holding ``Actor_XX`` folders (see the module docstring)."""
    base = resolve_root(root, fmt=FMT)
    if not any(_FOLDER.fullmatch(p.name) for p in base.iterdir() if p.is_dir()):
        raise ValueError(f"{base} does not hold the {FMT} layout: no Actor_XX folders in it")
    utterances, skipped = classify_files(files_under(base), lambda path: _classify(path, base))
    return finish(fmt=FMT, root=base, utterances=utterances, skipped=skipped)


def _classify(path: Path, base: Path) -> Utterance | str:
    """The utterance for ``path``, or the reason it does not fit the layout."""
    folder = _FOLDER.fullmatch(path.parent.name)
    if path.parent.parent != base or folder is None:
        return "not directly inside an Actor_XX folder of the root"
    if folder.group(1) not in ACTORS:
        return f"folder actor {folder.group(1)} outside 01-24"
    if path.suffix != WAV_SUFFIX:
        return f"not a {WAV_SUFFIX} file"
    match = _NAME.fullmatch(path.stem)
    if match is None:
        return "name is not seven two-digit fields MM-VV-EE-II-SS-RR-AA"
    modality, channel, emotion, intensity, statement, repetition, actor = match.groups()
    reason = _field_problem(modality, channel, emotion, intensity, statement, repetition)
    if reason is None and actor != folder.group(1):
        reason = f"actor field {actor} does not match folder Actor_{folder.group(1)}"
    if reason is None:
        reason = unreadable_audio_reason(path)
    if reason is not None:
        return reason
    return make_utterance(utt_id=f"{FMT}_{path.stem}", path=path, speaker=f"{FMT}_{actor}", emotion=EMOTIONS[emotion])


def _field_problem(
    modality: str, channel: str, emotion: str, intensity: str, statement: str, repetition: str
) -> str | None:
    """First field of the name that rules the file out, in the order the fields appear."""
    if modality in VIDEO_MODALITIES:
        return f"modality {modality} is {VIDEO_MODALITIES[modality]} video; only {AUDIO_ONLY} audio-only is indexed"
    if modality != AUDIO_ONLY:
        return f"unknown modality {modality}"
    if channel == SONG:
        return f"vocal channel {SONG} is song; only {SPEECH} speech is indexed"
    if channel != SPEECH:
        return f"unknown vocal channel {channel}"
    if emotion not in EMOTIONS:
        return f"unknown emotion code {emotion}"
    if intensity not in TWO_LEVELS:
        return f"unknown intensity {intensity}"
    if emotion == "01" and intensity != "01":
        return "neutral has no strong intensity (02) in RAVDESS"
    if statement not in TWO_LEVELS:
        return f"unknown statement {statement}"
    if repetition not in TWO_LEVELS:
        return f"unknown repetition {repetition}"
    return None
