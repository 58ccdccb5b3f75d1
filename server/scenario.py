"""The default simulated scenario around the ServerApp: provisioning, evaluation, requests, report.

Evaluation here takes the researcher's view of a simulation: the server process can read the
synthetic corpus it provisioned (never the nodes' copies), so it can measure forget accuracy and
membership inference on the forgotten recordings. A deployed server has no such view; there the
nodes report forget accuracy themselves (``query.release`` replies, also in the report).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from flwr.app import ArrayRecord, MetricRecord

from serforget.client.node import file_deletion_request
from serforget.common.data import load_waveforms
from serforget.common.fsutil import atomic_write_json, atomic_write_text
from serforget.common.labels import task_labels
from serforget.common.manifest import read_manifest
from serforget.common.models import build_model
from serforget.common.settings import RunSettings
from serforget.common.training import evaluate_model, predict_logits
from serforget.server.federation import ServerDir
from serforget.server.simulation import SimulationLayout, provision_simulation

log = logging.getLogger("serforget.server")


@dataclass
class Scenario:
    cfg: RunSettings
    server: ServerDir
    layout: SimulationLayout | None  # None in deployment: the devices are real hosts
    labels: tuple[str, ...]
    valid: Any  # WaveformSet or None (deployment without an eval manifest)
    test: Any
    rounds: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    #: node name -> {"device", "note"} of its FedAvg training (from the replies' node-info)
    train_devices: dict[str, dict[str, str]] = field(default_factory=dict)
    #: the retrain-level target and where it came from (:meth:`held_out_accuracy`), shown in the report
    target: dict[str, Any] = field(default_factory=dict)
    #: what trains and travels and its bytes (common.traffic.Traffic.summary), shown in the report
    traffic: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def provision(cls, cfg: RunSettings) -> "Scenario":
        start = time.perf_counter()
        labels = task_labels(cfg.task)
        if cfg.mode == "deployment":
            server = ServerDir(cfg.server_path).init()
            held_out = (
                load_waveforms(read_manifest(cfg.eval_manifest), labels=labels, clip_seconds=cfg.clip_seconds)
                if cfg.eval_manifest
                else None
            )
            if held_out is None:
                log.warning(
                    "deployment without eval-manifest: no held-out gate on deltas (only signatures, the norm bound "
                    "and the elastic constraint check them) and the retrain-level target falls back to the nodes' "
                    "own evaluation of their training recordings"
                )
            return cls(cfg, server, None, labels, held_out, held_out)
        layout = provision_simulation(
            root=cfg.work_path,
            synth=cfg.synth_config,
            manifest=cfg.data_manifest_path,
            task=cfg.task,
            split=cfg.split_spec,
        )
        load = lambda name: load_waveforms(
            read_manifest(layout.splits[name]), labels=labels, clip_seconds=cfg.clip_seconds
        )
        scenario = cls(cfg, layout.server, layout, labels, load("valid"), load("test"))
        scenario.timings["provision_s"] = time.perf_counter() - start
        return scenario

    @property
    def n_nodes(self) -> int:
        return len(self.layout.speakers) if self.layout is not None else self.cfg.min_nodes

    @property
    def eval_manifest(self) -> Path | None:
        if self.layout is not None:
            return self.layout.splits["test"]
        return Path(self.cfg.eval_manifest) if self.cfg.eval_manifest else None

    def held_out_accuracy(self, federated: Any, *, release: Any = None) -> float:
        """What the devices aim forget accuracy at (``retrain-level``): held-out UA of the global model.

        In order of preference: central validation UA of the last round; the nodes' federated
        evaluation accuracy of the last round; the held-out UA stored with the release resumed
        from; chance level (1 / number of classes) when nothing was measured. Every fallback is
        logged as a warning and named in the report (``unlearning.target``): the nodes' own
        evaluation scores the recordings they trained on, so on a memorising model it sits near
        1.0 and asks the devices to forget almost nothing.
        """
        value, source = self._target(federated, release)
        self.target = {"forget_acc": value, "source": source}
        if not self.rounds:
            log.warning("retrain-level target %.3f comes from %s", value, source)
        return value

    def _target(self, federated: Any, release: Any) -> tuple[float, str]:
        if self.rounds:
            return float(self.rounds[-1]["valid_ua"]), "held-out validation UA of the last FedAvg round"
        if federated is not None and federated.evaluate_metrics_clientapp:
            last = max(federated.evaluate_metrics_clientapp)
            return (
                float(federated.evaluate_metrics_clientapp[last]["eval-acc"]),
                "the nodes' own federated evaluation (eval-acc on their training recordings; no eval-manifest)",
            )
        if release is not None:
            for key in ("valid_ua", "test_ua"):
                if key in release.metrics:
                    return float(release.metrics[key]), f"{key} stored with release v{release.version}"
        return 1.0 / len(self.labels), "chance level (nothing held out was measured)"

    @property
    def report_dir(self) -> Path:
        return self.cfg.work_path / "report"

    def model(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        model = build_model(arch=self.cfg.model_arch, config=self.cfg.model_config, labels=self.labels)
        model.load_state_dict(dict(state))
        return model.eval()

    def central_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """FedAvg's centralized evaluation on the held-out valid and test speakers (rows kept in ``rounds``)."""
        row = self.held_out_row(server_round, arrays)
        if row is None:
            return MetricRecord({})
        self.rounds.append(row)
        return MetricRecord({k.replace("_", "-"): float(v) for k, v in row.items() if k != "round"})

    def held_out_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """The same evaluation without recording the row: for a run that is not the release's (the retrain oracle)."""
        row = self.held_out_row(server_round, arrays)
        return MetricRecord({k.replace("_", "-"): float(v) for k, v in (row or {}).items() if k != "round"})

    def held_out_row(self, server_round: int, arrays: ArrayRecord) -> dict | None:
        if self.test is None:
            return None
        model = self.model(arrays.to_torch_state_dict())
        test = evaluate_model(model, self.test, labels=self.labels, device=self.cfg.device)
        valid = evaluate_model(model, self.valid, labels=self.labels, device=self.cfg.device)
        return {"round": server_round, "test_ua": test["ua"], "test_wa": test["wa"], "valid_ua": valid["ua"]}

    def held_out_score(self) -> Callable[[Mapping[str, torch.Tensor]], float] | None:
        """Validation-speaker UA of given weights: the server's utility gate on deltas (None without a held-out set)."""
        if self.valid is None:
            return None
        return lambda state: evaluate_model(self.model(state), self.valid, labels=self.labels, device=self.cfg.device)[
            "ua"
        ]

    def test_metrics(self, state: Mapping[str, torch.Tensor]) -> dict:
        """Held-out UA/WA of a model (empty without a held-out set): stored in release metadata."""
        if self.test is None:
            return {}
        report = evaluate_model(self.model(state), self.test, labels=self.labels, device=self.cfg.device)
        return {"test_ua": report["ua"], "test_wa": report["wa"]}

    def file_requests(self) -> list[dict]:
        """The default scenario's two speakers: one deletes some recordings, one deletes everything."""
        cfg, out = self.cfg, []
        partial = self.layout.node_dir(cfg.scenario_partial_node)
        utts = sorted(u.utt_id for u in partial.utterances())
        chosen = sorted(random.Random(cfg.seed).sample(utts, min(cfg.scenario_partial_n, len(utts))))
        req = file_deletion_request(data_dir=partial.root, utt_ids=chosen)
        out.append(
            {"node": partial.node_id, "kind": "partial", "request_id": req.request_id, "utt_ids": list(req.utt_ids)}
        )
        whole = self.layout.node_dir(cfg.scenario_whole_node)
        req = file_deletion_request(data_dir=whole.root, whole_speaker=True)
        out.append(
            {"node": whole.node_id, "kind": "whole-speaker", "request_id": req.request_id, "utt_ids": list(req.utt_ids)}
        )
        return out

    def forget_and_remain(self, forget_ids: set[str], *, max_remain: int = 400):
        """The forgotten recordings and a sample of the remaining training recordings (corpus copy)."""
        train = read_manifest(self.layout.splits["train"])
        forget = [u for u in train if u.utt_id in forget_ids]
        remain = [u for u in train if u.utt_id not in forget_ids]
        remain = random.Random(self.cfg.seed).sample(remain, min(max_remain, len(remain)))
        load = lambda rows: load_waveforms(rows, labels=self.labels, clip_seconds=self.cfg.clip_seconds)
        return load(forget), load(remain)

    def privacy_and_accuracy(
        self, state: Mapping[str, torch.Tensor], forget, remain, groups: Mapping[str, set[str]] | None = None
    ) -> dict:
        """Forget/remain/test accuracy, forget-set population MIAs and the per-example attack of one global model.

        ``groups`` (name -> utt ids of the forget set, e.g. per request kind) adds each group's
        forget accuracy and per-example member rate: a whole-speaker deletion and a few
        recordings of a speaker who stays are different questions for a model.
        """
        from serforget.common.per_example_mia import logit_confidence, per_example_attack
        from serforget.common.privacy import membership_inference

        model = self.model(state)
        logits = {
            name: predict_logits(model, data, device=self.cfg.device)
            for name, data in (("forget", forget), ("remain", remain), ("test", self.test))
        }
        test = evaluate_model(model, self.test, labels=self.labels, device=self.cfg.device)
        acc = (
            lambda name, data: float((logits[name].argmax(1) == data.targets).float().mean())
            if len(data)
            else float("nan")
        )
        mia = membership_inference(
            member_logits=logits["remain"],
            member_targets=remain.targets,
            nonmember_logits=logits["test"],
            nonmember_targets=self.test.targets,
            forget_logits=logits["forget"],
            forget_targets=forget.targets,
        )
        attack = per_example_attack(
            member_phi=logit_confidence(logits["remain"], remain.targets),
            nonmember_phi=logit_confidence(logits["test"], self.test.targets),
            target_phi=logit_confidence(logits["forget"], forget.targets),
            seed=self.cfg.seed,
        )
        correct = (logits["forget"].argmax(1) == forget.targets).tolist()
        by_group = {}
        for name, ids in (groups or {}).items():
            rows = [i for i, utt in enumerate(forget.utt_ids) if utt in ids]
            if rows:
                by_group[name] = {
                    "n": len(rows),
                    "forget_acc": sum(correct[i] for i in rows) / len(rows),
                    "member_rate": sum(attack.scores[i] > 0 for i in rows) / len(rows),
                }
        return {
            "forget_acc": acc("forget", forget),
            "remain_acc": acc("remain", remain),
            "test_ua": test["ua"],
            "test_wa": test["wa"],
            "mia": {name: result.to_dict() for name, result in mia.items()},
            "per_example_mia": attack.to_dict(forget.utt_ids),
            "by_group": by_group,
        }

    def write_report(self, report: dict) -> Path:
        out = self.report_dir
        out.mkdir(parents=True, exist_ok=True)
        plot_report(report, out)
        atomic_write_text(out / "report.md", report_markdown(report))
        return atomic_write_json(out / "report.json", report)


def report_markdown(report: dict) -> str:
    b, a, o = report["before"], report["after"], report.get("oracle") or {}
    lines = [
        f"# serforget simulation report (run finished {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(report['finished_at']))} UTC)",
        "",
        f"nodes: {report['n_nodes']}, FedAvg rounds: {report['num_rounds']}, "
        f"releases: {report['releases']['published']} (revoked: {report['releases']['revoked']})",
        "",
        "| metric | before unlearning (v%d) | after unlearning (v%d) | retrain oracle |"
        % (report["releases"]["trained"], report["releases"]["unlearned"] or 0),
        "|---|---:|---:|---:|",
    ]
    cell = lambda m, key: f"{m[key]:.3f}" if key in m else "-"
    for key, label in (
        ("forget_acc", "forget accuracy"),
        ("remain_acc", "remaining-set accuracy"),
        ("test_ua", "test UA"),
        ("test_wa", "test WA"),
    ):
        if key in b and key in a:
            lines.append(f"| {label} | {b[key]:.3f} | {a[key]:.3f} | {cell(o, key)} |")
    if report.get("after_without_elastic") and "forget_acc" in report["after_without_elastic"]:
        w = report["after_without_elastic"]
        lines.append(
            f"| (same deltas without the elastic constraint) forget acc / test UA | | {w['forget_acc']:.3f} / {w['test_ua']:.3f} | |"
        )
    for attack in ("loss", "confidence", "entropy"):
        if attack in b.get("mia", {}):
            oracle_auc = f"{o['mia'][attack]['auc']:.3f}" if attack in o.get("mia", {}) else "-"
            lines.append(
                f"| MIA AUC ({attack}) on forget set | {b['mia'][attack]['auc']:.3f} | {a['mia'][attack]['auc']:.3f} | {oracle_auc} |"
            )
    for node in report["node_release_reports"]:
        if node.get("forget-acc-release", -1.0) >= 0:
            lines.append(
                f"| a device's forget accuracy on its deleted recordings, measured before purge | | {node['forget-acc-release']:.3f} | |"
            )
    lines += ["", *deleted_recordings_markdown(report)]
    lines += devices_markdown(report.get("node_devices") or {})
    t = report["timings"]
    lines += ["", "| timing | seconds |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in sorted(t.items())]
    lines += [
        "",
        f"bytes sent to nodes for unlearning: {report['unlearning']['bytes_sent']}, "
        f"sealed deltas received: {report['unlearning']['bytes_received']}",
        "",
    ]
    for v in report["unlearning"]["verdicts"]:
        lines.append(f"- delta from {v['node']}: {v['reason']}")
    return "\n".join(lines) + "\n"


def devices_markdown(devices: dict) -> list[str]:
    """Where the nodes trained and unlearned (``cuda: 3 nodes``), and every node's note (asked for a GPU, ran on CPU)."""
    lines = []
    for step in ("train", "unlearn"):
        per_node = devices.get(step) or {}
        if per_node:
            counts: dict[str, int] = {}
            for d in per_node.values():
                counts[d["device"]] = counts.get(d["device"], 0) + 1
            lines.append(f"devices ({step}): " + ", ".join(f"{dev}: {n} node(s)" for dev, n in sorted(counts.items())))
            lines += [f"- {node}: {d['note']}" for node, d in sorted(per_node.items()) if d.get("note")]
    return ["", *lines] if lines else []


def deleted_recordings_markdown(report: dict) -> list[str]:
    """The deleted recordings under v1, v2 and the retrain oracle (or why there is no oracle)."""
    oracle = report.get("retrain_oracle") or {}
    if not oracle.get("ran"):
        return [f"retrain oracle: not run ({oracle.get('skipped', 'not part of this report')})"]
    lines = []
    d = report.get("deleted_recordings")
    if d is not None:
        models = d["models"]
        lines += [
            f"## The {d['n']} deleted recordings ("
            + ", ".join(f"{name}: {n}" for name, n in d["n_by_group"].items())
            + ")",
            "",
            "| model | accuracy | "
            + " | ".join(f"accuracy ({g})" for g in d["n_by_group"])
            + " | per-example attack: called member | mean membership posterior | attack on held-out non-members (FPR) / remaining (TPR) |",
            "|---|---:|" + "---:|" * len(d["n_by_group"]) + "---:|---:|---:|",
        ]
        names = {
            "v1": f"v{report['releases']['trained']} (FedAvg)",
            "v2": f"v{report['releases']['unlearned']} (unlearned)"
            if report["releases"]["unlearned"]
            else "no unlearned release",
            "oracle": "retrain oracle",
        }
        for key, m in models.items():
            groups = " | ".join(
                f"{m['by_group'][g]['forget_acc']:.3f}" if g in m["by_group"] else "-" for g in d["n_by_group"]
            )
            lines.append(
                f"| {names[key]} | {m['forget_acc']:.3f} | {groups} | {m['member_rate']:.3f} | {m['mean_posterior']:.3f} | "
                f"{m['nonmember_rate']:.3f} / {m['remaining_member_rate']:.3f} |"
            )
        dist = d["score_distance_to_oracle"]
        acc = d["acceptance"]
        lines += [
            "",
            f"mean per-example distance of the attack's log likelihood ratio to the oracle's: "
            f"v1 {dist['v1']:.2f}, v2 {dist['v2']:.2f}",
            f"memorisation (issue 10, federated): v1 is {acc['v1_minus_oracle_forget_acc_pts']:.1f} accuracy points above the "
            f"oracle on the deleted recordings (target >= {acc['target_pts']:.0f}): **{'met' if acc['met'] else 'missed'}**",
        ]
    speed = report.get("unlearning_vs_oracle")
    if speed:
        ratio = f"{speed['speedup']:.1f}x" if speed["speedup"] else "n/a"
        lines.append(
            f"wall time: unlearning round {speed['unlearning_round_s']:.1f} s vs retrain oracle {speed['oracle_train_s']:.1f} s "
            f"(FedAvg without the deleted recordings, central evaluation excluded): {ratio}"
        )
    examples = oracle.get("examples_per_round", {})
    fedavg = oracle.get("fedavg_examples_per_round", {})
    if examples and fedavg:
        first = next(iter(examples))
        lines.append(f"recordings trained on per round: FedAvg {fedavg.get(first, '-')}, oracle {examples[first]}")
    return lines


def plot_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.0, 1.6, 0.7]})
    rounds = report["fedavg_rounds"]
    ax1.plot([r["round"] for r in rounds], [r["test_ua"] for r in rounds], marker="o", label="test UA (FedAvg)")
    ax1.plot([r["round"] for r in rounds], [r["valid_ua"] for r in rounds], marker=".", label="valid UA (FedAvg)")
    oracle_rounds = [r for r in (report.get("retrain_oracle") or {}).get("rounds", []) if "test_ua" in r]
    if oracle_rounds:
        ax1.plot(
            [r["round"] for r in oracle_rounds],
            [r["test_ua"] for r in oracle_rounds],
            marker="x",
            linestyle="--",
            label="test UA (retrain oracle)",
        )
    if report.get("labels"):
        ax1.axhline(1.0 / len(report["labels"]), color="grey", linestyle=":", linewidth=1, label="chance")
    ax1.set_xlabel("FedAvg round")
    ax1.set_ylabel("UA")
    ax1.set_title("federated training (central evaluation)")
    ax1.legend(fontsize=8)
    models = [("before", "v1 (FedAvg)"), ("after", "v2 (unlearned)")] + (
        [("oracle", "retrain oracle")] if report.get("oracle") else []
    )
    named = [
        (k, n)
        for k, n in (("forget_acc", "forget acc"), ("remain_acc", "remain acc"), ("test_ua", "test UA"))
        if all(k in report[m] for m, _ in models)
    ]
    values = {m: [report[m][k] for k, _ in named] for m, _ in models}
    names = [n for _, n in named]
    if all("per_example_mia" in report[m] for m, _ in models):
        for m, _ in models:
            values[m].append(report[m]["per_example_mia"]["member_rate"])
        names.append("forget called member\n(per-example attack)")
    elif report["before"].get("mia"):
        mia_key = next(iter(report["before"]["mia"]))
        for m, _ in models:
            values[m].append(report[m]["mia"][mia_key]["auc"])
        names.append(f"MIA AUC ({mia_key})")
    width = 0.8 / len(models)
    for j, (m, label) in enumerate(models):
        ax2.bar(
            [i + (j - (len(models) - 1) / 2) * width for i in range(len(names))], values[m], width=width, label=label
        )
    ax2.set_xticks(list(range(len(names))), names, fontsize=8)
    ax2.set_ylim(0, 1)
    ax2.set_title("the deleted recordings (forget set) and the rest")
    ax2.legend(fontsize=8)
    speed = report.get("unlearning_vs_oracle")
    if speed:
        ax3.bar(
            ["unlearning\nround", "retrain\noracle"],
            [speed["unlearning_round_s"], speed["oracle_train_s"]],
            color=["tab:orange", "tab:green"],
        )
        ax3.set_yscale("log")
        ax3.set_ylabel("wall time (s, log scale)")
        ax3.set_title(f"cost: {speed['speedup']:.1f}x" if speed["speedup"] else "cost")
    else:
        ax3.axis("off")
        ax3.text(0.5, 0.5, "no retrain oracle\nin this run", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)
    plt.close(fig)
