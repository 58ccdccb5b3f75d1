"""The one error a settings dataclass raises about one of its fields.

Why a module of its own: :class:`~serforget.common.unlearning.config.UnlearnConfig` and
:class:`~serforget.common.models.cnn.CNNConfig` validate themselves on construction, and the
run-config parser (:mod:`serforget.common.settings`) must report such an error under the key
the user wrote (``unlearn.pgd-eps``), not the Python field name. The dataclasses cannot import
the parser (it imports them), so both sides share this leaf module.
"""

from __future__ import annotations


class FieldError(ValueError):
    """``owner.field rule``: ``field`` names the dataclass field, ``rule`` says what it must be."""

    def __init__(self, owner: str, field: str, rule: str) -> None:
        super().__init__(f"{owner}.{field} {rule}")
        self.owner, self.field, self.rule = owner, field, rule
