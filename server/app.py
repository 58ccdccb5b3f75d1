"""serforget ServerApp: FedAvg over speaker nodes, then an unlearning round and signed releases.

The handler is the scenario's table of contents; each step is a function of ``server/`` glue or
of ``common`` (no ML or crypto lives here).
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from serforget.common.models import build_model
from serforget.common.settings import RunSettings
from serforget.common.traffic import Traffic
from serforget.server.federation import applied_request_ids, latest_release_state, publish_release
from serforget.server.oracle import run_retrain_oracle
from serforget.server.report import build_report
from serforget.server.scenario import Scenario
from serforget.server.simulation import require_partition_nodes
from serforget.server.strategy import run_fedavg
from serforget.server.unlearning_round import announce_release, retry_by_node, run_unlearning_round

app = ServerApp()
log = logging.getLogger("serforget.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunSettings.from_mapping(context.run_config)
    scenario = Scenario.provision(cfg)
    if scenario.layout is not None:
        require_partition_nodes(grid, n_partitions=scenario.n_nodes)
    torch.manual_seed(cfg.seed)
    base = latest_release_state(scenario.server) if cfg.resume else None
    if cfg.num_rounds == 0 and base is None:
        raise ValueError("num-rounds = 0 (unlearning only) needs resume = true and a published release")
    model = build_model(arch=cfg.model_arch, config=cfg.model_config, labels=scenario.labels)
    initial = base[1] if base else model.state_dict()
    traffic = Traffic.of(model, cfg.model_trainable, initial)  # what travels (model.trainable)
    scenario.traffic = traffic.summary(n_nodes=scenario.n_nodes)
    release = dict(
        server=scenario.server,
        labels=scenario.labels,
        onnx=cfg.release_onnx_export,
        eval_manifest=scenario.eval_manifest,
        int8_max_ua_drop=cfg.release_int8_max_ua_drop,
    )
    if cfg.num_rounds > 0:
        fed = run_fedavg(grid, cfg=cfg, scenario=scenario, initial=initial, traffic=traffic)
        trained, importance, fedavg_examples = fed.state, fed.importance, fed.examples_per_round
        if importance is not None:
            scenario.server.save_importance(importance)
        v_trained = publish_release(
            model=scenario.model(trained),
            parent=base[0].version if base else None,
            metrics=scenario.rounds[-1] if scenario.rounds else {},
            **release,
        )
        target = scenario.held_out_accuracy(fed.result)
    else:
        (v_trained, trained), importance = base, traffic.restrict(scenario.server.load_importance())
        fedavg_examples = {}
        target = scenario.held_out_accuracy(None, release=v_trained)
    requests = scenario.file_requests() if cfg.scenario and scenario.layout is not None else []
    outcome = run_unlearning_round(
        grid,
        cfg=cfg,
        server=scenario.server,
        base_state=trained,
        base_version=v_trained.version,
        target_forget_acc=target,
        importance=importance,
        n_nodes=scenario.n_nodes,
        score=scenario.held_out_score(),
        traffic=traffic,
    )
    scenario.timings["unlearning_round_s"] = outcome.seconds
    v_unlearned = None
    if outcome.merged is not None:
        v_unlearned = publish_release(
            model=scenario.model(outcome.merged),
            parent=v_trained.version,
            applied_request_ids=outcome.applied_request_ids,
            metrics=scenario.test_metrics(outcome.merged),
            revoke_previous=True,
            reason="applies deletion requests " + ", ".join(outcome.applied_request_ids),
            **release,
        )
    # before the release announcement purges the deleted audio: the oracle's nodes still hold it and leave it out
    oracle = run_retrain_oracle(
        grid,
        cfg=cfg,
        initial=initial,
        requests=requests,
        n_nodes=scenario.n_nodes,
        evaluate=scenario.held_out_evaluate if scenario.test is not None else None,
        traffic=traffic,
    )
    final_state = outcome.merged if outcome.merged is not None else trained
    applied = sorted(applied_request_ids(scenario.server.releases))
    retry = retry_by_node(outcome, set(applied))
    release_replies = announce_release(
        grid,
        cfg=cfg,
        state=final_state,
        version=(v_unlearned or v_trained).version,
        applied=applied,
        retry=retry,
        releases=scenario.server.releases,
        traffic=traffic,
    )
    report = build_report(
        scenario=scenario,
        requests=requests,
        outcome=outcome,
        trained=trained,
        final=final_state,
        v_trained=v_trained,
        v_unlearned=v_unlearned,
        release_replies=release_replies,
        oracle=oracle,
        fedavg_examples_per_round=fedavg_examples,
    )
    path = scenario.write_report(report)
    log.info("report written to %s", path)
    print(f"serforget: report written to {path}")
