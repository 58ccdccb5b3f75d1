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

from serforget.common.corpora.synth import speaker_name
from serforget.common.pipeline import training_speakers
from serforget.common.settings import RunSettings, flatten
from serforget.deploy.flwr_program import (
    LOCAL_HTTP_PORT_ENV,
    flwr_env,
    free_local_ports,
    parse_overrides,
    run_config_text,
    run_flwr,
    run_status,
    stop_local_superlink,
    write_flower_home,
)


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("simulate", help="run the default federated scenario with `flwr run .` and check it")
    sim.add_argument("--app", type=Path, default=Path("."), help="the Flower app folder (pyproject.toml)")
    sim.add_argument("--work-dir", type=Path, default=Path("runs/sim"), help="devices, server, releases and report")
    sim.add_argument("--flwr-home", type=Path, default=Path(".flwr"), help="Flower CLI home for this project")
    sim.add_argument(
        "--run-config",
        default="",
        help='extra run-config overrides, e.g. "num-rounds=5 constraint.enabled=false unlearn.lr=3e-4"',
    )
    sim.add_argument("--fresh", action="store_true", help="discard devices/server/report (keeps the corpus) and rerun")
    sim.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="an indexed corpus (`serforget corpus index`) instead of the synthetic one: run config data-manifest",
    )
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
    return RunSettings.from_mapping({**flatten(config), **overrides})


def simulation_nodes(cfg: RunSettings) -> int:
    """SuperNodes the run needs: one per training speaker of the corpus the ServerApp will split."""
    if cfg.data_manifest_path is not None:
        return len(training_speakers(manifest=cfg.data_manifest_path, task=cfg.task, split=cfg.split_spec))
    speakers = [speaker_name(k) for k in range(cfg.synth_speakers)]
    valid, test = cfg.split_spec.held_out(speakers)
    return len(speakers) - len(valid) - len(test)


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_mismatch(cfg: RunSettings, *, cuda_visible: bool) -> str | None:
    """Why the GPU settings cannot work on this machine (None when they can).

    Ray gives a node a GPU only when ``client-resources.num-gpus`` > 0 and hides it otherwise, so
    ``device = cuda`` with ``gpus-per-node = 0`` fails in every node, and ``gpus-per-node > 0``
    without a GPU leaves Ray's actor pool empty; both are refused here with the fix named.
    """
    wants_cuda = cfg.device.strip().lower().startswith("cuda")
    if cfg.gpus_per_node > 0 and not cuda_visible:
        return f"gpus-per-node = {cfg.gpus_per_node:g} but no CUDA device is visible on this machine (set gpus-per-node=0.0)"
    if wants_cuda and not cuda_visible:
        return f"device = {cfg.device!r} but no CUDA device is visible on this machine (use device='auto' or 'cpu')"
    if wants_cuda and cfg.gpus_per_node == 0:
        return (
            f"device = {cfg.device!r} needs gpus-per-node > 0: Flower's simulation hides the GPU from nodes "
            "that reserve none (e.g. gpus-per-node=0.25 shares one GPU among four nodes)"
        )
    return None


def _simulate(args: argparse.Namespace) -> int:
    app, work, home = args.app.resolve(), args.work_dir.resolve(), args.flwr_home.resolve()
    overrides = {**parse_overrides(args.run_config), "work-dir": str(work)}
    if args.manifest is not None:
        overrides["data-manifest"] = str(args.manifest)
    if overrides.get("data-manifest"):  # the ServerApp runs elsewhere: it gets an absolute path
        overrides["data-manifest"] = str(Path(str(overrides["data-manifest"])).expanduser().resolve())
    cfg = app_settings(app, overrides)
    n_nodes = simulation_nodes(cfg)
    gpu_problem = gpu_mismatch(cfg, cuda_visible=_cuda_visible())
    if gpu_problem:
        print(f"serforget: {gpu_problem}", file=sys.stderr)
        return 2
    if cfg.gpus_per_node == 0 and cfg.device.strip().lower() == "auto" and _cuda_visible():
        print(
            "serforget: this machine has a GPU but gpus-per-node = 0: the nodes train on the CPU "
            "(Flower's simulation hides the GPU; set gpus-per-node, e.g. 0.25)",
            file=sys.stderr,
        )
    report_path = work / "report" / "report.json"
    settings = cfg.as_run_config()
    if args.fresh:
        for name in ("nodes", "server", "report"):
            shutil.rmtree(work / name, ignore_errors=True)
    elif report_path.exists() and json.loads(report_path.read_text()).get("settings") == settings:
        print(f"serforget: the scenario already ran with these settings; report: {report_path} (use --fresh to rerun)")
        print((work / "report" / "report.md").read_text())
        return 0
    elif (work / "server").exists():
        print(
            f"serforget: {work} holds an earlier run with other settings or an unfinished one; rerun with --fresh",
            file=sys.stderr,
        )
        return 2
    write_flower_home(home, num_supernodes=n_nodes, cpus_per_node=args.cpus_per_node, gpus_per_node=cfg.gpus_per_node)
    # a local SuperLink of this run's own on free ports: `flwr run` reuses whatever answers on
    # Flower's fixed default port, i.e. another simulation's SuperLink
    env = flwr_env(home, local_ports=free_local_ports())
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
        stop_local_superlink(home, port=env[LOCAL_HTTP_PORT_ENV])
    ok = (
        status.get("status") == "finished:completed" and report_path.exists() and report_path.stat().st_mtime >= started
    )
    if not ok:
        print(
            f"serforget: run {run_id} ended as {status.get('status')!r}: {status.get('status-details')}",
            file=sys.stderr,
        )
        if status.get("status") == "finished:completed":
            print(f"serforget: ... but {report_path} was not written by this run", file=sys.stderr)
        return 1
    print((work / "report" / "report.md").read_text())
    print(f"serforget: report {report_path} (plots: {report_path.parent}/report.png)")
    return 0
