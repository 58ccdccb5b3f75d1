"""Durable file primitives shared by every on-disk format of the project.

Why: manifests, checkpoints, ledgers and releases must never be left half-written when a
process dies mid-write, so every write that matters goes through a temp file in the same
folder, an fsync, an atomic rename and an fsync of the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry so a completed rename survives a power cut."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never a mix."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int = 0o644) -> Path:
    """UTF-8 text variant of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, mode: int = 0o644) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically (stable bytes for hashing)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode=mode)


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks so large weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_dir(path: str | os.PathLike[str], *, what: str) -> Path:
    """Refuse, before any work starts, an output folder that cannot be created or written.

    Why up front: a training run that only fails when it saves its result wastes the run; the
    error names the option (``what``) and the path instead of a traceback from ``mkdir``.
    """
    out = Path(path)
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {out}: {parent} exists and is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{what} {out}: {parent} is not writable")
            return out
    return out


def check_output_file(path: str | os.PathLike[str], *, what: str) -> Path:
    """Refuse an output file path that is a folder or whose folder cannot be created."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{what} {out}: is a folder, expected a file path")
    check_output_dir(out.parent, what=what)
    return out
