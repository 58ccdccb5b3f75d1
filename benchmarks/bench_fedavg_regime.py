"""Which server optimiser makes the federated original memorise (issue 10, section 1)? Scored on validation speakers.

The main job's FedAvg (16 one-speaker nodes, 2 local epochs, 15 rounds) fits only ~63 % of its
training recordings: averaging 16 nodes divides what each one learns of its own recordings by
16, so plain FedAvg behaves like large-batch training with few steps and never reaches the
memorising regime that real fine-tuned SER models are in (and that forgetting is measured in).
Flower's answer is server-side optimisation: FedAvgM (a server learning rate and momentum on
the averaged update, Hsu et al. 2019), which this scan compares with plain FedAvg at the same
local work.

Each point runs FedAvg in process exactly as the ClientApp trains (``train_model`` with the
run's ``TrainConfig``, weighted averaging, then the server step) on the main job's own corpus
and speaker split (``RunSettings`` defaults), and scores training accuracy on the annotated
labels, accuracy on the mislabelled training takes (what only memorising can fit) and UA on the
*validation* speakers. Test speakers are never scored here.

Rule, fixed before the scan ran: keep the points whose final training accuracy is >= 0.97 (the
centralised regime's bar); among them the fewest node-epochs (the main job's cost), then the
highest validation UA; the choice would become ``RunSettings``' default. No point passed
(``benchmarks/results/fedavg_regime.md``): the best reached 0.69 training accuracy and fitted
<= 0.13 of the mislabelled takes, so the main job's defaults stay and the federated memorisation
target is recorded as missed (docs/forgetting.md).

    python -m benchmarks.bench_fedavg_regime                  # the grid: ~4-10 min per point, 2 cores
    python -m benchmarks.bench_fedavg_regime --points 0 1     # some points (--out to keep them apart)
    python -m benchmarks.bench_fedavg_regime --merge a.json b.json   # one report from partial runs
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from benchmarks.bench_forgetting import RESULTS_DIR
from serforget.common.corpora.synth import LABELS_NAME, read_label_table, synthesize_corpus
from serforget.common.data import WaveformSet, load_waveforms
from serforget.common.fsutil import atomic_write_json, atomic_write_text
from serforget.common.labels import task_labels
from serforget.common.manifest import by_speaker, read_manifest
from serforget.common.models import build_model
from serforget.common.pipeline import make_splits
from serforget.common.settings import RunSettings
from serforget.common.training import TrainConfig, evaluate_model, predict_logits, train_model
from serforget.server.federation import weighted_average

#: (strategy, local epochs, local lr, server learning rate, server momentum, rounds); FedAdam's
#: server learning rate is its ``eta`` (Flower's defaults for the rest: betas 0.9/0.99, tau 1e-3)
GRID: tuple[tuple[str, int, float, float, float, int], ...] = (
    ("fedavg", 2, 2e-3, 1.0, 0.0, 15),
    ("fedavgm", 2, 2e-3, 1.0, 0.9, 15),
    ("fedadam", 2, 2e-3, 0.003, 0.0, 15),
    ("fedadam", 2, 2e-3, 0.01, 0.0, 15),
    ("fedavg", 5, 2e-3, 1.0, 0.0, 15),
    ("fedavg", 2, 5e-3, 1.0, 0.0, 15),
    ("fedavgm", 2, 5e-4, 1.0, 0.9, 15),
    ("fedavgm", 2, 1e-3, 1.0, 0.9, 15),
)
TRAIN_ACC_MIN = 0.97


def load_corpus(cfg: RunSettings, work: Path) -> tuple[list[WaveformSet], WaveformSet, set[str], tuple[str, ...]]:
    """The main job's nodes (one per training speaker), its validation speakers and its mislabelled takes."""
    manifest = synthesize_corpus(out_dir=work / "corpus", config=cfg.synth_config, progress=True)
    splits = make_splits(
        manifest=manifest,
        out_dir=work / "splits",
        task=cfg.task,
        split=cfg.split_spec,
    )
    labels = task_labels(cfg.task)
    load = lambda utts: load_waveforms(utts, labels=labels, clip_seconds=cfg.clip_seconds)  # noqa: E731
    nodes = [load(utts) for utts in by_speaker(read_manifest(splits["train"])).values()]
    table = read_label_table(Path(manifest).parent / LABELS_NAME)
    noisy = {utt for utt, row in table.items() if row.mislabelled}
    return nodes, load(read_manifest(splits["valid"])), noisy, labels


class ServerStep:
    """The server's update from the example-weighted mean of the nodes' weights, as Flower 1.41 computes it.

    ``fedavg`` keeps the mean (``current - 1 x (current - mean)``); ``fedavgm`` is FedAvgM (pseudo-gradient ``current - mean``, momentum
    without Nesterov, ``server_lr``); ``fedadam`` is FedAdam with ``server_lr`` as ``eta`` and
    Flower's defaults (betas 0.9/0.99, tau 1e-3, bias-corrected eta). ``tests/test_bench_fedavg_regime.py``
    checks each against Flower's own strategy.
    """

    def __init__(self, strategy: str, *, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        if strategy not in ("fedavg", "fedavgm", "fedadam"):
            raise ValueError(f"strategy must be fedavg, fedavgm or fedadam; got {strategy!r}")
        self.strategy, self.server_lr, self.server_momentum = strategy, server_lr, server_momentum
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor], round_no: int) -> dict:
        delta = {k: mean[k].float() - state[k].float() for k in state}
        if self.strategy == "fedadam":
            first, second = self.memory.get("m", {}), self.memory.get("v", {})
            first = {k: 0.9 * first.get(k, 0) + 0.1 * d for k, d in delta.items()}
            second = {k: 0.99 * second.get(k, 0) + 0.01 * d**2 for k, d in delta.items()}
            self.memory = {"m": first, "v": second}
            eta = self.server_lr * (1 - 0.99 ** (round_no + 1)) ** 0.5 / (1 - 0.9 ** (round_no + 1))
            return {
                k: (state[k].float() + eta * first[k] / (second[k].sqrt() + 1e-3)).to(state[k].dtype) for k in state
            }
        step = {k: -d for k, d in delta.items()}
        if self.server_momentum > 0:
            previous = self.memory.get("momentum")
            step = step if previous is None else {k: self.server_momentum * previous[k] + step[k] for k in step}
            self.memory = {"momentum": step}
        return {k: (state[k].float() - self.server_lr * step[k]).to(state[k].dtype) for k in state}


def fedavg(
    nodes: Sequence[WaveformSet],
    *,
    cfg: RunSettings,
    labels: tuple[str, ...],
    strategy: str,
    local_epochs: int,
    local_lr: float,
    server_lr: float,
    server_momentum: float,
    rounds: int,
    on_round,
) -> dict[str, torch.Tensor]:
    """FedAvg(M)/FedAdam in process: each node trains as the ClientApp does, the server steps as Flower's strategies."""
    torch.manual_seed(cfg.seed)
    model = build_model(arch=cfg.model_arch, config=cfg.model_config, labels=labels)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server = ServerStep(strategy, server_lr=server_lr, server_momentum=server_momentum)
    for round_no in range(1, rounds + 1):
        replies = []
        for data in nodes:
            local = copy.deepcopy(model)
            local.load_state_dict(state)
            tc = TrainConfig(
                epochs=local_epochs,
                batch_size=cfg.batch_size,
                lr=local_lr,
                seed=cfg.seed + round_no,
                device="cpu",
                select_best=False,
                cache_frontend=True,
            )
            train_model(local, data, config=tc, progress=False)
            replies.append(({k: v.detach().clone() for k, v in local.state_dict().items()}, float(len(data))))
        state = server(state, weighted_average(replies), round_no)
        on_round(round_no, state)
    return state


def score(
    state, *, cfg: RunSettings, labels, nodes: Sequence[WaveformSet], valid: WaveformSet, noisy: set[str]
) -> dict:
    model = build_model(arch=cfg.model_arch, config=cfg.model_config, labels=labels)
    model.load_state_dict(state)
    hits, noisy_hits, noisy_n, total = 0, 0, 0, 0
    for data in nodes:
        pred = predict_logits(model, data, device="cpu").argmax(1)
        ok = pred == data.targets
        hits += int(ok.sum())
        total += len(data)
        for i, utt in enumerate(data.utt_ids):
            if utt in noisy:
                noisy_n += 1
                noisy_hits += int(ok[i])
    return {
        "train_acc": hits / total,
        "mislabelled_acc": noisy_hits / max(noisy_n, 1),
        "n_mislabelled": noisy_n,
        "valid_ua": float(evaluate_model(model, valid, labels=labels, device="cpu")["ua"]),
    }


def choose(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    passing = [p for p in points if p["final"]["train_acc"] >= TRAIN_ACC_MIN]
    if not passing:
        return None
    return min(passing, key=lambda p: (p["node_epochs"], -p["final"]["valid_ua"]))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# FedAvg vs FedAvgM on the main job's corpus: which one memorises (validation speakers only)",
        "",
        f"Rule (fixed before the scan): final training accuracy >= {TRAIN_ACC_MIN}; then fewest node-epochs, "
        "then highest validation UA. Test speakers never scored.",
        "",
        "| strategy | local epochs | local lr | server lr | server momentum | rounds | node-epochs | train acc | "
        "mislabelled acc | validation UA | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in report["points"]:
        f = p["final"]
        lines.append(
            f"| {p['strategy']} | {p['local_epochs']} | {p['local_lr']:g} | {p['server_lr']:g} | {p['server_momentum']:g} | {p['rounds']} | "
            f"{p['node_epochs']} | {f['train_acc']:.3f} | {f['mislabelled_acc']:.3f} | {f['valid_ua']:.3f} | {p['seconds']:.0f} |"
        )
    chosen = report["chosen"]
    lines += [
        "",
        "chosen: "
        + (
            f"{chosen['strategy']}, {chosen['local_epochs']} local epochs at lr {chosen['local_lr']:g}, server lr {chosen['server_lr']:g}, "
            f"momentum {chosen['server_momentum']:g}, {chosen['rounds']} rounds"
            if chosen
            else "none passed the rule"
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench_fedavg_regime"))
    parser.add_argument("--points", type=int, nargs="*", help="indices into GRID (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fedavg_regime")
    parser.add_argument("--merge", type=Path, nargs="*", help="combine the points of earlier runs' JSON, run nothing")
    args = parser.parse_args(argv)
    if args.merge:
        merged = [p for path in args.merge for p in json.loads(path.read_text(encoding="utf-8"))["points"]]
        order = {(p[0], p[1], p[2], p[3], p[4], p[5]): i for i, p in enumerate(GRID)}
        key = lambda p: order.get(  # noqa: E731
            (p["strategy"], p["local_epochs"], p["local_lr"], p["server_lr"], p["server_momentum"], p["rounds"]),
            len(GRID),
        )
        return write(
            sorted(merged, key=key), nodes=json.loads(args.merge[0].read_text(encoding="utf-8"))["nodes"], out=args.out
        )
    cfg = RunSettings.from_mapping({})
    nodes, valid, noisy, labels = load_corpus(cfg, args.work)
    points = []
    chosen_grid = [GRID[i] for i in args.points] if args.points else list(GRID)
    for name, epochs, llr, slr, mom, rounds in chosen_grid:
        curve: list[dict] = []
        start = time.perf_counter()
        bar = tqdm(total=rounds, desc=f"{name} E={epochs} lr={llr:g} lr_s={slr:g} m={mom:g}")

        def on_round(round_no, state, curve=curve, bar=bar, rounds=rounds):
            if round_no % 5 == 0 or round_no == rounds:
                curve.append(
                    {"round": round_no, **score(state, cfg=cfg, labels=labels, nodes=nodes, valid=valid, noisy=noisy)}
                )
                bar.set_postfix(curve[-1])
            bar.update(1)

        fedavg(
            nodes,
            cfg=cfg,
            labels=labels,
            strategy=name,
            local_epochs=epochs,
            local_lr=llr,
            server_lr=slr,
            server_momentum=mom,
            rounds=rounds,
            on_round=on_round,
        )
        bar.close()
        points.append(
            {
                "strategy": name,
                "local_epochs": epochs,
                "local_lr": llr,
                "server_lr": slr,
                "server_momentum": mom,
                "rounds": rounds,
                "node_epochs": rounds * epochs * len(nodes),
                "seconds": time.perf_counter() - start,
                "curve": curve,
                "final": curve[-1],
            }
        )
        print(points[-1]["final"], flush=True)
    return write(points, nodes=len(nodes), out=args.out)


def write(points: list[dict[str, Any]], *, nodes: int, out: Path) -> int:
    report = {"nodes": nodes, "points": points, "chosen": choose(points)}
    atomic_write_json(out.with_suffix(".json"), report)
    atomic_write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
