"""Berlin EmoDB indexer: ``wav/SSTTTEV.wav`` (e.g. ``03a01Fa.wav``) -> canonical utterances.

Layout (Burkhardt et al., 2005): all audio in one ``wav`` folder; the seven-character name holds
the speaker (two digits, one of the ten actors 03, 08-16), the text code (``a01``-``a07`` short,
``b01``-``b10`` long sentences), the emotion as the first letter of its German name and a
version letter. German letters: W = Wut/Ärger (angry), L = Langeweile (boredom), E = Ekel
(disgust), A = Angst (fearful), F = Freude (happy), T = Trauer (sad), N = neutral. Anything else
is reported as skipped, never guessed.
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

FMT = "emodb"
AUDIO_DIR = "wav"

EMOTIONS: dict[str, str] = {
    "W": "angry",
    "L": "boredom",
    "E": "disgust",
    "A": "fearful",
    "F": "happy",
    "T": "sad",
    "N": "neutral",
}
SPEAKERS = frozenset({"03", "08", "09", "10", "11", "12", "13", "14", "15", "16"})
TEXTS = frozenset({f"a{n:02d}" for n in range(1, 8)} | {f"b{n:02d}" for n in range(1, 11)})

_NAME = re.compile(r"(\d{2})([ab]\d{2})([A-Z])([a-z])")


def index(root: Path) -> IndexResult:
    """Index an EmoDB root holding a ``wav`` folder (see the module docstring)."""
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
        return "name is not SSTTTEV (speaker, text code, emotion letter, version letter)"
    speaker, text, emotion, _version = match.groups()
    reason = _field_problem(speaker, text, emotion) or unreadable_audio_reason(path)
    if reason is not None:
        return reason
    return make_utterance(utt_id=f"{FMT}_{path.stem}", path=path, speaker=f"{FMT}_{speaker}", emotion=EMOTIONS[emotion])


def _field_problem(speaker: str, text: str, emotion: str) -> str | None:
    """First field of the name that rules the file out."""
    if speaker not in SPEAKERS:
        return f"unknown speaker {speaker}; EmoDB speakers are {', '.join(sorted(SPEAKERS))}"
    if text not in TEXTS:
        return f"unknown text code {text}"
    if emotion not in EMOTIONS:
        return f"unknown emotion letter {emotion}"
    return None
