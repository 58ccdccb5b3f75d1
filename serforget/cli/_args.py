"""Argument types and options shared by every subcommand, so each behaves the same way.

Why: a flag that reads ``maybe`` as False, or an output path that only fails after an hour of
training, turns a typo into a lost run. Types here refuse such values at parse time (argparse
prints one line and exits 2), and the progress option is spelled the same on every long command.
"""

from __future__ import annotations

import argparse
import sys

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def bool_value(text: str) -> bool:
    """``true/false`` (also yes/no, on/off, 1/0); anything else is an error, never a silent False."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_progress(parser: argparse.ArgumentParser) -> None:
    """``--progress/--no-progress``: progress bars on stderr; on by default when stderr is a terminal."""
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="show progress bars (default: on when stderr is a terminal)",
    )


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default in its help, unless it is empty or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, "", [], argparse.SUPPRESS)
            or not action.option_strings
            or isinstance(action, argparse.BooleanOptionalAction)
        ):
            return text
        return f"{text} (default: %(default)s)".strip()


class Parser(argparse.ArgumentParser):
    """The CLI's parser class: subparsers inherit it, so every command shows its defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        # argparse skips the help line of an option without help text, default included
        action = super().add_argument(*args, **kwargs)
        if action.help is None and action.option_strings and action.default not in (None, False, "", []):
            action.help = "(default: %(default)s)"
        return action
