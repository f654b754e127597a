"""Local executor: each job is a process running ``python -m jobs.run ...``, with its own log file.

With ``fork_server`` (``executor.fork_server``, the default), job processes are forked from a
process that has imported the jobs' libraries once (``jobs.executors.fork_server``), instead of
starting afresh: the same command, environment, log and exit status, without ~13 s of imports each.

An images job with ``images.num_jobs`` N > 1 is N processes, ``--shard-index I --num-shards N``
each, with a log each (``images-<skill>.I-of-N.log``): the job runs until all N have ended, and
succeeded if all did and one of them committed the output (or found it committed).

On a machine with several GPUs, each process of a GPU phase (``GPU_PHASES``) sees one of them
(``CUDA_VISIBLE_DEVICES``; a train job with ``train_gpus`` N, the N least busy): the one running
the fewest of this executor's processes (``GpuPlacement``), so that side-by-side jobs and an images
job's processes spread over the GPUs instead of all drawing on the first.

A train job with ``executor.train_gpus`` N > 1 trains its expert data-parallel on N GPUs, as a
Kubernetes pod with ``train_gpus`` does: one process, ``jobs.run ... --nproc-per-node N``, which
starts torchrun and its N ranks, shown the N least busy GPUs. On a machine without GPUs the N ranks
train on the CPU (gloo).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from jobs.executors.base import (
    Executor,
    JobHandle,
    JobState,
    JobStatus,
    image_process_command,
    speaking_process,
)
from jobs.executors.fork_server import (
    READ_AFTER_THE_FORK,
    SET_BY_EACH_JOB,
    ForkedProcess,
    ForkServer,
    ForkServerUnavailable,
)
from selma_core.errors import ConfigError
from selma_core.plan import JobSpec

# The phases whose jobs use a GPU where there is one (their Kubernetes Job templates ask for one);
# prompts too when its LLM runs in the job (make_executor adds it).
GPU_PHASES = frozenset({"images", "train", "merge-search", "eval"})

# Process: what _start returns (a fresh process, or one forked by the fork server).
Process = subprocess.Popen | ForkedProcess

# How long cancelled jobs get, all together, to clean up after SIGTERM (close their MLflow runs,
# remove staging folders) before SIGKILL.
CANCEL_GRACE_S = 20.0


def _shared(environment: dict[str, str]) -> dict[str, str]:
    """``environment`` but for what each forked job sets or reads itself after the fork: where this
    differs from the server's, the libraries in the server loaded under another environment than
    the job's."""
    per_job = (*SET_BY_EACH_JOB, *READ_AFTER_THE_FORK)
    return {name: value for name, value in environment.items() if name not in per_job}


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them: its entries where it
    is set (up to the first negative one, where CUDA stops reading), else the UUIDs of the GPUs
    ``nvidia-smi`` lists, in its order (UUIDs, since CUDA numbers GPUs in another order than
    ``nvidia-smi`` unless told otherwise); none without it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = []
        for entry in (e.strip() for e in visible.split(",")):
            if not entry or entry.startswith("-"):
                break
            gpus.append(entry)
        return gpus
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return []
    why = None
    try:
        listed = subprocess.run(
            [nvidia_smi, "--query-gpu=uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        if listed.returncode != 0:  # no driver, say
            said = (listed.stderr or listed.stdout).strip().splitlines()
            why = said[-1] if said else f"exit status {listed.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    if why is not None:
        print(
            f"warning: nvidia-smi could not list the GPUs ({why}): jobs are not placed on GPUs",
            file=sys.stderr,
        )
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip().startswith("GPU-")]


def too_few_gpus(count: int, gpus: list[str]) -> ConfigError:
    """The error for train jobs of ``count`` GPUs each (``executor.train_gpus``) when jobs are placed
    on fewer, said alike whether the controller finds it before any job runs or an executor at a
    job's start."""
    return ConfigError(
        f"executor.train_gpus: {count}, but jobs are placed on {len(gpus)} GPU(s) ({', '.join(gpus)})"
    )


class GpuPlacement:
    """Which GPU each new process of a GPU job sees: the one running the fewest processes now (the
    first listed, on a tie). More processes than GPUs share them; none are held back. ``gpus``: as
    ``CUDA_VISIBLE_DEVICES`` names them; None: ``visible_gpus()``, found at the first ``take``."""

    def __init__(self, gpus: Iterable[str] | None = None) -> None:
        self._gpus = None if gpus is None else list(gpus)
        self._running: dict[str, int] | None = None
        self._lock = threading.Lock()

    def _counts(self) -> dict[str, int]:
        if self._running is None:
            gpus = visible_gpus() if self._gpus is None else self._gpus
            self._running = dict.fromkeys(gpus, 0)
            if len(gpus) > 1:
                print(
                    f"local executor: GPU jobs are spread over {len(gpus)} GPUs: {', '.join(gpus)}",
                    file=sys.stderr,
                )
        return self._running

    @property
    def running(self) -> dict[str, int]:
        """How many processes each GPU runs, in the listed order."""
        with self._lock:
            return dict(self._counts())

    def take(self, count: int = 1) -> list[str]:
        """``count`` distinct GPUs for a new process, the least busy (none on a machine without
        GPUs). More than the machine has is a ``ConfigError``."""
        with self._lock:
            running = self._counts()
            if not running:
                return []
            if count > len(running):
                raise too_few_gpus(count, list(running))
            # The least busy first, the first listed on a tie (sorted is stable; dicts keep order).
            gpus = sorted(running, key=running.__getitem__)[:count]
            for gpu in gpus:
                running[gpu] += 1
            return gpus

    def give_back(self, gpus: Iterable[str]) -> None:
        with self._lock:
            running = self._counts()
            for gpu in gpus:
                if running.get(gpu, 0) < 1:
                    raise ValueError(f"GPU {gpu} given back but not taken")  # a bug: never silently
                running[gpu] -= 1


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
        self,
        log_dir: str | Path,
        max_parallel: int = 1,
        project_root: str | Path | None = None,
        images_jobs: int = 1,
        fork_server: bool = False,
        preload: bool = True,
        gpus: Iterable[str] | None = None,
        gpu_phases: Iterable[str] = GPU_PHASES,
        train_gpus: int = 1,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.project_root = Path(project_root or Path(__file__).resolve().parents[2])
        # Jobs running side by side share the CPU cores: each gets its share of threads, since
        # oversubscribed OpenMP pools spin against each other (seen: 7 s instead of 0.06 s a step).
        self.threads_per_job = str(max(1, (os.cpu_count() or 1) // max_parallel))
        # Processes per images job: images.num_jobs (make_executor passes it).
        self.images_jobs = images_jobs
        # Fork jobs from a server that imported their libraries (started at the first job; off for
        # good, with a warning, if it can't start). preload=False: a server that imports nothing.
        self.fork_server = fork_server and sys.platform == "linux"
        self.preload = preload
        self._server: ForkServer | None = None
        self._server_environment: dict[str, str] = {}
        self._server_lock = threading.Lock()
        # The GPUs jobs are placed on (None: this machine's, found at the first GPU job); none: jobs
        # see what this process sees.
        self.gpus = GpuPlacement(gpus)
        self.gpu_phases = frozenset(gpu_phases)
        # GPUs (torchrun processes) per train job: executor.train_gpus.
        self.train_gpus = train_gpus

    def _command(self, command: list[str]) -> list[str]:
        # The job runs with this interpreter (the active virtual environment).
        return [sys.executable, *command[1:]] if command and command[0] == "python" else command

    def processes(self, job: JobSpec, command: list[str]) -> int:
        """How many processes run ``job``: ``images.num_jobs`` for an images job, else 1."""
        if job.phase != "images" or "--shard-index" in command or "--num-shards" in command:
            return 1
        return max(1, self.images_jobs)

    def _environment(self, env: dict[str, str], threads: str) -> dict[str, str]:
        pythonpath = os.pathsep.join(p for p in (str(self.project_root), os.environ.get("PYTHONPATH")) if p)
        return {
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            **os.environ,  # a user's own thread settings win
            **env,
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
        }

    def prepare(self, jobs: list[JobSpec], env: dict[str, str]) -> None:
        """The fork server started (its imports take seconds) before the controller holds interrupts
        to start jobs: a Ctrl-C meanwhile stops the pipeline at once."""
        if jobs and self.fork_server and self._server is None:
            self._fork_server(self._environment(env, self.threads_per_job))

    def _start(self, command: list[str], log_path: Path, env: dict[str, str], threads: str) -> Process:
        environment = self._environment(env, threads)
        command = self._command(command)
        if command[0] == sys.executable and command[1:2] in (["-m"], ["-c"]) and len(command) > 2:
            server = self._fork_server(environment)
            if server is not None:
                log_path.write_bytes(b"")  # the job appends to it, as a fresh process would write it
                try:
                    return server.start(command[1:], environment, os.getcwd(), str(log_path))
                except ForkServerUnavailable as e:
                    self._give_up_forking(str(e))
        with open(log_path, "wb") as log:
            return subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                cwd=os.getcwd(),
                start_new_session=True,  # Ctrl-C reaches the controller, which cancels jobs itself
            )

    def _fork_server(self, environment: dict[str, str]) -> ForkServer | None:
        """The fork server, started at the first job with that job's environment; None when off, or
        for a job whose environment is not the server's (a fresh process reads its own)."""
        with self._server_lock:
            if self.fork_server and self._server is None:
                try:
                    self._server = ForkServer(
                        environment, os.getcwd(), self.log_dir / "fork-server.log", preload=self.preload
                    )
                    self._server_environment = _shared(environment)
                except ForkServerUnavailable as e:
                    self._give_up_forking(str(e))
            if not self.fork_server or _shared(environment) != self._server_environment:
                return None
            return self._server

    def _give_up_forking(self, why: str) -> None:
        print(f"warning: {why}; jobs start as fresh processes from now on", file=sys.stderr, flush=True)
        self.fork_server = False

    def _log_paths(self, job: JobSpec, count: int) -> list[Path]:
        if count == 1:
            return [self.log_dir / f"{job.name}.log"]
        return [self.log_dir / f"{job.name}.{i}-of-{count}.log" for i in range(count)]

    def _on_gpu(
        self, job: JobSpec, env: dict[str, str], placed: dict[int, list[str]], index: int
    ) -> dict[str, str]:
        """``env`` for process ``index`` of ``job``: seeing its GPUs (one, or ``train_gpus`` for a
        train job), noted in ``placed``, for a GPU phase on a machine with GPUs."""
        gpus = self.gpus.take(self._ranks(job)) if job.phase in self.gpu_phases else []
        if not gpus:
            return env
        placed[index] = gpus
        return {**env, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}

    def _ranks(self, job: JobSpec) -> int:
        """The ranks (torchrun's processes, one GPU each) each of ``job``'s processes runs."""
        return self.train_gpus if job.phase == "train" else 1

    def _process_commands(self, job: JobSpec, command: list[str]) -> list[list[str]]:
        """Each of ``job``'s processes' commands: an images job's shares (``processes``), or the one
        command, launching its ranks itself for a train job with ``train_gpus`` > 1."""
        count = self.processes(job, command)
        if count > 1:
            return [image_process_command(command, count, i) for i in range(count)]
        launches = any(a.startswith("--nproc-per-node") for a in command)
        if job.phase != "train" or self.train_gpus == 1 or launches:
            return [command]
        return [[*command, f"--nproc-per-node={self.train_gpus}"]]

    def submit(self, job: JobSpec, command: list[str], env: dict[str, str]) -> JobHandle:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        commands = self._process_commands(job, command)
        count = len(commands)
        logs = self._log_paths(job, count)
        # Process index -> its GPUs, given back as each process ends (_give_back_ended).
        gpus: dict[int, list[str]] = {}
        processes: list[Process] = []
        threads = self.threads_per_job
        ranks = self._ranks(job)
        if count * ranks > 1:  # the job's share of the cores, split between its processes
            threads = str(max(1, int(self.threads_per_job) // (count * ranks)))
        try:
            for i, (process_command, log) in enumerate(zip(commands, logs, strict=True)):
                processes.append(self._start(process_command, log, self._on_gpu(job, env, gpus, i), threads))
        except BaseException:
            # Neither a job half started nor a GPU counted for a process that is not watched.
            for process in processes:
                _kill(process)
            self.gpus.give_back(gpu for placed in gpus.values() for gpu in placed)
            raise
        if count == 1:
            return JobHandle(job=job, ref=processes[0], log=str(logs[0]), extra={"gpus": gpus})
        extra = {"logs": [str(p) for p in logs], "gpus": gpus}
        return JobHandle(job=job, ref=processes, log=str(logs[0]), extra=extra)

    def _give_back_ended(self, handle: JobHandle, codes: list[int | None]) -> None:
        """The GPUs of the job's processes that have ended (``codes``: each one's exit status, None
        while it runs), each given back once."""
        gpus: dict[int, list[str]] = handle.extra.get("gpus", {})
        ended = [i for i, code in enumerate(codes) if code is not None and i in gpus]
        self.gpus.give_back([gpu for i in ended for gpu in gpus.pop(i)])

    def poll(self, handle: JobHandle) -> JobStatus:
        if isinstance(handle.ref, list):
            return self._poll_processes(handle)
        process: Process = handle.ref
        code = process.poll()
        self._give_back_ended(handle, [code])
        if code is None:
            return JobStatus(JobState.RUNNING)
        code, result = _exit_status(handle.job, process, handle.log)
        return JobStatus(JobState.SUCCEEDED if code == 0 else JobState.FAILED, code, result)

    def _poll_processes(self, handle: JobHandle) -> JobStatus:
        """The processes of an images job: running while any runs (a failed one's siblings finish and
        save their shards, for the rerun); failed if one failed (its log named), or if none of them
        committed the output nor found it committed; else the committing process's result."""
        codes = [process.poll() for process in handle.ref]
        self._give_back_ended(handle, codes)  # a process that has ended frees its GPU for others
        if any(code is None for code in codes):
            return JobStatus(JobState.RUNNING)
        logs = handle.extra["logs"]
        ended = [_exit_status(handle.job, p, log) for p, log in zip(handle.ref, logs, strict=True)]
        codes = [code for code, _ in ended]
        results = [result or {} for _, result in ended]
        failed = [i for i, code in enumerate(codes) if code != 0]
        if failed:
            handle.log = logs[failed[0]]
            return JobStatus(JobState.FAILED, codes[failed[0]], results[failed[0]] or None)
        speaker = speaking_process(results)
        if speaker is not None:
            handle.log = logs[speaker]
            return JobStatus(JobState.SUCCEEDED, 0, results[speaker])
        missing = sorted({s for r in results for s in (r.get("result") or {}).get("missing_shards", [])})
        error = (
            f"none of the {len(codes)} processes of {handle.job.id} committed its output"
            + (f" (shards not saved: {', '.join(missing)})" if missing else "")
            + f"; see {', '.join(logs)}"
        )
        return JobStatus(JobState.FAILED, 1, {"job": handle.job.id, "status": "failed", "error": error})

    def cancel(self, handle: JobHandle) -> None:
        self.cancel_all([handle])

    def cancel_all(self, handles: list[JobHandle]) -> dict[str, Exception]:
        """SIGTERM to every process of every job first, then one grace period for all of them
        (``CANCEL_GRACE_S``) to clean up, then SIGKILL to each job's process group, so that no
        process of it is left running."""
        processes = {handle.job.id: _processes(handle) for handle in handles}
        running = [process for group in processes.values() for process in group if process.poll() is None]
        errors: dict[str, Exception] = {}
        for job_id, group in processes.items():
            for process in group:
                if process not in running:
                    continue
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass  # ended in between
                except OSError as e:  # one job that cannot be signalled must not spare the others
                    errors[job_id] = e
        deadline = time.monotonic() + CANCEL_GRACE_S
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        for process in running:
            # The whole group, whether or not its first process has ended: a child that ignored
            # SIGTERM outlives a parent that obeyed it.
            _kill(process)
        for handle in handles:
            self._give_back_ended(handle, [process.poll() for process in processes[handle.job.id]])
        return errors

    def close(self) -> None:
        with self._server_lock:
            if self._server is not None:
                self._server.close()
                self._server = None

    def describe(self, job: JobSpec, command: list[str]) -> str:
        commands = self._process_commands(job, command)
        count = len(commands)
        lines = []
        for i, (process_command, log) in enumerate(zip(commands, self._log_paths(job, count), strict=True)):
            where = f" [{i}/{count}]" if count > 1 else ""
            lines.append(f"{job.id}{where}: {shlex.join(self._command(process_command))}  > {log}")
        return "\n".join(lines)


def _processes(handle: JobHandle) -> list[Process]:
    """A job's processes (an images job with ``images.num_jobs`` has several)."""
    return handle.ref if isinstance(handle.ref, list) else [handle.ref]


def _kill(process: Process) -> None:
    """Kill a job's process group, and wait for the process."""
    # Ended in between; or, once the group's first process was reaped, its id may (rarely) be
    # another user's group now: not ours to kill, and no reason to stop cancelling the others.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _lost(process: Process) -> bool:
    return isinstance(process, ForkedProcess) and process.lost


def _exit_status(job: JobSpec, process: Process, log: str) -> tuple[int, dict | None]:
    """An ended process's exit status and result (its log's last JSON line). Where the status was
    lost with the fork server, the job's own last line decides: one that says it ran (or skipped)
    succeeded, and the controller still checks its output is in the store; else it failed."""
    result = last_json_line(log)
    if not _lost(process):
        return process.returncode, result
    if result and result.get("status") in ("ran", "skipped"):
        return 0, result
    error = f"the fork server ended before the job did, so its exit status is unknown; see {log}"
    return process.returncode, {"job": job.id, "status": "failed", "error": error}
