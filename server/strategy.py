"""FedAvg that also keeps the global importance map the nodes send with their updates, and the run that uses it."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from serforget.common.protocol import (
    DEVICE,
    DEVICE_NOTE,
    FROZEN_SHA256,
    IMPORTANCE,
    NODE_ID,
    NODE_INFO,
    SERVER_ROUND,
    WANT_IMPORTANCE,
)
from serforget.common.settings import RunSettings
from serforget.common.traffic import Traffic
from serforget.server.federation import weighted_average

if TYPE_CHECKING:
    from serforget.server.scenario import Scenario

_INFO_MAX_CHARS = 200
log = logging.getLogger("serforget.server")


def node_device(msg: Message) -> dict[str, str] | None:
    """``{"node", "device", "note"}`` from a reply's node-info record (None when absent or malformed).

    A node's own claim, only ever shown in the report: strings are required and cut to a bounded
    length so a hostile node cannot bloat or break it.
    """
    try:
        info = msg.content.config_records.get(NODE_INFO)
        if info is None:
            return None
        values = {
            name: info.get(key, "") for name, key in (("node", NODE_ID), ("device", DEVICE), ("note", DEVICE_NOTE))
        }
        if not all(isinstance(v, str) for v in values.values()):
            return None
        return {k: v[:_INFO_MAX_CHARS] for k, v in values.items()}
    except Exception:  # noqa: BLE001 - a malformed record only loses this node's device line
        return None


class ImportanceFedAvg(FedAvg):
    """FedAvg over ``arrays``; the ``importance`` records are averaged by example count on the side.

    Flower's FedAvg expects exactly one ArrayRecord per reply, so the importance record is taken
    out of each reply before the standard aggregation runs.
    """

    def __init__(self, *, collect_importance: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.importance: dict[str, torch.Tensor] | None = None
        #: whether nodes send importance maps; only the last round's is kept, so only it is asked
        #: for (a node's MAS pass costs about a local epoch)
        self.collect_importance = collect_importance
        self._last_round = 0
        #: round -> recordings the nodes trained on (sum of their ``num-examples``): lets a report
        #: show what a run excluded, e.g. the retrain oracle's missing deleted recordings
        self.examples_per_round: dict[int, int] = {}
        #: node name -> device it trained on in its latest round (and a note when not what was asked)
        self.devices: dict[str, dict[str, str]] = {}
        #: round -> error reasons of the nodes whose train reply was an error (e.g. ``device = cuda``
        #: on a node without a GPU): lets the ServerApp stop when no node trained at all
        self.node_errors: dict[int, list[str]] = {}
        #: name -> shape of every tensor sent to the nodes: a reply must return exactly these
        self._layout: dict[str, tuple[int, ...]] = {}

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *args, **kwargs) -> Result:
        self._last_round = num_rounds
        self.expect(initial_arrays)
        return super().start(grid, initial_arrays, num_rounds, *args, **kwargs)

    def expect(self, arrays: ArrayRecord) -> None:
        """Train replies must return exactly these tensors (names and shapes): what was sent."""
        self._layout = {k: tuple(v.shape) for k, v in arrays.items()}

    def _reply_problem(self, msg: Message) -> str | None:
        """Why a train reply cannot be averaged (None when it can).

        Flower's own consistency check raises for the whole round, and a reply with other tensors
        would break completing the model afterwards: such a reply is that node's error instead.
        """
        records = [r for name, r in msg.content.array_records.items() if name != IMPORTANCE]
        try:
            weight = float(next(iter(msg.content.metric_records.values()))[self.weighted_by_key])
        except (StopIteration, KeyError, TypeError, ValueError):
            weight = float("nan")
        if len(records) != 1 or not math.isfinite(weight) or weight < 0:
            return "malformed train reply: one ArrayRecord and a finite num-examples >= 0 expected"
        arrays = records[0]
        shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        if shapes != self._layout:
            extra, missing = sorted(set(shapes) - set(self._layout)), sorted(set(self._layout) - set(shapes))
            wrong = sorted(k for k in set(shapes) & set(self._layout) if shapes[k] != self._layout[k])
            return f"train reply tensors differ from those sent: missing {missing[:3]}, unexpected {extra[:3]}, shape {wrong[:3]}"
        return None

    def run(
        self,
        grid: Grid,
        *,
        initial: Mapping[str, torch.Tensor],
        traffic: Traffic,
        num_rounds: int,
        timeout: float,
        evaluate: Callable[[int, ArrayRecord], MetricRecord] | None = None,
    ) -> tuple[dict[str, torch.Tensor], Result]:
        """:meth:`start` with only ``traffic``'s tensors travelling; ``evaluate`` and the state returned see the whole model.

        Raises (:func:`require_training`) when a round had no node that trained.
        """
        frozen = ConfigRecord({FROZEN_SHA256: traffic.frozen})
        whole = lambda arrays: traffic.complete(initial, arrays.to_torch_state_dict())  # noqa: E731
        result = self.start(
            grid=grid,
            initial_arrays=ArrayRecord(traffic.send(initial)),
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=frozen,
            evaluate_config=frozen,
            evaluate_fn=(lambda r, a: evaluate(r, ArrayRecord(whole(a)))) if evaluate is not None else None,
        )
        require_training(self, num_rounds=num_rounds)
        return whole(result.arrays), result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        wanted = self.collect_importance and server_round == self._last_round
        config = ConfigRecord({**dict(config), SERVER_ROUND: server_round, WANT_IMPORTANCE: wanted})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        maps, examples = [], 0
        self.node_errors[server_round] = [str(msg.error.reason)[:_INFO_MAX_CHARS] for msg in replies if msg.has_error()]
        problems = {id(msg): self._reply_problem(msg) for msg in replies if not msg.has_error()}
        for msg in replies:
            if not msg.has_error() and problems[id(msg)]:
                log.warning("train reply of node %s left out: %s", msg.metadata.src_node_id, problems[id(msg)])
                self.node_errors[server_round].append(problems[id(msg)][:_INFO_MAX_CHARS])
        replies = [msg for msg in replies if msg.has_error() or not problems[id(msg)]]
        for msg in replies:
            if msg.has_error():
                continue
            info = node_device(msg)
            if info is not None:
                self.devices[info["node"] or str(msg.metadata.src_node_id)] = {
                    "device": info["device"],
                    "note": info["note"],
                }
            weight = float(next(iter(msg.content.metric_records.values()))[self.weighted_by_key])  # checked above
            examples += int(weight)
            if IMPORTANCE not in msg.content:
                continue
            importance = msg.content[IMPORTANCE].to_torch_state_dict()
            del msg.content[IMPORTANCE]
            if all(self._layout.get(k) == tuple(v.shape) for k, v in importance.items()):
                maps.append((importance, weight))
        self.examples_per_round[server_round] = examples
        if maps:  # honest nodes send the same tensors: average the maps of the most common set of names
            common = Counter(frozenset(m) for m, _ in maps).most_common(1)[0][0]
            maps = [(m, w) for m, w in maps if frozenset(m) == common and w > 0]
        if maps:
            self.importance = weighted_average(maps)
        return super().aggregate_train(server_round, replies)


def require_training(strategy: ImportanceFedAvg, *, num_rounds: int) -> None:
    """Stop the run when a FedAvg round had no node that trained, naming the nodes' errors.

    Why: FedAvg keeps the previous global model when every reply failed, so a setting every node
    rejects (``device = cuda`` without a GPU, a missing partition) would otherwise publish an
    untrained model as if nothing happened.
    """
    for server_round in range(1, num_rounds + 1):
        if strategy.examples_per_round.get(server_round, 0) == 0:
            errors = strategy.node_errors.get(server_round, [])
            detail = f"; node errors: {sorted(set(errors))}" if errors else ""
            raise RuntimeError(f"FedAvg round {server_round}: no node trained on any recording{detail}")


@dataclass
class FedAvgOutcome:
    #: the full trained global model (the travelling tensors completed with the frozen rest)
    state: dict[str, torch.Tensor]
    importance: dict[str, torch.Tensor] | None
    examples_per_round: dict[int, int]
    result: Result


def run_fedavg(
    grid: Grid, *, cfg: RunSettings, scenario: "Scenario", initial: Mapping[str, torch.Tensor], traffic: Traffic
) -> FedAvgOutcome:
    """FedAvg over every speaker node from ``initial``; only ``traffic``'s tensors travel.

    The central evaluation of each round sees the completed model; the scenario keeps the
    timing and the devices the nodes trained on.
    """
    strategy = ImportanceFedAvg(
        fraction_train=1.0,
        fraction_evaluate=cfg.fraction_evaluate,
        min_available_nodes=scenario.n_nodes,
        min_train_nodes=scenario.n_nodes,
    )
    start = time.perf_counter()
    state, result = strategy.run(
        grid,
        initial=initial,
        traffic=traffic,
        num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout,
        evaluate=scenario.central_evaluate,
    )
    scenario.timings["fedavg_s"] = time.perf_counter() - start
    scenario.train_devices = dict(strategy.devices)
    return FedAvgOutcome(
        state=state,
        importance=strategy.importance,
        examples_per_round=dict(strategy.examples_per_round),
        result=result,
    )
