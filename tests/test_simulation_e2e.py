"""The main job for real: `serforget simulate` runs `flwr run .` (Ray simulation) and checks it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serforget.client.node import NodeDir

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "synth.speakers=7 synth.sentences=2 synth.takes=1 valid-speakers=1 test-speakers=2 num-rounds=2 "
    "local-epochs=1 clip-seconds=2.0 scenario.partial-n=3 importance-max-utts=8 max-ua-drop=100.0 "
    "unlearn.max-epochs=5 unlearn.pgd-k=1 unlearn.pgd-steps=3"
)


def _simulate(tmp_path: Path, extra: str = "", *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "serforget",
            "simulate",
            "--app",
            str(ROOT),
            "--work-dir",
            str(tmp_path / "sim"),
            "--flwr-home",
            str(tmp_path / "flwr"),
            "--run-config",
            f"{TINY} {extra}",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.slow
def test_flwr_run_end_to_end_and_failure_is_reported(tmp_path: Path) -> None:
    done = _simulate(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "sim" / "report" / "report.json").read_text())
    assert report["n_nodes"] == 4 and report["releases"]["revoked"] == [1]
    assert all(v["accepted"] for v in report["unlearning"]["verdicts"])
    assert {f for f in report["releases"]["files"]} >= {"model.safetensors", "model.json", "model.onnx"}
    whole = NodeDir(tmp_path / "sim" / "nodes" / "002")
    assert whole.utterances() == []  # the whole-speaker node purged every recording
    assert not any((whole.root / "wav").iterdir())
    # a second call with the same settings does not redo the finished run
    again = _simulate(tmp_path)
    assert again.returncode == 0 and "already ran" in again.stdout
    # a ServerApp failure (flwr run itself exits 0) must make the wrapper fail
    failed = _simulate(tmp_path, "scenario.whole-node=99", "--fresh")
    assert failed.returncode == 1
    assert "finished:failed" in failed.stderr and "partition-id 99" in failed.stderr
