"""Project-wide rules: common/ stays free of Flower; pyproject's run config mirrors the defaults."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch

from common.device import resolve_device
from common.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]


def test_common_never_imports_flwr() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "common").rglob("*.py")
                 if re.search(r"^\s*(import flwr|from flwr)", p.read_text(), flags=re.M)]
    assert offenders == []


def test_pyproject_run_config_equals_settings_defaults() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert RunSettings.from_mapping(config) == RunSettings()
    assert set(config) == {line.split(" = ")[0] for line in RunSettings().to_toml_lines()}


def test_run_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown run-config key"):
        RunSettings.from_mapping({"num-round": 3})
    with pytest.raises(ValueError, match="'num-rounds' must be int"):
        RunSettings.from_mapping({"num-rounds": "3"})
    with pytest.raises(ValueError, match="'unlearn-json' is not valid JSON"):
        RunSettings.from_mapping({"unlearn-json": "{"})
    assert RunSettings.from_mapping({"lr": 1}).lr == 1.0


def test_device_setting() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device setting"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
