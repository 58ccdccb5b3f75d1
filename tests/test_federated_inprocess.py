"""ServerApp + ClientApp logic end to end through an in-process Grid (no Ray, no SuperLink)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from serforget.client.app import app as client_app
from serforget.client.ledger import Ledger
from serforget.common.release import ReleaseRegistry
from serforget.server.app import app as server_app
from serforget.server.inprocess import InProcessGrid
from tests.helpers.scenario import TINY


def _run(tmp_path: Path, **overrides) -> tuple[dict, InProcessGrid, Path]:
    work = tmp_path / "sim"
    run_config = {**TINY, "work-dir": str(work), **overrides}
    grid = InProcessGrid(client_app, run_config=run_config, n_nodes=4)
    server_app(
        grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    )
    return json.loads((work / "report" / "report.json").read_text()), grid, work


@pytest.mark.slow
def test_default_scenario_trains_unlearns_releases_and_purges(tmp_path: Path) -> None:
    report, grid, work = _run(tmp_path)
    assert grid.calls.count("train") == 2 * 2 * 4  # FedAvg and the retrain oracle (tests/test_retrain_oracle.py)
    assert {"query.pending", "query.unlearn", "query.release"} <= set(grid.calls)
    verdicts = report["unlearning"]["verdicts"]
    assert len(verdicts) == 2 and all(v["accepted"] for v in verdicts), verdicts
    assert report["releases"]["trained"] == 1 and report["releases"]["unlearned"] == 2
    assert report["releases"]["revoked"] == [1]
    registry = ReleaseRegistry(work / "server" / "releases")
    assert registry.latest().version == 2
    assert sorted(registry.manifest(2).applied_request_ids) == sorted(report["unlearning"]["applied_request_ids"])
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


def _deployment(tiny_corpus: Path, tmp_path: Path, **overrides) -> tuple[dict, InProcessGrid, dict, Path]:
    """A deployment-mode run: devices bring their own data dirs; spk2 files a request with the CLI."""
    from serforget.cli import main as cli
    from serforget.client.node import pin_server_keys, prepare_node_dir
    from serforget.common.manifest import by_speaker, read_manifest
    from serforget.server.federation import ServerDir

    server = ServerDir(tmp_path / "server").init()
    node_configs = []
    for speaker, utts in by_speaker(read_manifest(tiny_corpus)).items():
        node = prepare_node_dir(
            root=tmp_path / "devices" / speaker, node_id=f"node-{speaker}", speaker=speaker, utterances=utts
        )
        server.enroll(node_id=node.node_id, public_key_path=node.keys_dir / "sign.pub")
        pin_server_keys(node, server_keys_dir=server.keys_dir)
        node_configs.append({"data-dir": str(node.root)})
    victim = tmp_path / "devices" / "spk2"
    assert cli(["node", "forget", "--data-dir", str(victim), "--utt", "spk2_happy_0", "spk2_sad_1"]) == 0
    run_config = {
        **TINY,
        "mode": "deployment",
        "work-dir": str(tmp_path / "work"),
        "server-dir": str(server.root),
        "min-nodes": 4,
        "eval-manifest": str(tiny_corpus),
        "clip-seconds": 0.5,
        **overrides,
    }
    grid = InProcessGrid(client_app, run_config=run_config, n_nodes=4, node_configs=node_configs)
    server_app(
        grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    )
    return json.loads((tmp_path / "work" / "report" / "report.json").read_text()), grid, run_config, victim


def test_deployment_mode_uses_node_data_dirs_and_cli_requests(tiny_corpus: Path, tmp_path: Path) -> None:
    """Deployment: devices bring their own data dirs; a speaker files a request with the CLI."""
    report, grid, run_config, victim = _deployment(tiny_corpus, tmp_path)
    assert report["mode"] == "deployment" and report["releases"]["unlearned"] == 2
    assert [v["accepted"] for v in report["unlearning"]["verdicts"]] == [True]
    assert report["unlearning"]["held_out_gate"] is True
    assert report["unlearning"]["target"]["source"].startswith("held-out validation UA")
    assert not (victim / "wav" / "spk2_happy_0.wav").exists() and (victim / "wav" / "spk2_happy_1.wav").exists()
    assert any(r.get("forget-acc-release", -1) >= 0 for r in report["node_release_reports"])
    # a second unlearning round (the deployment's `deploy run --unlearn-only`: resume, no FedAvg)
    # finds nothing pending and publishes nothing new
    again_config = {**run_config, "resume": True, "num-rounds": 0}
    grid.calls.clear()
    server_app(
        grid=grid, context=Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=again_config)
    )
    assert "train" not in grid.calls
    again = json.loads((tmp_path / "work" / "report" / "report.json").read_text())
    assert again["unlearning"]["pending_nodes"] == 0 and again["releases"]["unlearned"] is None
    assert "stored with release v2" in again["unlearning"]["target"]["source"]  # the latest release


def test_deployment_without_eval_manifest_says_what_it_falls_back_to(
    tiny_corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No held-out set: the gate is off and the target is the nodes' own evaluation, both said, never silent."""
    with caplog.at_level("WARNING", logger="serforget.server"):
        report, *_ = _deployment(tiny_corpus, tmp_path, **{"eval-manifest": "", "fraction-evaluate": 1.0})
    assert report["unlearning"]["held_out_gate"] is False
    target = report["unlearning"]["target"]
    assert "eval-acc on their training recordings" in target["source"] and 0.0 <= target["forget_acc"] <= 1.0
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "without eval-manifest: no held-out gate" in warnings and "retrain-level target" in warnings


def test_unlearning_only_run_resumes_from_the_latest_release(tmp_path: Path) -> None:
    """num-rounds=0 + resume: no training, the pending request is unlearned on the published model."""
    from serforget.client.node import file_deletion_request

    report, grid, work = _run(tmp_path, **{"scenario.enabled": False})
    assert report["releases"]["unlearned"] is None and report["releases"]["published"] == [1]
    node = work / "nodes" / "003"
    file_deletion_request(data_dir=node, whole_speaker=True)
    report, grid, work = _run(tmp_path, **{"scenario.enabled": False, "num-rounds": 0, "resume": True})
    assert "train" not in grid.calls
    assert report["releases"]["trained"] == 1 and report["releases"]["unlearned"] == 2
    assert report["releases"]["revoked"] == [1]
    assert report["unlearning"]["constraint"] and (work / "server" / "importance.safetensors").exists()


def test_held_out_gate_refuses_harmful_deltas_and_nothing_is_released_or_purged(tmp_path: Path, monkeypatch) -> None:
    """A delta that lowers the (stand-in) held-out score past max-ua-drop is refused and its request retried."""
    from serforget.common.checkpoint import state_sha256
    from serforget.server.scenario import Scenario

    published: dict[str, str] = {}

    def strict_score(self):
        # held-out UA 0.9 for the trained release's weights, 0.5 for anything else (a harmful delta)
        def score(state):
            digest = state_sha256(state)
            published.setdefault("base", digest)
            return 0.9 if digest == published["base"] else 0.5

        return score

    monkeypatch.setattr(Scenario, "held_out_score", strict_score)
    # no retrain oracle: the gate is what is tested, and the oracle would only repeat FedAvg
    report, grid, work = _run(tmp_path, **{"max-ua-drop": 2.0, "retrain-oracle": False})
    assert grid.calls.count("train") == TINY["num-rounds"] * 4
    verdicts = report["unlearning"]["verdicts"]
    steps = {node: metrics["steps"] for node, metrics in report["unlearning"]["node_metrics"].items()}
    assert len(verdicts) == 2 and any(steps.values())
    for verdict in verdicts:  # a device that took no step sends a zero delta: harmless, accepted
        moved = steps[verdict["node"]] > 0
        assert verdict["accepted"] is not moved
        assert verdict["reason"].startswith("harms-held-out") is moved
        assert verdict["ua_drop"] == pytest.approx(40.0 if moved else 0.0)
    harmful = {v["node"] for v in verdicts if not v["accepted"]}
    for pid in (0, 1):  # a refused device keeps its audio and its request goes back to pending, to retry
        with Ledger(work / "nodes" / f"{pid:03d}" / "ledger.sqlite") as ledger:
            (request,) = ledger.all()
        assert request.state == ("pending" if f"node-synth-{pid:03d}" in harmful else "purged")
