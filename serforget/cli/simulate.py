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
import shutil
import sys
import time
import tomllib
from pathlib import Path

from serforget.common.settings import RunSettings
from serforget.deploy.flwr_program import flwr_env, parse_overrides, run_flwr, run_config_text, run_status, stop_local_superlink, write_flower_home


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
    pyproject = app / "pyproject.toml"
    if not pyproject.is_file():
        raise ValueError(f"--app {app}: no pyproject.toml here; run from the serforget repository or pass --app REPO")
    try:
        with open(pyproject, "rb") as handle:
            config = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    except (tomllib.TOMLDecodeError, KeyError) as exc:
        raise ValueError(f"{pyproject}: not a Flower app ([tool.flwr.app.config] missing or invalid: {exc})") from None
    return RunSettings.from_mapping({**config, **overrides})


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
    env = flwr_env(home)
    run_config = run_config_text(overrides)
    started = time.time()
    try:
        submitted = run_flwr(["run", str(app), "--format", "json", "--run-config", run_config], env)
        try:
            run_id = str(json.loads(submitted.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError):
            print(f"serforget: flwr run failed to submit:\n{submitted.stdout}\n{submitted.stderr}", file=sys.stderr)
            return 1
        print(f"serforget: run {run_id} submitted ({n_nodes} SuperNodes); following its log")
        run_flwr(["log", run_id, "--stream"], env, capture=False)
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
