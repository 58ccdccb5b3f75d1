"""The ``serforget`` command line: one thin subcommand per capability.

Each submodule registers its subcommands with ``register(subparsers)`` and binds a handler via
``set_defaults(handler=...)``; handlers parse nothing themselves, call one library function and
print or write its result. Errors that name a bad file or field reach the user as one line on
stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: Submodules that contribute subcommands, in help order.
_COMMAND_MODULES = ("corpus", "train", "simulate", "deploy", "unlearn", "keys", "node", "server", "edge")
#: Which submodule owns each top-level command. Only that module is imported to run a command, so
#: the edge path (``edge predict``) never imports torch through an unrelated command module.
_OWNER = {"corpus": "corpus", "train": "train", "evaluate": "train", "demo": "train", "simulate": "simulate",
          "unlearn": "unlearn", "unlearn-eval": "unlearn", "keys": "keys", "node": "node",
          "export-onnx": "edge", "edge": "edge", "server": "edge", "deploy": "deploy"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with ``command`` only the submodule owning it is imported and registered."""
    parser = argparse.ArgumentParser(prog="serforget", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = (_OWNER[command],) if command in _OWNER else _COMMAND_MODULES
    for name in modules:
        try:
            module = importlib.import_module(f"common.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"common.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        result = args.handler(args)
    except (ValueError, FileNotFoundError, PermissionError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"serforget {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
