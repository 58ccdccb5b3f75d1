"""Start long-running programs with PID files, and stop exactly the processes that were started.

Why PID files with a start time: a clean stop must end the SuperLink and SuperNodes this tool
started - and nothing else, not another user's Flower processes and not an unrelated program
that inherited a recycled PID. Each program is started as the leader of a new session (its own
process group), so the helpers it spawns (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``) are stopped with it. The PID file records the leader's PID and its kernel
start time (``/proc/PID/stat`` field 22); a stop signals the group and the leader's descendants,
and only processes that started no earlier than the leader (never a recycled PID).

PID file (``RUN/pids/NAME.json``, atomic, ``format_version`` 1)::

    {"format_version": 1, "name": ..., "pid": ..., "start_ticks": ..., "argv": [...], "log": ...}

Programs start with umask 077 and their logs are 0600 in a 0700 folder: the SuperLink's state
database, its logs (which name runs and nodes) and whatever a ServerApp writes stay readable by
the service account only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from serforget.common.fsutil import atomic_write_json

PIDFILE_FORMAT_VERSION = 1
#: what started programs may not grant: group and others get nothing
PROCESS_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700, also when it already existed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


class ProcessError(RuntimeError):
    """A managed process could not be started, found or stopped; the message names it."""


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` split after the command name (which may hold spaces); None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """Kernel start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] == "Z"


def _process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, start_ticks) of every live, non-zombie process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and fields[0] != "Z":
                table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def _tree_members(leader: int, *, not_before: int) -> list[int]:
    """The leader's process group plus every descendant of it, started no earlier than the leader.

    Descendants matter because Flower detaches some helpers into their own session
    (``flower-superlink`` starts ``flower-superexec`` with ``start_new_session``, which in turn
    runs ``flwr-serverapp``): a group signal alone would leave the ServerApp running.
    """
    table = _process_table()
    found = {pid for pid, (_, pgid, ticks) in table.items() if pgid == leader and ticks >= not_before}
    frontier = set(found)
    while frontier:
        children = {pid for pid, (ppid, _, ticks) in table.items() if ppid in frontier and ticks >= not_before} - found
        found |= children
        frontier = children
    return sorted(found)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@dataclass(frozen=True)
class ManagedProcess:
    """One started program, as recorded in its PID file."""

    name: str
    pid: int
    start_ticks: int
    argv: tuple[str, ...]
    log: Path

    def is_running(self) -> bool:
        """True while the leader we started is alive (a recycled PID does not count)."""
        return start_ticks(self.pid) == self.start_ticks and not _is_zombie(self.pid)

    def members(self) -> list[int]:
        """Every live process of our group and every descendant: the leader and what it spawned."""
        return _tree_members(self.pid, not_before=self.start_ticks)

    def signal(self, sig: int) -> list[int]:
        """Send ``sig`` to every member of the group; returns the PIDs signalled."""
        targets = self.members()
        _signal_all(targets, sig)
        return targets

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ProcessTable:
    """The PID files of one deployment run directory (``RUN/pids``)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / "pids"
        self.logs = Path(run_dir) / "logs"
        self._children: dict[int, subprocess.Popen] = {}

    def _pidfile(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def start(
        self, *, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> ManagedProcess:
        """Start ``argv`` in a new session, logging to ``RUN/logs/NAME.log``, and record it."""
        existing = self.get(name)
        if existing is not None and existing.is_running():
            raise ProcessError(f"{name} is already running (pid {existing.pid}, {self._pidfile(name)})")
        private_dir(self.logs)
        private_dir(self.dir)
        log = self.logs / f"{name}.log"
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # a log left 0644 by an older version is tightened
        with os.fdopen(fd, "ab") as out:
            child = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                umask=PROCESS_UMASK,
            )
        ticks = start_ticks(child.pid)
        if ticks is None:
            child.wait()
            raise ProcessError(f"{name} exited at once (status {child.returncode}); see {log}")
        self._children[child.pid] = child
        process = ManagedProcess(name, child.pid, ticks, tuple(argv), log)
        atomic_write_json(
            self._pidfile(name),
            {
                "format_version": PIDFILE_FORMAT_VERSION,
                "name": name,
                "pid": child.pid,
                "start_ticks": ticks,
                "argv": list(argv),
                "log": str(log),
            },
        )
        return process

    def get(self, name: str) -> ManagedProcess | None:
        path = self._pidfile(name)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise ProcessError(f"{path}: not valid JSON ({exc})") from None
        if raw.get("format_version") != PIDFILE_FORMAT_VERSION:
            raise ProcessError(f"{path}: unsupported format_version {raw.get('format_version')!r}")
        return ManagedProcess(
            raw["name"], int(raw["pid"]), int(raw["start_ticks"]), tuple(raw["argv"]), Path(raw["log"])
        )

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json")) if self.dir.is_dir() else []

    def exit_status(self, name: str) -> int | None:
        """Exit status of a process this table started and that has ended (None while running/unknown)."""
        process = self.get(name)
        child = self._children.get(process.pid) if process else None
        return child.poll() if child is not None else None

    def wait_exit(self, name: str, *, timeout: float) -> int | None:
        """Wait (bounded) for a process this table started to end; its status, or None on timeout."""
        process = self.get(name)
        child = self._children.get(process.pid) if process else None
        if child is None:
            raise ProcessError(f"{name}: not started by this process table")
        try:
            return child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, name: str, *, sig: int = signal.SIGKILL) -> list[int]:
        """Signal a whole managed group at once (fault injection: SIGKILL = the host lost power)."""
        process = self.get(name)
        if process is None:
            raise ProcessError(f"{name}: no PID file in {self.dir}")
        targets = process.signal(sig)
        self._reap(process.pid)
        return targets

    def stop(self, name: str, *, timeout: float = 15.0) -> bool:
        """SIGTERM the group, SIGKILL what is left after ``timeout``, remove the PID file.

        Returns True if something was running. A PID file whose processes are gone is simply removed.
        """
        process = self.get(name)
        if process is None:
            return False
        # snapshot the tree while the leader lives: orphans are re-parented and would drop out of it
        snapshot = {pid: start_ticks(pid) for pid in process.members()}
        alive = lambda: [pid for pid, ticks in snapshot.items() if start_ticks(pid) == ticks and not _is_zombie(pid)]
        _signal_all(list(snapshot), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive() and time.monotonic() < deadline:
            self._reap(process.pid)
            time.sleep(0.1)
        if alive():
            _signal_all(alive(), signal.SIGKILL)
            time.sleep(0.2)
        self._reap(process.pid)
        if alive():
            raise ProcessError(f"{name}: processes {alive()} survived SIGKILL")
        was_running = bool(snapshot)
        self._pidfile(name).unlink(missing_ok=True)
        return was_running

    def stop_all(self, *, timeout: float = 15.0) -> list[str]:
        """Stop every recorded process, SuperNodes before the SuperLink (names sorted reverse)."""
        stopped = []
        for name in sorted(self.names(), key=lambda n: (n == "superlink", n)):
            if self.stop(name, timeout=timeout):
                stopped.append(name)
        return stopped

    def _reap(self, pid: int) -> None:
        child = self._children.get(pid)
        if child is not None:
            child.poll()
