"""``serforget deploy up|run|down``: the Deployment Engine on one machine (TLS + SuperNode auth).

Thin wrappers over :mod:`serforget.deploy.local`; the run directory remembers the endpoint and devices in
``deployment.json`` so ``run`` and ``down`` work from a later shell. For several hosts follow the
steps in docs/deployment.md, which these commands perform locally.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    dep = sub.add_parser("deploy", help="real SuperLink + SuperNodes (TLS, node auth) on this machine")
    dsub = dep.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    up = dsub.add_parser("up", help="PKI, one device per speaker, SuperLink, registration, SuperNodes")
    up.add_argument("--run-dir", type=Path, required=True)
    up.add_argument("--manifest", type=Path, required=True, help="corpus manifest: one device per speaker")
    up.add_argument("--host", default="127.0.0.1", help="address of the Fleet API (what devices dial)")
    up.add_argument("--port", type=int, default=9092, help="port of the Fleet API")
    up.add_argument(
        "--control-host",
        default="127.0.0.1",
        help="address of the Control and Runtime APIs (operator only; keep loopback, tunnel with SSH)",
    )
    up.add_argument("--control-port", type=int, default=9093, help="port of the Control and Runtime APIs")
    up.set_defaults(handler=_up)
    run = dsub.add_parser("run", help="`flwr run . serforget --stream` on the deployment, status checked")
    run.add_argument("--run-dir", type=Path, required=True)
    run.add_argument("--app", type=Path, default=Path("."))
    run.add_argument("--run-config", default="", help='run-config overrides, e.g. "num-rounds=5 unlearn.max-epochs=10"')
    run.add_argument("--unlearn-only", action="store_true", help="resume from the newest release, no training")
    run.add_argument("--timeout", type=float, default=3600.0)
    run.set_defaults(handler=_run)
    down = dsub.add_parser("down", help="stop exactly the processes `up` started (PID files)")
    down.add_argument("--run-dir", type=Path, required=True)
    down.set_defaults(handler=_down)


def _state_path(run_dir: Path) -> Path:
    return run_dir / "deployment.json"


def _load(run_dir: Path):
    from serforget.deploy.local import Deployment

    try:
        state = json.loads(_state_path(run_dir).read_text())
    except FileNotFoundError:
        raise ValueError(f"{_state_path(run_dir)}: no deployment here; run `serforget deploy up` first") from None
    if "control_port" not in state:
        raise ValueError(
            f"{_state_path(run_dir)}: written before the Control API got its own port; "
            "run `serforget deploy down` and `serforget deploy up` again"
        )
    return Deployment(
        run_dir,
        host=state["host"],
        port=int(state["port"]),
        control_host=state["control_host"],
        control_port=int(state["control_port"]),
    ), state


def _up(args: argparse.Namespace) -> int:
    from serforget.common.fsutil import atomic_write_json
    from serforget.common.manifest import by_speaker, read_manifest
    from serforget.deploy.local import Deployment, free_port, up

    deployment = Deployment(
        args.run_dir, host=args.host, port=args.port, control_host=args.control_host, control_port=args.control_port
    )
    n_devices = len(by_speaker(read_manifest(args.manifest)))
    devices = up(deployment, manifest=args.manifest, ports=[free_port() for _ in range(n_devices)])
    atomic_write_json(
        _state_path(deployment.root),
        {
            "format_version": 1,
            "host": args.host,
            "port": args.port,
            "control_host": args.control_host,
            "control_port": args.control_port,
            "devices": [d.name for d in devices],
        },
    )
    print(
        f"SuperLink: Fleet API {deployment.address} (TLS, node auth), Control API {deployment.control_address} with {len(devices)} SuperNodes; devices under "
        f"{deployment.root / 'devices'}; file deletions with `serforget node forget --data-dir DEVICE_DIR ...`"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from serforget.common.settings import RunSettings
    from serforget.deploy.flwr_program import parse_overrides
    from serforget.deploy.local import deployment_run_config, run_app

    deployment, state = _load(args.run_dir)
    overrides = parse_overrides(args.run_config)
    if args.unlearn_only:
        overrides.update({"resume": True, "num-rounds": 0})
    config = deployment_run_config(deployment, min_nodes=len(state["devices"]), overrides=overrides)
    RunSettings.from_mapping(config)  # a bad key or value: one line naming it, before anything is submitted
    outcome = run_app(deployment, app=args.app.resolve(), run_config=config, timeout=args.timeout)
    report = deployment.work_dir / "report" / "report.md"
    if outcome.status != "finished:completed":
        print(f"run {outcome.run_id} ended as {outcome.status}: {outcome.details}", file=sys.stderr)
        return 1
    print(report.read_text() if report.exists() else f"run {outcome.run_id} completed")
    return 0


def _down(args: argparse.Namespace) -> int:
    from serforget.deploy.local import Deployment

    stopped = Deployment(args.run_dir).processes.stop_all(timeout=15.0)
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0
