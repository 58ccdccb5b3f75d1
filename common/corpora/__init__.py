"""Corpus indexers: map a real corpus's on-disk layout to canonical :class:`Utterance` rows.

Why: RAVDESS, CREMA-D, EmoDB and IEMOCAP each encode speaker and emotion differently (file-name
fields or separate label files). Each indexer turns its layout into the project's one vocabulary
(:mod:`serforget.common.labels`), with absolute paths, sorted and with unique ids, and lists every file it
refused together with the reason, so nothing is guessed and nothing is dropped silently. Write
the result with :func:`serforget.common.manifest.write_manifest`.

The synthetic acted-emotion corpus, the project's default data, lives in
:mod:`serforget.common.corpora.synth` (not imported here so indexing does not pull in torch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from serforget.common.corpora import cremad, emodb, iemocap, ravdess
from serforget.common.corpora._common import IndexResult, Skipped

__all__ = ["FORMATS", "IndexResult", "Skipped", "index_corpus"]

_INDEXERS: dict[str, Callable[[Path], IndexResult]] = {
    "ravdess": ravdess.index,
    "cremad": cremad.index,
    "emodb": emodb.index,
    "iemocap": iemocap.index,
}

#: Names accepted by :func:`index_corpus`.
FORMATS: tuple[str, ...] = tuple(_INDEXERS)


def index_corpus(*, fmt: str, root: Path) -> IndexResult:
    """Index the corpus of format ``fmt`` stored under ``root``.

    Raises ``ValueError`` for an unknown format or a root without that format's layout (or
    without a single usable utterance), and ``FileNotFoundError`` if ``root`` does not exist.
    """
    try:
        indexer = _INDEXERS[fmt]
    except KeyError:
        raise ValueError(f"unknown corpus format {fmt!r}; known formats: {', '.join(FORMATS)}") from None
    return indexer(Path(root))
