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
import subprocess
import sys
import tomllib
from pathlib import Path

from serforget.common.fsutil import atomic_write_text


def flwr_env(home: Path) -> dict[str, str]:
    """Environment of every Flower program: this FLWR_HOME, this venv's programs, no telemetry or installs."""
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}


_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")  # the pattern `flwr run --run-config` uses


def parse_overrides(text: str) -> dict:
    """Flower's ``k=v k2='a b'`` syntax (TOML values), parsed the way ``flwr run`` parses it."""
    try:
        return tomllib.loads("\n".join(f"{k} = {v}" for k, v in _PAIR.findall(text)))
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


def write_flower_home(home: Path, *, num_supernodes: int, cpus_per_node: int) -> None:
    atomic_write_text(home / "config.toml", "\n".join([
        "[superlink]", 'default = "local"', "", "[superlink.local]", 'address = ":local:"',
        f"options.num-supernodes = {num_supernodes}",
        f"options.backend.client-resources.num-cpus = {cpus_per_node}", "",
    ]))


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


def stop_local_superlink(home: Path) -> list[int]:
    """End the local SuperLink that `flwr run` spawned for this FLWR_HOME (and nothing else)."""
    marker = str(home / "local-superlink")
    stopped = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and marker in cmdline:
            os.kill(int(proc.name), signal.SIGTERM)
            stopped.append(int(proc.name))
    return stopped


def run_config_text(values: dict) -> str:
    """``k=v`` pairs for ``flwr run --run-config`` that Flower parses back to the same values."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())
