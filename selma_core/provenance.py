"""Where a run came from: the code version and the git commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import selma_core


def git_commit() -> str:
    """The commit of the checkout selma runs from (``SELMA_GIT_COMMIT`` wins: set in images and jobs)."""
    if os.environ.get("SELMA_GIT_COMMIT"):
        return os.environ["SELMA_GIT_COMMIT"]
    root = Path(selma_core.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def code_version() -> str:
    return selma_core.__version__
