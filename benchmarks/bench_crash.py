"""Crash safety: SIGKILL the writers of the release registry, the deletion ledger, the replay list and the request owners.

Why: every store that a deletion promise depends on must survive a process dying at any
instruction. This runs, for each store, a writer child process that commits operations in a
loop and, after each commit returns, appends one line describing it to a log file and fsyncs
the log. The parent kills the child with ``SIGKILL`` after a random delay (seeded), then checks
the store against the log:

* **release registry** (:mod:`serforget.common.release`): every release folder verifies against the
  server's public key (no half-written release), every logged release exists, the signed
  index verifies and lists only existing releases with their manifest hashes (it may lag
  behind by the newest releases whose publish was killed before the index write), every release
  that applies deletions has all earlier releases revoked, and the next publish succeeds
  (it is the next child's first operation) and repairs a lagging index;
* **deletion ledger** (:mod:`serforget.client.ledger`): the SQLite file opens, ``PRAGMA
  integrity_check`` is ``ok`` and every logged transition is in the request's history;
* **replay list** (``ServerDir.remember``, ``seen.json``): it parses and holds every logged
  envelope id;
* **request owners** (``ServerDir.bind_requests``, ``request_owners.json``): it parses and holds
  every logged binding with its first owner (a binding never moves).

A commit that completed just before the kill but was not logged yet is allowed (at most one
per trial and store): it is the in-flight operation, and it is counted as ``unlogged``. A
logged operation that is missing is a **lost** record; a record that fails verification is
**corrupted**. Both must be zero.

Children are forked from a ``forkserver`` that has the store modules preloaded, so a trial
costs milliseconds of start-up rather than a fresh interpreter, and the kill lands inside the
store code rather than inside imports.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_crash --trials 50

Writes ``benchmarks/results/crash.json`` and ``benchmarks/results/crash.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from serforget.client.ledger import APPLIED, PENDING, UNLEARNED, Ledger
from serforget.common.fsutil import atomic_write_json, atomic_write_text, sha256_bytes
from serforget.common.release import MANIFEST_NAME, ReleaseError, ReleaseRegistry
from serforget.server.federation import ServerDir

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_VERSION = 1
#: Largest random delay between "child ready" and SIGKILL; several commits fit in it.
DEFAULT_MAX_DELAY_S = 0.25
#: Every n-th release applies a deletion request and revokes all earlier releases.
_REVOKE_EVERY = 3
#: Every n-th ledger request is rejected once by the "server" (unlearned -> pending -> unlearned).
_RETRY_EVERY = 3
_KNOWN_UTTS = 50_000
_FORKSERVER_PRELOAD = ["serforget.common.release", "serforget.client.ledger", "serforget.server.federation"]


@dataclass
class StoreResult:
    """Outcome of the kill trials against one store."""

    store: str
    trials: int = 0
    committed_logged: int = 0
    unlogged_in_flight: int = 0
    lost: int = 0
    corrupted: int = 0
    recovery_failures: int = 0
    evidence: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.corrupted == 0 and self.recovery_failures == 0

    def note(self, kind: str, message: str) -> None:
        """Count a failure of ``kind`` (lost/corrupted/recovery_failures) and keep its description."""
        setattr(self, kind, getattr(self, kind) + 1)
        self.problems.append(message)


# --------------------------------------------------------------------------- logging from children


def _append_fsynced(log: Path, line: str) -> None:
    """Append one line and make it durable before the child's next operation starts."""
    with open(log, "a", encoding="ascii") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _read_log(log: Path) -> list[str]:
    """Complete lines only: a line cut by the kill was never acknowledged."""
    if not log.exists():
        return []
    text = log.read_text(encoding="ascii")
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]


# --------------------------------------------------------------------------- child writers


def _release_writer(root: str, key_bytes: bytes, log: str, ready: Any) -> None:
    """Publish small releases forever; every third applies a request and revokes its elders."""
    key = Ed25519PrivateKey.from_private_bytes(key_bytes)
    registry = ReleaseRegistry(Path(root))
    rng = random.Random(os.getpid())
    sources = Path(tempfile.mkdtemp(prefix="crash-src-"))
    ready.set()
    while True:
        files = {}
        for name in ("model.safetensors", "model.json", "model.onnx"):
            path = sources / name
            path.write_bytes(rng.randbytes(rng.randint(512, 8192)))
            files[name] = path
        number = max(registry.versions(), default=0) + 1
        applies = number % _REVOKE_EVERY == 0
        manifest = registry.publish(
            files=files,
            signing_key=key,
            parent=None,
            applied_request_ids=[f"req-{number}"] if applies else [],
            revoke_previous=applies,
        )
        _append_fsynced(Path(log), str(manifest.version))


def _drive_request(ledger: Ledger, request_id: str, *, number: int, log: Path) -> None:
    """Move one request from wherever it stands to ``applied``, logging each committed step."""
    request = ledger.get(request_id)
    retried = any(event.to_state == PENDING and event.from_state == UNLEARNED for event in ledger.history(request_id))
    while request.state != APPLIED:
        if request.state == PENDING:
            request = ledger.mark_unlearned(request_id, envelope_id=os.urandom(16).hex(), base_version=1)
        elif number % _RETRY_EVERY == 0 and not retried:
            request, retried = ledger.mark_retry(request_id, reason="rejected by the server (crash trial)"), True
        else:
            request = ledger.mark_applied([request_id], release_version=2)[0]
        _append_fsynced(log, f"{request_id} {request.state}")


def _ledger_writer(path: str, log: str, ready: Any) -> None:
    """Finish what an earlier (killed) writer left open, then file and complete requests forever."""
    known = frozenset(f"u{i:05d}" for i in range(_KNOWN_UTTS))
    with Ledger(Path(path)) as ledger:
        existing = ledger.all()
        ready.set()
        for number, request in enumerate(existing):
            _drive_request(ledger, request.request_id, number=number, log=Path(log))
        number = len(existing)
        while True:
            request = ledger.request_forget(utt_ids=[f"u{number:05d}"], known_utt_ids=known)
            _append_fsynced(Path(log), f"{request.request_id} {request.state}")
            _drive_request(ledger, request.request_id, number=number, log=Path(log))
            number += 1


def _seen_writer(root: str, log: str, ready: Any) -> None:
    """Remember accepted envelope ids one at a time, as the ServerApp does before publishing."""
    server = ServerDir(Path(root))
    ready.set()
    while True:
        envelope_id = os.urandom(16).hex()
        server.remember([envelope_id])
        _append_fsynced(Path(log), envelope_id)


def _owners_writer(root: str, log: str, ready: Any) -> None:
    """Bind fresh request ids one at a time, and re-claim an old one for another node, as rounds do."""
    server = ServerDir(Path(root))
    ready.set()
    number = 0
    while True:
        request_id, node = os.urandom(16).hex(), f"node-{number % 7}"
        # a later claim of an owned id by another node must never move it
        stolen = next(iter(server.request_owners()), None)
        claims = {node: [request_id]} if stolen is None else {node: [request_id], "squatter": [stolen]}
        server.bind_requests(claims)
        _append_fsynced(Path(log), f"{request_id} {node}")
        number += 1


# --------------------------------------------------------------------------- verification


def _check_releases(
    registry: ReleaseRegistry, public_key: Ed25519PublicKey, logged: list[str], before: set[int], result: StoreResult
) -> None:
    """Compare the registry after a kill with the log of completed publishes."""
    versions = registry.versions()
    staging = [p for p in registry.root.iterdir() if p.name.startswith(".staging-")]
    result.evidence["staging_leftovers_seen"] = result.evidence.get("staging_leftovers_seen", 0) + len(staging)
    for version in versions:
        try:
            registry.verify(version, public_key=public_key)
        except ReleaseError as exc:
            result.note("corrupted", f"release v{version}: {exc}")
    logged_versions = {int(line) for line in logged}
    for version in sorted(logged_versions - set(versions)):
        result.note("lost", f"release v{version} was logged as published but is missing")
    in_flight = set(versions) - before - logged_versions
    result.unlogged_in_flight += len(in_flight)
    if len(in_flight) > 1:
        result.note("corrupted", f"{len(in_flight)} unlogged releases appeared in one trial: {sorted(in_flight)}")
    revoked = _check_revocations(registry, public_key, versions, result)
    _check_index(registry, public_key, versions, revoked, result)


def _check_revocations(
    registry: ReleaseRegistry, public_key: Ed25519PublicKey, versions: list[int], result: StoreResult
) -> dict[int, str]:
    """A release that applies deletions must never be live next to an older one; returns the revocations."""
    try:
        revoked = registry._revocation_reasons(public_key=public_key)
    except ReleaseError as exc:
        result.note("corrupted", f"revocation log: {exc}")
        return {}
    for version in versions:
        if registry.manifest(version).applied_request_ids:
            live_elders = [v for v in versions if v < version and v not in revoked]
            if live_elders:
                result.note("corrupted", f"v{version} applies deletions but {live_elders} are not revoked")
    return revoked


def _check_index(
    registry: ReleaseRegistry,
    public_key: Ed25519PublicKey,
    versions: list[int],
    revoked: dict[int, str],
    result: StoreResult,
) -> None:
    """The signed index must verify and describe existing releases; it may lag behind the newest ones.

    A lagging index may also still show as live a release that the revocation log already
    revokes (kill between the revocation and the index write); that window is counted as
    ``index_hides_revocation_seen`` (README, "Security and reliability", discusses it and its fix).
    """
    if not registry.has_index():
        if versions:
            result.evidence["index_missing_seen"] = result.evidence.get("index_missing_seen", 0) + 1
        return
    try:
        index = registry.read_index(public_key=public_key)
    except ReleaseError as exc:
        result.note("corrupted", f"index: {exc}")
        return
    listed = {entry.version: entry for entry in index.releases}
    for version, entry in listed.items():
        if version not in versions:
            result.note("corrupted", f"index lists v{version}, which does not exist")
            continue
        manifest_bytes = (registry.path(version) / MANIFEST_NAME).read_bytes()
        if sha256_bytes(manifest_bytes) != entry.manifest_sha256:
            result.note("corrupted", f"index hash of v{version} does not match its manifest")
    if any(not entry.revoked and version in revoked for version, entry in listed.items()):
        result.evidence["index_hides_revocation_seen"] = result.evidence.get("index_hides_revocation_seen", 0) + 1
    unlisted = [v for v in versions if v not in listed]
    if unlisted:
        # A publish killed after its rename but before its index write leaves the index one
        # generation behind; consecutive such kills leave it further behind. It must still be
        # an earlier *state*: only the newest releases may be missing, never one in the middle.
        result.evidence["index_lagging_seen"] = result.evidence.get("index_lagging_seen", 0) + 1
        result.evidence["index_max_lag"] = max(result.evidence.get("index_max_lag", 0), len(unlisted))
        if listed and min(unlisted) < max(listed):
            result.note("corrupted", f"index misses {unlisted} but lists the newer v{max(listed)}")


def _check_ledger(path: Path, logged: list[str], before: int, result: StoreResult) -> int:
    """Compare the ledger's event log with the logged transitions; returns the event count."""
    connection = sqlite3.connect(path)
    try:
        status = connection.execute("PRAGMA integrity_check").fetchone()[0]
        if status != "ok":
            result.note("corrupted", f"integrity_check: {status}")
        events = Counter(connection.execute("SELECT request_id, to_state FROM events").fetchall())
    finally:
        connection.close()
    try:
        with Ledger(path) as ledger:
            ledger.all()
    except Exception as exc:  # noqa: BLE001 - any failure to reopen is the finding being measured
        result.note("recovery_failures", f"ledger does not reopen: {type(exc).__name__}: {exc}")
    wanted = Counter(tuple(line.split(" ", 1)) for line in logged)
    for key, count in wanted.items():
        if events[key] < count:
            result.note("lost", f"transition {key} logged {count}x, ledger holds {events[key]}")
    total = sum(events.values())
    unlogged = total - before - (len(logged) - result.committed_logged)
    result.unlogged_in_flight += max(unlogged, 0)
    if unlogged > 1:
        result.note("corrupted", f"{unlogged} unlogged transitions appeared in one trial")
    return total


def _check_seen(server: ServerDir, logged: list[str], before: set[str], result: StoreResult) -> set[str]:
    try:
        stored = server.seen_ids()
    except (ValueError, KeyError, TypeError) as exc:
        result.note("corrupted", f"{server.seen_path}: unreadable after the kill ({exc})")
        return before
    for envelope_id in sorted(set(logged) - stored):
        result.note("lost", f"envelope id {envelope_id} was logged as remembered but is missing")
    in_flight = stored - before - set(logged)
    result.unlogged_in_flight += len(in_flight)
    if len(in_flight) > 1:
        result.note("corrupted", f"{len(in_flight)} unlogged ids appeared in one trial")
    return stored


def _check_owners(server: ServerDir, logged: list[str], before: dict[str, str], result: StoreResult) -> dict[str, str]:
    try:
        stored = server.request_owners()
    except (ValueError, KeyError, TypeError) as exc:
        result.note("corrupted", f"{server.request_owners_path}: unreadable after the kill ({exc})")
        return before
    for line in logged:
        request_id, node = line.split()
        if request_id not in stored:
            result.note("lost", f"request {request_id} was logged as bound to {node} but is missing")
        elif stored[request_id] != node:
            result.note("corrupted", f"request {request_id} bound to {node} moved to {stored[request_id]}")
    for request_id, node in before.items():
        if stored.get(request_id) != node:
            result.note("corrupted", f"request {request_id} of {node} changed owner or vanished")
    in_flight = set(stored) - set(before) - {line.split()[0] for line in logged}
    result.unlogged_in_flight += len(in_flight)
    if len(in_flight) > 1:
        result.note("corrupted", f"{len(in_flight)} unlogged bindings appeared in one trial")
    return stored


# --------------------------------------------------------------------------- trial loop


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return context


def _kill_after_random_delay(
    context: multiprocessing.context.BaseContext, target: Callable[..., None], args: tuple, *, delay: float
) -> None:
    """Start ``target`` in a child, wait until it is ready, sleep ``delay``, SIGKILL it."""
    ready = context.Event()
    child = context.Process(target=target, args=(*args, ready), daemon=True)
    child.start()
    try:
        if not ready.wait(timeout=60):
            raise RuntimeError(f"crash-trial child {target.__name__} never became ready (exit code {child.exitcode})")
        time.sleep(delay)
        if child.exitcode is not None:
            raise RuntimeError(f"crash-trial child {target.__name__} died on its own with exit code {child.exitcode}")
    finally:
        child.kill()
        child.join()


def release_trials(*, work: Path, trials: int, seed: int, max_delay_s: float = DEFAULT_MAX_DELAY_S) -> StoreResult:
    """Kill a release publisher ``trials`` times; verify the registry after each kill and at the end."""
    result, rng, context = StoreResult(store="release registry"), random.Random(seed), _context()
    started = time.perf_counter()
    key = Ed25519PrivateKey.generate()
    key_bytes = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    registry, log = ReleaseRegistry(work / "releases"), work / "releases.log"
    for _ in range(trials):
        before, logged_before = set(registry.versions()), len(_read_log(log))
        _kill_after_random_delay(
            context, _release_writer, (str(registry.root), key_bytes, str(log)), delay=rng.uniform(0, max_delay_s)
        )
        logged = _read_log(log)
        _check_releases(registry, key.public_key(), logged, before, result)
        result.committed_logged = len(logged)
        result.trials += 1
        if len(logged) == logged_before and set(registry.versions()) == before:
            result.evidence["trials_without_commit"] = result.evidence.get("trials_without_commit", 0) + 1
    _final_release_recovery(registry, key, work, result)
    result.seconds = time.perf_counter() - started
    return result


def _final_release_recovery(registry: ReleaseRegistry, key: Ed25519PrivateKey, work: Path, result: StoreResult) -> None:
    """After the last kill: one more publish must work, clean up, and leave a complete index."""
    source = work / "final.bin"
    source.write_bytes(b"final release")
    try:
        registry.publish(files={"model.onnx": source}, signing_key=key, parent=None)
        index = registry.read_index(public_key=key.public_key())
    except (ReleaseError, OSError) as exc:
        result.note("recovery_failures", f"publish after the last kill failed: {exc}")
        return
    if sorted(entry.version for entry in index.releases) != registry.versions():
        result.note("recovery_failures", "index after the recovery publish does not list every release")
    if any(p.name.startswith(".staging-") for p in registry.root.iterdir()):
        result.note("recovery_failures", "staging leftovers survived the recovery publish")


def ledger_trials(*, work: Path, trials: int, seed: int, max_delay_s: float = DEFAULT_MAX_DELAY_S) -> StoreResult:
    """Kill a ledger writer ``trials`` times; check integrity and the logged transitions each time."""
    result, rng, context = StoreResult(store="deletion ledger"), random.Random(seed + 1), _context()
    started = time.perf_counter()
    path, log = work / "ledger.sqlite", work / "ledger.log"
    events = 0
    for _ in range(trials):
        _kill_after_random_delay(context, _ledger_writer, (str(path), str(log)), delay=rng.uniform(0, max_delay_s))
        logged = _read_log(log)
        events = _check_ledger(path, logged, events, result)
        result.committed_logged = len(logged)
        result.trials += 1
    result.evidence["requests"] = len(Ledger(path).all())
    result.seconds = time.perf_counter() - started
    return result


def seen_trials(*, work: Path, trials: int, seed: int, max_delay_s: float = DEFAULT_MAX_DELAY_S) -> StoreResult:
    """Kill the replay-list writer ``trials`` times; ``seen.json`` must always parse and hold every logged id."""
    result, rng, context = StoreResult(store="replay list (seen.json)"), random.Random(seed + 2), _context()
    started = time.perf_counter()
    server, log = ServerDir(work / "server"), work / "seen.log"
    server.root.mkdir(parents=True, exist_ok=True)
    stored: set[str] = set()
    for _ in range(trials):
        _kill_after_random_delay(context, _seen_writer, (str(server.root), str(log)), delay=rng.uniform(0, max_delay_s))
        logged = _read_log(log)
        stored = _check_seen(server, logged, stored, result)
        result.committed_logged = len(logged)
        result.trials += 1
    result.seconds = time.perf_counter() - started
    return result


def owners_trials(*, work: Path, trials: int, seed: int, max_delay_s: float = DEFAULT_MAX_DELAY_S) -> StoreResult:
    """Kill the request-owner writer ``trials`` times; every logged binding must survive, unmoved."""
    result, rng, context = (
        StoreResult(store="request owners (request_owners.json)"),
        random.Random(seed + 3),
        _context(),
    )
    started = time.perf_counter()
    server, log = ServerDir(work / "server"), work / "owners.log"
    server.root.mkdir(parents=True, exist_ok=True)
    stored: dict[str, str] = {}
    for _ in range(trials):
        _kill_after_random_delay(
            context, _owners_writer, (str(server.root), str(log)), delay=rng.uniform(0, max_delay_s)
        )
        logged = _read_log(log)
        stored = _check_owners(server, logged, stored, result)
        result.committed_logged = len(logged)
        result.trials += 1
    result.seconds = time.perf_counter() - started
    return result


STORES: dict[str, Callable[..., StoreResult]] = {
    "release": release_trials,
    "ledger": ledger_trials,
    "seen": seen_trials,
    "owners": owners_trials,
}


def run_all(
    *,
    work: Path,
    trials: int,
    seed: int,
    max_delay_s: float = DEFAULT_MAX_DELAY_S,
    stores: Sequence[str] = tuple(STORES),
) -> list[StoreResult]:
    """Every store's trials, each in its own sub-folder of ``work``."""
    results = []
    for name in stores:
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        results.append(STORES[name](work=folder, trials=trials, seed=seed, max_delay_s=max_delay_s))
    return results


# --------------------------------------------------------------------------- report


def to_markdown(results: Sequence[StoreResult], *, trials: int, seed: int, seconds: float) -> str:
    lines = [
        "# Crash safety: SIGKILL during writes",
        "",
        f"Generated by `benchmarks/bench_crash.py`: {trials} kill trials per store (seed {seed}), "
        f"{seconds:.1f} s wall, Python {platform.python_version()}, {os.cpu_count()} CPUs.",
        "",
        "A child commits operations in a loop and logs each one (fsynced) after it returns; the parent "
        "SIGKILLs it after a random delay and checks the store against the log. *Unlogged in flight* = "
        "a commit that finished just before the kill, before its log line (allowed, at most one per trial). "
        "*Lost* = logged but missing; *corrupted* = fails verification or breaks an invariant; "
        "*recovery failures* = the store does not reopen or the next write fails.",
        "",
        "| store | trials | logged commits | unlogged in flight | lost | corrupted | recovery failures | evidence | s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        evidence = ", ".join(f"{k} {v}" for k, v in sorted(r.evidence.items())) or "-"
        lines.append(
            f"| {r.store} | {r.trials} | {r.committed_logged} | {r.unlogged_in_flight} | {r.lost} | {r.corrupted} | "
            f"{r.recovery_failures} | {evidence} | {r.seconds:.1f} |"
        )
    problems = [f"- {r.store}: {p}" for r in results for p in r.problems]
    lines += ["", "## Problems", "", *(problems or ["None."]), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50, help="kill trials per store (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=DEFAULT_MAX_DELAY_S, help="largest delay before SIGKILL, s")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where crash.json and crash.md go")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-crash-") as tmp:
        results = run_all(work=Path(tmp), trials=args.trials, seed=args.seed, max_delay_s=args.max_delay)
    seconds = time.perf_counter() - started
    document: dict[str, Any] = {
        "result_version": RESULT_VERSION,
        "trials_per_store": args.trials,
        "seed": args.seed,
        "max_delay_s": args.max_delay,
        "seconds": seconds,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "stores": [asdict(r) | {"ok": r.ok} for r in results],
    }
    atomic_write_json(args.out_dir / "crash.json", document)
    atomic_write_text(
        args.out_dir / "crash.md", to_markdown(results, trials=args.trials, seed=args.seed, seconds=seconds)
    )
    print(to_markdown(results, trials=args.trials, seed=args.seed, seconds=seconds))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
