"""CREMA-D indexer: ``AudioWAV/AAAA_SSS_EEE_LL.wav`` -> canonical utterances.

Layout (Cao et al., 2014): all audio in one ``AudioWAV`` folder; the name gives the actor
(1001-1091), one of the twelve sentence codes, the emotion (ANG, DIS, FEA, HAP, NEU, SAD) and
the level (LO, MD, HI, or XX = unspecified). Files that do not fit, including the few empty or
truncated WAVs some copies of the corpus carry, are reported as skipped rather than guessed.
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
    require_dir,
    resolve_root,
    unreadable_audio_reason,
)
from serforget.common.manifest import Utterance

FMT = "cremad"
AUDIO_DIR = "AudioWAV"

EMOTIONS: dict[str, str] = {
    "ANG": "angry",
    "DIS": "disgust",
    "FEA": "fearful",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}
SENTENCES = frozenset({"IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI"})
LEVELS = frozenset({"LO", "MD", "HI", "XX"})
FIRST_ACTOR, LAST_ACTOR = 1001, 1091

_NAME = re.compile(r"(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})")


def index(root: Path) -> IndexResult:
    """Index a CREMA-D root holding an ``AudioWAV`` folder (see the module docstring)."""
    base = resolve_root(root, fmt=FMT)
    audio = require_dir(base / AUDIO_DIR, fmt=FMT, root=base, expected=f"a {AUDIO_DIR} folder")
    utterances, skipped = classify_files(files_under(audio), lambda path: _classify(path, audio))
    return finish(fmt=FMT, root=base, utterances=utterances, skipped=skipped)


def _classify(path: Path, audio: Path) -> Utterance | str:
    """The utterance for ``path``, or the reason it does not fit the layout."""
    if path.parent != audio:
        return f"not directly inside {AUDIO_DIR}"
    if path.suffix != WAV_SUFFIX:
        return f"not a {WAV_SUFFIX} file"
    match = _NAME.fullmatch(path.stem)
    if match is None:
        return "name is not AAAA_SSS_EEE_LL"
    actor, sentence, emotion, level = match.groups()
    reason = _field_problem(actor, sentence, emotion, level) or unreadable_audio_reason(path)
    if reason is not None:
        return reason
    return make_utterance(utt_id=f"{FMT}_{path.stem}", path=path, speaker=f"{FMT}_{actor}", emotion=EMOTIONS[emotion])


def _field_problem(actor: str, sentence: str, emotion: str, level: str) -> str | None:
    """First field of the name that rules the file out."""
    if not FIRST_ACTOR <= int(actor) <= LAST_ACTOR:
        return f"actor {actor} outside {FIRST_ACTOR}-{LAST_ACTOR}"
    if sentence not in SENTENCES:
        return f"unknown sentence code {sentence}"
    if emotion not in EMOTIONS:
        return f"unknown emotion code {emotion}"
    if level not in LEVELS:
        return f"unknown level {level}"
    return None
