"""Membership-inference attacks on synthetic score distributions where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serforget.common.privacy import attack_forget_set, best_threshold, membership_inference, membership_scores, roc_auc


def _pairwise_auc(pos, neg) -> float:
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_roc_auc_extremes_and_ties():
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert roc_auc(np.array([1.0, 2.0]), np.array([1.0])) == 0.75
    with pytest.raises(ValueError):
        roc_auc(np.array([]), np.array([1.0]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=30), st.lists(st.integers(-5, 5), min_size=1, max_size=30))
def test_roc_auc_equals_the_pairwise_definition(pos, neg):
    assert roc_auc(np.array(pos), np.array(neg)) == pytest.approx(_pairwise_auc(pos, neg))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=30), st.lists(st.integers(-5, 5), min_size=1, max_size=30))
def test_best_threshold_maximises_tpr_minus_fpr(members, nonmembers):
    mem, non = np.array(members, float), np.array(nonmembers, float)
    threshold, advantage = best_threshold(mem, non)
    assert advantage == pytest.approx(np.mean(mem >= threshold) - np.mean(non >= threshold))
    brute = max(np.mean(mem >= t) - np.mean(non >= t) for t in [*mem, *non, np.inf])
    assert advantage == pytest.approx(brute)
    assert advantage >= 0.0


def test_best_threshold_separates_separable_scores():
    threshold, advantage = best_threshold(np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0]))
    assert advantage == 1.0 and 2.0 < threshold <= 5.0


def test_membership_scores_match_their_definitions():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    probs = torch.softmax(logits.double(), dim=1)
    np.testing.assert_allclose(membership_scores(logits, targets, attack="loss"), np.log(probs[[0, 1], [0, 2]].numpy()))
    np.testing.assert_allclose(membership_scores(logits, targets, attack="confidence"), probs[[0, 1], [0, 2]].numpy())
    entropy = membership_scores(logits, targets, attack="entropy")
    assert entropy[1] == pytest.approx(-math.log(3))  # uniform output: maximal entropy
    assert entropy[0] > entropy[1]
    with pytest.raises(ValueError, match="unknown"):
        membership_scores(logits, targets, attack="shadow")
    with pytest.raises(ValueError, match="expected"):
        membership_scores(logits, targets[:1], attack="loss")


def _gaussian(mean: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, 1.0, n)


def test_attack_detects_a_forget_set_drawn_like_members():
    members, nonmembers = _gaussian(1.0, 4000, 0), _gaussian(0.0, 4000, 1)
    result = attack_forget_set(
        member_scores=members, nonmember_scores=nonmembers, forget_scores=_gaussian(1.0, 4000, 2)
    )
    # AUC of N(1,1) vs N(0,1) is Phi(1/sqrt(2)); the best advantage is 2 * Phi(0.5) - 1
    assert result.auc == pytest.approx(0.5 * (1 + math.erf(0.5)), abs=0.02)
    assert result.advantage == pytest.approx(math.erf(0.5 / math.sqrt(2)), abs=0.04)
    assert result.member_auc == pytest.approx(result.auc, abs=0.02)


def test_attack_sees_nothing_in_a_forget_set_drawn_like_non_members():
    members, nonmembers = _gaussian(1.0, 4000, 0), _gaussian(0.0, 4000, 1)
    result = attack_forget_set(
        member_scores=members, nonmember_scores=nonmembers, forget_scores=_gaussian(0.0, 4000, 3)
    )
    assert result.auc == pytest.approx(0.5, abs=0.02)
    assert abs(result.advantage) < 0.04
    # over-forgetting (forget set scored far below unseen data) shows up as an AUC well under 0.5
    over = attack_forget_set(member_scores=members, nonmember_scores=nonmembers, forget_scores=_gaussian(-1.0, 4000, 4))
    assert over.auc < 0.3


def test_attack_cross_fits_the_threshold_on_disjoint_test_folds():
    members = np.array([1.0, 1.0, 1.0])
    nonmembers = np.array([0.0, 0.0, 1.0, 1.0])
    result = attack_forget_set(
        member_scores=members, nonmember_scores=nonmembers, forget_scores=np.array([1.0]), seed=0
    )
    assert len(result.thresholds) == 2
    assert 0.0 <= result.test_member_rate <= 1.0
    with pytest.raises(ValueError, match="at least 2"):
        attack_forget_set(member_scores=members, nonmember_scores=np.array([0.0]), forget_scores=np.array([1.0]))


def test_membership_inference_on_model_outputs():
    gen = torch.Generator().manual_seed(0)
    n = 300
    targets = torch.randint(0, 4, (n,), generator=gen)
    confident = torch.nn.functional.one_hot(targets, 4).float() * 6 + torch.randn(n, 4, generator=gen)
    unsure = torch.nn.functional.one_hot(targets, 4).float() * 1 + torch.randn(n, 4, generator=gen)
    results = membership_inference(
        member_logits=confident,
        member_targets=targets,
        nonmember_logits=unsure,
        nonmember_targets=targets,
        forget_logits=confident[:50],
        forget_targets=targets[:50],
    )
    assert set(results) == {"loss", "confidence", "entropy"}
    for result in results.values():
        assert result.auc > 0.9 and result.advantage > 0.7
        assert set(result.to_dict()) >= {"attack", "auc", "advantage", "member_auc"}
