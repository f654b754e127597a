"""The fork server: a forked job is a process of its own that ends as ``python`` would, and the server
holds what jobs import (libraries, not selma's modules) and nothing that makes a fork unsafe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO

from jobs.executors.fork_server import ForkServer, fork_unsafe_reason, imported_names


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def server(tmp_path):
    server = ForkServer(environment(), str(REPO), tmp_path / "fork-server.log", preload=False)
    yield server
    server.close()


def run(server: ForkServer, tmp_path: Path, code: str, *args: str, **env: str) -> tuple[int, str]:
    log = tmp_path / "job.log"
    log.write_text("")
    process = server.start(["-c", code, *args], environment(**env), str(tmp_path), str(log))
    return process.wait(timeout=60), log.read_text()


def test_a_forked_job_has_its_own_process_group_environment_directory_and_log(server, tmp_path):
    code = (
        "import json, os, sys; print(json.dumps({'group_leader': os.getpgrp() == os.getpid(), "
        "'server': os.getppid(), 'cwd': os.getcwd(), 'x': os.environ.get('X'), "
        "'inherited': os.environ.get('ONLY_IN_SERVER'), 'argv': sys.argv})); "
        "print('to stderr', file=sys.stderr)"
    )
    code, log = run(server, tmp_path, code, "a", "b", X="42")
    assert code == 0
    report = json.loads(log.splitlines()[0])
    assert report == {
        "group_leader": True,  # os.killpg(pid) reaches the job and its children
        "server": server.process.pid,
        "cwd": str(tmp_path),
        "x": "42",
        "inherited": None,
        "argv": ["-c", "a", "b"],
    }
    assert log.splitlines()[1] == "to stderr"


LATE_THREAD = (
    "import threading, time; threading.Thread(target=lambda: (time.sleep(0.3), print('joined'))).start()"
)


INTERRUPTED_EXIT = (
    "import atexit, threading, _thread, time; atexit.register(print, 'atexit ran'); "
    "threading.Thread(target=lambda: (time.sleep(1), _thread.interrupt_main(), time.sleep(0.2))).start()"
)


@pytest.mark.parametrize(
    ("code", "status", "in_log"),
    [
        ("pass", 0, ""),
        ("import sys; sys.exit(3)", 3, ""),
        ("import sys; sys.exit('bye')", 1, "bye"),
        ("raise ValueError('bad input')", 1, "ValueError: bad input"),
        ("raise KeyboardInterrupt", -signal.SIGINT, "KeyboardInterrupt"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL, ""),
        # An interpreter's exit runs atexit handlers and waits for non-daemon threads.
        ("import atexit; atexit.register(print, 'exit handler ran')", 0, "exit handler ran"),
        (LATE_THREAD, 0, "joined"),
        # Ctrl-C while the exit waits for a thread: reported, and the exit handlers still run.
        (INTERRUPTED_EXIT, 0, "atexit ran"),
        ("import sys; sys.exit(-1)", 255, ""),
        # -c code runs in a __main__ module of its own, where pickle finds its classes.
        ("import pickle\nclass A: pass\nprint(len(pickle.dumps(A())) > 0)", 0, "True"),
    ],
)
def test_a_forked_job_ends_as_python_would(server, tmp_path, code, status, in_log):
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == status
    returncode, log = run(server, tmp_path, code)
    assert returncode == status
    assert in_log in log


def test_a_module_runs_as_main_as_with_python_m(server, tmp_path):
    log = tmp_path / "help.log"
    log.write_text("")
    process = server.start(["-m", "jobs.run", "--help"], environment(), str(tmp_path), str(log))
    assert process.wait(timeout=60) == 0
    assert "usage: python -m jobs.run" in log.read_text()


@pytest.fixture(scope="module")
def preloaded(tmp_path_factory):
    """A server with the real preload (~15 s): what the local executor starts."""
    logs = tmp_path_factory.mktemp("preloaded")
    server = ForkServer(environment(), str(REPO), logs / "fork-server.log")
    yield server
    server.close()
    assert "fork server: ready in" in (logs / "fork-server.log").read_text()


def test_the_server_holds_the_jobs_libraries_but_not_selma(preloaded, tmp_path):
    """Libraries come from the server, selma's modules are imported anew by each job (under its own
    environment), and torch's threads are the job's own."""
    code = (
        "import json, sys; loaded = set(sys.modules); import torch; "
        "print(json.dumps({'libraries': sorted(m for m in ('torch', 'diffusers', 'transformers', "
        "'peft', 'mlflow') if m in loaded), 'selma': sorted(m for m in loaded "
        "if m.split('.')[0] in ('selma_core', 'jobs')), 'threads': torch.get_num_threads()}))"
    )
    returncode, log = run(preloaded, tmp_path, code, OMP_NUM_THREADS="2")
    assert returncode == 0, log
    assert json.loads(log.splitlines()[-1]) == {
        "libraries": ["diffusers", "mlflow", "peft", "torch", "transformers"],
        "selma": [],
        "threads": 2,
    }


def test_a_job_without_omp_num_threads_gets_the_threads_a_fresh_process_would(preloaded, tmp_path):
    """The server holds torch at one thread; a job that does not set $OMP_NUM_THREADS is sized as
    ``python`` would size it (one thread per physical core, or $MKL_NUM_THREADS), not left at the
    server's one."""
    code = "import torch; print(torch.get_num_threads())"
    log = tmp_path / "job.log"
    unset = {k: v for k, v in environment().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for env in (unset, {**unset, "MKL_NUM_THREADS": "1"}):
        fresh = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert preloaded.start(["-c", code], env, str(tmp_path), str(log)).wait(timeout=60) == 0
        assert log.read_text().split()[-1] == fresh.stdout.strip()
    assert fresh.stdout.strip() == "1"


def test_each_job_draws_its_own_random_seeds(preloaded, tmp_path):
    """As fresh processes would: NumPy's and Python's global generators differ from job to job."""
    code = "import random, numpy; print(random.random(), numpy.random.random())"
    draws = [run(preloaded, tmp_path, code)[1].split() for _ in range(3)]
    assert len({python for python, _ in draws}) == 3 and len({numpy for _, numpy in draws}) == 3


def test_imported_names_include_imports_inside_functions():
    source = (
        "import os, json as j\nfrom pathlib import Path\nfrom . import sibling\n"
        "def f():\n    from diffusers import UNet2DConditionModel\n    import mlflow.pyfunc\n"
    )
    assert imported_names(source) == [
        ("os", None),
        ("json", None),
        ("pathlib", "Path"),
        ("diffusers", "UNet2DConditionModel"),
        ("mlflow.pyfunc", None),
    ]


def test_a_process_with_another_thread_is_not_fork_safe():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert "threads" in (fork_unsafe_reason() or "")
    finally:
        stop.set()
        thread.join()


def test_a_process_that_loaded_the_cuda_driver_is_not_fork_safe(tmp_path):
    # What /proc/self/maps shows once a CUDA check has loaded the driver: a file of that name mapped.
    # (In a process of its own: this one has threads, which fork_unsafe_reason names first.)
    driver = tmp_path / "libcuda.so.1"
    driver.write_bytes(b"\0" * 4096)
    code = (
        "import mmap, sys; from jobs.executors.fork_server import fork_unsafe_reason as why; "
        "before = why(); f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
        "print(before); print(why())"
    )
    done = subprocess.run([sys.executable, "-c", code, str(driver)], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.splitlines() == [
        "None",
        "importing loaded the CUDA driver (a forked process could not initialise it)",
    ], done.stderr
