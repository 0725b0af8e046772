"""``tailrank ingest`` / ``search`` / ``eval`` over a Collection (placeholder until the pipeline lands)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError(args.command)
