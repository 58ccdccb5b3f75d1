"""Purge: delete an applied deletion request's audio and the node's caches, keep a receipt.

Why its own file: the ledger (:mod:`serforget.client.ledger`) records what a speaker asked and
how far it got; this module is the one place on the device that deletes files. It only ever
deletes inside the node's data dir, walking from a directory descriptor without following links,
and it is safe to rerun after a crash at any step (the survey is stored in the ledger before the
first deletion, so the receipt keeps the true hashes).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serforget.client.ledger import APPLIED, CACHE_DIR, MANIFEST_FILE, PURGED, DeletionRequest, Ledger, LedgerError
from serforget.common.fsutil import sha256_file
from serforget.common.manifest import read_manifest, write_manifest

#: Version of the purge receipt layout; stored in every receipt as ``receipt_version``.
RECEIPT_VERSION = 1


def purge_request(
    *, data_dir: Path, ledger: Ledger, request_id: str, manifest_path: Path | None = None
) -> dict[str, Any]:
    """Delete an ``applied`` request's audio and the node's derived caches; return the receipt.

    Steps, each safe to repeat, so a rerun after a crash at any point completes the purge:

    1. Survey: for each utterance, its audio file (from the manifest, default
       ``<data_dir>/manifest.csv``) with SHA-256 and size, and the files under
       ``<data_dir>/cache``. The survey is stored in the ledger *before* any deletion, so the
       receipt keeps the true hashes even if the process dies right after deleting a file.
       A file already missing at survey time is recorded with ``status: "already_gone"``; an
       utterance absent from the manifest with ``status: "not_in_manifest"``.
    2. Delete the audio files (only inside ``data_dir``: a manifest pointing elsewhere, e.g. at
       a shared corpus, is refused before anything is deleted). Deletion walks from a file
       descriptor of ``data_dir`` one component at a time with ``O_NOFOLLOW``, re-checking
       every stored plan path, so a folder swapped for a symlink after the survey (say after
       a crash) is refused with an error naming it instead of followed out of the data dir;
       once it is put right the same call completes the purge.
    3. Delete the whole ``<data_dir>/cache`` folder. Why all of it: caches may hold pooled
       artefacts (normalisation statistics, feature batches) derived from the forgotten audio
       that no file name ties to an utterance, and every cache can be rebuilt from the audio
       that remains. A ``cache`` that is a symlink is unlinked, never followed.
    4. Rewrite the manifest atomically without the request's rows.
    5. ``mark_purged`` with the receipt ``{receipt_version, request_id, release_version, files:
       [{utt_id, path, sha256, size, status}], cache_files, purged_at}`` (paths relative to
       ``data_dir``).

    An already ``purged`` request returns its stored receipt; any other state is refused.
    """
    request = ledger.get(request_id)
    if request.state == PURGED:
        return _stored_receipt(request)
    if request.state != APPLIED:
        raise LedgerError(f"request {request_id} is {request.state}; only an {APPLIED} request can be purged")
    root = Path(data_dir).resolve()
    manifest = Path(manifest_path) if manifest_path is not None else root / MANIFEST_FILE
    plan = ledger.purge_plan(request_id)
    if plan is None:
        plan = ledger.stage_purge_plan(request_id, plan=_survey(request, root=root, manifest=manifest))
    root_fd = _open_data_dir(root)
    try:
        # the stored plan is re-validated here: it may predate a folder being swapped for a link
        _delete_audio(plan["files"], root=root, root_fd=root_fd)
        _remove_cache_dir(root / CACHE_DIR, root_fd=root_fd)
    finally:
        os.close(root_fd)
    _rewrite_manifest_without(manifest, utt_ids=set(request.utt_ids))
    receipt = {
        "receipt_version": RECEIPT_VERSION,
        "request_id": request_id,
        "release_version": request.release_version,
        "files": plan["files"],
        "cache_files": plan["cache_files"],
        "purged_at": time.time(),
    }
    return _stored_receipt(ledger.mark_purged(request_id, receipt=receipt))


def _stored_receipt(request: DeletionRequest) -> dict[str, Any]:
    """A purged request's receipt; its absence means the ledger file was altered by hand."""
    if request.receipt is None:
        raise LedgerError(f"request {request.request_id} is {PURGED} but has no receipt stored")
    return request.receipt


def _survey(request: DeletionRequest, *, root: Path, manifest: Path) -> dict[str, Any]:
    """Hash and size every audio file of the request and list the caches, deleting nothing."""
    rows = {utt.utt_id: utt.path for utt in read_manifest(manifest)}
    files = [_survey_audio(utt_id, audio=rows.get(utt_id), root=root, manifest=manifest) for utt_id in request.utt_ids]
    return {"files": files, "cache_files": _list_cache_files(root / CACHE_DIR, root=root)}


def _survey_audio(utt_id: str, *, audio: Path | None, root: Path, manifest: Path) -> dict[str, Any]:
    """One receipt entry; refuses a path outside ``root`` so a purge never deletes foreign files."""
    if audio is None:
        return {"utt_id": utt_id, "path": None, "sha256": None, "size": None, "status": "not_in_manifest"}
    audio = audio.resolve()
    if not audio.is_relative_to(root):
        raise LedgerError(
            f"{manifest}: audio of {utt_id!r} at {audio} lies outside the data dir {root}; refusing to delete it"
        )
    entry: dict[str, Any] = {"utt_id": utt_id, "path": audio.relative_to(root).as_posix()}
    if audio.is_file():
        return entry | {"sha256": sha256_file(audio), "size": audio.stat().st_size, "status": "deleted"}
    if audio.exists():
        raise LedgerError(f"{manifest}: audio of {utt_id!r} at {audio} is not a regular file")
    return entry | {"sha256": None, "size": None, "status": "already_gone"}


def _list_cache_files(cache: Path, *, root: Path) -> list[str]:
    """Regular files under ``cache``, never looking through a symlink (the cache itself or inside)."""
    if cache.is_symlink() or not cache.is_dir():
        return []
    found = []
    for folder, _dirs, names in os.walk(cache, followlinks=False):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def _open_data_dir(root: Path) -> int:
    """A directory descriptor for the (already resolved) data dir: every deletion starts from it."""
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise LedgerError(f"{root}: cannot open the data dir ({exc.strerror})") from None


def _plan_parts(relpath: object, *, root: Path) -> list[str]:
    """Components of a stored plan path, refusing anything that is not a plain path under ``root``."""
    if not isinstance(relpath, str) or not relpath:
        raise LedgerError(f"{root}: purge plan holds a malformed path {relpath!r}")
    parts = relpath.split("/")
    if relpath.startswith("/") or any(part in ("", ".", "..") or "\x00" in part for part in parts):
        raise LedgerError(f"{root}: purge plan path {relpath!r} does not stay inside the data dir; refusing it")
    return parts


def _open_folder_at(root_fd: int, parts: Sequence[str], *, root: Path) -> int | None:
    """Open ``root/parts...`` one component at a time without following links.

    ``None`` when a component is missing (a rerun: the folder is already gone). A component
    that is a symlink or not a folder raises :class:`LedgerError` naming it.
    """
    fd = os.dup(root_fd)
    for depth, part in enumerate(parts):
        try:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            where = root.joinpath(*parts[: depth + 1])
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise LedgerError(
                    f"{where}: is a symlink or not a folder; the purge never follows a link out of the data dir "
                    f"{root} - replace it with the real folder and run the purge again"
                ) from None
            raise LedgerError(f"{where}: cannot open ({exc.strerror})") from None
        os.close(fd)
        fd = child
    return fd


def _delete_audio(files: list[dict[str, Any]], *, root: Path, root_fd: int) -> None:
    """Unlink the surveyed audio (missing ones are fine on a rerun) and flush the deletions."""
    for entry in files:
        if entry["path"] is None:
            continue
        parts = _plan_parts(entry["path"], root=root)
        folder_fd = _open_folder_at(root_fd, parts[:-1], root=root)
        if folder_fd is None:
            continue
        try:
            os.unlink(parts[-1], dir_fd=folder_fd)  # removes a link itself, never its target
            os.fsync(folder_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LedgerError(f"{root / entry['path']}: cannot delete ({exc.strerror})") from None
        finally:
            os.close(folder_fd)


def _remove_cache_dir(cache: Path, *, root_fd: int) -> None:
    """Delete ``cache`` (a direct child of the data dir) without following any symlink."""
    try:
        info = os.lstat(cache.name, dir_fd=root_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        # fd-based rmtree: it checks the folder it opened is the one it lstat-ed, and never follows links inside
        shutil.rmtree(cache.name, dir_fd=root_fd)
    else:
        os.unlink(cache.name, dir_fd=root_fd)  # a symlink (or stray file) named cache: drop the name only
    os.fsync(root_fd)


def _rewrite_manifest_without(manifest: Path, *, utt_ids: set[str]) -> None:
    """Drop the forgotten rows, atomically; untouched when none is left (a rerun)."""
    rows = read_manifest(manifest)
    keep = [utt for utt in rows if utt.utt_id not in utt_ids]
    if len(keep) != len(rows):
        write_manifest(manifest, keep)
