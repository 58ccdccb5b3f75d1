"""UnlearnConfig: validation and reading from CLI mappings (the run config's unlearn.* table: test_settings.py)."""

from __future__ import annotations

import pytest

from serforget.common.unlearning import UnlearnConfig


def test_defaults_are_valid_and_round_trip_through_a_mapping():
    config = UnlearnConfig()
    assert config.stop == "zero" and config.importance == "mas"
    assert UnlearnConfig.from_mapping(config.to_dict()) == config


def test_from_mapping_coerces_strings_and_accepts_hyphens():
    config = UnlearnConfig.from_mapping(
        {
            "pgd-eps": "0.1",
            "max_epochs": "7",
            "pgd_rand_init": "false",
            "stop": "retrain-level",
            "target-forget-acc": 0.55,
            "remain_steps_per_epoch": "none",
            "pgd_k": 3.0,
        }
    )
    assert config.pgd_eps == 0.1 and config.max_epochs == 7 and config.pgd_rand_init is False
    assert config.stop == "retrain-level" and config.target_forget_acc == 0.55
    assert config.remain_steps_per_epoch is None and config.pgd_k == 3


def test_renamed_penalty_settings_are_refused_naming_the_new_name():
    """``ela_lambda``/``tau`` became ``penalty_lambda``/``penalty_tau`` (the server's constraint has its own
    ``constraint.*``): an old key is an error that says the new name, never silently dropped or aliased."""
    with pytest.raises(ValueError, match="^tau: renamed penalty_tau$"):
        UnlearnConfig.from_mapping({"tau": "0.25"})
    with pytest.raises(ValueError, match="^ela_lambda: renamed penalty_lambda$"):
        UnlearnConfig.from_mapping({"ela_lambda": 2.0})
    assert UnlearnConfig.from_mapping({"penalty-tau": "0.25", "penalty_lambda": 2}).penalty_tau == 0.25


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"learning_rate": 1.0}, "^learning_rate: unknown unlearning setting"),
        ({"lrr": 1.0}, r"^lrr: unknown unlearning setting \(did you mean lr\?\)"),
        ({"max_epochs": "two"}, "^max_epochs: cannot read 'two' as int"),
        ({"pgd_k": 2.5}, "^pgd_k: cannot read 2.5 as int"),
        ({"pgd_rand_init": "maybe"}, "^pgd_rand_init: cannot read"),
        ({"lr": True}, "^lr: cannot read True as float"),
        ({"pgd-eps": "-1"}, r"^pgd_eps: must be > 0, got -1\.0"),
    ],
)
def test_from_mapping_names_the_bad_key(mapping, message):
    with pytest.raises(ValueError, match=message):
        UnlearnConfig.from_mapping(mapping)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"lr": 0.0}, "lr"),
        ({"stop": "never"}, "stop"),
        ({"stop": "retrain-level"}, "target_forget_acc"),
        ({"target_forget_acc": 1.5}, "target_forget_acc"),
        ({"pgd_norm": "l1"}, "pgd_norm"),
        ({"penalty_tau": 0.0}, "penalty_tau"),
        ({"penalty_tau": 1.5}, "penalty_tau"),
        ({"penalty_lambda": -1.0}, "penalty_lambda"),
        ({"importance": "ewc"}, "importance"),
        ({"pgd_k": 0}, "pgd_k"),
        ({"neggrad_plus_alpha": 2.0}, "neggrad_plus_alpha"),
        ({"relabel_scope": "some"}, "relabel_scope"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=f"UnlearnConfig.{field}"):
        UnlearnConfig(**changes)


@pytest.mark.parametrize(
    ("scope", "stop", "only_needed"),
    [
        ("auto", "zero", False),
        ("auto", "retrain-level", True),
        ("all", "retrain-level", False),
        ("needed", "zero", True),
    ],
)
def test_relabel_scope_auto_means_needed_only_under_the_retrain_level_rule(scope, stop, only_needed):
    config = UnlearnConfig(relabel_scope=scope, stop=stop, target_forget_acc=0.5)
    assert config.trains_only_needed is only_needed
