"""Every ``python -m jobs.*`` command ends with one JSON line, a usage error included."""

from __future__ import annotations

import importlib
import json

import pytest


@pytest.mark.parametrize(
    ("command", "fields"),
    [
        ("submit", {"jobs": []}),
        ("run", {"job": None, "status": "failed", "exit_code": 2}),
        ("status", {}),
        ("cancel", {"deleted": []}),
        ("promote", {"promoted": False}),
    ],
)
def test_a_usage_error_ends_with_the_json_line_and_exit_code_2(command, fields, capsys):
    main = importlib.import_module(f"jobs.{command}").main
    assert main(["--no-such-flag"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1]) == {
        **fields,
        "error": "invalid command line (see the usage above)",
    }
    assert "error: the following arguments are required" in err  # argparse explained it
    assert main(["--help"]) == 0 and "usage: python -m jobs." in capsys.readouterr().out
