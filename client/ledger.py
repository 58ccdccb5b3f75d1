"""The node's durable deletion ledger: what a speaker asked to forget, and how far it got.

Why a ledger at all: a deletion request is a promise to the speaker. It must outlive crashes,
restarts and rejected rounds, and the node must be able to show, afterwards, what it deleted.
So every request lives in ``<data_dir>/ledger.sqlite`` (SQLite in WAL mode with
``synchronous=FULL``: a committed change survives a power cut, an interrupted one leaves no
trace) and moves through a fixed life cycle::

    pending --mark_unlearned--> unlearned --mark_applied--> applied --mark_purged--> purged
       ^                            |
       +---------mark_retry---------+   (server rejected the delta or the round timed out)

* ``pending``: recorded; the utterances are excluded from local training from this moment
  (:meth:`Ledger.forgotten_utt_ids`), but no unlearning delta has been sent yet.
* ``unlearned``: a delta was sent in envelope ``envelope_id``, computed on model ``base_version``.
* ``applied``: the server published release ``release_version`` that includes the delta.
* ``purged``: the audio and derived caches are gone; a receipt (file hashes, sizes, time) stays.

Design rules (the reasons are in the docstrings below):

* A request's set of utterances never changes once recorded, because a round may be computing
  the unlearning delta for exactly that set at the same moment. Each utterance therefore belongs
  to at most one request (enforced by a unique index).
* :meth:`Ledger.request_forget` is idempotent: asking again for the same set (or a subset of one
  open request) returns the existing request. Asking for a set that partly overlaps earlier
  requests records a new request holding only the utterances not yet covered; asking for a set
  already fully covered by several earlier requests is rejected with an error naming them.
* Repeating a transition with identical arguments (e.g. the same release announced twice after
  a restart) returns the stored request unchanged; anything else off the diagram above raises
  :class:`LedgerError` naming the request and both states.
* Every transition is appended to an event log (:meth:`Ledger.history`), which also keeps the
  reason given for each retry.

A :class:`Ledger` wraps one SQLite connection and is meant for one thread; other threads and
processes open their own and coordinate through SQLite's locks (write transactions take the
write lock up front, ``BEGIN IMMEDIATE``, so two writers never deadlock on a lock upgrade).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from serforget.common.manifest import IdError, check_id

#: Version of the SQLite schema below; stored in the ``schema_version`` table.
SCHEMA_VERSION = 1

PENDING = "pending"
UNLEARNED = "unlearned"
APPLIED = "applied"
PURGED = "purged"
STATES: tuple[str, ...] = (PENDING, UNLEARNED, APPLIED, PURGED)

#: Legal moves of the life cycle; anything else is refused.
TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({UNLEARNED}),
    UNLEARNED: frozenset({PENDING, APPLIED}),
    APPLIED: frozenset({PURGED}),
    PURGED: frozenset(),
}

#: Names inside a node's data directory that :func:`serforget.client.purge.purge_request` relies on.
LEDGER_FILE = "ledger.sqlite"
MANIFEST_FILE = "manifest.csv"
CACHE_DIR = "cache"

_SCHEMA = f"""
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    whole_speaker INTEGER NOT NULL CHECK (whole_speaker IN (0, 1)),
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    asked_digest TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    envelope_id TEXT,
    base_version INTEGER,
    release_version INTEGER,
    purge_plan TEXT,
    receipt TEXT
);
CREATE INDEX requests_by_state ON requests (state);
CREATE INDEX requests_by_asked ON requests (asked_digest);
CREATE TABLE request_utts (
    request_id TEXT NOT NULL REFERENCES requests (request_id),
    utt_id TEXT NOT NULL,
    PRIMARY KEY (request_id, utt_id)
);
CREATE UNIQUE INDEX request_utts_one_request_per_utt ON request_utts (utt_id);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL REFERENCES requests (request_id),
    from_state TEXT,
    to_state TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX events_by_request ON events (request_id);
"""

_REQUEST_COLUMNS = (
    "request_id, whole_speaker, state, created_at, updated_at, envelope_id, base_version, release_version, receipt"
)


class LedgerError(ValueError):
    """A ledger operation was refused; the message names the request, state or file involved."""


@dataclass(frozen=True)
class DeletionRequest:
    """One speaker request to forget utterances, as stored (a snapshot; re-read after changes)."""

    request_id: str
    utt_ids: tuple[str, ...]
    whole_speaker: bool
    state: str
    created_at: float
    updated_at: float
    envelope_id: str | None
    base_version: int | None
    release_version: int | None
    receipt: dict[str, Any] | None


@dataclass(frozen=True)
class LedgerEvent:
    """One entry of a request's history: a transition with its arguments (e.g. a retry reason)."""

    request_id: str
    from_state: str | None
    to_state: str
    at: float
    detail: dict[str, Any]


class Ledger:
    """The deletion ledger stored at ``path`` (usually ``<data_dir>/ledger.sqlite``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise LedgerError(f"{self.path}: folder {self.path.parent} does not exist")
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            self._configure()
            self._ensure_schema()
        except BaseException:
            self._conn.close()
            raise

    # -- connection life cycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; committed changes are already durable."""
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _configure(self) -> None:
        """WAL + synchronous=FULL: a commit is on disk when it returns; a crash loses no commit."""
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:  # disk full, I/O error, read-only folder: not the file's fault
            raise LedgerError(f"{self.path}: cannot open the ledger for writing ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: not a ledger database ({exc})") from None
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")

    def _ensure_schema(self) -> None:
        """Create the schema on first use; refuse a ledger written by a newer or foreign program.

        The existence check is a plain read so that opening a ledger never waits for another
        process's write transaction; only creation takes the write lock.
        """
        version = self._stored_schema_version()
        if version is None:
            with self._write():
                if self._stored_schema_version() is None:
                    self._create_schema()
                    return
            version = self._stored_schema_version()
        if version != SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: ledger schema version {version}, this program understands {SCHEMA_VERSION}"
            )

    def _stored_schema_version(self) -> int | None:
        tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" not in tables:
            if tables - {"sqlite_sequence"}:
                raise LedgerError(f"{self.path}: SQLite file without a ledger schema_version table")
            return None
        rows = self._conn.execute("SELECT version FROM schema_version").fetchall()
        if len(rows) != 1:
            raise LedgerError(f"{self.path}: schema_version table holds {len(rows)} rows, expected 1")
        return int(rows[0][0])

    def _create_schema(self) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._conn.execute(statement)
        self._conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction holding the write lock from its start: all of it or none of it."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[None]:
        """A read transaction, so a multi-query read sees one consistent snapshot."""
        self._conn.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    # -- recording requests ----------------------------------------------------------------

    def request_forget(
        self,
        *,
        utt_ids: Sequence[str] | None = None,
        whole_speaker: bool = False,
        known_utt_ids: Collection[str],
    ) -> DeletionRequest:
        """Record that the speaker wants ``utt_ids`` (or, with ``whole_speaker``, everything) forgotten.

        ``known_utt_ids`` are the node's utterances (its manifest); an id outside it is refused,
        because a typo must not be acknowledged as a deletion that never happens.

        Returns, without writing anything, an open (non-purged) request that already covers the
        asked set: one recorded from the same asked set, or one whose utterances include it.
        Otherwise records a new ``pending`` request holding the asked ids not yet in any request
        (ids under earlier requests stay with them, since those sets are frozen). If every asked
        id is already under some other requests, raises :class:`LedgerError` naming them.
        """
        asked = _asked_utt_ids(utt_ids=utt_ids, whole_speaker=whole_speaker, known_utt_ids=known_utt_ids)
        digest = _digest_of(asked)
        with self._write():
            existing = self._requests_where("state != ?", (PURGED,))
            covering = self._covering_request(existing, asked=asked, digest=digest)
            if covering is not None:
                return covering
            taken = self._request_of_utts(asked)
            new_ids = sorted(set(asked) - set(taken))
            if not new_ids:
                owners = sorted({f"{rid} ({state})" for rid, state in taken.values()})
                raise LedgerError(
                    f"every asked utt id is already covered by earlier requests {', '.join(owners)}; "
                    "no new request recorded"
                )
            request_id = uuid.uuid4().hex
            now = time.time()
            self._conn.execute(
                "INSERT INTO requests (request_id, whole_speaker, state, asked_digest, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (request_id, int(whole_speaker), PENDING, digest, now, now),
            )
            self._conn.executemany(
                "INSERT INTO request_utts (request_id, utt_id) VALUES (?, ?)",
                [(request_id, utt) for utt in new_ids],
            )
            self._log(
                request_id,
                from_state=None,
                to_state=PENDING,
                at=now,
                detail={"asked": len(asked), "already_covered": sorted(set(taken))},
            )
            return self._fetch(request_id)

    def _covering_request(
        self, candidates: list[DeletionRequest], *, asked: tuple[str, ...], digest: str
    ) -> DeletionRequest | None:
        """The open request that already answers this ask: same asked set first, then a superset."""
        same_ask = {
            row[0]
            for row in self._conn.execute(
                "SELECT request_id FROM requests WHERE asked_digest = ? AND state != ?", (digest, PURGED)
            )
        }
        for request in candidates:
            if request.request_id in same_ask:
                return request
        wanted = set(asked)
        for request in candidates:
            if wanted <= set(request.utt_ids):
                return request
        return None

    def _request_of_utts(self, utt_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Map each already-requested utt id among ``utt_ids`` to (request_id, state)."""
        owners: dict[str, tuple[str, str]] = {}
        for utt in utt_ids:
            row = self._conn.execute(
                "SELECT u.request_id, r.state FROM request_utts u JOIN requests r USING (request_id) "
                "WHERE u.utt_id = ?",
                (utt,),
            ).fetchone()
            if row is not None:
                owners[utt] = (row[0], row[1])
        return owners

    # -- reading ---------------------------------------------------------------------------

    def get(self, request_id: str) -> DeletionRequest:
        """The stored request; :class:`LedgerError` if no request has this id."""
        with self._read():
            return self._fetch(request_id)

    def pending(self) -> list[DeletionRequest]:
        """Requests waiting for an unlearning delta, oldest first."""
        with self._read():
            return self._requests_where("state = ?", (PENDING,))

    def all(self) -> list[DeletionRequest]:
        """Every request ever recorded, oldest first."""
        with self._read():
            return self._requests_where("1 = 1", ())

    def forgotten_utt_ids(self) -> set[str]:
        """Every utt id under any request, whatever its state.

        Local training must skip these from the moment of the request, not from the purge.
        """
        return {row[0] for row in self._conn.execute("SELECT utt_id FROM request_utts")}

    def history(self, request_id: str) -> list[LedgerEvent]:
        """The request's transitions in order, with their arguments (retry reasons included)."""
        with self._read():
            self._fetch(request_id)
            rows = self._conn.execute(
                "SELECT request_id, from_state, to_state, at, detail FROM events WHERE request_id = ? ORDER BY seq",
                (request_id,),
            ).fetchall()
        return [LedgerEvent(row[0], row[1], row[2], row[3], json.loads(row[4])) for row in rows]

    def _fetch(self, request_id: str) -> DeletionRequest:
        _require_id(request_id, what="request id")
        found = self._requests_where("request_id = ?", (request_id,))
        if not found:
            raise LedgerError(f"{self.path}: no deletion request {request_id!r}")
        return found[0]

    def _requests_where(self, condition: str, params: tuple[Any, ...]) -> list[DeletionRequest]:
        """Requests matching a fixed SQL condition (never user text), ordered by creation."""
        rows = self._conn.execute(
            f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE {condition} ORDER BY seq", params
        ).fetchall()
        return [self._request_from_row(row) for row in rows]

    def _request_from_row(self, row: tuple[Any, ...]) -> DeletionRequest:
        request_id = row[0]
        utts = tuple(
            utt
            for (utt,) in self._conn.execute(
                "SELECT utt_id FROM request_utts WHERE request_id = ? ORDER BY utt_id", (request_id,)
            )
        )
        return DeletionRequest(
            request_id=request_id,
            utt_ids=utts,
            whole_speaker=bool(row[1]),
            state=row[2],
            created_at=row[3],
            updated_at=row[4],
            envelope_id=row[5],
            base_version=row[6],
            release_version=row[7],
            receipt=json.loads(row[8]) if row[8] is not None else None,
        )

    # -- transitions -----------------------------------------------------------------------

    def mark_unlearned(self, request_id: str, *, envelope_id: str, base_version: int) -> DeletionRequest:
        """``pending`` -> ``unlearned``: its delta left in ``envelope_id``, computed on ``base_version``."""
        _require_text(envelope_id, field="envelope_id")
        _require_version(base_version, field="base_version")
        with self._write():
            current = self._fetch(request_id)
            if current.state == UNLEARNED and (current.envelope_id, current.base_version) == (
                envelope_id,
                base_version,
            ):
                return current
            _check_transition(current, UNLEARNED)
            return self._move(
                current,
                to_state=UNLEARNED,
                columns={"envelope_id": envelope_id, "base_version": base_version},
                detail={"envelope_id": envelope_id, "base_version": base_version},
            )

    def mark_retry(self, request_id: str, *, reason: str) -> DeletionRequest:
        """``unlearned`` -> ``pending``: the delta was rejected or lost, so send a new one next round.

        The void envelope id and base version are cleared from the request (nothing is in
        flight any more) and kept, with ``reason``, in :meth:`history`.
        """
        _require_text(reason, field="reason")
        with self._write():
            current = self._fetch(request_id)
            _check_transition(current, PENDING)
            return self._move(
                current,
                to_state=PENDING,
                columns={"envelope_id": None, "base_version": None},
                detail={
                    "reason": reason,
                    "envelope_id": current.envelope_id,
                    "base_version": current.base_version,
                },
            )

    def mark_applied(self, request_ids: Sequence[str], *, release_version: int) -> list[DeletionRequest]:
        """``unlearned`` -> ``applied`` for every id at once (all or none): release vN includes them.

        ``release_version`` must be newer than each request's ``base_version``: a release cannot
        contain a delta computed on a model that did not exist yet.
        """
        if isinstance(request_ids, str):
            raise LedgerError(f"request_ids must be a sequence of ids, got the string {request_ids!r}")
        _require_version(release_version, field="release_version")
        marked: list[DeletionRequest] = []
        with self._write():
            for request_id in dict.fromkeys(request_ids):
                current = self._fetch(request_id)
                if current.state == APPLIED and current.release_version == release_version:
                    marked.append(current)
                    continue
                _check_transition(current, APPLIED)
                if current.base_version is not None and release_version <= current.base_version:
                    raise LedgerError(
                        f"request {request_id}: release_version {release_version} is not newer than "
                        f"its base_version {current.base_version}"
                    )
                marked.append(
                    self._move(
                        current,
                        to_state=APPLIED,
                        columns={"release_version": release_version},
                        detail={"release_version": release_version},
                    )
                )
        return marked

    def mark_purged(self, request_id: str, *, receipt: dict[str, Any]) -> DeletionRequest:
        """``applied`` -> ``purged``, keeping ``receipt`` (JSON-serialisable) as the proof of deletion."""
        stored_receipt = _receipt_json(receipt, request_id=request_id)
        with self._write():
            current = self._fetch(request_id)
            if current.state == PURGED and _canonical_json(current.receipt) == stored_receipt:
                return current
            _check_transition(current, PURGED)
            return self._move(
                current,
                to_state=PURGED,
                columns={"receipt": stored_receipt, "purge_plan": None},
                detail={"files": len(receipt.get("files", ()))},
            )

    def _move(
        self,
        current: DeletionRequest,
        *,
        to_state: str,
        columns: dict[str, Any],
        detail: dict[str, Any],
    ) -> DeletionRequest:
        """Write a checked transition and its event inside the caller's write transaction."""
        now = time.time()
        assignments = "".join(f", {name} = ?" for name in columns)
        self._conn.execute(
            f"UPDATE requests SET state = ?, updated_at = ?{assignments} WHERE request_id = ?",
            (to_state, now, *columns.values(), current.request_id),
        )
        self._log(current.request_id, from_state=current.state, to_state=to_state, at=now, detail=detail)
        return self._fetch(current.request_id)

    def _log(
        self, request_id: str, *, from_state: str | None, to_state: str, at: float, detail: dict[str, Any]
    ) -> None:
        self._conn.execute(
            "INSERT INTO events (request_id, from_state, to_state, at, detail) VALUES (?, ?, ?, ?, ?)",
            (request_id, from_state, to_state, at, json.dumps(detail, sort_keys=True)),
        )

    # -- purge plan (used by serforget.client.purge) ------------------------------------------

    def purge_plan(self, request_id: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT purge_plan FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        return json.loads(row[0]) if row is not None and row[0] is not None else None

    def stage_purge_plan(self, request_id: str, *, plan: dict[str, Any]) -> dict[str, Any]:
        """Store the pre-deletion survey (hashes, sizes) before anything is deleted.

        If a plan is already stored (an earlier, interrupted purge), that one is kept and
        returned: it was taken while the files still existed, so its hashes are the real ones.
        """
        with self._write():
            current = self._fetch(request_id)
            if current.state != APPLIED:
                raise LedgerError(f"request {request_id} is {current.state}; only an {APPLIED} request can be purged")
            staged = self.purge_plan(request_id)
            if staged is not None:
                return staged
            self._conn.execute(
                "UPDATE requests SET purge_plan = ? WHERE request_id = ?",
                (json.dumps(plan, sort_keys=True), request_id),
            )
            return plan


# -- validation helpers --------------------------------------------------------------------


def _asked_utt_ids(
    *, utt_ids: Sequence[str] | None, whole_speaker: bool, known_utt_ids: Collection[str]
) -> tuple[str, ...]:
    """The validated, sorted, de-duplicated set of utt ids a forget call asks for."""
    if isinstance(known_utt_ids, str):
        raise LedgerError("known_utt_ids must be a collection of ids, not a single string")
    known = set(known_utt_ids)
    if whole_speaker:
        if utt_ids is not None:
            raise LedgerError("give either utt_ids or whole_speaker=True, not both")
        if not known:
            raise LedgerError("whole_speaker=True but the node knows no utterances")
        return tuple(sorted(known))
    if utt_ids is None:
        raise LedgerError("give utt_ids or whole_speaker=True")
    if isinstance(utt_ids, str):
        raise LedgerError(f"utt_ids must be a sequence of ids, got the string {utt_ids!r}")
    for utt in utt_ids:
        _require_id(utt, what="utt id")
    asked = sorted(set(utt_ids))
    if not asked:
        raise LedgerError("utt_ids is empty: nothing to forget")
    unknown = [u for u in asked if u not in known]
    if unknown:
        raise LedgerError(f"unknown utt ids (not in this node's manifest): {', '.join(unknown)}")
    return tuple(asked)


def _digest_of(utt_ids: Sequence[str]) -> str:
    """Identity of an asked set, so repeating the same ask finds the same request."""
    return hashlib.sha256(json.dumps(sorted(utt_ids)).encode("utf-8")).hexdigest()


def _check_transition(request: DeletionRequest, to_state: str) -> None:
    allowed = TRANSITIONS[request.state]
    if to_state not in allowed:
        options = ", ".join(sorted(allowed)) or "nothing (final state)"
        raise LedgerError(
            f"request {request.request_id}: illegal transition {request.state} -> {to_state}; "
            f"from {request.state} it may move to {options}"
        )


def _require_id(value: object, *, what: str) -> str:
    """An id as :func:`serforget.common.manifest.check_id` defines it, or :class:`LedgerError`."""
    try:
        return check_id(value, what=what)
    except IdError as exc:
        raise LedgerError(str(exc)) from None


def _require_text(value: object, *, field: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise LedgerError(f"{field} must be a non-empty string, got {value!r}")


def _require_version(value: object, *, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LedgerError(f"{field} must be a non-negative integer, got {value!r}")


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


def _receipt_json(receipt: object, *, request_id: str) -> str:
    """Serialise a receipt, refusing what could not be stored or belongs to another request."""
    if not isinstance(receipt, dict):
        raise LedgerError(f"request {request_id}: receipt must be a dict, got {type(receipt).__name__}")
    if receipt.get("request_id", request_id) != request_id:
        raise LedgerError(f"request {request_id}: receipt names another request {receipt['request_id']!r}")
    try:
        return _canonical_json(receipt)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"request {request_id}: receipt is not JSON-serialisable ({exc})") from None
