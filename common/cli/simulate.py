"""``serforget simulate``: the main job - ``flwr run .`` of the default scenario, checked.

Why a wrapper: ``flwr run`` exits 0 even when the ServerApp fails, and a simulation needs one
SuperNode per speaker. The wrapper writes a Flower connection config (``$FLWR_HOME/config.toml``)
whose local simulation has exactly that many SuperNodes, runs ``flwr run .``, follows the log,
reads the run's final status and the report's presence, stops the local SuperLink it started,
and exits non-zero on any failure. It runs ``flwr`` as a program: no Flower import here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from common.fsutil import atomic_write_text
from common.settings import RunSettings


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("simulate", help="run the default federated scenario with `flwr run .` and check it")
    sim.add_argument("--app", type=Path, default=Path("."), help="the Flower app folder (pyproject.toml)")
    sim.add_argument("--work-dir", type=Path, default=Path("runs/sim"), help="devices, server, releases and report")
    sim.add_argument("--flwr-home", type=Path, default=Path(".flwr"), help="Flower CLI home for this project")
    sim.add_argument("--run-config", default="", help='extra overrides, e.g. "num-rounds=5 elastic=false"')
    sim.add_argument("--fresh", action="store_true", help="discard devices/server/report (keeps the corpus) and rerun")
    sim.add_argument("--cpus-per-node", type=int, default=1)
    sim.set_defaults(handler=_simulate)


def app_settings(app: Path, overrides: dict) -> RunSettings:
    """The run's settings: pyproject's ``[tool.flwr.app.config]`` with the overrides applied."""
    with open(app / "pyproject.toml", "rb") as handle:
        config = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    return RunSettings.from_mapping({**config, **overrides})


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


def _flwr(args: list[str], env: dict, *, capture: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("flwr", path=env["PATH"])
    if exe is None:
        raise FileNotFoundError("the `flwr` program is not installed in this environment")
    return subprocess.run([exe, *args], env=env, text=True, capture_output=capture, check=False)


def run_status(run_id: str, env: dict) -> dict:
    out = _flwr(["list", "--run-id", run_id, "--format", "json"], env)
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


def _simulate(args: argparse.Namespace) -> int:
    app, work, home = args.app.resolve(), args.work_dir.resolve(), args.flwr_home.resolve()
    overrides = {**parse_overrides(args.run_config), "work-dir": str(work)}
    cfg = app_settings(app, overrides)
    report_path = work / "report" / "report.json"
    settings = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    if args.fresh:
        for name in ("nodes", "server", "report"):
            shutil.rmtree(work / name, ignore_errors=True)
    elif report_path.exists() and json.loads(report_path.read_text()).get("settings") == settings:
        print(f"serforget: the scenario already ran with these settings; report: {report_path} (use --fresh to rerun)")
        print((work / "report" / "report.md").read_text())
        return 0
    elif (work / "server").exists():
        print(f"serforget: {work} holds an earlier run with other settings or an unfinished one; rerun with --fresh",
              file=sys.stderr)
        return 2
    n_nodes = cfg.synth_speakers - cfg.valid_speakers - cfg.test_speakers
    write_flower_home(home, num_supernodes=n_nodes, cpus_per_node=args.cpus_per_node)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
    started = time.time()
    try:
        submitted = _flwr(["run", str(app), "--format", "json", "--run-config", run_config], env)
        try:
            run_id = str(json.loads(submitted.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError):
            print(f"serforget: flwr run failed to submit:\n{submitted.stdout}\n{submitted.stderr}", file=sys.stderr)
            return 1
        print(f"serforget: run {run_id} submitted ({n_nodes} SuperNodes); following its log")
        _flwr(["log", run_id, "--stream"], env, capture=False)
        status = run_status(run_id, env)
        while not status.get("status", "").startswith("finished") and status.get("status") != "unknown":
            time.sleep(2)
            status = run_status(run_id, env)
    finally:
        stop_local_superlink(home)
    ok = status.get("status") == "finished:completed" and report_path.exists() and report_path.stat().st_mtime >= started
    if not ok:
        print(f"serforget: run {run_id} ended as {status.get('status')!r}: {status.get('status-details')}", file=sys.stderr)
        if status.get("status") == "finished:completed":
            print(f"serforget: ... but {report_path} was not written by this run", file=sys.stderr)
        return 1
    print((work / "report" / "report.md").read_text())
    print(f"serforget: report {report_path} (plots: {report_path.parent}/report.png)")
    return 0
