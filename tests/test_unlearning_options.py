"""Unlearning settings added for issue 10: runner-up relabels, anchoring, per-step stop, L2UL's recipe."""

from __future__ import annotations

import pytest
import torch

from serforget.common.unlearning import UnlearnConfig, unlearn
from serforget.common.unlearning.engine import loss_match_targets, runner_up_labels
from serforget.common.unlearning.stopping import REASON_TARGET, REASON_ZERO
from tests.helpers.unlearning import trained_tiny

FAST = UnlearnConfig(device="cpu", max_epochs=3, pgd_steps=2, pgd_k=1)


def _forget():
    model, train, _ = trained_tiny()
    return model, train.subset(list(range(len(train) - 8, len(train))))


def test_runner_up_is_the_best_class_other_than_the_label():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 5.0, 4.0, 9.0]])
    assert runner_up_labels(logits, torch.tensor([0, 3])).tolist() == [1, 1]
    assert runner_up_labels(logits, torch.tensor([1, 1])).tolist() == [0, 3]


@pytest.mark.parametrize(
    "changes",
    [
        {"relabel_to": "runner_up"},
        {"anchor_weight": 1.0, "stop": "retrain-level", "target_forget_acc": 0.5},
        {"importance_scope": "trained", "stop": "retrain-level", "target_forget_acc": 0.5},
        {"loss_weighting": "set_size", "adv_label": "attack_target", "weight_decay": 1e-4, "optimizer": "sgd"},
    ],
)
def test_each_option_unlearns_and_leaves_the_input_alone(changes):
    model, forget = _forget()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = unlearn(model, forget, method="rl_adv_ela", config=FAST.replace(**changes))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.steps >= 1 and result.importance is not None
    assert result.summary()["config"] == FAST.replace(**changes).to_dict()


def test_importance_on_the_trained_rows_differs_from_importance_on_the_whole_set():
    model, forget = _forget()
    config = FAST.replace(stop="retrain-level", target_forget_acc=0.75, max_epochs=1)
    whole = unlearn(model, forget, method="rl_adv_ela", config=config)
    trained = unlearn(model, forget, method="rl_adv_ela", config=config.replace(importance_scope="trained"))
    assert any(not torch.allclose(whole.importance[k], trained.importance[k]) for k in whole.importance)


def test_per_step_check_stops_no_later_than_per_epoch():
    model, forget = _forget()
    config = FAST.replace(stop="zero", max_epochs=20, batch_size=2, lr=5e-2, pgd_k=1)
    epoch = unlearn(model, forget, method="neggrad", config=config)
    step = unlearn(model, forget, method="neggrad", config=config.replace(stop_check="step"))
    assert step.steps <= epoch.steps
    if step.stop_reason == REASON_ZERO:
        assert step.forget_acc == 0.0


def test_l2ul_recipe_runs_to_its_stop_rule():
    model, forget = _forget()
    config = UnlearnConfig(
        device="cpu",
        stop="zero",
        stop_check="step",
        optimizer="sgd",
        lr=1e-2,
        weight_decay=1e-4,
        loss_weighting="set_size",
        adv_label="attack_target",
        adv_drop_unflipped=False,
        pgd_k=3,
        pgd_steps=2,
        penalty_lambda=0.5,
        penalty_tau=1.0,
        max_epochs=50,
    )
    result = unlearn(model, forget, method="neggrad_adv_ela", config=config)
    assert result.stop_reason in (REASON_ZERO, "max_epochs") and result.n_adversarial == 3 * len(forget)
    assert result.importance is not None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"stop_check": "batch"}, "stop_check"),
        ({"loss_weighting": "x"}, "loss_weighting"),
        ({"adv_label": "x"}, "adv_label"),
        ({"relabel_to": "x"}, "relabel_to"),
        ({"importance_scope": "x"}, "importance_scope"),
        ({"anchor_weight": -1}, "anchor_weight"),
        ({"anchor_copies": 0}, "anchor_copies"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"loss_match_weight": -1}, "loss_match_weight"),
        ({"loss_match_weight": 1.0}, "reference_losses"),
        ({"reference_losses": ()}, "reference_losses"),
        ({"reference_losses": (0.1, float("nan"))}, "reference_losses"),
        ({"reference_losses": (-0.5,)}, "reference_losses"),
        ({"reference_losses": [0.5]}, "reference_losses"),
    ],
)
def test_invalid_options_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"UnlearnConfig.{field}"):
        UnlearnConfig(**changes)


def test_retrain_level_with_runner_up_reaches_its_target():
    model, forget = _forget()
    result = unlearn(
        model,
        forget,
        method="rl_adv_ela",
        config=FAST.replace(
            stop="retrain-level", target_forget_acc=0.5, relabel_to="runner_up", max_epochs=30, lr=1e-3
        ),
    )
    assert result.stop_reason == REASON_TARGET and result.forget_acc <= 0.5


def test_loss_targets_match_ranks_to_reference_quantiles():
    # Row 1 has the smallest original loss, row 0 the largest: targets follow that order and
    # are the reference's quantiles at (k + 0.5) / n.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    targets = loss_match_targets(logits, torch.tensor([0, 0, 0]), (0.0, 1.0, 2.0, 3.0))
    expected = torch.quantile(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([5 / 6, 1 / 6, 3 / 6]))
    assert torch.allclose(targets, expected)
    assert targets[1] < targets[2] < targets[0]


def test_loss_matching_raises_the_forget_losses_toward_the_reference():
    model, forget = _forget()
    config = FAST.replace(
        stop="retrain-level", target_forget_acc=0.5, relabel_scope="needed", max_epochs=1, lr=1e-3, forget_weight=0.0
    )
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        before = ce(model.eval()(forget.waves), forget.targets).item()
    plain = unlearn(model, forget, method="rl", config=config)
    matched = unlearn(
        model, forget, method="rl", config=config.replace(loss_match_weight=1.0, reference_losses=(before + 2.0,) * 4)
    )
    with torch.no_grad():
        after_plain = ce(plain.model(forget.waves), forget.targets).item()
        after_matched = ce(matched.model(forget.waves), forget.targets).item()
    assert plain.steps >= 1 and after_matched > after_plain
