"""Manifest CSV: the one interchange format between corpora, training, nodes and evaluation.

Format (version 1): a CSV with exactly the header ``utt_id,path,speaker,emotion``. ``path`` is
relative to the manifest's folder or absolute; ``emotion`` is a canonical name from
:mod:`serforget.common.labels`. Why a strict reader: a silently skipped or mislabelled row would change
what a model learns or forgets, so every defect is an error naming the file and the line.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from serforget.common.fsutil import atomic_write_text
from serforget.common.labels import check_emotion

COLUMNS: tuple[str, ...] = ("utt_id", "path", "speaker", "emotion")

#: The one syntax of every identifier the system passes around: utterance ids, request ids,
#: node ids. Why this narrow: ids become file names (``wav/<utt_id>.wav``), ledger keys and
#: signed fields, so an id must be a single, non-hidden path component (no ``/``, no leading
#: ``.``, so never ``..``), printable ASCII with no whitespace, and short.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}", re.ASCII)
ID_SYNTAX = "1-128 chars of [A-Za-z0-9._:@-] starting with a letter or digit"


class ManifestError(ValueError):
    """A manifest file is malformed; the message names the file and line."""


class IdError(ValueError):
    """An identifier does not follow :data:`ID_PATTERN`; the message names where it came from."""


def check_id(value: object, *, what: str) -> str:
    """Return ``value`` if it is a valid id, else raise :class:`IdError` naming ``what``.

    Surrounding whitespace is an error, not something to strip: ``"a "`` and ``"a"`` would
    otherwise be two spellings of one recording, and a deletion could miss one of them.
    """
    if not isinstance(value, str):
        raise IdError(f"{what}: ids must be strings, got {type(value).__name__}")
    if value != value.strip():
        raise IdError(f"{what}: id {value!r} has surrounding whitespace")
    if not ID_PATTERN.fullmatch(value):
        raise IdError(f"{what}: id {value!r} must be {ID_SYNTAX}")
    return value


@dataclass(frozen=True)
class Utterance:
    """One labelled recording. ``path`` is absolute once read from a manifest."""

    utt_id: str
    path: Path
    speaker: str
    emotion: str


def read_manifest(path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None) -> list[Utterance]:
    """Read and validate a manifest; relative paths resolve against the manifest's folder.

    ``root``, when given, is the data root every audio path must stay inside (a manifest must
    not point a node at files outside its own data directory).
    """
    manifest = Path(path)
    try:
        text = manifest.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{manifest}: manifest not found") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{manifest}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:  # a folder, an unreadable file
        raise ManifestError(f"{manifest}: cannot read the manifest ({exc.strerror or exc})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        body = list(reader)
    except csv.Error as exc:  # e.g. a field longer than the csv module's limit
        raise ManifestError(f"{manifest}:{reader.line_num}: malformed CSV ({exc})") from None
    if header is None:
        raise ManifestError(f"{manifest}: empty file, expected header {','.join(COLUMNS)}")
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    extra = [c for c in header if c not in COLUMNS]
    if missing or extra or len(header) != len(COLUMNS):
        raise ManifestError(
            f"{manifest}: header must be {','.join(COLUMNS)}; missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    index = {name: header.index(name) for name in COLUMNS}
    base = manifest.resolve().parent
    root_dir = Path(root).resolve() if root is not None else None
    seen: set[str] = set()
    rows: list[Utterance] = []
    for line_no, fields in enumerate(body, start=2):
        if not fields or all(not f.strip() for f in fields):
            continue
        where = f"{manifest}:{line_no}"
        if len(fields) != len(COLUMNS):
            raise ManifestError(f"{where}: expected {len(COLUMNS)} fields, got {len(fields)}")
        try:
            check_id(fields[index["utt_id"]], what=f"{where}: utt_id")
        except IdError as exc:
            raise ManifestError(str(exc)) from None
        values = {name: fields[i].strip() for name, i in index.items()}
        for name, value in values.items():
            if not value:
                raise ManifestError(f"{where}: empty field {name!r}")
            if "\x00" in value:
                raise ManifestError(f"{where}: field {name!r} contains a NUL byte")
        if values["utt_id"] in seen:
            raise ManifestError(f"{where}: duplicate utt_id {values['utt_id']!r}")
        seen.add(values["utt_id"])
        try:
            emotion = check_emotion(values["emotion"], where=where)
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        audio = Path(values["path"])
        audio = (audio if audio.is_absolute() else base / audio).resolve()
        if root_dir is not None and not audio.is_relative_to(root_dir):
            raise ManifestError(f"{where}: path {values['path']!r} lies outside the data root {root_dir}")
        rows.append(Utterance(values["utt_id"], audio, values["speaker"], emotion))
    return rows


def write_manifest(path: str | os.PathLike[str], utterances: Iterable[Utterance], *, relative: bool = True) -> Path:
    """Write a manifest atomically; paths are stored relative to its folder when possible."""
    manifest = Path(path)
    base = manifest.resolve().parent
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for utt in utterances:
        audio = Path(utt.path).resolve()
        stored = os.path.relpath(audio, base) if relative and audio.is_relative_to(base) else str(audio)
        writer.writerow((utt.utt_id, stored, utt.speaker, utt.emotion))
    return atomic_write_text(manifest, buffer.getvalue())


def filter_labels(utterances: Iterable[Utterance], labels: Sequence[str]) -> list[Utterance]:
    """Keep the utterances whose emotion belongs to the task's label list."""
    keep = set(labels)
    return [u for u in utterances if u.emotion in keep]


def by_speaker(utterances: Iterable[Utterance]) -> dict[str, list[Utterance]]:
    """Per-speaker partitions (speakers sorted): each later becomes one Flower node."""
    groups: dict[str, list[Utterance]] = defaultdict(list)
    for utt in utterances:
        groups[utt.speaker].append(utt)
    return {speaker: groups[speaker] for speaker in sorted(groups)}


@dataclass(frozen=True)
class SpeakerSplit:
    """Speaker-independent train/valid/test split: no speaker appears in two parts."""

    train: list[Utterance]
    valid: list[Utterance]
    test: list[Utterance]

    def speakers(self, part: str) -> list[str]:
        return sorted({u.speaker for u in getattr(self, part)})


#: how whole speakers are held out (run config ``split.protocol``)
SPLIT_PROTOCOLS = ("random", "speakers", "iemocap-loso")
_IEMOCAP_SPEAKER = re.compile(r"iemocap_S([1-5])([FM])")


@dataclass(frozen=True)
class SplitSpec:
    """Which speakers validate and test; everyone else trains (one Flower node each).

    * ``random``: ``n_valid`` + ``n_test`` speakers drawn with ``seed`` (the default).
    * ``speakers``: the fixed lists ``valid`` and ``test`` (a published protocol's speaker lists).
    * ``iemocap-loso``: IEMOCAP's leave-one-session-out, fold ``fold`` (1-5): Session ``fold`` is
      held out; its female speaker validates (the retrain-level target, the held-out gate) and its
      male speaker tests, so validation is never a training speaker and test stays unseen.
    """

    protocol: str = "random"
    n_valid: int = 3
    n_test: int = 5
    seed: int = 0
    valid: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    fold: int = 1

    def held_out(self, speakers: Sequence[str]) -> tuple[set[str], set[str]]:
        """``(valid, test)`` speakers of a corpus with ``speakers``; ValueError says what does not fit."""
        speakers = sorted(set(speakers))
        if self.protocol == "random":
            if self.n_valid < 0 or self.n_test < 0 or self.n_valid + self.n_test >= len(speakers):
                raise ValueError(
                    f"cannot hold out {self.n_valid} valid + {self.n_test} test speakers from {len(speakers)} speakers"
                )
            shuffled = list(speakers)
            random.Random(self.seed).shuffle(shuffled)
            return set(shuffled[self.n_test : self.n_test + self.n_valid]), set(shuffled[: self.n_test])
        if self.protocol == "speakers":
            valid, test = set(self.valid), set(self.test)
            for key, chosen in (("split.valid-list", valid), ("split.test-list", test)):
                if not chosen:
                    raise ValueError(f"{key}: split.protocol = 'speakers' needs at least one speaker")
                missing = sorted(chosen - set(speakers))
                if missing:
                    raise ValueError(f"{key}: speaker(s) {', '.join(missing)} not in the corpus")
            if valid & test:
                raise ValueError(f"split.valid-list and split.test-list share {', '.join(sorted(valid & test))}")
        elif self.protocol == "iemocap-loso":
            if not 1 <= self.fold <= 5:
                raise ValueError(f"split.fold: IEMOCAP has sessions 1-5, got {self.fold}")
            foreign = [s for s in speakers if not _IEMOCAP_SPEAKER.fullmatch(s)]
            if foreign:
                raise ValueError(
                    "split.protocol = 'iemocap-loso' needs IEMOCAP speakers (iemocap_S<1-5><F|M>, from "
                    f"`serforget corpus index --format iemocap`); got {', '.join(foreign[:3])}"
                )
            valid, test = {f"iemocap_S{self.fold}F"}, {f"iemocap_S{self.fold}M"}
            missing = sorted((valid | test) - set(speakers))
            if missing:
                raise ValueError(f"split.fold = {self.fold}: speaker(s) {', '.join(missing)} not in the corpus")
        else:
            raise ValueError(f"split.protocol: must be one of {', '.join(SPLIT_PROTOCOLS)}, got {self.protocol!r}")
        if not set(speakers) - valid - test:
            raise ValueError("the split leaves no training speaker")
        return valid, test


def speaker_split(utterances: Sequence[Utterance], spec: SplitSpec = SplitSpec()) -> SpeakerSplit:
    """Split by speaker as ``spec`` says, deterministically; whole speakers go to valid and test."""
    valid, test = spec.held_out([u.speaker for u in utterances])
    return SpeakerSplit(
        train=[u for u in utterances if u.speaker not in test and u.speaker not in valid],
        valid=[u for u in utterances if u.speaker in valid],
        test=[u for u in utterances if u.speaker in test],
    )
