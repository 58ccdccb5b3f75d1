"""A per-example membership attack: one likelihood ratio per utterance, "member" versus "unseen".

The population attacks of :mod:`serforget.common.privacy` answer "does the forget set as a whole look
trained on?" with one AUC. A deletion is a promise about each recording, so this attack gives
every recording its own verdict, in the style of LiRA (Carlini et al., "Membership inference
attacks from first principles", 2022) and its unlearning form U-LiRA (Hayes et al., 2024):

- the statistic is the logit-scaled confidence on the label,
  ``phi = log p_y - log(1 - p_y)``, which is close to Gaussian where raw confidence is not;
- the IN distribution is a Gaussian fitted to ``phi`` of known members (remaining training
  utterances), the OUT distribution one fitted to ``phi`` of known non-members (held-out
  utterances);
- each target utterance gets ``log N(phi; IN) - log N(phi; OUT)``: above 0 it looks more like a
  training member than like unseen data.

This is LiRA's *global* variant: IN and OUT are fitted on the population rather than on shadow
models per example, so it needs no retraining and runs inside the federated report. It is
weaker than U-LiRA with shadows (hard examples look like non-members for every model), which is
why the report sets it next to the retrain oracle's value on the same recordings, the level an
exactly unlearned model reaches.

Non-members are split in two folds: OUT is fitted on one and the false-positive rate measured on
the other (both ways, averaged), so no rate is measured on the utterances that fitted it.
Plain numpy + torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: keeps a degenerate fit (all scores equal) from dividing by zero
MIN_STD = 1e-3


def logit_confidence(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """``phi = log p_y - log(1 - p_y)`` per row, computed from logits without forming ``1 - p_y``.

    ``1 - p_y`` underflows to 0 for a memorised utterance (p_y = 1 - 1e-12), so the statistic is
    taken as ``z_y - logsumexp_{c != y} z_c``, which is exact and finite.
    """
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected logits[N, C] and targets[N]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if logits.shape[1] < 2:
        raise ValueError("the logit-scaled confidence needs at least 2 classes")
    z = logits.detach().double().cpu()
    y = targets.detach().long().cpu()
    own = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf"))
    return (own - torch.logsumexp(others, dim=1)).numpy()


@dataclass(frozen=True)
class Gaussian:
    mean: float
    std: float

    @classmethod
    def fit(cls, values: np.ndarray) -> "Gaussian":
        values = np.asarray(values, dtype=np.float64)
        if values.size < 2:
            raise ValueError("fitting a Gaussian needs at least 2 scores")
        return cls(float(values.mean()), max(float(values.std(ddof=1)), MIN_STD))

    def log_pdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return -0.5 * ((x - self.mean) / self.std) ** 2 - np.log(self.std) - 0.5 * np.log(2 * np.pi)


@dataclass(frozen=True)
class PerExampleAttack:
    """The attack's verdict on a target set (e.g. the deleted recordings) under one model.

    ``scores`` are the per-example log likelihood ratios (averaged over the two folds' OUT fits);
    ``member_rate`` the fraction of targets called members (ratio > 1); ``mean_posterior`` the mean
    membership probability at prior 1/2; ``nonmember_rate`` the false-positive rate on held-out
    non-members and ``remaining_member_rate`` the true-positive rate on known members (together:
    the attack's power on this model).
    """

    scores: tuple[float, ...]
    member_rate: float
    mean_posterior: float
    nonmember_rate: float
    remaining_member_rate: float

    def to_dict(self, ids: list[str] | None = None) -> dict:
        out = {
            "member_rate": self.member_rate,
            "mean_posterior": self.mean_posterior,
            "nonmember_rate": self.nonmember_rate,
            "remaining_member_rate": self.remaining_member_rate,
        }
        out["scores"] = dict(zip(ids, self.scores)) if ids is not None else list(self.scores)
        return out


def _log_ratio(phi: np.ndarray, members: Gaussian, nonmembers: Gaussian) -> np.ndarray:
    return members.log_pdf(phi) - nonmembers.log_pdf(phi)


def per_example_attack(
    *, member_phi: np.ndarray, nonmember_phi: np.ndarray, target_phi: np.ndarray, seed: int = 0
) -> PerExampleAttack:
    """Score ``target_phi`` per example against IN (members) and OUT (non-members) Gaussians."""
    members = np.asarray(member_phi, dtype=np.float64)
    nonmembers = np.asarray(nonmember_phi, dtype=np.float64)
    targets = np.asarray(target_phi, dtype=np.float64)
    if nonmembers.size < 4:
        raise ValueError("the per-example attack needs at least 4 non-member utterances (two folds of 2)")
    if members.size < 2 or targets.size == 0:
        raise ValueError("the per-example attack needs at least 2 member and 1 target utterance")
    if not (np.isfinite(members).all() and np.isfinite(nonmembers).all() and np.isfinite(targets).all()):
        raise ValueError("the per-example attack got non-finite confidences (a model returned NaN/inf logits)")
    inside = Gaussian.fit(members)
    order = np.random.default_rng(seed).permutation(nonmembers.size)
    folds = (order[: nonmembers.size // 2], order[nonmembers.size // 2 :])
    target_ratios, fprs, tprs = [], [], []
    for fit_idx, eval_idx in (folds, folds[::-1]):
        outside = Gaussian.fit(nonmembers[fit_idx])
        target_ratios.append(_log_ratio(targets, inside, outside))
        fprs.append(float(np.mean(_log_ratio(nonmembers[eval_idx], inside, outside) > 0)))
        tprs.append(float(np.mean(_log_ratio(members, inside, outside) > 0)))
    ratios = np.mean(target_ratios, axis=0)
    posterior = 1.0 / (1.0 + np.exp(-np.clip(ratios, -700, 700)))
    return PerExampleAttack(
        scores=tuple(float(r) for r in ratios),
        member_rate=float(np.mean(ratios > 0)),
        mean_posterior=float(posterior.mean()),
        nonmember_rate=float(np.mean(fprs)),
        remaining_member_rate=float(np.mean(tprs)),
    )
