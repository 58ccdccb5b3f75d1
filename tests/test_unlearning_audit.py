"""The forgetting audit's metrics: U-LiRA ratios and AUC, EMD, paired bootstrap, speed-ups, LiRA score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from serforget.common.privacy import membership_scores
from serforget.common.unlearning.audit import (
    ShadowScores,
    emd_1d,
    lira_scores,
    losses,
    paired_bootstrap,
    pooled_std,
    population_auc,
    speedups,
    ulira_auc,
    ulira_ratios,
)


def test_lira_score_is_the_logit_of_the_label_probability_and_stays_finite():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 50.0, -50.0]])
    targets = torch.tensor([0, 1])
    p = torch.softmax(logits.double(), dim=1)[0, 0].item()
    scores = lira_scores(logits, targets)
    assert scores[0] == pytest.approx(math.log(p / (1 - p)))
    assert np.isfinite(scores[1]) and scores[1] > 40
    assert losses(logits, targets) == pytest.approx(-membership_scores(logits, targets, attack="loss"))


def _shadows(rng: np.random.Generator, n: int = 40, k: int = 8) -> tuple[ShadowScores, np.ndarray, np.ndarray]:
    """Unlearned shadows score around +3, retrained around 0, per-utterance offsets on top."""
    offset = rng.normal(0, 2, n)
    inside = np.zeros((k, n), dtype=bool)
    for column in range(n):
        inside[rng.permutation(k)[: k // 2], column] = True
    unlearned = np.where(inside, offset + 3 + rng.normal(0, 0.5, (k, n)), np.nan)
    retrained = np.where(~inside, offset + rng.normal(0, 0.5, (k, n)), np.nan)
    return ShadowScores(unlearned, retrained), offset, inside


def test_ulira_tells_an_unlearned_model_from_retrain_and_not_retrain_from_itself():
    rng = np.random.default_rng(0)
    scores, offset, _ = _shadows(rng)
    leaky = offset + 3 + rng.normal(0, 0.5, offset.size)
    retrain = offset + rng.normal(0, 0.5, offset.size)
    other_retrain = offset + rng.normal(0, 0.5, offset.size)
    assert ulira_auc(leaky, retrain, scores) > 0.95
    assert 0.3 < ulira_auc(other_retrain, retrain, scores) < 0.7
    ratios = ulira_ratios(leaky, scores)
    assert np.all(np.isfinite(ratios)) and np.mean(ratios > 0) > 0.9
    assert pooled_std(scores) == pytest.approx(0.5, rel=0.3)


def test_ulira_leaves_uncalibrated_utterances_out():
    unlearned = np.array([[1.0, np.nan], [1.2, np.nan]])
    retrained = np.array([[0.0, 0.1], [0.2, 0.0]])
    scores = ShadowScores(unlearned, retrained)
    ratios = ulira_ratios(np.array([1.0, 1.0]), scores)
    assert np.isfinite(ratios[0]) and np.isnan(ratios[1])
    with pytest.raises(ValueError, match="one value per utterance"):
        ulira_ratios(np.zeros(3), scores)
    with pytest.raises(ValueError, match="shadows, utterances"):
        ShadowScores(np.zeros((2, 3)), np.zeros((2, 4)))
    assert math.isnan(ulira_auc(np.zeros(2), np.zeros(2), ShadowScores(np.full((1, 2), np.nan), np.zeros((1, 2)))))


def test_emd_matches_hand_computed_values():
    assert emd_1d([0.0], [1.0]) == pytest.approx(1.0)
    assert emd_1d([0.0, 1.0], [0.0, 1.0]) == pytest.approx(0.0)
    assert emd_1d([0.0, 2.0], [1.0]) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 500)
    assert emd_1d(a, a + 0.7) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        emd_1d([], [1.0])


def test_paired_bootstrap_covers_the_mean_difference_and_drops_undefined_sets():
    rng = np.random.default_rng(2)
    reference = rng.normal(0, 1, 30)
    values = reference + 0.5 + rng.normal(0, 0.1, 30)
    interval = paired_bootstrap(values, reference=reference, seed=3)
    assert interval.low < 0.5 < interval.high and interval.high - interval.low < 0.2 and interval.n == 30
    unpaired = paired_bootstrap(values, seed=3)
    assert unpaired.high - unpaired.low > interval.high - interval.low, "pairing removes the per-set variation"
    with_nan = paired_bootstrap(np.array([1.0, np.nan, 3.0]))
    assert with_nan.n == 2 and with_nan.mean == pytest.approx(2.0)
    single = paired_bootstrap([0.4])
    assert (single.low, single.high) == (0.4, 0.4)
    with pytest.raises(ValueError, match="equal shapes"):
        paired_bootstrap([1.0, 2.0], reference=[1.0])


def test_speedups_take_the_median_of_ratios_and_the_ratio_of_totals():
    out = speedups([100.0, 100.0, 100.0], [1.0, 2.0, 50.0])
    assert out["median"] == pytest.approx(50.0)
    assert out["ratio_of_totals"] == pytest.approx(300.0 / 53.0)
    assert speedups([10.0], [0.0])["median"] > 1e6, "a zero-step cell is an infinite-ish ratio, not a crash"


def test_population_auc_ranks_members_above_non_members():
    logits_member = torch.tensor([[5.0, 0.0]] * 4)
    logits_non = torch.tensor([[0.0, 0.0]] * 4)
    y = torch.zeros(4, dtype=torch.long)
    assert population_auc(logits_member, y, logits_non, y) == 1.0
