"""The CLI as a new user meets it: every user error is one line on stderr and exit 2, never a
traceback; outputs and the model are checked before any audio loads; ``--help`` imports nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serforget import __version__
from serforget.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *, needle: str) -> str:
    """Run the CLI in-process; assert exit 2 with a single stderr line that names ``needle``."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit 2 after printing usage + one error line
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in "\n".join(err)
    assert needle in err[-1], err
    return err[-1]


def test_top_level_help_and_version_import_no_command_module() -> None:
    code = (
        "import sys; from serforget.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = {'torch', 'flwr', 'onnxruntime', 'serforget.common.training'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert name in done.stdout
    version = subprocess.run([sys.executable, "-m", "serforget", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert version.stdout.strip() == f"serforget {__version__}"


def test_every_command_registers_the_summary_the_table_shows() -> None:
    for name, (_, summary) in COMMANDS.items():
        parser = build_parser(name)
        sub = next(a for a in parser._actions if a.dest == "command")
        assert name in sub.choices, name
        help_text = {c.dest: c.help for c in sub._choices_actions}[name]
        assert help_text == summary, name


def test_help_shows_defaults() -> None:
    help_text = build_parser("train")._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default: 4class)" in help_text and "(default: logmel_cnn)" in help_text


def test_boolean_flags_refuse_nonsense(capsys, tmp_path: Path) -> None:
    _one_line_error(
        capsys,
        ["train", "--train", "x.csv", "--out", str(tmp_path / "o"), "--select-best", "maybe"],
        needle="expected true or false, got 'maybe'",
    )


def test_train_refuses_an_output_that_is_a_file_before_loading_audio(capsys, tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    missing_manifest = tmp_path / "never-read.csv"  # were audio loaded first, this would fail instead
    line = _one_line_error(
        capsys, ["train", "--train", str(missing_manifest), "--out", str(blocker / "ckpt")], needle="is not a folder"
    )
    assert str(blocker) in line


def test_train_refuses_a_transformer_without_config_before_loading_audio(capsys, tmp_path: Path) -> None:
    _one_line_error(
        capsys,
        ["train", "--train", str(tmp_path / "never-read.csv"), "--out", str(tmp_path / "o"), "--arch", "wav2vec2"],
        needle="wav2vec2",
    )


def test_evaluate_and_index_refuse_bad_outputs(capsys, tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    _one_line_error(
        capsys,
        ["evaluate", "--checkpoint", str(tmp_path / "none"), "--manifest", "m.csv", "--out", str(blocker)],
        needle="is not a folder",
    )
    _one_line_error(
        capsys,
        ["corpus", "index", "--format", "ravdess", "--root", str(tmp_path), "--out", str(tmp_path)],
        needle="is a folder",
    )
    _one_line_error(
        capsys,
        ["corpus", "index", "--format", "ravdess", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "m.csv")],
        needle="not a folder",
    )


def test_simulate_outside_the_repository_names_the_problem(capsys, tmp_path: Path) -> None:
    _one_line_error(
        capsys, ["simulate", "--app", str(tmp_path), "--work-dir", str(tmp_path / "w")], needle="no pyproject.toml"
    )


def test_unknown_command_and_missing_files_are_one_line(capsys, tmp_path: Path) -> None:
    _one_line_error(capsys, ["trian"], needle="invalid choice")
    _one_line_error(capsys, ["node", "status", "--data-dir", str(tmp_path / "none")], needle=str(tmp_path / "none"))
