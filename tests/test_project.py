"""Project-wide rules: the layering of the role folders, one namespace, Flower only in the glue,
pyproject's run config mirroring the defaults."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch

from serforget.common.device import resolve_device
from serforget.common.settings import RunSettings, flatten

ROOT = Path(__file__).resolve().parents[1]


#: The only modules that may import ``flwr``: the Flower glue of each side (and the SuperLink
#: launcher). Everything else is plain Python that the CLI, the benchmarks and the tests call
#: without a Flower runtime; the rest of deploy/ runs Flower's programs, never imports them.
FLWR_ALLOWED = {
    "client/app.py",
    "client/runtime.py",
    "server/app.py",
    "server/inprocess.py",
    "server/report.py",
    "server/scenario.py",
    "server/strategy.py",
    "server/unlearning_round.py",
    "server/oracle.py",
    # the SuperLink launcher that serves Flower's own app with the Fleet API alone on the devices' port
    "deploy/superlink.py",
}
#: Which role folders each folder may import from (``serforget.<role>``). ``common`` is shared by
#: everyone and imports no other role; the CLI (``serforget/``) sits on top of all of them.
LAYERS = {
    "common": set(),
    "client": {"common"},
    "server": {"common", "client"},
    "deploy": {"common", "client", "server"},
    "serforget": {"common", "client", "server", "deploy", "cli"},
}
_IMPORT = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", flags=re.M)


def _imports(path: Path) -> list[str]:
    return _IMPORT.findall(path.read_text())


def test_layering_each_role_imports_only_the_roles_below_it() -> None:
    offenders = []
    for folder, allowed in LAYERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            for module in _imports(path):
                parts = module.split(".")
                if parts[0] in {"common", "client", "server", "deploy", "cli"}:
                    offenders.append(f"{path.relative_to(ROOT)}: bare import {module} (use serforget.{module})")
                elif parts[0] == "serforget" and len(parts) > 1 and parts[1] not in allowed | {"__version__"}:
                    if not (folder == parts[1]):
                        offenders.append(f"{path.relative_to(ROOT)}: imports {module}")
    assert offenders == []


def test_only_the_flower_glue_imports_flwr() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for folder in LAYERS
        for p in (ROOT / folder).rglob("*.py")
        if any(m == "flwr" or m.startswith("flwr.") for m in _imports(p))
        and str(p.relative_to(ROOT)) not in FLWR_ALLOWED
    ]
    assert offenders == []


def test_wheel_top_level_is_serforget_only(tmp_path: Path) -> None:
    """Every package the wheel installs lives under ``serforget`` (no bare ``common``/``server``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {name.split(".")[0] for name in config["packages"]} == {"serforget"}
    for name, folder in config["package-dir"].items():
        assert name.startswith("serforget") and (ROOT / folder / "__init__.py").is_file(), name
    on_disk = {
        str(p.parent.relative_to(ROOT))
        for folder in ("common", "client", "server", "deploy", "serforget")
        for p in (ROOT / folder).rglob("__init__.py")
    }
    listed = set()
    for name in config["packages"]:
        head = max((k for k in config["package-dir"] if name == k or name.startswith(k + ".")), key=len)
        listed.add(str(Path(config["package-dir"][head], *name[len(head) :].split(".")[1:])))
    assert on_disk == listed, "a package folder is missing from [tool.setuptools] packages"


def test_pyproject_run_config_equals_settings_defaults() -> None:
    """pyproject's [tool.flwr.app.config] (nested tables) is exactly RunSettings' defaults, key for key."""
    text = (ROOT / "pyproject.toml").read_text()
    config = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert RunSettings.from_mapping(config) == RunSettings()
    assert flatten(config) == RunSettings().as_run_config()
    assert RunSettings().to_toml() in text


def test_device_setting() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device setting"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_test_modules_share_helpers_only_through_tests_helpers() -> None:
    """A test module never imports another test module (helpers live in tests/helpers/ or conftest)."""
    offenders = [
        f"{p.name}: {m}"
        for p in (ROOT / "tests").glob("*.py")
        for m in _imports(p)
        if m.startswith("tests.") and not m.startswith("tests.helpers")
    ]
    assert offenders == []
