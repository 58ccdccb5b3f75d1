"""ServerApp + ClientApp logic end to end through an in-process Grid (no Ray, no SuperLink)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client.app import app as client_app
from common.ledger import Ledger
from common.release import ReleaseRegistry
from server.app import app as server_app
from server.inprocess import InProcessGrid

TINY = {
    "synth-speakers": 6, "synth-sentences": 2, "synth-takes": 1, "valid-speakers": 1, "test-speakers": 1,
    "num-rounds": 2, "local-epochs": 1, "batch-size": 8, "clip-seconds": 2.0, "onnx-export": False,
    "scenario-partial-n": 3, "scenario-partial-node": 0, "scenario-whole-node": 1, "importance-max-utts": 8,
    "model-json": json.dumps({"channels": [8, 16], "hidden": 16}),
    "unlearn-json": json.dumps({"max_epochs": 5, "pgd_k": 1, "pgd_steps": 3}),
}


def _run(tmp_path: Path, **overrides) -> tuple[dict, InProcessGrid, Path]:
    work = tmp_path / "sim"
    run_config = {**TINY, "work-dir": str(work), **overrides}
    grid = InProcessGrid(client_app, run_config=run_config, n_nodes=4)
    server_app(grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return json.loads((work / "report" / "report.json").read_text()), grid, work


@pytest.mark.slow
def test_default_scenario_trains_unlearns_releases_and_purges(tmp_path: Path) -> None:
    report, grid, work = _run(tmp_path)
    assert grid.calls.count("train") == 2 * 4
    assert {"query.pending", "query.unlearn", "query.release"} <= set(grid.calls)
    verdicts = report["unlearning"]["verdicts"]
    assert len(verdicts) == 2 and all(v["accepted"] for v in verdicts), verdicts
    assert report["releases"]["trained"] == 1 and report["releases"]["unlearned"] == 2
    assert report["releases"]["revoked"] == [1]
    registry = ReleaseRegistry(work / "server" / "releases")
    assert registry.latest().version == 2
    assert sorted(registry.manifest(2).applies_requests) == sorted(report["unlearning"]["applied_request_ids"])
    # the forget audio is gone from the devices and the ledgers say purged, with receipts
    for pid in (0, 1):
        node = work / "nodes" / f"{pid:03d}"
        with Ledger(node / "ledger.sqlite") as ledger:
            (request,) = ledger.all()
        assert request.state == "purged" and request.release_version == 2
        for entry in request.receipt["files"]:
            assert not (node / entry["path"]).exists()
    assert report["after"]["forget_acc"] <= report["before"]["forget_acc"]
    assert (work / "report" / "report.png").exists() and (work / "report" / "report.md").exists()
