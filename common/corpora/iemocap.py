"""IEMOCAP indexer: ``SessionN/sentences/wav/DIALOG/UTT.wav`` + EmoEvaluation labels.

Layout (Busso et al., 2008): five sessions, each with the segmented utterances under
``sentences/wav/<dialog>/<utt>.wav`` and the consensus labels in
``dialog/EmoEvaluation/*.txt``, one line per utterance such as
``[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]``. An utterance id is
``<dialog>_<G><NNN>``; ``G`` is the gender of the speaker of *that* utterance (each session has
one female and one male actor), so the speaker is ``iemocap_S<N><G>``.

Label codes: neu, hap, exc (merged into happy, the usual IEMOCAP convention), ang, sad, sur,
fea, dis map to canonical emotions; fru (frustrated), oth (other) and xxx (no annotator
agreement) have none, so those utterances are skipped with that reason, as is a WAV without a
label line. Labels without a WAV are ignored: only audio files are indexed. A malformed or
contradictory label line is an error naming the file and line, because it means the annotation
itself is damaged, not that one recording should be left out.
"""

from __future__ import annotations

import re
from pathlib import Path

from serforget.common.corpora._common import (
    WAV_SUFFIX,
    IndexResult,
    Skipped,
    files_under,
    finish,
    make_utterance,
    require_dir,
    resolve_root,
    unreadable_audio_reason,
)
from serforget.common.manifest import Utterance

FMT = "iemocap"

EMOTIONS: dict[str, str] = {
    "neu": "neutral",
    "hap": "happy",
    "exc": "happy",
    "ang": "angry",
    "sad": "sad",
    "sur": "surprised",
    "fea": "fearful",
    "dis": "disgust",
}
UNMAPPED: dict[str, str] = {"fru": "frustrated", "oth": "other", "xxx": "no annotator agreement"}

_SESSION = re.compile(r"Session([1-5])")
_UTT = re.compile(r"(Ses0([1-5])[FM]_.+)_([FM])(\d{3})")
_LABEL_LINE = re.compile(r"\[(\d+(?:\.\d+)?) - (\d+(?:\.\d+)?)\]\t(\S+)\t(\S+)\t\[[^\]]*\]")


def index(root: Path) -> IndexResult:
    """Index an IEMOCAP root holding ``SessionN`` folders (see the module docstring)."""
    base = resolve_root(root, fmt=FMT)
    sessions = {
        match.group(1): folder
        for folder in base.iterdir()
        if folder.is_dir() and (match := _SESSION.fullmatch(folder.name)) is not None
    }
    if not sessions:
        raise ValueError(f"{base} does not hold the {FMT} layout: no Session1..Session5 folders in it")
    utterances: list[Utterance] = []
    skipped: list[Skipped] = []
    for number, session in sorted(sessions.items()):
        found, refused = _index_session(session, number=number, base=base)
        utterances.extend(found)
        skipped.extend(refused)
    return finish(fmt=FMT, root=base, utterances=utterances, skipped=skipped)


def _index_session(session: Path, *, number: str, base: Path) -> tuple[list[Utterance], list[Skipped]]:
    """Utterances and refused files of one ``SessionN`` folder (``number`` is its N)."""
    audio = require_dir(session / "sentences" / "wav", fmt=FMT, root=base, expected=f"{session.name}/sentences/wav")
    label_dir = require_dir(
        session / "dialog" / "EmoEvaluation", fmt=FMT, root=base, expected=f"{session.name}/dialog/EmoEvaluation"
    )
    labels = read_labels(label_dir)
    utterances: list[Utterance] = []
    skipped: list[Skipped] = []
    for path in files_under(audio):
        result = _classify(path, audio=audio, session=number, labels=labels)
        if isinstance(result, Utterance):
            utterances.append(result)
        else:
            skipped.append(Skipped(path=path, reason=result))
    return utterances, skipped


def read_labels(label_dir: Path) -> dict[str, str]:
    """Map utterance id -> label code from every ``*.txt`` directly in ``label_dir``.

    Only lines starting with ``[`` are label lines; the header and the per-annotator lines that
    follow each label line are not. Raises ``ValueError`` naming file and line on a malformed
    label line or on two different codes for one utterance.
    """
    labels: dict[str, str] = {}
    origin: dict[str, str] = {}
    for text_file in sorted(label_dir.glob("*.txt")):
        lines = text_file.read_text(encoding="utf-8", errors="strict").splitlines()
        for line_no, raw in enumerate(lines, start=1):
            line = raw.rstrip()
            if not line.startswith("["):
                continue
            where = f"{text_file}:{line_no}"
            match = _LABEL_LINE.fullmatch(line)
            if match is None:
                raise ValueError(
                    f"{where}: malformed label line {line!r}; expected '[start - end]\\tUTT\\tcode\\t[v, a, d]'"
                )
            utt, code = match.group(3), match.group(4)
            if labels.get(utt, code) != code:
                raise ValueError(f"{where}: {utt} labelled {code!r}, but {origin[utt]} labels it {labels[utt]!r}")
            labels[utt] = code
            origin.setdefault(utt, where)
    return labels


def _classify(path: Path, *, audio: Path, session: str, labels: dict[str, str]) -> Utterance | str:
    """The utterance for ``path``, or the reason it does not fit the layout."""
    if path.parent.parent != audio:
        return "not directly inside a dialog folder of sentences/wav"
    if path.suffix != WAV_SUFFIX:
        return f"not a {WAV_SUFFIX} file"
    match = _UTT.fullmatch(path.stem)
    if match is None:
        return "name is not an utterance id like Ses01F_impro01_F000"
    dialog, utt_session, gender, _number = match.groups()
    if dialog != path.parent.name:
        return f"utterance of dialog {dialog} inside folder {path.parent.name}"
    if utt_session != session:
        return f"utterance of session {utt_session} inside Session{session}"
    reason = _label_problem(labels.get(path.stem)) or unreadable_audio_reason(path)
    if reason is not None:
        return reason
    return make_utterance(
        utt_id=f"{FMT}_{path.stem}",
        path=path,
        speaker=f"{FMT}_S{session}{gender}",
        emotion=EMOTIONS[labels[path.stem]],
    )


def _label_problem(code: str | None) -> str | None:
    """Why a label code gives no canonical emotion (``None`` if it does)."""
    if code is None:
        return "no label line in dialog/EmoEvaluation"
    if code in UNMAPPED:
        return f"label {code!r} ({UNMAPPED[code]}) has no canonical emotion"
    if code not in EMOTIONS:
        return f"unknown label code {code!r}"
    return None
