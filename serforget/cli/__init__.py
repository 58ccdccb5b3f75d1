"""The ``serforget`` command line: one thin subcommand per capability.

Each submodule registers its subcommands with ``register(subparsers)`` and binds a handler via
``set_defaults(handler=...)``; handlers parse nothing themselves, call one library function and
print or write its result. Errors that name a bad file or field reach the user as one line on
stderr and exit status 2, not a traceback.

Only the module that owns the command being run is imported (``serforget --help`` imports none,
so it answers at once, and ``edge predict`` never imports torch through another command).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from serforget import __version__
from serforget.cli._args import Parser

#: Every top-level command, in help order: (module that owns it, one-line summary). The summary is
#: what ``serforget --help`` shows without importing the module; the module repeats it.
COMMANDS: dict[str, tuple[str, str]] = {
    "corpus": ("corpus", "synthesize, index or split an emotional-speech corpus"),
    "train": ("train", "train a SER model on a manifest (speaker-independent split)"),
    "evaluate": ("train", "UA/WA/macro-F1/confusion of a checkpoint on a manifest"),
    "demo": ("train", "centralized pipeline: synth corpus -> split -> train -> evaluation table"),
    "simulate": ("simulate", "run the default federated scenario with `flwr run .` and check it"),
    "deploy": ("deploy", "real SuperLink + SuperNodes (TLS, node auth) on this machine"),
    "unlearn": ("unlearn", "unlearn a forget set from a checkpoint using the forget set alone"),
    "unlearn-eval": ("unlearn", "evaluate unlearning methods against Retrain on one forget set"),
    "keys": ("keys", "create keys and enroll nodes"),
    "node": ("node", "a device's deletion requests"),
    "export-onnx": ("edge", "export a checkpoint to ONNX (parity-checked; optional int8)"),
    "edge": ("edge", "edge device: pull signed releases, predict with ONNX Runtime"),
    "server": ("edge", "server-side services"),
}

#: Errors that mean "the user gave something wrong" (a bad file, field or value): one line, exit 2.
USER_ERRORS = (ValueError, OSError, KeyError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with a known ``command`` only the module owning it is imported."""
    parser = Parser(
        prog="serforget",
        description="Federated, on-device machine unlearning for speech emotion recognition.",
        epilog="Run `serforget COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"serforget {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(f"serforget.cli.{COMMANDS[command][0]}").register(sub)
    else:  # help or a typo: list the commands without importing any of them
        for name, (_, summary) in COMMANDS.items():
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        result = args.handler(args)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"serforget {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"serforget {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
