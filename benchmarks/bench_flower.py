"""Per-round overhead of the Flower simulation path vs the same ServerApp/ClientApp code in-process.

Both paths run the identical scenario (same settings, same ServerApp and ClientApp code): once
through ``flwr run .`` (local SuperLink + Ray simulation, via ``serforget simulate``), once through
:class:`serforget.server.inprocess.InProcessGrid`, which hands each message straight to the ClientApp. The
FedAvg phase's wall time per round is compared side by side in one run, and the unlearning
round's wall time too. Both paths get the same compute shape: one ClientApp at a time with two
torch threads (Flower: ``--cpus-per-node 2``; in-process: sequential calls). Writes ``benchmarks/results/flower_overhead.{json,md}``.

    python -m benchmarks.bench_flower [--rounds 3] [--speakers 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, RecordDict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def settings(rounds: int, speakers: int) -> dict:
    return {
        "synth.speakers": speakers,
        "synth.sentences": 4,
        "synth.takes": 1,
        "valid-speakers": 2,
        "test-speakers": 2,
        "num-rounds": rounds,
        "local-epochs": 1,
        "release.onnx-export": False,
        "scenario.partial-n": 5,
    }


def run_flower(work: Path, cfg: dict) -> dict:
    from serforget.deploy.flwr_program import run_config_text

    overrides = run_config_text(cfg)
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serforget",
            "simulate",
            "--app",
            str(ROOT),
            "--work-dir",
            str(work),
            "--flwr-home",
            str(work.parent / "flwr-home"),
            "--run-config",
            overrides,
            "--fresh",
            "--cpus-per-node",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"flwr path failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = json.loads((work / "report" / "report.json").read_text())
    report["timings"]["total_wall_s"] = time.perf_counter() - start
    return report


def run_inprocess(work: Path, cfg: dict) -> dict:
    import torch

    from serforget.client.app import app as client_app
    from serforget.server.app import app as server_app
    from serforget.server.inprocess import InProcessGrid

    run_config = {**cfg, "work-dir": str(work)}
    n_nodes = cfg["synth.speakers"] - cfg["valid-speakers"] - cfg["test-speakers"]
    grid = InProcessGrid(client_app, run_config=run_config, n_nodes=n_nodes)
    # same compute shape as the Flower path below (--cpus-per-node 2): one node at a time, 2 threads
    torch.set_num_threads(2)
    start = time.perf_counter()
    server_app(
        grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    )
    report = json.loads((work / "report" / "report.json").read_text())
    report["timings"]["total_wall_s"] = time.perf_counter() - start
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speakers", type=int, default=10)
    args = parser.parse_args()
    cfg = settings(args.rounds, args.speakers)
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        inproc = run_inprocess(Path(tmp) / "inprocess", cfg)
        flower = run_flower(Path(tmp) / "flower", cfg)
    rows = []
    for name, report in (("in-process", inproc), ("flwr run (simulation)", flower)):
        t = report["timings"]
        rows.append(
            {
                "path": name,
                "rounds": args.rounds,
                "nodes": report["n_nodes"],
                "fedavg_s": t["fedavg_s"],
                "per_round_s": t["fedavg_s"] / args.rounds,
                "unlearning_round_s": t["unlearning_round_s"],
                "total_wall_s": t["total_wall_s"],
            }
        )
    ratio = rows[1]["per_round_s"] / rows[0]["per_round_s"]
    result = {
        "settings": cfg,
        "rows": rows,
        "per_round_ratio_flower_vs_inprocess": ratio,
        "per_round_overhead_s": rows[1]["per_round_s"] - rows[0]["per_round_s"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flower_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| path | nodes | rounds | FedAvg s/round | unlearning round s | total wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['path']} | {r['nodes']} | {r['rounds']} | {r['per_round_s']:.2f} | {r['unlearning_round_s']:.2f} | "
        f"{r['total_wall_s']:.1f} |"
        for r in rows
    ]
    lines += [
        "",
        f"Flower path / in-process, per FedAvg round: **{ratio:.2f}x** "
        f"(+{result['per_round_overhead_s']:.2f} s per round).",
    ]
    (RESULTS / "flower_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
