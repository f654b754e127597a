"""Local executor: each job is a subprocess running ``python -m jobs.run ...``, with its own log file."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from jobs.executors.base import Executor, JobHandle, JobState, JobStatus
from selma_core.plan import JobSpec


def last_json_line(path: str) -> dict | None:
    """The last line of a log that parses as a JSON object (the job's result), if any."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


class LocalExecutor(Executor):
    name = "local"

    def __init__(
        self, log_dir: str | Path, max_parallel: int = 1, project_root: str | Path | None = None
    ) -> None:
        self.log_dir = Path(log_dir)
        self.project_root = Path(project_root or Path(__file__).resolve().parents[2])
        # Jobs running side by side share the CPU cores: each gets its share of threads, since
        # oversubscribed OpenMP pools spin against each other (seen: 7 s instead of 0.06 s a step).
        self.threads_per_job = str(max(1, (os.cpu_count() or 1) // max_parallel))

    def _command(self, command: list[str]) -> list[str]:
        # The job runs with this interpreter (the active virtual environment).
        return [sys.executable, *command[1:]] if command and command[0] == "python" else command

    def submit(self, job: JobSpec, command: list[str], env: dict[str, str]) -> JobHandle:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{job.name}.log"
        pythonpath = os.pathsep.join(p for p in (str(self.project_root), os.environ.get("PYTHONPATH")) if p)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                self._command(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={
                    "OMP_NUM_THREADS": self.threads_per_job,
                    "MKL_NUM_THREADS": self.threads_per_job,
                    **os.environ,  # a user's own thread settings win
                    **env,
                    "PYTHONPATH": pythonpath,
                    "PYTHONUNBUFFERED": "1",
                },
                cwd=os.getcwd(),
                start_new_session=True,  # Ctrl-C reaches the controller, which cancels jobs itself
            )
        return JobHandle(job=job, ref=process, log=str(log_path))

    def poll(self, handle: JobHandle) -> JobStatus:
        process: subprocess.Popen = handle.ref
        code = process.poll()
        if code is None:
            return JobStatus(JobState.RUNNING)
        state = JobState.SUCCEEDED if code == 0 else JobState.FAILED
        return JobStatus(state, code, last_json_line(handle.log))

    def cancel(self, handle: JobHandle) -> None:
        process: subprocess.Popen = handle.ref
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def describe(self, job: JobSpec, command: list[str]) -> str:
        return f"{job.id}: {shlex.join(self._command(command))}  > {self.log_dir / (job.name + '.log')}"
