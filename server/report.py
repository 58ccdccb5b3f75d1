"""``report.json``: what the default scenario did and what it cost (fields documented in README)."""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from flwr.app import Message

from serforget.common.release import ReleaseRegistry
from serforget.server.scenario import Scenario
from serforget.server.unlearning_round import RoundOutcome

REPORT_VERSION = 1


def build_report(
    *,
    scenario: Scenario,
    requests: list[dict],
    outcome: RoundOutcome,
    trained: Mapping[str, torch.Tensor],
    final: Mapping[str, torch.Tensor],
    v_trained: Any,
    v_unlearned: Any,
    release_replies: list[Message],
) -> dict:
    forget_ids = {u for r in requests for u in r["utt_ids"]}
    if scenario.layout is not None and forget_ids:
        forget, remain = scenario.forget_and_remain(forget_ids)
        before = scenario.privacy_and_accuracy(trained, forget, remain)
        after = scenario.privacy_and_accuracy(final, forget, remain)
        ablation = (scenario.privacy_and_accuracy(outcome.merged_unconstrained, forget, remain)
                    if outcome.merged_unconstrained is not None else None)
    else:  # deployment (or no scenario requests): the server never sees forget audio; devices report forget accuracy
        before, after = scenario.test_metrics(trained), scenario.test_metrics(final)
        ablation = scenario.test_metrics(outcome.merged_unconstrained) if outcome.merged_unconstrained is not None else None
    registry = ReleaseRegistry(scenario.server.releases)
    node_reports = [dict(r.content["metrics"]) for r in release_replies if not r.has_error()]
    node_unlearn = outcome.node_metrics
    return {
        "report_version": REPORT_VERSION,
        "finished_at": time.time(),
        "settings": {k: getattr(scenario.cfg, k) for k in scenario.cfg.__dataclass_fields__},
        "mode": scenario.cfg.mode,
        "n_nodes": scenario.n_nodes,
        "num_rounds": scenario.cfg.num_rounds,
        "fedavg_rounds": [r for r in scenario.rounds],
        "requests": [{k: (len(v) if k == "utt_ids" else v) for k, v in r.items()} for r in requests],
        "n_forget": sum(len(r["utt_ids"]) for r in requests) if requests else sum(
            int(m.get("n-forget", 0)) for m in outcome.node_metrics.values()),
        "before": before,
        "after": after,
        "after_without_elastic": ablation,
        "unlearning": {
            "pending_nodes": len(outcome.pending),
            "verdicts": [{"node": v.node_id, "accepted": v.accepted, "reason": v.reason,
                          "relative_norm": v.relative_norm, "open_s": v.open_seconds, "ua_drop": v.ua_drop} for v in outcome.verdicts],
            "applied_request_ids": outcome.applied_request_ids,
            "node_metrics": node_unlearn,
            "bytes_sent": outcome.bytes_sent,
            "bytes_received": outcome.bytes_received,
            "elastic": scenario.cfg.elastic,
        },
        "node_release_reports": node_reports,
        "releases": {
            "trained": v_trained.version,
            "unlearned": v_unlearned.version if v_unlearned else None,
            "published": registry.versions(),
            "revoked": sorted(registry.revoked()),
            "files": sorted((v_unlearned or v_trained).files),
        },
        "timings": {
            **scenario.timings,
            "node_unlearn_s_max": max((m.get("unlearn-s", 0.0) for m in node_unlearn.values()), default=0.0),
            "node_seal_s_max": max((m.get("seal-s", 0.0) for m in node_unlearn.values()), default=0.0),
            "server_open_s_total": sum(v.open_seconds for v in outcome.verdicts),
        },
    }
