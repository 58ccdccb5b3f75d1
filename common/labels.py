"""Canonical emotion names and the label sets (tasks) built from them.

Why: every corpus spells emotions differently; mapping all of them onto one lower-case
vocabulary once, here, keeps manifests comparable and lets a task pick a subset by name.
"""

from __future__ import annotations

CANONICAL_EMOTIONS: tuple[str, ...] = (
    "neutral",
    "calm",
    "happy",
    "sad",
    "angry",
    "fearful",
    "disgust",
    "surprised",
    "boredom",
)

#: The default 4-class task (IEMOCAP convention; IEMOCAP ``exc`` is indexed as ``happy``).
FOUR_CLASS: tuple[str, ...] = ("neutral", "happy", "angry", "sad")

TASKS: dict[str, tuple[str, ...]] = {
    "4class": FOUR_CLASS,
    "all": CANONICAL_EMOTIONS,
}


def task_labels(task: str) -> tuple[str, ...]:
    """Label list of a named task; raises ``ValueError`` naming the unknown task."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def check_emotion(name: str, *, where: str) -> str:
    """Return ``name`` if it is canonical, else raise ``ValueError`` naming ``where`` it came from."""
    if name not in CANONICAL_EMOTIONS:
        raise ValueError(f"{where}: unknown emotion label {name!r}; expected one of {', '.join(CANONICAL_EMOTIONS)}")
    return name
