"""The memorising regime's knobs are the ones the validation-only scan chose (benchmarks/bench_regime.py)."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_regime
from serforget.common.corpora.synth import MEMORISING


def _point(spread: float, *, train: float = 0.99, auc: float = 0.8, valid: float = 0.7) -> dict:
    knobs = {"speaker_style_spread": spread, "ambiguous_rate": 0.0, "label_noise_rate": 0.15}
    return {"knobs": knobs, "train_acc": train, "member_auc_inspeaker": auc, "valid_ua": valid}


def test_the_default_corpus_is_the_committed_scans_choice() -> None:
    report = json.loads((bench_regime.RESULTS_DIR / "regime_scan.json").read_text())
    assert bench_regime.choose(report["points"])["knobs"] == report["chosen"]
    assert {k: getattr(MEMORISING, k) for k in bench_regime.KNOBS} == report["chosen"]


def test_the_rule_prefers_the_band_then_the_largest_style_spread() -> None:
    points = [_point(0.35, valid=0.5), _point(0.1, valid=0.66), _point(0.0, valid=0.75), _point(0.2, train=0.9)]
    assert bench_regime.choose(points)["knobs"]["speaker_style_spread"] == 0.1
    # Nothing in the band: the highest validation UA among the memorising points.
    assert (
        bench_regime.choose([_point(0.35, valid=0.5), _point(0.1, valid=0.6)])["knobs"]["speaker_style_spread"] == 0.1
    )
    with pytest.raises(RuntimeError, match="memorises"):
        bench_regime.choose([_point(0.0, auc=0.6), _point(0.1, train=0.9)])
