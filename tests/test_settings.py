"""The run config: nested tables, Flower's flattening and overrides, and the one parser's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.config import fuse_dicts, get_fused_config_from_dir, parse_config_args

from serforget.common.models.cnn import CNNConfig
from serforget.common.settings import RENAMED_KEYS, RunSettings, SettingsError
from serforget.common.unlearning import UnlearnConfig
from serforget.deploy.flwr_program import parse_overrides, run_config_text

ROOT = Path(__file__).resolve().parents[1]


def test_flower_flattens_the_nested_tables_into_the_keys_the_parser_reads() -> None:
    """What a ServerApp/ClientApp gets as ``Context.run_config`` (Flower 1.41's own code path)."""
    overrides = parse_config_args(["unlearn.lr=0.0003 constraint.enabled=false model.channels='8,16' num-rounds=3"])
    assert overrides == {
        "unlearn.lr": 0.0003,
        "constraint.enabled": False,
        "model.channels": "8,16",
        "num-rounds": 3,
    }
    run_config = get_fused_config_from_dir(ROOT, overrides)
    assert run_config["unlearn.lr"] == 0.0003 and run_config["unlearn.pgd-eps"] == 0.05
    assert not any(isinstance(v, dict) for v in run_config.values())
    cfg = RunSettings.from_mapping(run_config)
    assert cfg.unlearn.lr == 0.0003 and cfg.constraint is False and cfg.num_rounds == 3
    assert cfg.model_cnn.channels == (8, 16) and cfg.model_config["channels"] == [8, 16]
    # the same text through our own --run-config parser gives the same keys and values
    assert parse_overrides("unlearn.lr=0.0003 constraint.enabled=false model.channels='8,16' num-rounds=3") == overrides


def test_flower_refuses_an_override_pyproject_does_not_define() -> None:
    """Why every setting has its default in pyproject: ``flwr run`` fuses overrides into it strictly."""
    with pytest.raises(ValueError, match="unlearn.lrr"):
        get_fused_config_from_dir(ROOT, parse_config_args(["unlearn.lrr=0.1"]))


def test_run_config_text_round_trips_through_flowers_parser() -> None:
    values = {"unlearn.max-epochs": 5, "model.channels": "8,16", "work-dir": "/tmp/a b", "constraint.tau": 0.1}
    assert parse_config_args([run_config_text(values)]) == values
    assert fuse_dicts(RunSettings().as_run_config(), values) != RunSettings().as_run_config()


def test_settings_round_trip_through_the_flat_run_config() -> None:
    cfg = RunSettings.from_mapping(
        {"unlearn.penalty-tau": 0.25, "model.hidden": 16, "synth.speakers": 9, "scenario.enabled": False}
    )
    assert RunSettings.from_mapping(cfg.as_run_config()) == cfg
    assert (cfg.unlearn.penalty_tau, cfg.model_cnn.hidden, cfg.synth_speakers, cfg.scenario) == (0.25, 16, 9, False)
    # ints widen to float; a nested mapping reads like its flattened form
    assert RunSettings.from_mapping({"unlearn": {"lr": 1}}).unlearn.lr == 1.0


def test_the_device_unlearn_config_adds_the_runs_stop_rule_seed_target_and_device() -> None:
    cfg = RunSettings.from_mapping({"seed": 7, "unlearn.max-epochs": 4, "unlearn.penalty-lambda": 2.0})
    device_cfg = cfg.device_unlearn_config(target_forget_acc=0.4, device="cpu")
    assert device_cfg == UnlearnConfig(
        max_epochs=4, penalty_lambda=2.0, stop="retrain-level", target_forget_acc=0.4, seed=7, device="cpu"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"unlearn.lrr": 0.1},
            r"^unlearn\.lrr: unknown setting \(did you mean unlearn\.lr\?\); known unlearn\.\* settings: ",
        ),
        ({"unlearn.pgd_eps": 0.1}, r"^unlearn\.pgd_eps: unknown setting \(did you mean unlearn\.pgd-eps\?\)"),
        ({"num-round": 3}, r"^num-round: unknown setting \(did you mean num-rounds\?\); known top-level settings"),
        (
            {"bogus.key": 1},
            r"^bogus\.key: unknown setting; known tables: constraint, model, release, scenario, split, synth",
        ),
        ({"unlearn.seed": 1}, r"^unlearn\.seed: unknown setting"),  # the run's seed is the top-level one
        ({"num-rounds": "3"}, r"^num-rounds: must be an integer, got '3'"),
        ({"constraint.enabled": 1}, r"^constraint\.enabled: must be true or false, got 1"),
        ({"unlearn.lr": "fast"}, r"^unlearn\.lr: must be a number, got 'fast'"),
        ({"unlearn.pgd-eps": -1.0}, r"^unlearn\.pgd-eps: must be > 0, got -1\.0"),
        ({"unlearn.penalty-tau": 1.5}, r"^unlearn\.penalty-tau: must lie in \(0, 1\], got 1\.5"),
        ({"constraint.tau": 0.0}, r"^constraint\.tau: must lie in \(0, 1\], got 0\.0"),
        ({"constraint.strength": 1.5}, r"^constraint\.strength: must lie in \[0, 1\], got 1\.5"),
        ({"gpus-per-node": -1.0}, r"^gpus-per-node: must lie in \[0, 64\]"),
        ({"mode": "cloud"}, r"^mode: must be 'simulation' or 'deployment'"),
        ({"unlearn.method": "ft"}, r"^unlearn\.method: must be a forget-set-only method"),
        ({"unlearn.stop": "never"}, r"^unlearn\.stop: must be one of zero, retrain-level"),
        ({"model.arch": "resnet"}, r"^model\.arch: must be one of logmel_cnn"),
        ({"model.channels": "8,x"}, r"^model\.channels: must be comma-separated integers"),
        ({"model.channels": 8}, r"^model\.channels: must be a string of comma-separated integers"),
        ({"model.dropout": 1.0}, r"^model\.dropout: must lie in \[0, 1\), got 1\.0"),
        ({"model.arch": "wav2vec2"}, r"^model\.pretrained-dir: required by model\.arch = 'wav2vec2'"),
        ({"model.pretrained-dir": "/m"}, r"^model\.pretrained-dir: set, but model\.arch = 'logmel_cnn'"),
        (
            {"model.arch": "hubert", "model.pretrained-dir": "/m", "model.hidden": 8},
            r"^model\.\*: log-mel CNN settings",
        ),
        ({"task": "9class"}, r"^task: must be one of"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(raw: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_mapping(raw)


@pytest.mark.parametrize("old", sorted(RENAMED_KEYS))
def test_every_old_key_is_refused_with_its_new_name(old: str) -> None:
    with pytest.raises(SettingsError, match=f"^{old}: renamed "):
        RunSettings.from_mapping({old: 1})


def test_a_pre_trained_transformer_run_gets_its_model_config() -> None:
    cfg = RunSettings.from_mapping({"model.arch": "wav2vec2", "model.pretrained-dir": "/models/w2v"})
    assert cfg.model_config == {"pretrained_dir": "/models/w2v", "freeze_feature_encoder": True}
    assert RunSettings().model_config == CNNConfig().to_dict()
