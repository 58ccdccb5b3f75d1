"""Shared result types and checks for the corpus indexers.

Why one place: every indexer must report the same things (canonical utterances with absolute
paths, plus every file it refused and why), sort the same way, and fail the same clear way when
pointed at the wrong folder, so callers can treat the four corpora interchangeably.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import soundfile as sf

from serforget.common.labels import check_emotion
from serforget.common.manifest import Utterance

#: Suffix every indexed audio file must have (all four corpora ship lower-case ``.wav``).
WAV_SUFFIX = ".wav"


@dataclass(frozen=True)
class Skipped:
    """A file inside a corpus's audio area that does not fit its layout, with the reason."""

    path: Path
    reason: str


@dataclass
class IndexResult:
    """What an indexer found: usable utterances and the files it refused (both sorted)."""

    utterances: list[Utterance]
    skipped: list[Skipped]


def resolve_root(root: Path, *, fmt: str) -> Path:
    """Absolute corpus root; ``FileNotFoundError``/``NotADirectoryError`` naming it if unusable."""
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{fmt} corpus root {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{fmt} corpus root {path} is not a directory")
    return path.resolve()


def require_dir(path: Path, *, fmt: str, root: Path, expected: str) -> Path:
    """Return ``path`` if it is a directory, else say which part of the layout is missing."""
    if not path.is_dir():
        raise ValueError(f"{root} does not hold the {fmt} layout: expected {expected}, missing {path}")
    return path


def classify_files(
    paths: Iterable[Path], classify: Callable[[Path], "Utterance | str"]
) -> tuple[list[Utterance], list[Skipped]]:
    """Split ``paths`` into utterances and skipped files, by what ``classify`` returns for each."""
    utterances: list[Utterance] = []
    skipped: list[Skipped] = []
    for path in paths:
        result = classify(path)
        if isinstance(result, Utterance):
            utterances.append(result)
        else:
            skipped.append(Skipped(path=path, reason=result))
    return utterances, skipped


def files_under(folder: Path) -> Iterator[Path]:
    """Every regular file below ``folder`` in sorted order, so results never depend on the OS."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path


def unreadable_audio_reason(path: Path) -> str | None:
    """Why ``path`` cannot be used as audio (``None`` if it can).

    Why check at indexing time: a truncated or empty download would otherwise only surface as
    a crash deep inside training, far from the file that caused it.
    """
    try:
        info = sf.info(str(path))
    except RuntimeError as exc:  # soundfile's errors derive from RuntimeError
        return f"not a readable audio file ({exc})"
    if info.frames == 0:
        return "audio file holds no samples"
    return None


def make_utterance(*, utt_id: str, path: Path, speaker: str, emotion: str) -> Utterance:
    """Build an :class:`Utterance`, checking the emotion is canonical (a bug in a label table)."""
    return Utterance(utt_id=utt_id, path=path, speaker=speaker, emotion=check_emotion(emotion, where=str(path)))


def finish(*, fmt: str, root: Path, utterances: list[Utterance], skipped: list[Skipped]) -> IndexResult:
    """Sort the results, enforce unique utterance ids, and refuse a root with nothing usable."""
    duplicates = sorted(uid for uid, count in Counter(u.utt_id for u in utterances).items() if count > 1)
    if duplicates:
        raise ValueError(f"{root}: {fmt} layout yields duplicate utterance ids: {', '.join(duplicates[:5])}")
    if not utterances:
        examples = "; ".join(f"{s.path.name}: {s.reason}" for s in sorted(skipped, key=_skip_key)[:3])
        detail = f" ({len(skipped)} files skipped, e.g. {examples})" if skipped else ""
        raise ValueError(f"{root}: no usable {fmt} utterances found{detail}")
    return IndexResult(
        utterances=sorted(utterances, key=lambda u: u.utt_id),
        skipped=sorted(skipped, key=_skip_key),
    )


def _skip_key(item: Skipped) -> tuple[str, str]:
    return (str(item.path), item.reason)
