"""The default simulated scenario around the ServerApp: provisioning, evaluation, requests, report.

Evaluation here takes the researcher's view of a simulation: the server process can read the
synthetic corpus it provisioned (never the nodes' copies), so it can measure forget accuracy and
membership inference on the forgotten recordings. A deployed server has no such view; there the
nodes report forget accuracy themselves (``query.release`` replies, also in the report).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from flwr.app import ArrayRecord, MetricRecord

from serforget.common.corpora.synth import SynthConfig
from serforget.common.data import load_waveforms
from serforget.common.fsutil import atomic_write_json, atomic_write_text
from serforget.common.labels import task_labels
from serforget.common.manifest import read_manifest
from serforget.common.models import build_model
from serforget.client.node import file_deletion_request
from serforget.server.federation import ServerDir
from serforget.common.settings import RunSettings
from serforget.server.simulation import SimulationLayout, provision_simulation
from serforget.common.training import evaluate_model, predict_logits


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

    @classmethod
    def provision(cls, cfg: RunSettings) -> "Scenario":
        start = time.perf_counter()
        labels = task_labels(cfg.task)
        if cfg.mode == "deployment":
            server = ServerDir(cfg.server_path).init()
            held_out = (load_waveforms(read_manifest(cfg.eval_manifest), labels=labels, clip_seconds=cfg.clip_seconds)
                        if cfg.eval_manifest else None)
            return cls(cfg, server, None, labels, held_out, held_out)
        layout = provision_simulation(root=cfg.work_path, synth=SynthConfig(n_speakers=cfg.synth_speakers, sentences_per_speaker=cfg.synth_sentences,
                                                                        takes_per_emotion=cfg.synth_takes, seed=cfg.seed),
                                      task=cfg.task, n_valid=cfg.valid_speakers, n_test=cfg.test_speakers, seed=cfg.seed)
        load = lambda name: load_waveforms(read_manifest(layout.splits[name]), labels=labels, clip_seconds=cfg.clip_seconds)
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
        from; chance level (1 / number of classes) when nothing was measured.
        """
        if self.rounds:
            return float(self.rounds[-1]["valid_ua"])
        if federated is not None and federated.evaluate_metrics_clientapp:
            last = max(federated.evaluate_metrics_clientapp)
            return float(federated.evaluate_metrics_clientapp[last]["eval-acc"])
        if release is not None:
            for key in ("valid_ua", "test_ua"):
                if key in release.metrics:
                    return float(release.metrics[key])
        return 1.0 / len(self.labels)

    @property
    def report_dir(self) -> Path:
        return self.cfg.work_path / "report"

    def model(self, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        model = build_model(arch=self.cfg.arch, config=self.cfg.model_config, labels=self.labels)
        model.load_state_dict(dict(state))
        return model.eval()

    def central_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """FedAvg's centralized evaluation on the held-out valid and test speakers."""
        if self.test is None:
            return MetricRecord({})
        model = self.model(arrays.to_torch_state_dict())
        test = evaluate_model(model, self.test, labels=self.labels, device=self.cfg.device)
        valid = evaluate_model(model, self.valid, labels=self.labels, device=self.cfg.device)
        row = {"round": server_round, "test_ua": test["ua"], "test_wa": test["wa"], "valid_ua": valid["ua"]}
        self.rounds.append(row)
        return MetricRecord({k.replace("_", "-"): float(v) for k, v in row.items() if k != "round"})

    def held_out_score(self) -> Callable[[Mapping[str, torch.Tensor]], float] | None:
        """Validation-speaker UA of given weights: the server's utility gate on deltas (None without a held-out set)."""
        if self.valid is None:
            return None
        return lambda state: evaluate_model(self.model(state), self.valid, labels=self.labels, device=self.cfg.device)["ua"]

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
        out.append({"node": partial.node_id, "kind": "partial", "request_id": req.request_id, "utt_ids": list(req.utt_ids)})
        whole = self.layout.node_dir(cfg.scenario_whole_node)
        req = file_deletion_request(data_dir=whole.root, whole_speaker=True)
        out.append({"node": whole.node_id, "kind": "whole-speaker", "request_id": req.request_id, "utt_ids": list(req.utt_ids)})
        return out

    def forget_and_remain(self, forget_ids: set[str], *, max_remain: int = 400):
        """The forgotten recordings and a sample of the remaining training recordings (corpus copy)."""
        train = read_manifest(self.layout.splits["train"])
        forget = [u for u in train if u.utt_id in forget_ids]
        remain = [u for u in train if u.utt_id not in forget_ids]
        remain = random.Random(self.cfg.seed).sample(remain, min(max_remain, len(remain)))
        load = lambda rows: load_waveforms(rows, labels=self.labels, clip_seconds=self.cfg.clip_seconds)
        return load(forget), load(remain)

    def privacy_and_accuracy(self, state: Mapping[str, torch.Tensor], forget, remain) -> dict:
        """Forget/remain/test accuracy and forget-set MIA of one global model."""
        from serforget.common.privacy import membership_inference

        model = self.model(state)
        logits = {name: predict_logits(model, data, device=self.cfg.device) for name, data in
                  (("forget", forget), ("remain", remain), ("test", self.test))}
        test = evaluate_model(model, self.test, labels=self.labels, device=self.cfg.device)
        acc = lambda name, data: float((logits[name].argmax(1) == data.targets).float().mean()) if len(data) else float("nan")
        mia = membership_inference(member_logits=logits["remain"], member_targets=remain.targets,
                                   nonmember_logits=logits["test"], nonmember_targets=self.test.targets,
                                   forget_logits=logits["forget"], forget_targets=forget.targets)
        return {"forget_acc": acc("forget", forget), "remain_acc": acc("remain", remain), "test_ua": test["ua"],
                "test_wa": test["wa"], "mia": {name: result.to_dict() for name, result in mia.items()}}

    def write_report(self, report: dict) -> Path:
        out = self.report_dir
        out.mkdir(parents=True, exist_ok=True)
        plot_report(report, out)
        atomic_write_text(out / "report.md", report_markdown(report))
        return atomic_write_json(out / "report.json", report)


def report_markdown(report: dict) -> str:
    b, a = report["before"], report["after"]
    lines = [
        f"# serforget simulation report (run finished {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(report['finished_at']))} UTC)",
        "", f"nodes: {report['n_nodes']}, FedAvg rounds: {report['num_rounds']}, "
        f"releases: {report['releases']['published']} (revoked: {report['releases']['revoked']})", "",
        "| metric | before unlearning (v%d) | after unlearning (v%d) |" % (report["releases"]["trained"], report["releases"]["unlearned"] or 0),
        "|---|---:|---:|",
    ]
    for key, label in (("forget_acc", "forget accuracy"), ("remain_acc", "remaining-set accuracy"), ("test_ua", "test UA"), ("test_wa", "test WA")):
        if key in b and key in a:
            lines.append(f"| {label} | {b[key]:.3f} | {a[key]:.3f} |")
    if report.get("after_without_elastic") and "forget_acc" in report["after_without_elastic"]:
        w = report["after_without_elastic"]
        lines.insert(len(lines), f"| (same deltas without the elastic constraint) forget acc / test UA | | {w['forget_acc']:.3f} / {w['test_ua']:.3f} |")
    for attack in ("loss", "confidence", "entropy"):
        if attack in b.get("mia", {}):
            lines.append(f"| MIA AUC ({attack}) on forget set | {b['mia'][attack]['auc']:.3f} | {a['mia'][attack]['auc']:.3f} |")
    for node in report["node_release_reports"]:
        if node.get("forget-acc-release", -1.0) >= 0:
            lines.append(f"| a device's forget accuracy on its deleted recordings, measured before purge | | {node['forget-acc-release']:.3f} |")
    t = report["timings"]
    lines += ["", "| timing | seconds |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in sorted(t.items())]
    lines += ["", f"bytes sent to nodes for unlearning: {report['unlearning']['bytes_sent']}, "
              f"sealed deltas received: {report['unlearning']['bytes_received']}", ""]
    for v in report["unlearning"]["verdicts"]:
        lines.append(f"- delta from {v['node']}: {v['reason']}")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    rounds = report["fedavg_rounds"]
    ax1.plot([r["round"] for r in rounds], [r["test_ua"] for r in rounds], marker="o", label="test UA")
    ax1.plot([r["round"] for r in rounds], [r["valid_ua"] for r in rounds], marker=".", label="valid UA")
    ax1.set_xlabel("FedAvg round")
    ax1.set_ylabel("UA")
    ax1.set_title("federated training (central evaluation)")
    ax1.legend()
    named = [(k, n) for k, n in (("forget_acc", "forget acc"), ("remain_acc", "remain acc"), ("test_ua", "test UA"))
             if k in report["before"] and k in report["after"]]
    before = [report["before"][k] for k, _ in named]
    after = [report["after"][k] for k, _ in named]
    names = [n for _, n in named]
    if report["before"].get("mia"):
        mia_key = next(iter(report["before"]["mia"]))
        before.append(report["before"]["mia"][mia_key]["auc"])
        after.append(report["after"]["mia"][mia_key]["auc"])
        names.append(f"MIA AUC ({mia_key})")
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], before, width=0.4, label="before (trained release)")
    ax2.bar([i + 0.2 for i in x], after, width=0.4, label="after (unlearned release)")
    ax2.set_xticks(list(x), names)
    ax2.set_ylim(0, 1)
    ax2.set_title("deletion of the forget set")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)
    plt.close(fig)
