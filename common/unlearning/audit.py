"""Forgetting audit: per-example (U-LiRA-style) attack, population attack, EMD and paired CIs.

Why more than :mod:`serforget.common.privacy`: a population attack (one loss threshold for all
utterances) cannot tell an utterance that is hard for every model from one that this model has
forgotten badly, and it is blind when the original model generalises. Hayes et al. ("Inexact
unlearning needs more careful evaluations to avoid a false sense of privacy", 2024) therefore
calibrate per example with shadow models: for each forget utterance ``x`` the attacker knows how
``x`` scores under models that were *trained on x and then unlearned* and under models that
*never saw x* (retrained), fits a Gaussian to each, and asks of the audited model which of the
two it resembles. This module implements that test (:func:`ulira_ratios`, :func:`ulira_auc`)
with the LiRA score (:func:`serforget.common.privacy.membership_scores` ``"logit"``) and a fixed,
pooled variance (Carlini et al.'s "fixed variance" variant, which is the robust choice with few
shadows: each per-example variance would rest on 2-8 values).

Definitions used everywhere in the project (one definition per metric):

- **per-example attack AUC**: over the utterances of one forget set, ROC AUC of the
  log-likelihood ratio ``log N(s | unlearned) - log N(s | retrained)`` computed on the audited
  model (positives) against the same ratio computed on the Retrain model of that forget set
  (negatives). 0.5: the audited model is as "retrained" as Retrain itself; 1.0: every forget
  utterance gives the unlearning away. Applied to the untouched original (with shadows that
  were trained on ``x`` and not unlearned), it measures how much there is to forget (power).
- **population attack AUC**: ROC AUC of the loss score (``-CE``) of the forget utterances
  against non-members (:func:`population_auc`); reported with in-speaker non-members (held-out
  utterances of training speakers) and unseen-speaker non-members separately.
- **EMD to Retrain**: the earth mover's (1-Wasserstein) distance between the per-utterance
  losses of the forget set under the audited model and under the Retrain ensemble
  (:func:`emd_1d`).
- **paired bootstrap CI**: a difference is computed per forget set (method minus reference on
  the same forget set), and its mean's percentile interval is taken over forget sets resampled
  with replacement (:func:`paired_bootstrap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from serforget.common.privacy import membership_scores, roc_auc

#: Floor of the pooled standard deviation (logit units): with shadows that agree exactly the
#: Gaussians would collapse and every ratio would become +-inf.
MIN_STD = 1e-2


def lira_scores(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """LiRA's per-example statistic: ``log p_y - log(1 - p_y)``, the logit of the label's probability."""
    return membership_scores(logits, targets, attack="logit")


def losses(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Per-example cross-entropy (the population attack's score is its negative)."""
    return -membership_scores(logits, targets, attack="loss")


@dataclass(frozen=True)
class ShadowScores:
    """LiRA scores of the forget utterances under the shadow models.

    ``unlearned[k, i]`` / ``retrained[k, i]``: score of utterance ``i`` under shadow ``k``, NaN
    where shadow ``k`` does not belong to that side for utterance ``i`` (per-example inclusion:
    each shadow trained on a random half of the candidate utterances).
    """

    unlearned: np.ndarray
    retrained: np.ndarray

    def __post_init__(self) -> None:
        if self.unlearned.ndim != 2 or self.retrained.ndim != 2 or self.unlearned.shape[1] != self.retrained.shape[1]:
            raise ValueError(
                f"shadow scores must be [shadows, utterances] with equal utterance counts; got "
                f"{self.unlearned.shape} and {self.retrained.shape}"
            )

    @property
    def usable(self) -> np.ndarray:
        """Utterances with at least one shadow on each side (the others cannot be calibrated)."""
        return (np.isfinite(self.unlearned).sum(0) >= 1) & (np.isfinite(self.retrained).sum(0) >= 1)


def pooled_std(scores: ShadowScores) -> float:
    """Standard deviation of every shadow score around its own (utterance, side) mean (pooled)."""
    residuals = []
    for side in (scores.unlearned, scores.retrained):
        counts = np.isfinite(side).sum(0)
        means = _column_means(side)
        for column in np.flatnonzero(counts >= 2):
            values = side[:, column][np.isfinite(side[:, column])]
            # Bessel's correction per column: with 2-4 shadows per side the plain residuals
            # would understate the spread by up to 30 %.
            residuals.append((values - means[column]) * math.sqrt(values.size / (values.size - 1)))
    if not residuals:
        return 1.0
    flat = np.concatenate(residuals)
    return max(float(np.sqrt(np.mean(flat**2))), MIN_STD)


def _column_means(side: np.ndarray) -> np.ndarray:
    """Mean of the finite values of every column; NaN for a column without any."""
    finite = np.isfinite(side)
    counts = finite.sum(0)
    sums = np.where(finite, side, 0.0).sum(0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def ulira_ratios(target: np.ndarray, scores: ShadowScores, *, std: float | None = None) -> np.ndarray:
    """Per-utterance ``log N(s | unlearned) - log N(s | retrained)`` of a model's scores ``target``.

    Positive: the utterance looks trained-then-unlearned; negative: it looks never seen.
    Utterances without shadows on both sides get NaN.
    """
    target = np.asarray(target, dtype=np.float64)
    if target.shape != (scores.unlearned.shape[1],):
        raise ValueError(
            f"target scores must have one value per utterance ({scores.unlearned.shape[1]}); got {target.shape}"
        )
    sigma = pooled_std(scores) if std is None else std
    mu_u = _column_means(scores.unlearned)
    mu_r = _column_means(scores.retrained)
    ratio = ((target - mu_r) ** 2 - (target - mu_u) ** 2) / (2.0 * sigma**2)
    return np.where(scores.usable, ratio, np.nan)


def ulira_auc(audited: np.ndarray, retrain: np.ndarray, scores: ShadowScores) -> float:
    """Per-example attack AUC of one forget set (module docstring): audited vs Retrain model.

    ``audited`` and ``retrain`` are the LiRA scores of the same forget utterances under the
    audited model and under that forget set's Retrain model. NaN if no utterance is usable.
    """
    sigma = pooled_std(scores)
    pos = ulira_ratios(audited, scores, std=sigma)
    neg = ulira_ratios(retrain, scores, std=sigma)
    keep = np.isfinite(pos) & np.isfinite(neg)
    if not keep.any():
        return math.nan
    return roc_auc(pos[keep], neg[keep])


def population_auc(
    forget_logits: torch.Tensor,
    forget_targets: torch.Tensor,
    nonmember_logits: torch.Tensor,
    nonmember_targets: torch.Tensor,
) -> float:
    """Loss-threshold attack AUC: forget utterances (positives) vs non-members (negatives)."""
    return roc_auc(
        membership_scores(forget_logits, forget_targets, attack="loss"),
        membership_scores(nonmember_logits, nonmember_targets, attack="loss"),
    )


def emd_1d(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Earth mover's (1-Wasserstein) distance between two 1-D samples: ``integral |F_a - F_b|``."""
    x = np.sort(np.asarray(a, dtype=np.float64))
    y = np.sort(np.asarray(b, dtype=np.float64))
    if x.size == 0 or y.size == 0:
        raise ValueError("EMD needs two non-empty samples")
    grid = np.sort(np.concatenate([x, y]))
    cdf_x = np.searchsorted(x, grid[:-1], side="right") / x.size
    cdf_y = np.searchsorted(y, grid[:-1], side="right") / y.size
    return float(np.sum(np.abs(cdf_x - cdf_y) * np.diff(grid)))


@dataclass(frozen=True)
class Interval:
    """Mean over forget sets and its 95 % bootstrap percentile interval."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def paired_bootstrap(
    values: Sequence[float] | np.ndarray,
    *,
    reference: Sequence[float] | np.ndarray | None = None,
    n_boot: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean of ``values - reference`` (paired per forget set) with a percentile bootstrap interval.

    Without ``reference`` it is the interval of the mean of ``values`` itself. NaNs (a forget set
    where the metric is undefined) are dropped pairwise; with fewer than 2 sets the interval is
    the point itself.
    """
    v = np.asarray(values, dtype=np.float64)
    if reference is not None:
        r = np.asarray(reference, dtype=np.float64)
        if r.shape != v.shape:
            raise ValueError(f"paired values need equal shapes; got {v.shape} and {r.shape}")
        v = v - r
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if v.size < 2:
        return Interval(mean, mean, mean, int(v.size))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(mean, float(low), float(high), int(v.size))


def speedups(retrain_seconds: Sequence[float], unlearn_seconds: Sequence[float]) -> dict[str, float]:
    """Median of per-forget-set ratios and ratio of totals (retrain time / unlearning time)."""
    r = np.asarray(retrain_seconds, dtype=np.float64)
    u = np.asarray(unlearn_seconds, dtype=np.float64)
    if r.shape != u.shape or r.size == 0:
        raise ValueError("speed-ups need one retrain and one unlearning time per forget set")
    u = np.maximum(u, 1e-6)
    return {"median": float(np.median(r / u)), "ratio_of_totals": float(r.sum() / u.sum())}
