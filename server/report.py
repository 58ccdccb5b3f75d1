"""``report.json``: what the default scenario did and what it cost (fields documented in docs/formats.md)."""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch
from flwr.app import Message

from serforget.common.release import ReleaseRegistry
from serforget.server.oracle import OracleOutcome
from serforget.server.scenario import Scenario
from serforget.server.unlearning_round import RoundOutcome

REPORT_VERSION = 2
#: issue 10's federated acceptance: FedAvg's accuracy on the deleted recordings must exceed the
#: retrain oracle's by this many points, or there is nothing for unlearning to remove
MEMORISATION_TARGET_PTS = 10.0


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
    oracle: OracleOutcome,
    fedavg_examples_per_round: Mapping[int, int],
) -> dict:
    forget_ids = {u for r in requests for u in r["utt_ids"]}
    groups = {
        kind: {u for r in requests if r["kind"] == kind for u in r["utt_ids"]}
        for kind in sorted({r["kind"] for r in requests})
    }
    oracle_metrics = None
    if scenario.layout is not None and forget_ids:
        forget, remain = scenario.forget_and_remain(forget_ids)
        before = scenario.privacy_and_accuracy(trained, forget, remain, groups)
        after = scenario.privacy_and_accuracy(final, forget, remain, groups)
        ablation = (
            scenario.privacy_and_accuracy(outcome.merged_unconstrained, forget, remain, groups)
            if outcome.merged_unconstrained is not None
            else None
        )
        if oracle.state is not None:
            oracle_metrics = scenario.privacy_and_accuracy(oracle.state, forget, remain, groups)
    else:  # deployment (or no scenario requests): the server never sees forget audio; devices report forget accuracy
        before, after = scenario.test_metrics(trained), scenario.test_metrics(final)
        ablation = (
            scenario.test_metrics(outcome.merged_unconstrained) if outcome.merged_unconstrained is not None else None
        )
        if oracle.state is not None:
            oracle_metrics = scenario.test_metrics(oracle.state)
    registry = ReleaseRegistry(scenario.server.releases)
    node_reports = [dict(r.content["metrics"]) for r in release_replies if not r.has_error()]
    node_unlearn = outcome.node_metrics
    return {
        "report_version": REPORT_VERSION,
        "finished_at": time.time(),
        "settings": scenario.cfg.as_run_config(),
        "mode": scenario.cfg.mode,
        "n_nodes": scenario.n_nodes,
        "labels": list(scenario.labels),
        "num_rounds": scenario.cfg.num_rounds,
        "fedavg_rounds": [r for r in scenario.rounds],
        "requests": [{k: (len(v) if k == "utt_ids" else v) for k, v in r.items()} for r in requests],
        "n_forget": sum(len(r["utt_ids"]) for r in requests)
        if requests
        else sum(int(m.get("n-forget", 0)) for m in outcome.node_metrics.values()),
        "before": before,
        "after": after,
        "after_without_elastic": ablation,
        "oracle": oracle_metrics,
        "retrain_oracle": {
            "ran": oracle.state is not None,
            "skipped": oracle.skipped,
            "rounds": oracle.rounds,
            # recordings trained on per round: the oracle's count is FedAvg's minus the deleted ones
            "examples_per_round": {str(k): v for k, v in sorted(oracle.examples_per_round.items())},
            "fedavg_examples_per_round": {str(k): v for k, v in sorted(fedavg_examples_per_round.items())},
        },
        "deleted_recordings": deleted_recordings(before, after, oracle_metrics, groups),
        "traffic": dict(scenario.traffic),
        "unlearning": {
            "pending_nodes": len(outcome.pending),
            "verdicts": [
                {
                    "node": v.node_id,
                    "accepted": v.accepted,
                    "reason": v.reason,
                    "relative_norm": v.relative_norm,
                    "open_s": v.open_seconds,
                    "ua_drop": v.ua_drop,
                }
                for v in outcome.verdicts
            ],
            "applied_request_ids": outcome.applied_request_ids,
            "target": dict(scenario.target),
            "held_out_gate": scenario.valid is not None,
            "node_metrics": node_unlearn,
            "bytes_sent": outcome.bytes_sent,
            "bytes_received": outcome.bytes_received,
            "constraint": scenario.cfg.constraint,
        },
        "node_release_reports": node_reports,
        "node_devices": {
            "train": dict(scenario.train_devices),
            "unlearn": {
                n: {"device": m["device"], "note": m.get("device-note", "")}
                for n, m in node_unlearn.items()
                if "device" in m
            },
        },
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
            **(
                {
                    "oracle_fedavg_s": oracle.seconds,
                    "oracle_eval_s": oracle.eval_seconds,
                    "oracle_train_s": oracle.train_seconds,
                }
                if oracle.state is not None
                else {}
            ),
        },
        "unlearning_vs_oracle": (
            {
                "unlearning_round_s": outcome.seconds,
                "oracle_train_s": oracle.train_seconds,
                "speedup": oracle.train_seconds / outcome.seconds if outcome.seconds > 0 else None,
            }
            if oracle.state is not None
            else None
        ),
    }


def deleted_recordings(before: dict, after: dict, oracle: dict | None, groups: Mapping[str, set[str]]) -> dict | None:
    """Issue 10's table: v1 (FedAvg), v2 (unlearned) and the oracle on the deleted recordings.

    Per model: accuracy (on the recordings' own labels) and the per-example attack's member rate
    and mean posterior; per model and request kind the same two rates; for v1 and v2 the mean
    per-example distance of their attack scores to the oracle's (0 = each recording is exactly
    as member-like as under the oracle); and the memorisation acceptance (v1 minus oracle).
    None where the server cannot see the recordings (deployment) or no oracle ran.
    """
    if oracle is None or "per_example_mia" not in before:
        return None
    models = {"v1": before, "v2": after, "oracle": oracle}
    table = {
        name: {
            "forget_acc": m["forget_acc"],
            "member_rate": m["per_example_mia"]["member_rate"],
            "mean_posterior": m["per_example_mia"]["mean_posterior"],
            "nonmember_rate": m["per_example_mia"]["nonmember_rate"],
            "remaining_member_rate": m["per_example_mia"]["remaining_member_rate"],
            "by_group": m["by_group"],
        }
        for name, m in models.items()
    }
    reference = oracle["per_example_mia"]["scores"]
    distance = {
        name: sum(abs(models[name]["per_example_mia"]["scores"][u] - s) for u, s in reference.items()) / len(reference)
        for name in ("v1", "v2")
    }
    gap = 100.0 * (before["forget_acc"] - oracle["forget_acc"])
    return {
        "n": len(reference),
        "n_by_group": {name: len(ids) for name, ids in groups.items()},
        "models": table,
        "score_distance_to_oracle": distance,
        "acceptance": {
            "v1_minus_oracle_forget_acc_pts": gap,
            "target_pts": MEMORISATION_TARGET_PTS,
            "met": gap >= MEMORISATION_TARGET_PTS,
        },
    }
