"""The ``tailrank`` command line.

Each command lives in its own module that exposes ``add_parser(subparsers)`` and
``run(args) -> int``; this file only wires them together, so a command's heavy imports
happen only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import TailrankError

__all__ = ["main"]

# command name -> module (relative to this package) holding add_parser / run
_COMMANDS: dict[str, str] = {
    "export": "._cli_model",
    "optimize": "._cli_model",
    "ingest": "._cli_collection",
    "search": "._cli_collection",
    "eval": "._cli_collection",
    "tune": "._cli_collection",
    "serve": ".serve.cli",
    "bench": ".bench.cli",
}


def _module(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(_COMMANDS[name], __package__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tailrank", description="tailrank: fast two-stage retrieval and reranking")
    sub = p.add_subparsers(dest="command", required=True)
    seen: set[str] = set()
    for name, mod in _COMMANDS.items():
        if mod in seen:
            continue
        seen.add(mod)
        _module(name).add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tailrank`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return int(_module(args.command).run(args))
    except TailrankError as e:
        print(f"tailrank {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
