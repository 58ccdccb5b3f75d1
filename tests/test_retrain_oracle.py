"""The federated retrain oracle through the ServerApp (in-process Grid) and the per-example attack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

import serforget.client.app as client_module
from serforget.client.ledger import Ledger
from serforget.common.labels import task_labels
from serforget.common.manifest import read_manifest
from serforget.common.per_example_mia import logit_confidence, per_example_attack
from serforget.server.app import app as server_app
from serforget.server.inprocess import InProcessGrid
from tests.helpers.scenario import TINY

N_NODES = 4


@pytest.mark.slow
def test_oracle_reruns_fedavg_without_exactly_the_deleted_recordings(tmp_path: Path, monkeypatch) -> None:
    """Every oracle round trains on all training recordings but the scenario's deleted ones; FedAvg on all."""
    loads: list[set[str]] = []  # the recordings each train/evaluate call loaded, in call order
    load = client_module.load_training_set

    def recording_load(node, **kwargs):
        data = load(node, **kwargs)
        loads.append(set(data.utt_ids))
        return data

    monkeypatch.setattr(client_module, "load_training_set", recording_load)
    work = tmp_path / "sim"
    run_config = {**TINY, "work-dir": str(work)}
    grid = InProcessGrid(client_module.app, run_config=run_config, n_nodes=N_NODES)
    server_app(
        grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    )
    report = json.loads((work / "report" / "report.json").read_text())

    kinds = [c for c in grid.calls if c in ("train", "evaluate")]
    assert len(kinds) == len(loads)
    train_loads = [data for kind, data in zip(kinds, loads) if kind == "train"]
    rounds = run_config["num-rounds"]
    assert len(train_loads) == 2 * rounds * N_NODES  # FedAvg, then the oracle: same rounds, same nodes
    fedavg_loads, oracle_loads = train_loads[: rounds * N_NODES], train_loads[rounds * N_NODES :]
    # the oracle asks the nodes for no federated evaluation (it does not change the weights)
    assert grid.calls[len(grid.calls) - grid.calls[::-1].index("train") :].count("evaluate") == 0

    labels = task_labels("4class")  # TINY keeps the default task
    all_train = {u.utt_id for u in read_manifest(work / "splits" / "train.csv") if u.emotion in labels}
    deleted = set()
    for pid in range(N_NODES):
        with Ledger(work / "nodes" / f"{pid:03d}" / "ledger.sqlite") as ledger:
            deleted |= {u for r in ledger.all() for u in r.utt_ids}
    assert deleted and deleted < all_train
    assert len(deleted) == report["n_forget"]
    for r in range(rounds):
        assert set().union(*fedavg_loads[r * N_NODES : (r + 1) * N_NODES]) == all_train
        assert set().union(*oracle_loads[r * N_NODES : (r + 1) * N_NODES]) == all_train - deleted

    oracle = report["retrain_oracle"]
    assert oracle["ran"] and oracle["skipped"] is None
    assert [int(k) for k in oracle["examples_per_round"]] == list(range(1, rounds + 1))
    for k, n in oracle["examples_per_round"].items():
        assert n == oracle["fedavg_examples_per_round"][k] - len(deleted)
    assert [r["round"] for r in oracle["rounds"]] == list(range(rounds + 1))
    # the report's table: v1, v2 and the oracle on the same deleted recordings, per request kind too
    table = report["deleted_recordings"]
    assert table["n"] == len(deleted) and set(table["models"]) == {"v1", "v2", "oracle"}
    assert set(table["n_by_group"]) == {"partial", "whole-speaker"}
    assert set(report["oracle"]["per_example_mia"]["scores"]) == deleted
    assert table["acceptance"]["met"] == (table["acceptance"]["v1_minus_oracle_forget_acc_pts"] >= 10.0)
    assert report["timings"]["oracle_train_s"] > 0 and report["unlearning_vs_oracle"]["speedup"] > 0
    assert "retrain oracle" in (work / "report" / "report.md").read_text()


@pytest.mark.slow
def test_oracle_switched_off_or_meaningless_is_skipped_with_its_reason(tmp_path: Path) -> None:
    work = tmp_path / "sim"
    run_config = {**TINY, "work-dir": str(work), "retrain-oracle": False}
    grid = InProcessGrid(client_module.app, run_config=run_config, n_nodes=N_NODES)
    server_app(
        grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    )
    report = json.loads((work / "report" / "report.json").read_text())
    assert grid.calls.count("train") == TINY["num-rounds"] * N_NODES
    assert report["retrain_oracle"] == {**report["retrain_oracle"], "ran": False, "skipped": "retrain-oracle = false"}
    assert report["oracle"] is None and report["deleted_recordings"] is None and report["unlearning_vs_oracle"] is None
    assert "retrain oracle: not run (retrain-oracle = false)" in (work / "report" / "report.md").read_text()


def test_logit_confidence_is_exact_and_finite_for_memorised_rows() -> None:
    logits = torch.tensor([[0.0, 0.0], [40.0, 0.0]])
    phi = logit_confidence(logits, torch.tensor([0, 0]))
    assert phi[0] == pytest.approx(0.0) and phi[1] == pytest.approx(40.0)  # p/(1-p) = e^40, no underflow to inf
    three = torch.tensor([[1.0, 2.0, 3.0]])
    p = torch.softmax(three.double(), 1)[0, 2].item()
    assert logit_confidence(three, torch.tensor([2]))[0] == pytest.approx(np.log(p / (1 - p)))
    with pytest.raises(ValueError, match="logits"):
        logit_confidence(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


def test_per_example_attack_calls_members_members_and_outsiders_outsiders() -> None:
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(6.0, 1.0, 400), rng.normal(0.0, 1.0, 300)
    targets = np.array([6.5, 5.0, -0.5, 0.2])
    result = per_example_attack(member_phi=members, nonmember_phi=nonmembers, target_phi=targets, seed=1)
    assert [s > 0 for s in result.scores] == [True, True, False, False]
    assert result.member_rate == 0.5 and 0.4 < result.mean_posterior < 0.6
    assert result.nonmember_rate < 0.05 and result.remaining_member_rate > 0.95
    assert set(result.to_dict(["a", "b", "c", "d"])["scores"]) == {"a", "b", "c", "d"}
    # a model that treats members and non-members alike gives the attack no power
    same = per_example_attack(
        member_phi=rng.normal(0, 1, 400), nonmember_phi=rng.normal(0, 1, 400), target_phi=rng.normal(0, 1, 50), seed=1
    )
    assert abs(same.remaining_member_rate - same.nonmember_rate) < 0.15
    with pytest.raises(ValueError, match="non-finite"):
        per_example_attack(member_phi=members, nonmember_phi=nonmembers, target_phi=np.array([np.nan]))
    with pytest.raises(ValueError, match="4 non-member"):
        per_example_attack(member_phi=members, nonmember_phi=nonmembers[:3], target_phi=targets)


def test_strategy_counts_examples_and_survives_a_reply_without_metrics() -> None:
    """The per-round example count (recordings trained on) skips a malformed reply, which is that node's error."""
    from flwr.app import ArrayRecord, Message, MetricRecord
    from flwr.app.metadata import Metadata

    from serforget.server.strategy import ImportanceFedAvg

    def reply(content: RecordDict) -> Message:
        incoming = Message(
            content=RecordDict(),
            metadata=Metadata(
                run_id=1,
                message_id="m",
                src_node_id=0,
                dst_node_id=1,
                reply_to_message_id="",
                group_id="",
                created_at=0.0,
                ttl=60.0,
                message_type="train",
            ),
        )
        return Message(content, reply_to=incoming)

    arrays = ArrayRecord({"w": torch.ones(2)})
    good = [reply(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})) for n in (3, 2)]
    strategy = ImportanceFedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    strategy.expect(arrays)  # what start() records: the tensors sent to the nodes
    strategy.aggregate_train(1, good)
    assert strategy.examples_per_round[1] == 5
    # a reply without metrics: left out as that node's error (Flower's own check would refuse the
    # whole batch), the others are averaged
    merged, _ = strategy.aggregate_train(2, good + [reply(RecordDict({"arrays": arrays}))])
    assert strategy.examples_per_round[2] == 5 and merged is not None
    assert strategy.node_errors[2] == ["malformed train reply: one ArrayRecord and a finite num-examples >= 0 expected"]


def test_an_oracle_no_node_trained_in_is_reported_failed_not_raised() -> None:
    """The oracle runs after the unlearned release: a failing oracle must not stop the release announcement."""
    from serforget.common.models import build_model
    from serforget.common.settings import RunSettings
    from serforget.common.traffic import Traffic
    from serforget.server.oracle import run_retrain_oracle

    cfg = RunSettings.from_mapping({**TINY, "num-rounds": 1})
    model = build_model(arch=cfg.model_arch, config=cfg.model_config, labels=task_labels(cfg.task))
    grid = InProcessGrid(client_module.app, run_config={}, n_nodes=2, fail_types=("train",))
    outcome = run_retrain_oracle(
        grid,
        cfg=cfg,
        initial=model.state_dict(),
        requests=[{"node": "n", "kind": "partial", "request_id": "r", "utt_ids": ["u"]}],
        n_nodes=2,
        evaluate=None,
        traffic=Traffic.everything(model.state_dict()),
    )
    assert outcome.state is None and outcome.skipped.startswith("failed: FedAvg round 1: no node trained")
