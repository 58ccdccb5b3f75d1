"""Each unlearning component on its own: relabeling, PGD, importance, elastic terms, stop rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from serforget.common.data import WaveformSet
from serforget.common.unlearning.adversarial import make_adversarial_set, pgd_targeted
from serforget.common.unlearning.config import UnlearnConfig
from serforget.common.unlearning.elastic import ElasticPenalty, elastic_constraint, penalty_weights
from serforget.common.unlearning.forgetting import needed_rows, negative_ce_loss, random_other_labels, relabel_loss
from serforget.common.unlearning.importance import clip_importance, fisher_importance, mas_importance, minmax_normalize
from serforget.common.unlearning.stopping import REASON_MAX_EPOCHS, REASON_TARGET, REASON_ZERO, StopRule, run_until_stop
from tests.helpers.unlearning import trained_tiny

# ----------------------------------------------------------------------------- forgetting terms


def test_random_other_labels_never_keep_the_true_label_and_reach_every_other_class():
    targets = torch.tensor([0, 1, 2, 3] * 250)
    relabels = random_other_labels(targets, n_classes=4, generator=torch.Generator().manual_seed(0))
    assert (relabels != targets).all()
    for c in range(4):
        assert set(relabels[targets == c].tolist()) == {0, 1, 2, 3} - {c}


def test_random_other_labels_is_deterministic_and_rejects_bad_input():
    targets = torch.tensor([0, 1, 2, 3])
    a = random_other_labels(targets, n_classes=4, generator=torch.Generator().manual_seed(5))
    b = random_other_labels(targets, n_classes=4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="outside"):
        random_other_labels(torch.tensor([4]), n_classes=4, generator=torch.Generator())
    with pytest.raises(ValueError, match="at least 2"):
        random_other_labels(torch.tensor([0]), n_classes=1, generator=torch.Generator())


def test_forgetting_losses_point_in_opposite_directions():
    logits = torch.tensor([[3.0, 0.0, 0.0]])
    assert relabel_loss(logits, torch.tensor([1])) > 0
    assert negative_ce_loss(logits, torch.tensor([0])) == -nn.functional.cross_entropy(logits, torch.tensor([0]))


# ----------------------------------------------------------------------------- PGD


def test_needed_rows_picks_the_least_confident_correct_rows_until_the_target_is_met():
    targets = torch.tensor([0, 1, 2, 3, 0])
    logits = torch.tensor(
        [
            [5.0, 0.0, 0.0, 0.0],  # correct, margin 5
            [0.0, 1.0, 0.5, 0.0],  # correct, margin 0.5
            [0.0, 0.0, 2.0, 1.0],  # correct, margin 1
            [3.0, 0.0, 0.0, 1.0],  # wrong already
            [2.0, 0.0, 0.0, 0.0],  # correct, margin 2
        ]
    )
    assert needed_rows(logits, targets, target_acc=0.6).tolist() == [1]  # 4 correct, 3 allowed
    assert needed_rows(logits, targets, target_acc=0.4).tolist() == [1, 2]
    assert needed_rows(logits, targets, target_acc=0.0).tolist() == [1, 2, 4, 0]  # zero rule: every correct row
    assert needed_rows(logits, targets, target_acc=0.8).tolist() == []
    with pytest.raises(ValueError, match="rows"):
        needed_rows(logits[:3], targets, target_acc=0.5)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_flips_the_original_prediction_toward_the_target_inside_the_ball(norm):
    model, train, _ = trained_tiny()
    x, y = train.waves[:16], train.targets[:16]
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    target = (y + 1) % 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eps = 0.5 if norm == "l2" else 0.2
    adv = pgd_targeted(
        model, x, target, norm=norm, eps=eps, step=0.25, steps=20, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        pred = model(adv).argmax(1)
    assert (pred == target).float().mean() >= 0.8
    delta = adv - x
    if norm == "l2":
        assert (delta.norm(dim=1) <= eps * x.norm(dim=1) * (1 + 1e-4)).all()
    else:
        assert (delta.abs().amax(dim=1) <= eps * x.abs().amax(dim=1) * (1 + 1e-4) + 1e-7).all()
    assert adv.abs().max() <= 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_adversarial_set_is_labelled_by_the_original_model_and_drops_unflipped_examples():
    model, train, _ = trained_tiny()
    x, y = train.waves[:8], train.targets[:8]
    kwargs = dict(
        n_classes=4, k=3, norm="l2", step=0.25, steps=20, rand_init=True, generator=torch.Generator().manual_seed(1)
    )
    adv = make_adversarial_set(model, x, y, eps=0.5, drop_unflipped=False, **kwargs)
    assert len(adv) == 24
    assert torch.equal(adv.source, torch.arange(8).repeat_interleave(3))
    assert (adv.attack_targets != y[adv.source]).all()
    with torch.no_grad():
        assert torch.equal(adv.targets, model(adv.waves).argmax(1))
    assert (adv.targets != y[adv.source]).float().mean() >= 0.8  # pushed off the true class
    # a too-small budget leaves predictions unchanged: every example is unflipped and dropped
    weak = make_adversarial_set(model, x, y, eps=1e-6, drop_unflipped=True, **{**kwargs, "steps": 1})
    assert len(weak) == 0
    assert adv.rows_for(torch.tensor([2])).tolist() == [6, 7, 8]


# ----------------------------------------------------------------------------- importance


class _Linear(nn.Module):
    def __init__(self, n_in: int = 6, n_out: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _linear_data(n: int = 5) -> WaveformSet:
    waves = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))
    waves[:, 3:] = 0.0  # the forget outputs cannot depend on the weights reading these inputs
    return WaveformSet(waves=waves, targets=torch.arange(n) % 3, utt_ids=[str(i) for i in range(n)], speakers=["s"] * n)


def test_mas_is_higher_for_weights_that_move_the_forget_outputs():
    torch.manual_seed(0)
    model, data = _Linear(), _linear_data()
    imp = mas_importance(model, data, device="cpu")
    assert set(imp) == {"fc.weight", "fc.bias"}
    assert (imp["fc.weight"][:, 3:] == 0).all()
    assert (imp["fc.weight"][:, :3] > 0).all()
    # analytic: d||Wx+b||^2/dW = 2 (Wx+b) x^T, averaged in absolute value over the utterances
    with torch.no_grad():
        out = model.fc(data.waves)
        expected = torch.stack([(2 * o[:, None] * x[None, :]).abs() for o, x in zip(out, data.waves)]).mean(0)
    torch.testing.assert_close(imp["fc.weight"], expected)


def test_fisher_is_zero_where_the_loss_cannot_depend_on_a_weight():
    torch.manual_seed(0)
    imp = fisher_importance(_Linear(), _linear_data(), device="cpu")
    assert (imp["fc.weight"][:, 3:] == 0).all()
    assert (imp["fc.weight"][:, :3] > 0).all()


def test_importance_leaves_the_model_unchanged_and_skips_frozen_parameters():
    model = _Linear()
    model.fc.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    imp = mas_importance(model, _linear_data(), device="cpu")
    assert set(imp) == {"fc.weight"}
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="empty"):
        mas_importance(model, _linear_data().subset([]), device="cpu")


def test_minmax_normalize_and_clip():
    imp = {"a": torch.tensor([1.0, 3.0, 5.0]), "b": torch.tensor([2.0, 2.0])}
    norm = minmax_normalize(imp)
    torch.testing.assert_close(norm["a"], torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(norm["b"], torch.zeros(2))
    torch.testing.assert_close(clip_importance(norm, tau=0.25)["a"], torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(clip_importance(norm, tau=1.0)["a"], norm["a"])
    with pytest.raises(ValueError, match="tau"):
        clip_importance(norm, tau=0.0)
    with pytest.raises(ValueError, match="NaN"):
        minmax_normalize({"a": torch.tensor([float("nan")])})


# ----------------------------------------------------------------------------- elastic regulariser


def test_elastic_penalty_is_zero_at_the_original_weights_and_frees_important_weights():
    torch.manual_seed(0)
    model = _Linear()
    raw = {"fc.weight": torch.linspace(0, 1, 18).reshape(3, 6), "fc.bias": torch.tensor([0.0, 1.0, 0.5])}
    weights = penalty_weights(raw, penalty_tau=0.5, penalty_lambda=4.0)
    torch.testing.assert_close(weights["fc.bias"], torch.tensor([4.0, 0.0, 0.0]))
    penalty = ElasticPenalty(model, weights)
    assert float(penalty(model).detach()) == 0.0
    with torch.no_grad():
        model.fc.bias += 1.0  # only the first bias entry is held
    assert float(penalty(model).detach()) == pytest.approx(4.0)
    model.zero_grad()
    penalty(model).backward()
    torch.testing.assert_close(model.fc.bias.grad, torch.tensor([8.0, 0.0, 0.0]))


def test_elastic_penalty_rejects_a_map_of_another_model():
    model = _Linear()
    with pytest.raises(ValueError, match="no entry"):
        ElasticPenalty(model, {"fc.weight": torch.zeros(3, 6)})
    with pytest.raises(ValueError, match="shape"):
        ElasticPenalty(model, {"fc.weight": torch.zeros(6, 3), "fc.bias": torch.zeros(3)})


def test_elastic_constraint_scales_movement_by_global_importance():
    delta = {"w": torch.ones(4), "b": torch.full((2,), 2.0), "steps": torch.tensor(3)}
    importance = {"w": torch.tensor([0.0, 1.0, 2.0, 4.0]), "b": torch.tensor([5.0, 5.0])}
    out = elastic_constraint(delta, importance, constraint_tau=0.5, constraint_strength=0.8)
    # minmax(w) = [0, .25, .5, 1] -> clipped at tau .5 -> [0, .5, 1, 1] -> scale 1 - .8 * imp
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 0.6, 0.2, 0.2]))
    torch.testing.assert_close(out["b"], delta["b"])  # constant map: nothing stands out, all free
    assert torch.equal(out["steps"], delta["steps"])
    assert torch.equal(
        elastic_constraint(delta, importance, constraint_tau=1.0, constraint_strength=0.0)["w"], delta["w"]
    )
    torch.testing.assert_close(
        elastic_constraint(delta, importance, constraint_tau=0.25, constraint_strength=1.0)["w"],
        torch.tensor([1.0, 0, 0, 0]),
    )
    assert torch.equal(delta["w"], torch.ones(4))  # input untouched


def test_elastic_constraint_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="absent"):
        elastic_constraint({"w": torch.ones(2)}, {"v": torch.ones(2)}, constraint_tau=1.0, constraint_strength=1.0)
    with pytest.raises(ValueError, match="shape"):
        elastic_constraint({"w": torch.ones(2)}, {"w": torch.ones(3)}, constraint_tau=1.0, constraint_strength=1.0)
    with pytest.raises(ValueError, match="constraint_strength"):
        elastic_constraint({"w": torch.ones(2)}, {"w": torch.ones(2)}, constraint_tau=1.0, constraint_strength=-1.0)


# ----------------------------------------------------------------------------- stop rule


def test_stop_rule_decisions():
    zero = StopRule(kind="zero", target=0.0, max_epochs=3)
    assert zero.decide(epoch=0, forget_acc=0.2) is None
    assert zero.decide(epoch=1, forget_acc=0.0) == REASON_ZERO
    assert zero.decide(epoch=3, forget_acc=0.1) == REASON_MAX_EPOCHS
    level = StopRule.from_config(UnlearnConfig(stop="retrain-level", target_forget_acc=0.6))
    assert level.decide(epoch=1, forget_acc=0.7) is None
    assert level.decide(epoch=1, forget_acc=0.6) == REASON_TARGET
    with pytest.raises(ValueError):
        StopRule(kind="never", target=0.0, max_epochs=1)


class _Countdown(nn.Module):
    """Predicts class 0 for the first ``k`` utterances, where ``k`` drops by one per epoch."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.k = n
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = x[:, 0].long()
        logits = torch.zeros(len(x), 2)
        logits[index >= self.k, 1] = 1.0
        logits[index < self.k, 0] = 1.0
        return logits


@pytest.mark.parametrize(
    ("kind", "target", "epochs", "reason"),
    [
        ("zero", 0.0, 10, REASON_ZERO),
        ("retrain-level", 0.5, 5, REASON_TARGET),
    ],
)
def test_run_until_stop_stops_at_the_first_epoch_that_meets_the_rule(kind, target, epochs, reason):
    model = _Countdown(10)
    waves = torch.arange(10, dtype=torch.float32)[:, None]
    targets = torch.zeros(10, dtype=torch.long)

    def run_epoch() -> int:
        model.k -= 1
        return 2

    out = run_until_stop(
        model,
        rule=StopRule(kind=kind, target=target, max_epochs=100),
        forget_waves=waves,
        forget_targets=targets,
        run_epoch=run_epoch,
    )
    assert out.epochs == epochs and out.steps == 2 * epochs and out.stop_reason == reason
    assert out.forget_acc[0] == 1.0 and out.forget_acc[-1] == pytest.approx(target)
    assert all(a > target for a in out.forget_acc[:-1])


def test_run_until_stop_respects_max_epochs_and_skips_training_when_already_met():
    waves, targets = torch.arange(4, dtype=torch.float32)[:, None], torch.zeros(4, dtype=torch.long)
    calls = []
    out = run_until_stop(
        _Countdown(4),
        rule=StopRule(kind="zero", target=0.0, max_epochs=2),
        forget_waves=waves,
        forget_targets=targets,
        run_epoch=lambda: calls.append(1) or 1,
    )
    assert out.epochs == 2 and out.stop_reason == REASON_MAX_EPOCHS
    out = run_until_stop(
        _Countdown(0),
        rule=StopRule(kind="zero", target=0.0, max_epochs=2),
        forget_waves=waves,
        forget_targets=targets,
        run_epoch=lambda: calls.append(1) or 1,
    )
    assert out.epochs == 0 and out.steps == 0 and out.stop_reason == REASON_ZERO and len(calls) == 2
