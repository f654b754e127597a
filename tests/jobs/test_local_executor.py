"""The local executor: a process per job (fresh, or forked by the fork server), its log, its last
JSON line, and cancellation."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from jobs.executors import make_executor
from jobs.executors.base import JobState
from jobs.executors.fork_server import ForkedProcess
from jobs.executors.local import LocalExecutor, last_json_line
from selma_core.config import load_config
from selma_core.errors import ConfigError
from selma_core.plan import JobSpec

JOB = JobSpec("prompts", "counting", "prompts/counting/x", ())


@pytest.fixture(params=[False, True], ids=["fresh-process", "fork-server"])
def fork_server(request) -> dict:
    """How the executor starts jobs (the fork server importing nothing: these jobs are tiny)."""
    return {"fork_server": request.param, "preload": False}


def wait(executor, handle, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = executor.poll(handle)
        if status.state in (JobState.SUCCEEDED, JobState.FAILED):
            return status
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_a_job_writes_its_log_and_its_result_is_read(tmp_path, fork_server):
    executor = LocalExecutor(tmp_path / "logs", **fork_server)
    code = 'import json,os; print("working"); print(json.dumps({"status": "ran", "v": os.environ["X"]}))'
    handle = executor.submit(JOB, ["python", "-c", code], {"X": "42"})
    assert isinstance(handle.ref, ForkedProcess) == fork_server["fork_server"]
    status = wait(executor, handle)
    assert status.state == JobState.SUCCEEDED and status.exit_code == 0
    assert status.result == {"status": "ran", "v": "42"}
    assert handle.log == str(tmp_path / "logs" / "prompts-counting.log")
    assert "working" in (tmp_path / "logs" / "prompts-counting.log").read_text()


def test_the_fork_server_starts_before_the_jobs_with_interrupts_live(tmp_path):
    """prepare() starts it (seconds of imports) before the controller holds interrupts to start jobs;
    the jobs it then starts are forked by it."""
    executor = LocalExecutor(tmp_path / "logs", fork_server=True, preload=False)
    executor.prepare([], {})
    assert executor._server is None  # nothing to start: no server
    executor.prepare([JOB], {"X": "1"})
    server = executor._server
    assert server is not None
    code = 'import json; print(json.dumps({"status": "ran"}))'
    handle = executor.submit(JOB, ["python", "-c", code], {"X": "1"})
    assert isinstance(handle.ref, ForkedProcess) and executor._server is server
    assert wait(executor, handle).state == JobState.SUCCEEDED
    executor.close()


def test_exit_codes_are_kept(tmp_path, fork_server):
    executor = LocalExecutor(tmp_path / "logs", **fork_server)
    status = wait(executor, executor.submit(JOB, ["python", "-c", "import sys; sys.exit(2)"], {}))
    assert status.state == JobState.FAILED and status.exit_code == 2 and status.result is None


def test_cancel_stops_the_job_and_its_children(tmp_path, fork_server):
    executor = LocalExecutor(tmp_path / "logs", **fork_server)
    child = "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    code = f"import subprocess, sys, time; {child}; time.sleep(60)"
    handle = executor.submit(JOB, ["python", "-c", code], {})
    assert isinstance(handle.ref, ForkedProcess) == fork_server["fork_server"]
    time.sleep(0.5)
    start = time.monotonic()
    executor.cancel(handle)
    assert time.monotonic() - start < 25
    assert executor.poll(handle).state == JobState.FAILED


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (ended, not yet reaped)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_cancel_kills_a_child_that_ignores_sigterm_though_its_parent_obeyed(
    tmp_path, fork_server, monkeypatch
):
    """The job's first process ends on SIGTERM; a child of it that ignores SIGTERM is killed with
    the rest of the job's process group once the grace period is over."""
    from jobs.executors import local

    monkeypatch.setattr(local, "CANCEL_GRACE_S", 1.0)
    executor = LocalExecutor(tmp_path / "logs", **fork_server)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    start_child = f"subprocess.Popen([sys.executable, '-c', {stubborn!r}])"
    code = f"import subprocess, sys, time; print({start_child}.pid, flush=True); time.sleep(60)"
    handle = executor.submit(JOB, ["python", "-c", code], {})
    log = tmp_path / "logs" / "prompts-counting.log"
    deadline = time.monotonic() + 30
    while not log.read_text().strip():
        assert time.monotonic() < deadline, "the job did not start its child"
        time.sleep(0.05)
    child = int(log.read_text().split()[0])
    time.sleep(0.3)  # the child has set its handler
    executor.cancel(handle)
    deadline = time.monotonic() + 10
    while running(child):
        assert time.monotonic() < deadline, "the child that ignored SIGTERM is still running"
        time.sleep(0.05)


# A job that cleans up on SIGTERM as jobs.run does, but only once every job of the test has been
# told to stop: cancelling one job after another (waiting for each) would never finish its cleanup.
CLEANS_UP_AFTER_ALL_ARE_TOLD = """
import os, pathlib, signal, sys, time
folder, me, count = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def stop(*_):
    (folder / f"told-{me}").touch()
    deadline = time.monotonic() + 15
    while len(list(folder.glob("told-*"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(list(folder.glob("told-*"))) == count:
        (folder / f"cleaned-{me}").touch()
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
(folder / f"started-{me}").touch()
time.sleep(60)
"""


def test_a_second_interrupt_does_not_cut_cancelling_short(tmp_path, fork_server):
    """Ctrl-C: every running job is told to stop at once and waited for, and a second Ctrl-C while
    they clean up changes nothing: no job is left running unwatched."""
    import threading

    from jobs.dag import run_dag

    skills = ("a", "b", "c")
    jobs = [JobSpec("prompts", skill, f"prompts/{skill}/x", ()) for skill in skills]
    executor = LocalExecutor(tmp_path / "logs", max_parallel=3, **fork_server)
    folder = tmp_path / "marks"
    folder.mkdir()

    def interrupt_twice() -> None:
        while len(list(folder.glob("started-*"))) < len(skills):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        while not list(folder.glob("told-*")):  # cancelling has begun
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_twice, daemon=True)
    interrupter.start()
    lines = []
    with pytest.raises(KeyboardInterrupt):
        run_dag(
            jobs,
            executor,
            lambda job: [
                "python",
                "-c",
                CLEANS_UP_AFTER_ALL_ARE_TOLD,
                str(folder),
                job.skill,
                str(len(skills)),
            ],
            {},
            max_parallel=3,
            is_committed=lambda job: False,
            output_url=lambda job: "",
            echo=lines.append,
        )
    interrupter.join(timeout=10)
    executor.close()
    assert not interrupter.is_alive()  # the second interrupt was sent, during the cancelling
    assert sorted(path.name for path in folder.glob("cleaned-*")) == [f"cleaned-{s}" for s in skills]
    assert "cancelling prompts:a, prompts:b, prompts:c (further interrupts are ignored" in "\n".join(lines)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # as it was before


def test_last_json_line_skips_noise(tmp_path):
    log = tmp_path / "x.log"
    log.write_text('{"status": "old"}\nnoise\n{broken\n{"status": "ran"}\n\ntrailing text\n')
    assert last_json_line(str(log)) == {"status": "ran"}
    assert last_json_line(str(tmp_path / "missing.log")) is None


def test_describe_shows_the_command_and_log(tmp_path):
    line = LocalExecutor(tmp_path / "logs").describe(JOB, ["python", "-m", "jobs.run", "--phase", "prompts"])
    assert line.startswith("prompts:counting: ") and sys.executable in line and "prompts-counting.log" in line


def test_parallel_jobs_share_the_cores(tmp_path, monkeypatch, fork_server):

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    executor = LocalExecutor(tmp_path / "logs", max_parallel=4, **fork_server)
    code = 'import json, os; print(json.dumps({"status": "ran", "omp": os.environ["OMP_NUM_THREADS"]}))'
    status = wait(executor, executor.submit(JOB, ["python", "-c", code], {}))
    assert status.result["omp"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own setting wins
    status = wait(executor, executor.submit(JOB, ["python", "-c", code], {}))
    assert status.result["omp"] == "3"


# -- an images job in several processes (images.num_jobs) -----------------------------------------

IMAGES = JobSpec("images", "counting", "images/counting/x", ())
# A stand-in for jobs.run: reports its flags; which process commits (or fails) is set by $MODE.
WORKER = (
    "import json, os, sys; a = sys.argv; i = int(a[a.index('--shard-index') + 1]); "
    "n = int(a[a.index('--num-shards') + 1]); mode = os.environ['MODE']; "
    "print(json.dumps({'status': 'ran', 'shard_index': i, 'num_shards': n, 'config': a[-1], "
    "'omp': os.environ['OMP_NUM_THREADS'], 'committed': mode == 'commit' and i == n - 1})); "
    "sys.exit(2 if mode == 'fail' and i == 1 else 0)"
)


def test_an_images_job_runs_as_images_num_jobs_processes(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    config = str(tiny_config(images={"num_jobs": 3}, executor={"max_parallel": 1}))
    # As the controller makes it: images.num_jobs from the config.
    executor = make_executor(load_config(config), "local", str(tmp_path / "logs"))
    assert executor.fork_server  # executor.fork_server's default
    executor.preload = False  # these jobs are tiny: a server that imports nothing
    command = ["python", "-c", WORKER, "--config", config]
    described = executor.describe(IMAGES, command).splitlines()
    assert len(described) == 3 and "--shard-index 2 --num-shards 3 --config" in described[2]

    handle = executor.submit(IMAGES, command, {"MODE": "commit"})
    status = wait(executor, handle)
    assert status.state == JobState.SUCCEEDED and status.exit_code == 0
    # The result is the committing process's: the last of the three here.
    assert status.result == {
        "status": "ran",
        "shard_index": 2,
        "num_shards": 3,
        "config": config,
        "omp": "2",  # the job's share of the cores, split between its processes
        "committed": True,
    }
    logs = sorted(p.name for p in (tmp_path / "logs").glob("images-*"))
    assert logs == [f"images-counting.{i}-of-3.log" for i in range(3)]
    assert handle.log == str(tmp_path / "logs" / "images-counting.2-of-3.log")

    failed = wait(executor, executor.submit(IMAGES, command, {"MODE": "fail"}))
    assert failed.state == JobState.FAILED and failed.exit_code == 2 and failed.result["shard_index"] == 1
    nobody = executor.submit(IMAGES, command, {"MODE": "none"})
    status = wait(executor, nobody)
    assert (
        status.state == JobState.FAILED
        and "none of the 3 processes of images:counting" in status.result["error"]
    )

    # One process when images.num_jobs is 1, or for any other phase.
    assert LocalExecutor(tmp_path / "logs", images_jobs=1).processes(IMAGES, command) == 1
    assert executor.processes(JOB, command) == 1


def test_cancel_stops_every_process_of_an_images_job(tmp_path, fork_server):
    executor = LocalExecutor(tmp_path / "logs", images_jobs=2, **fork_server)
    handle = executor.submit(IMAGES, ["python", "-c", "import time; time.sleep(60)", "--config", "x"], {})
    assert len(handle.ref) == 2
    assert all(isinstance(process, ForkedProcess) == fork_server["fork_server"] for process in handle.ref)
    time.sleep(0.3)
    executor.cancel(handle)
    assert all(process.poll() is not None for process in handle.ref)
    assert executor.poll(handle).state == JobState.FAILED


# -- GPUs: each process of a GPU phase sees one, the least busy ---------------------------------------

TRAIN = JobSpec("train", "counting", "train/counting/x", ())
# A job that reports the GPUs it sees once $GO exists (so that jobs run side by side until then).
SEES = (
    "import json, os, pathlib, time\n"
    "while not pathlib.Path(os.environ['GO']).exists(): time.sleep(0.02)\n"
    "print(json.dumps({'status': 'ran', 'gpus': os.environ.get('CUDA_VISIBLE_DEVICES')}))"
)


def test_gpu_jobs_spread_over_the_gpus_and_give_them_back_when_they_end(tmp_path, monkeypatch, fork_server):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    executor = LocalExecutor(tmp_path / "logs", max_parallel=4, gpus=["0", "1"], **fork_server)
    go = tmp_path / "go"
    env = {"GO": str(go)}
    first, second, third = (
        executor.submit(JobSpec("train", skill, f"train/{skill}/x", ()), ["python", "-c", SEES], env)
        for skill in ("counting", "spatial", "everyday")
    )
    prompts = executor.submit(JOB, ["python", "-c", SEES], env)  # not a GPU phase
    # A job seeing another GPU than the server's environment names is still forked.
    assert all(isinstance(h.ref, ForkedProcess) == fork_server["fork_server"] for h in (first, second, third))
    assert list(executor.gpus.running.items()) == [("0", 2), ("1", 1)]
    go.touch()
    seen = [wait(executor, handle).result["gpus"] for handle in (first, second, third, prompts)]
    assert seen == ["0", "1", "0", None]
    assert executor.gpus.running == {"0": 0, "1": 0}
    executor.poll(first)  # polled again after its end: nothing given back twice
    assert executor.gpus.running == {"0": 0, "1": 0}

    # A cancelled job gives its GPU back too; the next one takes the least busy again.
    go.unlink()
    cancelled = executor.submit(TRAIN, ["python", "-c", SEES], env)
    running = executor.submit(TRAIN, ["python", "-c", SEES], env)
    executor.cancel(cancelled)
    assert executor.gpus.running == {"0": 0, "1": 1}
    assert executor.poll(cancelled).state == JobState.FAILED and executor.gpus.running == {"0": 0, "1": 1}
    go.touch()
    assert wait(executor, running).result["gpus"] == "1"
    assert wait(executor, executor.submit(TRAIN, ["python", "-c", SEES], env)).result["gpus"] == "0"


def test_an_images_jobs_processes_each_see_a_gpu_of_their_own(tmp_path, fork_server):
    """Each process on a GPU of its own, given back as that process ends (its siblings may run on)."""
    executor = LocalExecutor(tmp_path / "logs", images_jobs=2, gpus=["3", "5"], **fork_server)
    go = tmp_path / "go"
    code = (
        "import json, os, pathlib, sys, time; a = sys.argv; i = int(a[a.index('--shard-index') + 1])\n"
        "while i == 1 and not pathlib.Path(os.environ['GO']).exists(): time.sleep(0.02)\n"
        "gpus = os.environ['CUDA_VISIBLE_DEVICES']\n"
        "print(json.dumps({'status': 'ran', 'gpus': gpus, 'committed': i == 1}))"
    )
    handle = executor.submit(IMAGES, ["python", "-c", code, "--config", "x"], {"GO": str(go)})
    handle.ref[0].wait()
    assert executor.poll(handle).state == JobState.RUNNING
    assert executor.gpus.running == {"3": 0, "5": 1}  # the first process's GPU is free again
    go.touch()
    assert wait(executor, handle).result["gpus"] == "5"
    assert last_json_line(handle.extra["logs"][0])["gpus"] == "3"
    assert executor.gpus.running == {"3": 0, "5": 0}


def test_the_machines_gpus_are_found_where_cuda_would_find_them(tmp_path, monkeypatch, capsys):
    """CUDA_VISIBLE_DEVICES where set (up to a negative entry, where CUDA stops reading), else the
    UUIDs nvidia-smi lists (CUDA's own numbering may differ from nvidia-smi's); none without it."""
    from jobs.executors.local import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-8e3f,-1,4")
    assert visible_gpus() == ["2", "GPU-8e3f"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake = tmp_path / "bin"
    fake.mkdir()
    monkeypatch.setenv("PATH", str(fake))
    assert visible_gpus() == []  # no nvidia-smi
    executor = LocalExecutor(tmp_path / "logs")  # looks for GPUs at its first GPU job, not before
    (fake / "nvidia-smi").write_text(
        '#!/bin/sh\n[ "$1" = --query-gpu=uuid ] && printf "GPU-aa\\nGPU-bb\\n"\n'
    )
    (fake / "nvidia-smi").chmod(0o755)
    assert visible_gpus() == ["GPU-aa", "GPU-bb"]
    assert executor.gpus.running == {"GPU-aa": 0, "GPU-bb": 0}  # found when first asked
    assert "GPU jobs are spread over 2 GPUs: GPU-aa, GPU-bb" in capsys.readouterr().err
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2; exit 9\n")
    assert visible_gpus() == []
    assert "nvidia-smi could not list the GPUs (NVIDIA-SMI has failed: no driver)" in capsys.readouterr().err


def test_the_configs_gpus_are_positions_among_the_gpus_the_controller_sees(
    tiny_config, tmp_path, monkeypatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # the controller is shown three GPUs
    config = load_config(tiny_config(executor={"gpus": [2, 0]}))
    executor = make_executor(config, "local", str(tmp_path / "logs"))
    assert list(executor.gpus.running) == ["7", "4"] and "prompts" not in executor.gpu_phases
    assert executor.gpu_phases == {"images", "train", "merge-search", "eval"}
    assert make_executor(load_config(tiny_config()), "local", str(tmp_path)).gpus.running == {
        "4": 0,
        "6": 0,
        "7": 0,
    }
    with pytest.raises(
        ConfigError, match=r"executor.gpus: 3 is not a GPU of this machine, which shows 3 \(0: 4, "
    ):
        make_executor(load_config(tiny_config(executor={"gpus": [0, 3]})), "local", str(tmp_path))
    # None placed: asked for, or with a device that names one GPU (a job pinned to cuda:1 must see it).
    config = load_config(tiny_config(executor={"gpus": []}, prompts={"backend": "transformers"}))
    executor = make_executor(config, "local", str(tmp_path / "logs"))
    assert executor.gpus.running == {} and "prompts" in executor.gpu_phases
    assert make_executor(load_config(tiny_config(device="cuda:1")), "local", str(tmp_path)).gpus.running == {}
    with pytest.raises(ConfigError, match=r"gpus: expected distinct GPU indices \(>= 0\), got \[0, 0\]"):
        load_config(tiny_config(executor={"gpus": [0, 0]}))


# A stand-in for jobs.run that reports its flags and GPUs once $GO exists.
LAUNCHED = (
    "import json, os, pathlib, sys, time\n"
    "while not pathlib.Path(os.environ['GO']).exists(): time.sleep(0.02)\n"
    "gpus = os.environ.get('CUDA_VISIBLE_DEVICES')\n"
    "print(json.dumps({'status': 'ran', 'argv': sys.argv[1:], 'gpus': gpus}))"
)


def test_a_train_job_with_train_gpus_launches_its_ranks_on_the_least_busy_gpus(tmp_path, monkeypatch):
    """executor.train_gpus: the train job is one process that starts torchrun's ranks itself
    (``--nproc-per-node``, as a Kubernetes pod does), shown that many GPUs; other phases see one."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    executor = LocalExecutor(tmp_path / "logs", max_parallel=2, gpus=["0", "1", "2"], train_gpus=2)
    go = tmp_path / "go"
    env = {"GO": str(go)}
    command = ["python", "-c", LAUNCHED, "--phase", "train"]
    evaluation = executor.submit(JobSpec("eval", None, "eval/x", ()), ["python", "-c", LAUNCHED], env)
    train = executor.submit(TRAIN, command, env)
    assert executor.gpus.running == {"0": 1, "1": 1, "2": 1}
    assert "--nproc-per-node=2" in executor.describe(TRAIN, command)
    go.touch()
    assert wait(executor, evaluation).result["gpus"] == "0"
    result = wait(executor, train).result
    assert result["gpus"] == "1,2" and result["argv"] == ["--phase", "train", "--nproc-per-node=2"]
    assert executor.gpus.running == {"0": 0, "1": 0, "2": 0}

    # More GPUs than the machine has: a config error naming them, nothing started or taken.
    greedy = LocalExecutor(tmp_path / "logs", gpus=["0", "1"], train_gpus=3)
    with pytest.raises(
        ConfigError, match=r"executor.train_gpus: 3, but jobs are placed on 2 GPU\(s\) \(0, 1\)"
    ):
        greedy.submit(TRAIN, command, env)
    assert greedy.gpus.running == {"0": 0, "1": 0}
    # No GPUs: the ranks train on the CPU.
    cpu = LocalExecutor(tmp_path / "logs", gpus=[], train_gpus=2)
    assert wait(cpu, cpu.submit(TRAIN, command, env)).result == {
        "status": "ran",
        "argv": ["--phase", "train", "--nproc-per-node=2"],
        "gpus": None,
    }


def test_train_gpus_is_checked_against_the_machine_before_any_job_runs(
    tiny_config, tmp_path, monkeypatch, capsys
):
    """Not when the first train job starts, hours into the pipeline."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # the controller is shown two GPUs

    def executor(**settings):
        config = load_config(tiny_config(**settings))
        return make_executor(config, "local", str(tmp_path))

    pair = executor(executor={"train_gpus": 2, "max_parallel": 1})
    assert pair.train_gpus == 2 and list(pair.gpus.running) == ["4", "6"]
    assert "warning" not in capsys.readouterr().err
    executor(executor={"train_gpus": 2, "max_parallel": 2})
    assert "up to 2 train jobs (executor.max_parallel) of 2 GPUs each" in capsys.readouterr().err
    with pytest.raises(
        ConfigError, match=r"executor.train_gpus: 3, but jobs are placed on 2 GPU\(s\) \(4, 6\)"
    ):
        executor(executor={"train_gpus": 3})
    with pytest.raises(ConfigError, match=r"train_gpus: 2, but jobs are placed on 1 GPU\(s\) \(6\)"):
        executor(executor={"train_gpus": 2, "gpus": [1]})
    with pytest.raises(
        ConfigError, match="executor.train_gpus: 2 processes cannot all train on device cuda:1"
    ):
        executor(device="cuda:1", executor={"train_gpus": 2})
    assert executor(device="cpu", executor={"train_gpus": 4}).gpus.running == {}  # ranks on the CPU
    with pytest.raises(ConfigError, match="train_gpus: expected >= 1, got 0"):
        load_config(tiny_config(executor={"train_gpus": 0}))


def test_a_job_that_fails_to_start_leaves_no_process_running_and_no_gpu_taken(tmp_path, monkeypatch):
    executor = LocalExecutor(tmp_path / "logs", images_jobs=3, gpus=["0", "1"])
    started = []
    real = executor._start

    def second_fails(command, log, env, threads):
        if started:
            raise OSError("no more processes")
        started.append(real(command, log, env, threads))
        return started[-1]

    monkeypatch.setattr(executor, "_start", second_fails)
    with pytest.raises(OSError, match="no more processes"):
        executor.submit(IMAGES, ["python", "-c", "import time; time.sleep(60)", "--config", "x"], {})
    assert started[0].poll() is not None  # killed, not left running unwatched
    assert executor.gpus.running == {"0": 0, "1": 0}
    with pytest.raises(ValueError, match="GPU 0 given back but not taken"):
        executor.gpus.give_back(["0"])


# -- the fork server: when it refuses, or ends before its jobs do ------------------------------------


def test_a_server_that_would_fork_unsafely_refuses_and_jobs_start_afresh(tmp_path, monkeypatch, capsys):
    # A sitecustomize (run by every interpreter at start-up) that leaves a thread running.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import threading\nthreading.Thread(target=threading.Event().wait, daemon=True).start()\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(site))
    executor = LocalExecutor(tmp_path / "logs", fork_server=True, preload=False)
    code = 'import json, os; print(json.dumps({"status": "ran", "ppid": os.getppid()}))'
    status = wait(executor, executor.submit(JOB, ["python", "-c", code], {}))
    assert status.state == JobState.SUCCEEDED and status.result["ppid"] == os.getpid()  # a fresh process
    assert "the server has 2 threads after importing" in capsys.readouterr().err
    assert executor.fork_server is False
    executor.close()


def test_a_job_outlives_a_lost_server_and_its_last_line_says_how_it_ended(tmp_path, capsys):
    executor = LocalExecutor(tmp_path / "logs", fork_server=True, preload=False)
    silent = executor.submit(JOB, ["python", "-c", "import time; time.sleep(3)"], {})
    said = 'import json, time; time.sleep(3); print(json.dumps({"status": "ran", "run_id": "r1"}))'
    speaking = executor.submit(
        JobSpec("prompts", "spatial", "prompts/spatial/x", ()), ["python", "-c", said], {}
    )
    server = executor._server
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    assert executor.poll(silent).state == JobState.RUNNING  # the job goes on without its server
    status = wait(executor, silent)
    # Its exit status went with the server, and it said nothing: a failure worth a retry, which says why.
    assert status.state == JobState.FAILED and status.exit_code == 1
    assert "the fork server ended before the job did" in status.result["error"]
    # A job whose last line says it ran did (the controller still checks its output is committed).
    status = wait(executor, speaking)
    assert status.state == JobState.SUCCEEDED and status.exit_code == 0
    assert status.result == {"status": "ran", "run_id": "r1"}
    # Later jobs start as fresh processes.
    code = 'import json, os; print(json.dumps({"status": "ran", "ppid": os.getppid()}))'
    status = wait(executor, executor.submit(JOB, ["python", "-c", code], {}))
    assert status.state == JobState.SUCCEEDED and status.result["ppid"] == os.getpid()
    assert "the fork server has ended" in capsys.readouterr().err
    executor.close()


def test_a_job_whose_environment_is_not_the_servers_starts_afresh(tmp_path):
    """Libraries in the server read the first job's environment as they loaded; a job with another
    (but for its thread counts, which it sets itself) is a fresh process, which reads its own."""
    executor = LocalExecutor(tmp_path / "logs", fork_server=True, preload=False)
    code = 'import json, os; print(json.dumps({"status": "ran", "x": os.environ["X"]}))'
    first, same, other = (JobSpec("prompts", skill, f"prompts/{skill}/x", ()) for skill in ("a", "b", "c"))
    first = executor.submit(first, ["python", "-c", code], {"X": "1"})
    same = executor.submit(same, ["python", "-c", code], {"X": "1", "OMP_NUM_THREADS": "3"})
    other = executor.submit(other, ["python", "-c", code], {"X": "2"})  # (each job its own log)
    assert [isinstance(h.ref, ForkedProcess) for h in (first, same, other)] == [True, True, False]
    assert [wait(executor, h).result["x"] for h in (first, same, other)] == ["1", "1", "2"]
    executor.close()
