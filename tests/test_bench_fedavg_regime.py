"""The FedAvg calibration's server step is Flower's: FedAvg, FedAvgM and FedAdam give the same weights."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from benchmarks.bench_fedavg_regime import GRID, ServerStep, choose
from serforget.server.federation import weighted_average
from serforget.server.inprocess import InProcessGrid

ROUNDS, SIZES = 3, (3.0, 1.0)


def _node_states(round_no: int) -> list[dict[str, torch.Tensor]]:
    """What each node sends back in a round (fixed by the round, so both sides see the same replies)."""
    g = torch.Generator().manual_seed(round_no)
    return [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in SIZES]


def _client() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        round_no = int(msg.content["config"]["server-round"])
        state = _node_states(round_no)[pid]
        return Message(
            RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": SIZES[pid]})}),
            reply_to=msg,
        )

    return app


@pytest.mark.parametrize(
    ("name", "strategy", "kwargs"),
    [
        ("fedavg", FedAvg(min_available_nodes=2, min_train_nodes=2), {}),
        ("fedavgm", FedAvgM(min_available_nodes=2, min_train_nodes=2, server_momentum=0.9), {"server_momentum": 0.9}),
        ("fedavgm", FedAvgM(min_available_nodes=2, min_train_nodes=2, server_learning_rate=2.0), {"server_lr": 2.0}),
        ("fedadam", FedAdam(min_available_nodes=2, min_train_nodes=2, eta=0.01), {"server_lr": 0.01}),
    ],
)
def test_server_step_matches_flowers_strategy(name: str, strategy, kwargs: dict) -> None:
    grid = InProcessGrid(_client(), run_config={}, n_nodes=len(SIZES))
    ours = ServerStep(name, **kwargs)
    state = {"w": torch.zeros(4, 3), "b": torch.ones(3)}
    arrays = ArrayRecord(state)
    for round_no in range(1, ROUNDS + 1):
        messages = strategy.configure_train(round_no, arrays, ConfigRecord({"server-round": round_no}), grid)
        replies = grid.send_and_receive(messages)
        arrays, _ = strategy.aggregate_train(round_no, replies)
        mean = weighted_average(list(zip(_node_states(round_no), SIZES)))
        state = ours(state, mean, round_no)
        flower = arrays.to_torch_state_dict()
        for key in state:
            torch.testing.assert_close(state[key], flower[key].float(), rtol=1e-5, atol=1e-6)


def test_unknown_strategy_and_the_selection_rule() -> None:
    with pytest.raises(ValueError, match="fedavg, fedavgm or fedadam"):
        ServerStep("fedprox")
    assert {p[0] for p in GRID} <= {"fedavg", "fedavgm", "fedadam"}
    point = lambda acc, cost, ua: {"final": {"train_acc": acc, "valid_ua": ua}, "node_epochs": cost}  # noqa: E731
    assert choose([point(0.9, 100, 0.7)]) is None  # nothing memorises: no choice, defaults stay
    picked = choose([point(0.98, 900, 0.7), point(0.97, 480, 0.6), point(0.99, 480, 0.65)])
    assert picked == point(0.99, 480, 0.65)


@pytest.mark.slow
def test_one_round_of_in_process_fedavg_is_scored_on_every_field(tiny_corpus) -> None:
    from benchmarks.bench_fedavg_regime import fedavg, score
    from serforget.common.data import load_waveforms
    from serforget.common.labels import FOUR_CLASS
    from serforget.common.manifest import by_speaker, read_manifest
    from serforget.common.settings import RunSettings
    from tests.helpers.scenario import TINY

    cfg = RunSettings.from_mapping({**TINY, "clip-seconds": 0.5})
    labels = tuple(FOUR_CLASS)
    sets = [load_waveforms(u, labels=labels, clip_seconds=0.5) for u in by_speaker(read_manifest(tiny_corpus)).values()]
    nodes, valid = sets[:3], sets[3]
    seen: list[int] = []
    state = fedavg(
        nodes,
        cfg=cfg,
        labels=labels,
        strategy="fedavgm",
        local_epochs=1,
        local_lr=2e-3,
        server_lr=1.0,
        server_momentum=0.9,
        rounds=2,
        on_round=lambda r, s: seen.append(r),
    )
    assert seen == [1, 2]
    result = score(state, cfg=cfg, labels=labels, nodes=nodes, valid=valid, noisy={nodes[0].utt_ids[0]})
    assert result["n_mislabelled"] == 1 and 0.0 <= result["train_acc"] <= 1.0 and 0.0 <= result["valid_ua"] <= 1.0
