"""Test helper: jobs run as the local executor runs them, forked by its fork server, one at a time."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from conftest import REPO

from jobs.executors.fork_server import ForkServer


class ForkedJobs:
    """A fork server started with ``env`` (it imports torch, diffusers and MLflow once, where a fresh
    process would spend about 13 s of CPU on it for each job); ``run`` forks one job and waits."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.count = 0
        self.server = ForkServer(env, str(REPO), logs / "fork-server.log")

    def run(
        self, argv: list[str], name: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> tuple[int, str]:
        """Fork ``python *argv`` (``env``: the job's environment, default the server's) and wait for
        it: its exit code and its log (stdout and stderr in one file, as the executor keeps it)."""
        self.count += 1
        log = self.logs / f"{self.count:03d}-{name}.log"
        log.write_text("")
        process = self.server.start(argv, self.env if env is None else env, str(REPO), str(log))
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"{name} did not end in {timeout:g} s; see {log}") from None
        return code, log.read_text()

    def close(self) -> None:
        self.server.close()
