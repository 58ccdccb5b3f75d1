"""Membership-inference attacks (MIA) on a classifier's outputs: does the model still "know" a set?

Threat model (Shokri et al., 2017; Yeom et al., 2018): an attacker holds the model's outputs and
the true labels of some utterances and guesses which were in the training set. Three
per-utterance scores, higher meaning "more member-like":

- ``loss``: minus the cross-entropy of the true label (the loss-threshold attack, Yeom et al.);
- ``confidence``: the probability given to the true label;
- ``entropy``: minus the entropy of the predicted distribution (members get confident outputs).
- ``logit``: ``log p_y - log(1 - p_y)``, the logit-scaled confidence that LiRA/U-LiRA model as
  Gaussian per example (:mod:`serforget.common.unlearning.audit`); not in the default :data:`ATTACKS`,
  since as a threshold attack it ranks utterances exactly as ``loss`` does.

The attack's threshold is fitted on *known* members (the remaining training data) versus known
non-members (the test set) by maximising TPR - FPR. It then scores the forget set:

- ``auc``: ROC AUC of forget (positive) versus test (negative) scores, threshold-free. 0.5 means
  the forget set looks like unseen data; above 0.5 it still looks trained on; far below 0.5 it
  looks *worse* than unseen data (over-forgetting, itself a tell). The retrained model's value is
  the target: its forget utterances are genuinely unseen, though of seen speakers.
- ``advantage``: TPR on the forget set minus FPR on the test set at the fitted threshold. The
  test set is split in two folds: the threshold fitted with one fold is evaluated on the other,
  and the two advantages are averaged (cross-fitting), so the FPR is never measured on the
  utterances that chose the threshold.
- ``member_auc``: AUC of remaining versus test, the attack's strength against genuine members.

Plain numpy + torch; no sklearn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

ATTACKS: tuple[str, ...] = ("loss", "confidence", "entropy")


def membership_scores(logits: torch.Tensor, targets: torch.Tensor, *, attack: str) -> np.ndarray:
    """Per-utterance scores (higher = more member-like) for ``attack`` in :data:`ATTACKS` or ``logit``."""
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected logits[N, C] and targets[N]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    log_probs = torch.log_softmax(logits.detach().double().cpu(), dim=1)
    labels = targets.detach().long().cpu()
    if attack == "loss":
        scores = log_probs.gather(1, labels[:, None]).squeeze(1)
    elif attack == "confidence":
        scores = log_probs.gather(1, labels[:, None]).squeeze(1).exp()
    elif attack == "entropy":
        scores = (log_probs.exp() * log_probs).sum(dim=1)
    elif attack == "logit":
        # log p_y - log(1 - p_y), computed from log-probabilities so it stays finite near p_y = 1.
        true = log_probs.gather(1, labels[:, None]).squeeze(1)
        others = log_probs.masked_fill(torch.nn.functional.one_hot(labels, log_probs.shape[1]).bool(), float("-inf"))
        scores = true - torch.logsumexp(others, dim=1)
    else:
        raise ValueError(f"unknown membership attack {attack!r}; known: {', '.join(ATTACKS)}, logit")
    return scores.numpy()


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """``P(score_pos > score_neg) + 0.5 * P(tie)`` (Mann-Whitney U), exact with ties."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative score")
    combined = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(combined, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each tied group
    ranks = average_rank[inverse]
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def best_threshold(members: np.ndarray, nonmembers: np.ndarray) -> tuple[float, float]:
    """Threshold ``t`` (predict member when ``score >= t``) maximising TPR - FPR, and that advantage.

    Candidates are every observed score plus +inf (predict no member: advantage 0), so the
    returned advantage is never negative on the fitting data.
    """
    mem = np.sort(np.asarray(members, dtype=np.float64))
    non = np.sort(np.asarray(nonmembers, dtype=np.float64))
    if mem.size == 0 or non.size == 0:
        raise ValueError("fitting a threshold needs members and non-members")
    candidates = np.unique(np.concatenate([mem, non, [np.inf]]))
    tpr = 1.0 - np.searchsorted(mem, candidates, side="left") / mem.size
    fpr = 1.0 - np.searchsorted(non, candidates, side="left") / non.size
    gain = tpr - fpr
    best = int(np.argmax(gain))
    return float(candidates[best]), float(gain[best])


@dataclass(frozen=True)
class AttackResult:
    """One attack's verdict on the forget set (see the module docstring for each field)."""

    attack: str
    auc: float
    advantage: float
    forget_member_rate: float
    test_member_rate: float
    member_auc: float
    thresholds: tuple[float, float]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["thresholds"] = list(self.thresholds)
        return out


def _two_folds(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return order[: n // 2], order[n // 2 :]


def attack_forget_set(
    *,
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    forget_scores: np.ndarray,
    attack: str = "score",
    seed: int = 0,
) -> AttackResult:
    """Fit on members vs non-members, score the forget set, with a cross-fitted advantage."""
    members = np.asarray(member_scores, dtype=np.float64)
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64)
    forget = np.asarray(forget_scores, dtype=np.float64)
    if nonmembers.size < 2:
        raise ValueError("cross-fitting the attack needs at least 2 non-member (test) utterances")
    if forget.size == 0 or members.size == 0:
        raise ValueError("the attack needs member (remaining) and forget utterances")
    fold_a, fold_b = _two_folds(nonmembers.size, seed)
    advantages, tprs, fprs, thresholds = [], [], [], []
    for fit_idx, eval_idx in ((fold_a, fold_b), (fold_b, fold_a)):
        threshold, _ = best_threshold(members, nonmembers[fit_idx])
        tpr = float(np.mean(forget >= threshold))
        fpr = float(np.mean(nonmembers[eval_idx] >= threshold))
        advantages.append(tpr - fpr)
        tprs.append(tpr)
        fprs.append(fpr)
        thresholds.append(threshold)
    return AttackResult(
        attack=attack,
        auc=roc_auc(forget, nonmembers),
        advantage=float(np.mean(advantages)),
        forget_member_rate=float(np.mean(tprs)),
        test_member_rate=float(np.mean(fprs)),
        member_auc=roc_auc(members, nonmembers),
        thresholds=(thresholds[0], thresholds[1]),
    )


def membership_inference(
    *,
    member_logits: torch.Tensor,
    member_targets: torch.Tensor,
    nonmember_logits: torch.Tensor,
    nonmember_targets: torch.Tensor,
    forget_logits: torch.Tensor,
    forget_targets: torch.Tensor,
    attacks: tuple[str, ...] = ATTACKS,
    seed: int = 0,
) -> dict[str, AttackResult]:
    """Run every attack in ``attacks`` on a model's outputs for remaining, test and forget sets."""
    results = {}
    for attack in attacks:
        results[attack] = attack_forget_set(
            member_scores=membership_scores(member_logits, member_targets, attack=attack),
            nonmember_scores=membership_scores(nonmember_logits, nonmember_targets, attack=attack),
            forget_scores=membership_scores(forget_logits, forget_targets, attack=attack),
            attack=attack,
            seed=seed,
        )
    return results
