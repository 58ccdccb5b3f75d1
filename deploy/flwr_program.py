"""The one place that runs Flower's ``flwr`` program: environment, run-config text, status.

Why a module of its own: ``serforget simulate`` and the deployment engine both drive ``flwr`` as
a program (never by importing Flower), and both must agree on how values survive ``--run-config``,
which environment the program sees, and how a run's final status is read (``flwr run`` exits 0
even when the ServerApp fails).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from serforget.common.fsutil import atomic_write_text
from serforget.common.settings import flatten

#: the environment variables Flower's CLI reads for the ports of the local SuperLink it starts for
#: ``address = ":local:"`` (flwr/cli/constant.py; defaults 39091 and 39093 on every machine)
LOCAL_HTTP_PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
LOCAL_CONTROL_PORT_ENV = "FLWR_LOCAL_CONTROL_API_PORT"


def flwr_env(home: Path, *, local_ports: tuple[int, int] | None = None) -> dict[str, str]:
    """Environment of every Flower program: this FLWR_HOME, this venv's programs, no telemetry or installs.

    ``local_ports`` (HTTP API, Control API) moves the local SuperLink of ``address = ":local:"``
    off Flower's fixed defaults. Why: ``flwr run`` reuses any SuperLink answering on the default
    port, so a second simulation on the machine would otherwise join the first one's SuperLink.
    Every later ``flwr`` call of the run must get the same environment to reach that SuperLink.
    """
    bin_dir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
    }
    if local_ports is not None:
        env[LOCAL_HTTP_PORT_ENV], env[LOCAL_CONTROL_PORT_ENV] = (str(p) for p in local_ports)
    return env


def free_local_ports() -> tuple[int, int]:
    """Two distinct TCP ports free on 127.0.0.1 right now (the OS picks them: no fixed range to collide in)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        http, control = (sock.getsockname()[1] for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    return http, control


_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")  # the pattern `flwr run --run-config` uses


def parse_overrides(text: str) -> dict:
    """Flower's ``k=v k2='a b'`` syntax (TOML values), parsed the way ``flwr run`` parses it.

    Dotted keys (``unlearn.lr=3e-4``) are TOML dotted keys: Flower nests then flattens them back
    to ``"unlearn.lr"``, and so does this function, so the result has the keys a ServerApp's
    ``Context.run_config`` will hold. Which keys and values are valid is
    :meth:`serforget.common.settings.RunSettings.from_mapping`'s to say.
    """
    try:
        return flatten(tomllib.loads("\n".join(f"{k} = {v}" for k, v in _PAIR.findall(text))))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--run-config {text!r} is not valid k=v TOML pairs ({exc})") from None


def toml_value(value: object) -> str:
    """A value that survives ``flwr run --run-config`` (strings in single quotes: JSON inside stays intact)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return json.dumps(text)
    raise ValueError(f"run-config value {text!r} holds both quote characters")


def write_flower_home(home: Path, *, num_supernodes: int, cpus_per_node: int, gpus_per_node: float = 0.0) -> None:
    """The Flower connection config of a local simulation: node count and per-node CPU/GPU share.

    ``gpus_per_node`` is Ray's ``num_gpus`` per node actor (fractions share a GPU); Ray hides
    the GPU from a node that reserves none.
    """
    if num_supernodes < 1:
        raise ValueError(f"a simulation needs at least one SuperNode, got {num_supernodes}")
    if cpus_per_node < 1 or gpus_per_node < 0:
        raise ValueError(f"cpus-per-node must be >= 1 and gpus-per-node >= 0, got {cpus_per_node} and {gpus_per_node}")
    atomic_write_text(
        home / "config.toml",
        "\n".join(
            [
                "[superlink]",
                'default = "local"',
                "",
                "[superlink.local]",
                'address = ":local:"',
                f"options.num-supernodes = {num_supernodes}",
                f"options.backend.client-resources.num-cpus = {cpus_per_node}",
                f"options.backend.client-resources.num-gpus = {float(gpus_per_node)!r}",
                "",
            ]
        ),
    )


def run_flwr(args: list[str], env: dict, *, capture: bool = True) -> subprocess.CompletedProcess:
    """Run ``flwr ARGS`` from this environment (output captured unless streamed to the terminal)."""
    exe = shutil.which("flwr", path=env["PATH"])
    if exe is None:
        raise FileNotFoundError("the `flwr` program is not installed in this environment")
    return subprocess.run([exe, *args], env=env, text=True, capture_output=capture, check=False)


def run_status(run_id: str, env: dict) -> dict:
    out = run_flwr(["list", "--run-id", run_id, "--format", "json"], env)
    try:
        return json.loads(out.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        return {"status": "unknown", "status-details": out.stdout + out.stderr}


def is_our_local_superlink(argv: list[str], home: Path, port: str | None = None) -> bool:
    """Whether a process's argv is the local SuperLink ``flwr`` started for this FLWR_HOME (and port).

    Flower starts it as ``flower-superlink ... --log-file $FLWR_HOME/local-superlink/superlink.log``;
    the argument must equal that path exactly (a substring test would also match a FLWR_HOME
    that merely ends in this one's path), and with ``port`` the ``--port`` argument must match.
    """
    if not argv or not any(os.path.basename(a) == "flower-superlink" for a in argv[:2]):
        return False
    value = lambda flag: argv[argv.index(flag) + 1] if flag in argv[:-1] else None
    if value("--log-file") != str(home / "local-superlink" / "superlink.log"):
        return False
    return port is None or value("--port") == str(port)


def stop_local_superlink(home: Path, *, port: str | None = None, timeout: float = 15.0) -> list[int]:
    """End the local SuperLink that `flwr run` spawned for this FLWR_HOME (and nothing else).

    Only this user's processes whose argv ``is_our_local_superlink``: another run's SuperLink,
    even one started from a FLWR_HOME nested in this one, keeps running. Returns once every one
    of them has exited (SIGTERM, then SIGKILL after ``timeout`` seconds): a caller that exits right
    after must not leave a SuperLink that is still shutting down, and a busy machine can take a
    while to deliver the signal and run Flower's shutdown.
    """
    stopped = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid != os.getuid():
                continue
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if is_our_local_superlink(argv, home, port):
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                continue
            stopped.append(int(proc.name))
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait_s
        left = [pid for pid in stopped if not _exited(pid)]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [pid for pid in left if not _exited(pid)]
        if not left:
            break
        if sig == signal.SIGTERM:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return stopped


def _exited(pid: int) -> bool:
    """Whether a process is gone or a zombie (exited, waiting for a parent that may never reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def run_config_text(values: dict) -> str:
    """``k=v`` pairs for ``flwr run --run-config`` that Flower parses back to the same values."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())
