"""`causal-forcing` command line: thin argument parsing over the library.

Each sub-command lives in its own module exposing `register(subparsers)`; the module adds its parser and sets
`func=` to a callable taking the parsed namespace and returning an exit code. Errors derived from
`CausalForcingError` are printed as one line and give exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import CausalForcingError

# Sub-command modules, imported lazily so `--help` stays fast and one broken optional dependency does not
# take the whole CLI down.
COMMAND_MODULES = (
    "causal_forcing.cli.data",
    "causal_forcing.cli.eval",
    "causal_forcing.cli.train",
    "causal_forcing.cli.generate",
    "causal_forcing.cli.info",
    "causal_forcing.cli.bench",
    "causal_forcing.cli.plot",
    "causal_forcing.cli.export",
    "causal_forcing.cli.recipe",
    "causal_forcing.cli.serve",
    "causal_forcing.cli.encode",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse's default code too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="causal-forcing", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # the command module itself is not part of this build
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse cannot intermix them with a positional list)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        rc = args.func(args)
    except CausalForcingError as e:
        print(f"causal-forcing {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
