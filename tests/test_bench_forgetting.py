"""A small version of the forgetting benchmark: structure of the results and the attack's power."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_forgetting as bench

pytestmark = pytest.mark.slow

FIELDS = (
    "forget_acc",
    "retrain_forget_acc",
    "test_ua_drop",
    "attack_auc",
    "attack_auc_ci_high",
    "original_attack_auc",
    "emd_to_retrain",
    "speedup_median",
    "zero_step_cells",
)


def test_small_benchmark_writes_every_field_and_its_attack_sees_the_original(tmp_path: Path) -> None:
    report = bench.run(
        bench.SMOKE, data_root=tmp_path / "data", work_root=tmp_path / "work", out=tmp_path / "out", progress=False
    )
    for name in ("forgetting.json", "forgetting.md", "forgetting.png", "forgetting_tuning.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    stored = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert stored["config"]["reduced"] is True and "REDUCED" in stored["config"]["label"]
    for key in ("regime", "original_train_acc", "n_forget_sets", "tuned_on"):
        assert key in stored
    (regime,) = stored["regimes"]
    methods = {e["method"] for e in regime["table"]}
    assert methods == set(bench.METHOD_NAMES)
    for entry in regime["table"]:
        assert entry["N"] == 10 and entry["n_forget_sets"] == bench.SMOKE.n_eval_sets
        for key in FIELDS:
            assert key in entry
        assert entry["attack_auc_ci_low"] <= entry["attack_auc"] <= entry["attack_auc_ci_high"]
    by = {e["method"]: e for e in regime["table"]}
    assert by["retrain"]["attack_auc"] == 0.5
    # The attack has power: the untouched original's training utterances are told apart from
    # held-out utterances of the same speakers. (The per-example attack needs more than the smoke
    # run's two shadows to be steady; its power is shown by the benchmark itself.)
    assert regime["original_member_auc_inspeaker"] > 0.6
    assert 0.0 <= by["original"]["attack_auc"] <= 1.0 and by["original"]["zero_step_cells"] is None
    assert regime["original_train_acc"] > regime["original_heldout_acc"]
    # Tuning saw only tuning forget sets; the chosen changes are one of the grid points.
    assert stored["tuning"]["chosen"] in [dict(changes) for changes in bench.SMOKE.grid]
    assert all(s["n"] in bench.SMOKE.tuning_sizes for entry in stored["tuning"]["log"] for s in entry["sets"])
    assert {c["target"] for c in stored["targets"]} >= {"N=10: test UA within 1.5 points of Original"}
    # Resumable: a second run reuses every cell and model.
    again = bench.run(
        bench.SMOKE, data_root=tmp_path / "data", work_root=tmp_path / "work", out=tmp_path / "out2", progress=False
    )
    assert again["regimes"][0]["table"] == report["regimes"][0]["table"]


def test_forget_sets_are_seeded_and_drawn_from_their_own_speakers() -> None:
    candidates = [f"u{i}" for i in range(100)]
    assert bench.forget_set(candidates, n=10, tag="eval-x-10-0") == bench.forget_set(
        candidates, n=10, tag="eval-x-10-0"
    )
    assert bench.forget_set(candidates, n=10, tag="eval-x-10-0") != bench.forget_set(
        candidates, n=10, tag="tune-x-10-0"
    )
    with pytest.raises(ValueError, match="cannot draw"):
        bench.forget_set(candidates, n=101, tag="t")
    inside = bench.shadow_membership(candidates, 4, regime="memorising")
    assert inside.shape == (4, 100) and (inside.sum(0) == 2).all()
