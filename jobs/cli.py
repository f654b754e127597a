"""What every ``python -m jobs.*`` command line shares: its last line is one JSON object, usage
errors included, so scripts and CI read one outcome whatever went wrong."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

USAGE_ERROR = "invalid command line (see the usage above)"


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, failed: dict[str, Any]
) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``, or the exit code when argparse ends the program: 0 after
    ``--help``; after a usage error (argparse has explained it on stderr), ``failed`` with the
    error is printed as the last line, and 2 returned."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        if e.code:
            print(json.dumps({**failed, "error": USAGE_ERROR}))
        return int(e.code or 0)


def echo(line: str) -> None:
    """A line for the user on stderr; none where the terminal hung up (SIGHUP, a dropped SSH
    session): what follows it (a cancel, the JSON line, exit 130) must not fail on its write."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)
