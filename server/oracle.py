"""The federated retrain oracle: the model FedAvg would have produced without the deleted recordings.

Exact unlearning's reference for the report: what v2 (the unlearned release) should look like on
the deleted recordings, and what the unlearning round's wall time saves. It runs through the
same Grid, the same strategy class and the ClientApp's own ``train`` handler as the original
FedAvg: from the same initial weights, for the same number of rounds, with the same per-round
node seeds (``seed + server-round`` in the handler). The only difference is the data: a node's
``train`` handler loads its recordings minus every utterance under a deletion request (the
ledger's rule from the moment a request is filed), and the scenario files its requests after
the original FedAvg, so this second run is the one that never saw them.

Nothing here is reachable outside Flower: the oracle is a ServerApp step like the others.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from serforget.common.settings import RunSettings
from serforget.common.traffic import Traffic
from serforget.server.strategy import ImportanceFedAvg

log = logging.getLogger("serforget.server")


@dataclass
class OracleOutcome:
    """The oracle's weights and cost, or why it did not run (``skipped``)."""

    state: dict[str, torch.Tensor] | None = None
    skipped: str | None = None
    #: wall time of the whole second FedAvg run, and of its central evaluation (kept apart so that
    #: the cost compared with the unlearning round is training, not the report's measurement)
    seconds: float = 0.0
    eval_seconds: float = 0.0
    rounds: list[dict] = field(default_factory=list)
    examples_per_round: dict[int, int] = field(default_factory=dict)

    @property
    def train_seconds(self) -> float:
        return self.seconds - self.eval_seconds


def oracle_skip_reason(cfg: RunSettings, requests: list[dict]) -> str | None:
    """Why a retrain oracle would not be one here (None: it is, run it)."""
    if not cfg.retrain_oracle:
        return "retrain-oracle = false"
    if cfg.num_rounds == 0:
        return "num-rounds = 0: there is no FedAvg run to repeat"
    if cfg.resume:
        return "resume = true: the initial weights already trained on the deleted recordings"
    if not requests:
        return (
            "no deletion request was filed after FedAvg in this run (a request filed before it was never "
            "trained on: the trained release is its own oracle)"
        )
    return None


def run_retrain_oracle(
    grid: Grid,
    *,
    cfg: RunSettings,
    initial: Mapping[str, torch.Tensor],
    requests: list[dict],
    n_nodes: int,
    evaluate: Callable[[int, ArrayRecord], MetricRecord] | None,
    traffic: Traffic,
) -> OracleOutcome:
    """FedAvg from ``initial`` again, now that the nodes leave their requested recordings out.

    ``evaluate`` is the central evaluation of each round (its rows are the oracle's curve); no
    federated evaluation and no importance map is asked of the nodes: neither changes the weights.
    """
    reason = oracle_skip_reason(cfg, requests)
    if reason is not None:
        log.info("retrain oracle skipped: %s", reason)
        return OracleOutcome(skipped=reason)
    outcome = OracleOutcome()

    def timed_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        metrics = evaluate(server_round, arrays)
        outcome.rounds.append({"round": server_round, **{k.replace("-", "_"): float(v) for k, v in metrics.items()}})
        outcome.eval_seconds += time.perf_counter() - start
        return metrics

    strategy = ImportanceFedAvg(
        collect_importance=False,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_available_nodes=n_nodes,
        min_train_nodes=n_nodes,
    )
    log.info(
        "retrain oracle: FedAvg for %d rounds without %d deleted recordings",
        cfg.num_rounds,
        sum(len(r["utt_ids"]) for r in requests),
    )
    start = time.perf_counter()
    try:
        outcome.state, _ = strategy.run(
            grid,
            initial=initial,
            traffic=traffic,
            num_rounds=cfg.num_rounds,
            timeout=cfg.round_timeout,
            evaluate=timed_evaluate if evaluate is not None else None,
        )
    except RuntimeError as exc:  # a round no node trained in: the report says so, the release still goes out
        log.warning("retrain oracle failed: %s", exc)
        return OracleOutcome(skipped=f"failed: {exc}")
    outcome.seconds = time.perf_counter() - start
    outcome.examples_per_round = dict(strategy.examples_per_round)
    return outcome
