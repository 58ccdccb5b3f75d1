"""Forget-set-only machine unlearning for SER models (after arXiv 2510.04251 and Cha et al., 2024).

Entry point: :func:`unlearn` ``(model, forget, *, method, config, remain=None) -> UnlearnResult``.
Also public: the importance maps the server aggregates (:func:`mas_importance`) and the
server-side :func:`elastic_constraint`. Plain PyTorch; no Flower import.
"""

from serforget.common.unlearning.config import FORGET_ONLY_METHODS, METHODS, REMAIN_METHODS, UnlearnConfig
from serforget.common.unlearning.elastic import elastic_constraint
from serforget.common.unlearning.engine import UnlearnResult, unlearn
from serforget.common.unlearning.importance import clip_importance, fisher_importance, mas_importance, minmax_normalize

__all__ = [
    "FORGET_ONLY_METHODS",
    "METHODS",
    "REMAIN_METHODS",
    "UnlearnConfig",
    "UnlearnResult",
    "clip_importance",
    "elastic_constraint",
    "fisher_importance",
    "mas_importance",
    "minmax_normalize",
    "unlearn",
]
