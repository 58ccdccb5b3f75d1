"""serforget ServerApp: FedAvg over speaker nodes, then an unlearning round and signed releases.

The handler is the scenario's table of contents; each step is a function of ``server/`` glue or
of ``common`` (no ML or crypto lives here).
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.federation import applied_request_ids, publish_release
from common.models import build_model
from common.node import state_sha256
from common.settings import RunSettings
from common.training import evaluate_model
from server.report import build_report
from server.scenario import Scenario
from server.strategy import ImportanceFedAvg
from server.unlearning_round import announce_release, run_unlearning_round

app = ServerApp()
log = logging.getLogger("serforget.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunSettings.from_mapping(context.run_config)
    scenario = Scenario.provision(cfg)
    n_nodes = len(scenario.layout.speakers)
    torch.manual_seed(cfg.seed)
    model = build_model(arch=cfg.arch, config=cfg.model_config, labels=scenario.labels)
    strategy = ImportanceFedAvg(fraction_train=1.0, fraction_evaluate=cfg.fraction_evaluate,
                                min_available_nodes=n_nodes, min_train_nodes=n_nodes)
    start = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_rounds,
                            timeout=cfg.round_timeout, train_config=ConfigRecord({}), evaluate_fn=scenario.central_evaluate)
    scenario.timings["fedavg_s"] = time.perf_counter() - start
    trained = result.arrays.to_torch_state_dict()
    v_trained = publish_release(server=scenario.layout.server, model=scenario.model(trained), labels=scenario.labels,
                                parent=None, metrics=scenario.rounds[-1], onnx=cfg.onnx_export,
                                eval_manifest=scenario.layout.splits["test"], int8_max_ua_drop=cfg.int8_max_ua_drop)
    requests = scenario.file_requests() if cfg.scenario else []
    outcome = run_unlearning_round(grid, cfg=cfg, server=scenario.layout.server, base_state=trained,
                                   base_version=v_trained.version, target_forget_acc=scenario.rounds[-1]["valid_ua"],
                                   importance=strategy.importance)
    scenario.timings["unlearning_round_s"] = outcome.seconds
    v_unlearned = None
    if outcome.merged is not None:
        unlearned = scenario.model(outcome.merged)
        test = evaluate_model(unlearned, scenario.test, labels=scenario.labels, device=cfg.device)
        metrics = {"test_ua": test["ua"], "test_wa": test["wa"]}
        v_unlearned = publish_release(server=scenario.layout.server, model=unlearned, labels=scenario.labels,
                                      parent=v_trained.version, applies_requests=outcome.applied_request_ids,
                                      metrics=metrics, onnx=cfg.onnx_export, eval_manifest=scenario.layout.splits["test"],
                                      int8_max_ua_drop=cfg.int8_max_ua_drop, revoke_previous=True,
                                      reason="applies deletion requests " + ", ".join(outcome.applied_request_ids))
    final_state = outcome.merged if outcome.merged is not None else trained
    applied = sorted(applied_request_ids(scenario.layout.server.releases))
    retry = [rid for rs in outcome.pending.values() for rid in rs if rid not in applied]
    release_replies = announce_release(grid, cfg=cfg, state=final_state, version=(v_unlearned or v_trained).version,
                                       applied=applied, retry=retry)
    report = build_report(scenario=scenario, requests=requests, outcome=outcome, trained=trained, final=final_state,
                          v_trained=v_trained, v_unlearned=v_unlearned, release_replies=release_replies,
                          n_nodes=n_nodes, federated=result)
    path = scenario.write_report(report)
    log.info("report written to %s", path)
    print(f"serforget: report written to {path}")
