"""A fork server for the local executor: one process imports what jobs import, once, then forks a
process for each job.

A fresh ``python -m jobs.run`` spends about 13 s on 2 cores importing torch, diffusers, transformers,
peft and MLflow before it does any work; a local pipeline runs tens of jobs. Forked from a process
that has already imported them, a job starts in well under a second.

Each job still is a process of its own, as ``python -m jobs.run`` would be:
- its own process group (the executor cancels it with ``os.killpg``, children included), and no
  controlling terminal (Ctrl-C reaches the controller only, which cancels jobs itself);
- its own log (stdout and stderr), environment, working directory and ``sys.argv``;
- it runs ``jobs.run`` as ``__main__`` and ends as an interpreter ends (threads joined, ``atexit``
  handlers run, streams flushed; the teardown of modules, and the finalising of objects still alive
  then, is skipped), with its exit status reported to the executor (negative: the signal that
  killed it);
- selma's own modules are imported afresh in each job (they read the job's environment as they
  import); only other libraries' modules come from the server (the executor forks only jobs whose
  environment is the server's, but for thread counts, which each job sets for itself, and the GPU
  it sees, which CUDA reads when the job first uses it).
Its command line is the server's, though: ``ps`` shows ``python -m jobs.executors.fork_server``.

The server computes nothing: it imports, then forks only while it has a single thread and has not
loaded the CUDA driver (a fork is safe then: no lock is held by another thread, no driver state is
copied; each job initialises CUDA itself). When that can't be had, it says why and the executor
starts fresh processes instead.

Protocol, JSON lines. Requests on the server's stdin: ``{"id": I, "args": ["-m", "jobs.run", ...]
or ["-c", code, ...], "env": {...}, "cwd": ..., "log": ...}``. Replies on its stdout:
``{"ready": true}`` (or ``{"ready": false, "why": ...}``) once, ``{"id": I, "pid": P}`` for each
request, and ``{"id": I, "returncode": C}`` when job I ends (ids, not pids, name jobs: the system may
give a later job an ended one's pid). The server exits when its stdin closes (the executor
closed, or died: running jobs go on, as jobs started by ``subprocess`` would).
"""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import importlib
import json
import os
import pkgutil
import queue
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
import weakref
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Our own packages: never kept in the server (a job imports them afresh).
OWN_PACKAGES = ("selma_core", "jobs")
# Modules the jobs' libraries import by name at run time (an MLflow store for a URI scheme, an
# image format's plugin, a plotting backend), which no import statement of ours names.
IMPORTED_AT_RUN_TIME = (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.store.db.utils",
    "mlflow.store.artifact.local_artifact_repo",
    "mlflow.store.artifact.s3_artifact_repo",
    "mlflow.tracing.export",
    "mlflow.tracing.processor",
    "mlflow.pyfunc",
    "PIL.JpegImagePlugin",
    "PIL.PngImagePlugin",
    "matplotlib.backends.backend_agg",
    "peft",
    "safetensors.torch",
)
# Thread counts each forked job applies itself (torch's pools, from $OMP_NUM_THREADS: see
# _run_in_child); the server loads its libraries with these, and OpenBLAS's, at one thread.
SET_BY_EACH_JOB = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# What else may differ between a job's environment and the server's: the GPU a job sees, read by the
# CUDA driver when the job first uses it, after the fork (the server never initialises CUDA:
# fork_unsafe_reason), and by PyTorch's device count, which it does not keep before then.
READ_AFTER_THE_FORK = ("CUDA_VISIBLE_DEVICES",)
# How often the server reaps ended jobs while it waits for requests.
REAP_EVERY_S = 0.05


def _is_own(module: str) -> bool:
    return module.split(".")[0] in OWN_PACKAGES


def imported_names(source: str) -> list[tuple[str, str | None]]:
    """Every absolute import in ``source``, at any depth (functions import lazily): ``(module,
    name)`` for ``from module import name``, ``(module, None)`` for ``import module``."""
    names: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [(node.module, alias.name) for alias in node.names if alias.name != "*"]
    return names


def _import(module: str, name: str | None = None) -> None:
    try:
        imported = importlib.import_module(module)
        if name is not None and not hasattr(imported, name):  # a lazy attribute loads here
            importlib.import_module(f"{module}.{name}")
    except Exception:  # an optional dependency that isn't installed: the job that needs it says so
        pass


def preload() -> None:
    """Import what jobs import: selma's modules (so that what they set up before importing a library,
    such as MLflow's settings, holds as it does in a job), every library module their code names,
    and ``IMPORTED_AT_RUN_TIME``; then forget selma's own modules."""
    _import("jobs.run")
    for info in pkgutil.walk_packages(importlib.import_module("selma_core").__path__, "selma_core."):
        _import(info.name)
    sources = [*(PROJECT_ROOT / "selma_core").rglob("*.py"), PROJECT_ROOT / "jobs" / "run.py"]
    for path in sources:
        for module, name in imported_names(path.read_text()):
            if not _is_own(module):
                _import(module, name)
    for module in IMPORTED_AT_RUN_TIME:
        _import(module)
    for module in [m for m in sys.modules if _is_own(m)]:
        del sys.modules[module]


def fork_unsafe_reason() -> str | None:
    """Why forking this process now would be unsafe, or None."""
    threads = threading.active_count()
    with contextlib.suppress(OSError):
        threads = len(os.listdir("/proc/self/task"))  # threads started outside Python count too
    if threads != 1:
        return f"the server has {threads} threads after importing (a fork copies locks they may hold)"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "importing initialised CUDA (a forked process could not use it)"
    # A check such as torch.cuda.is_available() loads and initialises the driver without torch
    # counting CUDA as initialised; a process forked after that can't initialise it again.
    with contextlib.suppress(OSError):
        if "libcuda.so" in Path("/proc/self/maps").read_text():
            return "importing loaded the CUDA driver (a forked process could not initialise it)"
    return None


def _fresh_torch_threads() -> int:
    """The size of torch's thread pool in a fresh process with this environment: $OMP_NUM_THREADS,
    else $MKL_NUM_THREADS, else one thread per physical core of the machine (PyTorch's default:
    cores, not hyperthreads, and not the CPUs this process may run on)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        import psutil  # MLflow's dependency: here whenever jobs run

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return cores or os.cpu_count() or 1


def _run_in_child(request: dict, reply_fd: int) -> None:
    """In the forked process: become the job's process, run it, and exit as a Python process does."""
    try:
        with contextlib.suppress(OSError):  # the server may have done it first
            os.setpgid(0, 0)
        os.close(reply_fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # A fresh process sizes torch's thread pool as it loads; the server loaded torch with one
        # thread, so the job sets its own, as a fresh one would have. (NumPy's BLAS, sized at
        # load, stays at one thread: jobs do their heavy work in torch.)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(_fresh_torch_threads())
        # NumPy's global generator was seeded from the OS as the server imported it: each job draws
        # its own seed, as a fresh process would (Python's random module reseeds itself at fork).
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
        flag, target, *args = request["args"]
    except BaseException:  # the job could not be set up (its log may be where this goes)
        traceback.print_exc()
        os._exit(70)
    # What `python -m target args` or `python -c target args` does.
    interrupted = False
    try:
        if flag == "-m":
            sys.argv = [target, *args]  # runpy sets argv[0] to the module's file
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args]
            sys.path[0] = ""  # as with -c: the working directory
            main = types.ModuleType("__main__")  # a module of its own, as pickle expects to find
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code, interrupted = 1, True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _exit(code, interrupted)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _exit(code: int, interrupted: bool) -> None:
    """End the job's process as the interpreter ends, but for tearing down its modules and what they
    hold (objects still alive are not finalised; C-level exit handlers don't run): wait for its
    threads, run its exit handlers, flush its streams. (Tearing down the thousands of modules the
    server imported takes ~3 s; the process's memory goes with it anyway.) An uncaught Ctrl-C ends
    it by SIGINT, as Python does."""
    steps = (
        threading._shutdown,  # join non-daemon threads, as multiprocessing's processes do
        atexit._run_exitfuncs,
        sys.stdout.flush,
        sys.stderr.flush,
    )
    for step in steps:  # each on its own: one that fails (an interrupt while joining) skips none
        try:
            step()
        except BaseException:
            with contextlib.suppress(BaseException):
                print(f"Exception ignored in {step.__name__}:", file=sys.stderr)
                traceback.print_exc()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _reap(reply_fd: int, jobs: dict[int, int]) -> None:
    """Report every ended job (``jobs``: pid -> request id, the job's name for the executor: a pid
    may be reused by a later job)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _reply(reply_fd, {"id": jobs.pop(pid, None), "returncode": os.waitstatus_to_exitcode(status)})


def _reply(reply_fd: int, message: dict) -> None:
    os.write(reply_fd, (json.dumps(message) + "\n").encode())


def serve(reply_fd: int) -> None:
    """Fork a process per request until stdin closes, reporting each pid and, later, its exit."""
    pending = b""
    jobs: dict[int, int] = {}
    while True:
        readable, _, _ = select.select([0], [], [], REAP_EVERY_S)
        _reap(reply_fd, jobs)
        if not readable:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _run_in_child(request, reply_fd)  # never returns: it ends with os._exit
            with contextlib.suppress(OSError):  # its own group before the executor can signal it
                os.setpgid(pid, pid)
            jobs[pid] = request["id"]
            _reply(reply_fd, {"id": request["id"], "pid": pid})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.executors.fork_server",
        description="Import what selma's jobs import, then fork a process per job request (JSON lines "
        "on stdin; replies on stdout). Started by the local executor; not meant to be run by hand.",
    )
    parser.add_argument("--no-preload", action="store_true", help="import nothing first (tests)")
    args = parser.parse_args(argv)
    # Replies go to the original stdout; whatever importing prints goes to stderr (the server's log).
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    started = time.monotonic()
    if not args.no_preload:
        preload()
    reason = fork_unsafe_reason()
    if reason:
        _reply(reply_fd, {"ready": False, "why": reason})
        return 1
    print(f"fork server: ready in {time.monotonic() - started:.1f}s, {len(sys.modules)} modules", flush=True)
    _reply(reply_fd, {"ready": True})
    serve(reply_fd)
    # Done: skip the teardown of thousands of modules (seconds the executor's close would wait).
    sys.stderr.flush()
    os._exit(0)


# -- the executor's side --------------------------------------------------------------------------


class ForkServerUnavailable(RuntimeError):
    """The fork server could not start, or refused to fork: start jobs as fresh processes."""


class _Replies:
    """What the server has said: the ready line and started jobs in order, exit statuses by job id."""

    def __init__(self) -> None:
        self.started: queue.Queue[dict | None] = queue.Queue()
        self.returncodes: dict[int, int] = {}
        self.ended = False
        self.changed = threading.Condition()

    def read(self, stream) -> None:
        try:
            self._read(stream)
        finally:  # whatever ended the reading, nobody waits on the server any more
            with self.changed:
                self.ended = True
                self.changed.notify_all()
            self.started.put(None)

    def _read(self, stream) -> None:
        for line in stream:
            message = json.loads(line)
            if "returncode" in message:
                with self.changed:
                    self.returncodes[message["id"]] = message["returncode"]
                    self.changed.notify_all()
            else:  # {"id": I, "pid": P} for a request, or the ready line
                self.started.put(message)


class ForkedProcess:
    """A job forked by the server: the part of ``subprocess.Popen`` the local executor uses."""

    def __init__(self, server: ForkServer, pid: int, job_id: int) -> None:
        self.server = server
        self.pid = pid
        self.job_id = job_id
        self.returncode: int | None = None
        # The server ended before this job did: its exit status can't be known.
        self.lost = False

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode, self.lost = self.server.returncode(self.job_id, self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"job process {self.pid}", timeout or 0)
            self.server.wait_for_change(0.1)
        return self.returncode


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie has: no one may be left to reap it)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: the pid is another user's now
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class ForkServer:
    """Starts the server process and forks jobs through it (one request at a time)."""

    READY_TIMEOUT_S = 600.0

    def __init__(self, env: dict[str, str], cwd: str, log: Path, preload: bool = True) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as server_log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jobs.executors.fork_server", *([] if preload else ["--no-preload"])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=server_log,
                env={
                    **env,
                    "PYTHONUNBUFFERED": "1",
                    # Libraries that would start a thread pool as they load (OpenMP, BLAS, pyarrow's
                    # allocator) start none: a job sizes its own pools (``_run_in_child``).
                    **{name: "1" for name in (*SET_BY_EACH_JOB, "OPENBLAS_NUM_THREADS")},
                    "JE_ARROW_MALLOC_CONF": "background_thread:false",
                    # torch.cuda.is_available() asks NVML instead of initialising the driver.
                    "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
                },
                cwd=cwd,
                start_new_session=True,  # no controlling terminal, for the server and its jobs
            )
        self.log = log
        self._lock = threading.Lock()  # one request at a time: the next job started is its
        self._next_id = 0
        self._replies = _Replies()
        # The reader holds the replies, not this object, so that an executor dropped without
        # close() lets this object be collected: its finalizer closes stdin and the server ends.
        threading.Thread(
            target=self._replies.read, args=(self.process.stdout,), name="fork-server-replies", daemon=True
        ).start()
        weakref.finalize(self, ForkServer._close_stdin, self.process)
        try:
            ready = self._replies.started.get(timeout=self.READY_TIMEOUT_S)
        except queue.Empty:
            ready = {"why": f"not ready after {self.READY_TIMEOUT_S:.0f}s"}
        if ready is None or not ready.get("ready"):
            self.close()
            why = ready.get("why") if ready is not None else "it ended while importing"
            raise ForkServerUnavailable(f"the fork server is unavailable: {why} (see {log})")

    def start(self, args: list[str], env: dict[str, str], cwd: str, log: str) -> ForkedProcess:
        """Fork a job running ``python *args`` with this environment, working directory and log."""
        with self._lock:
            if self._replies.ended or self.process.poll() is not None:
                raise ForkServerUnavailable(f"the fork server has ended (see {self.log})")
            self._next_id += 1
            request = {"id": self._next_id, "args": args, "env": env, "cwd": cwd, "log": log}
            try:
                self.process.stdin.write((json.dumps(request) + "\n").encode())
                self.process.stdin.flush()
            except OSError as e:
                raise ForkServerUnavailable(f"the fork server has ended (see {self.log}): {e}") from e
            started = self._replies.started.get()
        if started is None:
            raise ForkServerUnavailable(f"the fork server ended while starting a job (see {self.log})")
        assert started["id"] == request["id"], (started, request["id"])
        return ForkedProcess(self, int(started["pid"]), request["id"])

    def returncode(self, job_id: int, pid: int) -> tuple[int | None, bool]:
        """``(exit status or None while running, lost)`` of job ``job_id``, process ``pid``. A job
        the server can no longer report on (it ended first) counts as failed once it is gone, with
        exit status 1: a failure worth a retry, which finds the output committed if the job did."""
        replies = self._replies
        with replies.changed:
            if job_id in replies.returncodes:
                return replies.returncodes[job_id], False
            if not replies.ended:
                return None, False
        return (1, True) if _gone(pid) else (None, False)

    def wait_for_change(self, timeout: float) -> None:
        with self._replies.changed:
            self._replies.changed.wait(timeout)

    @staticmethod
    def _close_stdin(process: subprocess.Popen) -> None:
        with contextlib.suppress(OSError):
            process.stdin.close()

    def close(self) -> None:
        """End the server (jobs it forked go on until they end or are cancelled)."""
        self._close_stdin(self.process)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    sys.exit(main())
