"""The job entry point: the same command runs in a local subprocess and in a Kubernetes pod.

    python -m jobs.run --phase train --skill counting --config configs/demo.yaml

The images phase may draw one skill's images in several processes (``images.num_jobs``; the local
executor starts them, the Kubernetes executor runs an Indexed Job):

    python -m jobs.run --phase images --skill counting --shard-index I --num-shards N --config C

Process I draws and saves the shards s with s % N == I (without --shard-index, I is
``$JOB_COMPLETION_INDEX``, set in a Kubernetes Indexed Job's pods); the one that then finds every
shard saved commits the output, the others exit 0 without committing (their result line says
``"committed": false``). Each holds an in-flight lease of its own (``<key>/_workers/I-of-N``), so a
second process of the same index waits, as a second process of a job does.

Everything else comes from the config and the environment: ``SELMA_PARENT_RUN_ID`` (the pipeline's
MLflow run), ``SELMA_GIT_COMMIT``, S3 credentials (``AWS_*``), ``HF_TOKEN``.
Exit codes: 0 done or already committed (skipped), 2 invalid configuration or input (a retry cannot
help), anything else a failure worth retrying. The last line on stdout is one JSON object.

The train phase may run data parallel on several processes (GPUs, nodes) under torchrun:

    torchrun --nproc-per-node=N -m jobs.run --phase train --skill counting --config C

Rank 0 is the job: it checks the store, opens and closes the MLflow run, commits the output and
prints the result line; it broadcasts whether the output is already committed before anything else
happens, so on a skip every process exits 0 at once. The other ranks fetch the same inputs and
train alongside (``selma_core.phases.train``) but record nothing, commit nothing and print no JSON
line (their errors go to stderr). Any other phase with ``WORLD_SIZE`` > 1 is a configuration error
(exit 2). A rank that fails exits non-zero; torchrun then stops the others (SIGTERM, rank 0 ends its
MLflow run as failed when it can) and itself exits 1 (torchrun reports any worker failure as 1,
whatever the worker's code); launched as ``python -m jobs.run ... --nproc-per-node N`` (what the
Kubernetes executor runs, and the local one with ``executor.train_gpus`` > 1), jobs.run starts
torchrun itself and exits with rank 0's exit code.
A rank that hangs without exiting is bounded by the process group's timeout
(``SELMA_DIST_TIMEOUT_S``, default 1800 s; see ``selma_core.distributed``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from jobs.cli import parse_args
from jobs.signals import terminate_as_interrupt
from jobs.tracking_buffers import keep_unsent_records
from selma_core import distributed
from selma_core.errors import EXIT_RETRYABLE, ConfigError, EndpointError, InputError, SelmaError
from selma_core.plan import PER_SKILL_PHASES, PHASES, JobSpec

ENV_PARENT_RUN = "SELMA_PARENT_RUN_ID"
# Seconds torchrun waits for its processes to stop after it passes a SIGTERM on: within the train
# pod's termination grace period (k8s/jobs/train.yaml: 90 s), for a checkpoint's save at the stop.
TORCHRUN_SHUTDOWN_S = 80
# How long a multi-node group's torchrun waits for all its nodes (torch's default: 600 s). Without
# gang admission (Kueue) a Job's pods are scheduled one by one, and the cluster may first have to
# add a GPU node for the last one (an autoscaler: minutes), while the first one's GPUs wait.
RENDEZVOUS_TIMEOUT_S = 1800
# Where the in-flight leases of an images job's processes live, under its output key.
WORKERS = "_workers"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.run",
        description="Run one SELMA job (one phase, one skill) and commit its output to the store.",
        # Whole flag names only: launch_torchrun strips its own flags by name before the job runs
        # under torchrun, and an abbreviation (--nproc) left in would start torchrun again there.
        allow_abbrev=False,
        epilog="Exit code: 0 done (or already committed), 2 invalid configuration or input (retrying cannot "
        "help), anything else a failure worth retrying. The last line printed is one JSON object.",
    )
    parser.add_argument("--phase", required=True, choices=PHASES, help="the phase to run")
    parser.add_argument("--skill", help="the skill (required for prompts, images and train)")
    parser.add_argument("--config", required=True, help="pipeline config YAML file")
    parser.add_argument(
        "--shard-index",
        type=int,
        help="which of a phase's parallel jobs (merge-search candidates; images: this process's index, "
        "0 to --num-shards - 1, default $JOB_COMPLETION_INDEX)",
    )
    parser.add_argument(
        "--num-shards",
        type=int,
        metavar="N",
        help="images: N processes draw the skill's images, this one the shards s with s %% N == its index",
    )
    parser.add_argument(
        "--shards",
        metavar="I,J,...",
        help="Kubernetes Indexed Jobs: run the shard at position $JOB_COMPLETION_INDEX of this list",
    )
    parser.add_argument("--force", action="store_true", help="run even if the output is already committed")
    launch = parser.add_argument_group(
        "data-parallel training",
        "run the train phase under torchrun (torch.distributed.run) over several processes; exit "
        "codes keep their meaning (torchrun itself reports any worker failure as 1)",
    )
    launch.add_argument("--nproc-per-node", type=int, help="processes (GPUs) on this node")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes (pods) in the group (default 1)")
    launch.add_argument("--node-rank", type=int, default=0, help="this node's rank (default 0)")
    launch.add_argument("--master-addr", help="host of node 0, the rendezvous (multi-node)")
    launch.add_argument("--master-port", type=int, default=29500, help="its port (default 29500)")
    return parser


def rendezvous_timeout_s() -> int:
    """How long the nodes of a multi-node group wait for each other: ``RENDEZVOUS_TIMEOUT_S``, or
    ``$SELMA_RENDEZVOUS_TIMEOUT_S`` (whole seconds)."""
    value = os.environ.get("SELMA_RENDEZVOUS_TIMEOUT_S", "")
    return int(value) if value.isdigit() and int(value) > 0 else RENDEZVOUS_TIMEOUT_S


def launch_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this same job under torchrun and exit as the job would have: rank 0's result line says
    how it ended, unless a rank failed on the configuration or input (exit 2): that stays 2, whichever
    rank it was, so a Kubernetes podFailurePolicy still sees a config error (the other ranks then
    fail on their collectives, or are stopped by torchrun: 1 or 130)."""
    import signal
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}"]
    if args.nnodes > 1:
        if not args.master_addr:
            error = "--nnodes > 1 needs --master-addr (the host of node 0)"
            print(f"error: {error}", file=sys.stderr)
            print_json_line(failed_result(args, error, ConfigError.exit_code))
            return ConfigError.exit_code
        command += [
            f"--nnodes={args.nnodes}",
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr}",
            f"--master-port={args.master_port}",
            f"--rdzv-conf=timeout={rendezvous_timeout_s()}",
        ]
    else:
        command.append("--standalone")
    launcher_flags = {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"}
    job_args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in launcher_flags:
            skip = "=" not in arg
            continue
        job_args.append(arg)
    # torchrun gives its processes this long after passing a SIGTERM on, then SIGKILLs them (its own
    # default, 30 s, would cut a preempted train job's checkpoint upload short).
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(TORCHRUN_SHUTDOWN_S), **os.environ}
    # torchrun in a session of its own: a signal to this process's group (the local executor's cancel,
    # Ctrl-C in a terminal) reaches it once, passed on below; a second SIGTERM would make it signal
    # its processes again, which they take for "stop now", with no checkpoint.
    process = subprocess.Popen(
        [*command, "-m", "jobs.run", *job_args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=_stop_when_parent_dies if sys.platform == "linux" else None,
    )
    results: list[dict] = []  # every result line, rank 0's and failed helper ranks'

    def relay() -> int:
        """The processes' output passed on, result lines kept, until every process closed it."""
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    results.append(json.loads(line))
        return process.wait()

    interrupted = False
    try:
        code = relay()
    except KeyboardInterrupt:  # SIGTERM (pod deleted) or Ctrl-C: stop the workers, and say how they did
        interrupted = True
        process.send_signal(signal.SIGTERM)
        try:
            code = relay()  # training saves a checkpoint first; rank 0's result line says where
        except KeyboardInterrupt:  # a second one: go now
            process.send_signal(signal.SIGTERM)
            return 130
    if code == 0 and not interrupted:
        return 0
    if not results:  # torchrun failed before any process said a word (a rendezvous that timed out)
        exit_code = 130 if interrupted else (code if code > 0 else 1)
        error = (
            "interrupted"
            if interrupted
            else f"torchrun exited {code} before any process ran the job: see above"
        )
        print_json_line(failed_result(args, error, exit_code))
        return exit_code
    # Rank 0's own first, when it is one of them.
    invalid = sorted(
        (r for r in results if r.get("exit_code") == ConfigError.exit_code), key=lambda r: "rank" in r
    )
    own = [r for r in results if "rank" not in r]
    verdict = (invalid or own or results or [{}])[0 if invalid else -1]
    if verdict and results and verdict is not results[-1]:
        print_json_line(verdict)  # the last line is the job's result
    if verdict.get("status") in ("ran", "skipped"):
        return 0  # committed (or found committed) before the interrupt came
    return int(verdict.get("exit_code") or (130 if interrupted else code))


def print_json_line(obj: dict) -> None:
    """``obj`` as one line on stdout, in one write: under torchrun every process writes to the same
    pipe, and ``print`` writes the text and its newline apart, so two processes failing at once
    could run their lines into one that is no JSON (the launcher would lose both)."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _stop_when_parent_dies() -> None:
    """In torchrun's process, before it starts (Linux): SIGTERM when the launcher dies, however it
    dies (SIGKILL after a cancel's grace period): torchrun then stops its processes, which would
    otherwise train on, orphaned, in sessions of their own."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def run_job(
    phase: str,
    skill: str | None,
    config_path: str,
    shard: int | None = None,
    force: bool = False,
    num_shards: int | None = None,
) -> dict:
    """Run one job and return its result line. Rank 0 holds the output key's in-flight lease
    (``selma_core.storage.lease``) while it works: a second process running the same job (another
    controller, a retried pod) waits for it, then skips (the output got committed) or runs it
    itself (the holder failed or died). ``force`` runs even over a committed output, still after
    any live holder of the lease is done. For the images phase ``shard`` and ``num_shards`` say which
    of the skill's image processes this is (see the module docstring)."""
    from selma_core.storage.lease import LeaseLost
    from selma_core.storage.local import NO_SPACE_ERRNOS

    state: dict = {"leases": [], "cfg": None, "job": phase if not skill else f"{phase}:{skill}"}
    try:
        return _run_job(phase, skill, config_path, shard, force, state, num_shards)
    except KeyboardInterrupt:
        lost = [lease for lease in state["leases"] if lease.lost]
        if lost:
            from selma_core.storage.lease import describe

            raise LeaseLost(
                f"{lost[0].url}: this job's in-flight lease was taken over by "
                f"{describe(lost[0].lost_to or {})} (this process was seen as dead); that process "
                "runs the job now, so this one stopped"
            ) from None
        raise
    except OSError as e:
        if e.errno not in NO_SPACE_ERRNOS:
            raise
        raise _no_space(e, state) from e
    finally:
        for lease in state["leases"]:
            lease.release()


def _no_space(error: OSError, state: dict):
    """A disk filled up under the phase (scratch folder, local store, temporary folder): an error
    naming the fullest candidate folder, since write(2) does not say which file it was."""
    import shutil

    from selma_core.storage.local import no_space_error

    if error.filename:
        return no_space_error(Path(str(error.filename)).parent, None, f"running {state['job']}")
    cfg = state["cfg"]
    candidates = [Path(tempfile.gettempdir())]
    if cfg is not None:
        candidates.insert(0, Path(cfg.cache_dir))
        if cfg.storage.uri.startswith("file://"):
            candidates.insert(1, Path(cfg.storage.uri[len("file://") :]))

    def free(folder: Path) -> int:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            return 1 << 62

    fullest = min(candidates, key=free)
    role = " (scratch folder: cache_dir)" if cfg is not None and fullest == Path(cfg.cache_dir) else ""
    return no_space_error(fullest, None, f"running {state['job']}{role}")


def _interrupt_main() -> None:
    """Stop the job's main thread as SIGTERM would (``KeyboardInterrupt``): its lease was lost. Now,
    not at training's next safe point: another worker owns the output, nothing more may be written."""
    from selma_core import stopping

    stopping.interrupt_now()


def image_workers(shard: int | None, num_shards: int | None, num_jobs: int) -> tuple[int, int]:
    """(this process's index, the number of processes) of an images job: ``--shard-index`` and
    ``--num-shards``; without ``--shard-index``, ``$JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job's
    pod); without ``--num-shards``, one process, or ``images.num_jobs`` in an Indexed Job's pod."""
    env_index = os.environ.get("JOB_COMPLETION_INDEX")
    if num_shards is None:
        if shard is not None:
            raise ConfigError(f"--phase images --shard-index {shard} needs --num-shards N (the processes)")
        if env_index is None:
            return 0, 1
        num_shards = num_jobs
    if num_shards < 1:
        raise ConfigError(f"--num-shards {num_shards}: expected at least 1")
    if shard is None:
        if env_index is None:
            if num_shards == 1:
                return 0, 1
            raise ConfigError(
                f"--num-shards {num_shards} needs --shard-index I (0 to {num_shards - 1}) or "
                "$JOB_COMPLETION_INDEX (a Kubernetes Indexed Job)"
            )
        try:
            shard = int(env_index)
        except ValueError:
            raise ConfigError(f"$JOB_COMPLETION_INDEX={env_index!r}: expected a number") from None
    if not 0 <= shard < num_shards:
        raise ConfigError(
            f"--shard-index {shard}: expected 0 to {num_shards - 1} (--num-shards {num_shards})"
        )
    return shard, num_shards


def _run_job(
    phase: str,
    skill: str | None,
    config_path: str,
    shard: int | None,
    force: bool,
    state: dict,
    num_shards: int | None = None,
) -> dict:
    from selma_core.config import load_config
    from selma_core.context import JobContext, NullJobRun
    from selma_core.models.loading import resolve_device
    from selma_core.phases import run_phase
    from selma_core.plan import build_plan, missing_input_message
    from selma_core.provenance import git_commit
    from selma_core.skills import load_skills
    from selma_core.storage import open_store
    from selma_core.tracking import (
        TAG_CONFIG_HASH,
        TAG_GIT_COMMIT,
        TAG_OUTPUT,
        TAG_PHASE,
        TAG_PIPELINE,
        TAG_SKILL,
        TAG_WORKER,
        open_tracker,
    )
    from selma_core.typed_yaml import to_dict

    rank, world_size, _ = distributed.world()
    if world_size > 1 and phase != "train":
        raise ConfigError(
            f"--phase {phase} cannot run on {world_size} processes (WORLD_SIZE={world_size}): only "
            f"--phase train runs under torchrun; run {phase} as one process"
        )
    if phase in PER_SKILL_PHASES and not skill:
        raise ConfigError(f"--phase {phase} needs --skill")
    if phase not in PER_SKILL_PHASES and skill:
        raise ConfigError(f"--phase {phase} runs once for all skills; drop --skill {skill}")
    cfg = load_config(config_path)
    state["cfg"] = cfg
    if skill and skill not in cfg.skills:
        raise ConfigError(f"--skill {skill}: not one of the pipeline's skills ({', '.join(cfg.skills)})")
    skills = load_skills(cfg.skills_path, cfg.skills)
    plan = build_plan(cfg, skills)
    worker, workers = 0, 1  # images: this process's index, of how many (one job per skill in the plan)
    if phase == "images":
        worker, workers = image_workers(shard, num_shards, cfg.images.num_jobs)
        shard = None
    elif num_shards is not None:
        raise ConfigError(f"--num-shards: only --phase images runs in several processes, not {phase}")
    started = time.time()
    try:
        job = plan.job(phase, skill, shard)
    except KeyError as e:
        raise ConfigError(
            f"--phase {phase}{f' --shard-index {shard}' if shard is not None else ''}: {e}"
        ) from e
    store = open_patiently(lambda: open_store(cfg.storage), cfg.storage.retry_budget_s, "storage")
    if world_size > 1:  # under torchrun: join the process group
        distributed.init(resolve_device(cfg.device))
    # Rank 0 decides for all, before any process starts work: skip (the output is committed), fail
    # (its error, raised by every process), or go on.
    decision: dict = {}
    if rank == 0:
        try:
            if not force and store.is_committed(job.key):
                decision = {"skipped": {"job": job.id, "status": "skipped", "output": store.url(job.key)}}
            else:
                decision = _claim(store, job, force, state, worker, workers)
            if world_size > 1 and not decision:  # a missing input fails every process alike
                for dep in job.deps:
                    if not store.is_committed(plan.jobs[dep].key):
                        raise InputError(missing_input_message(job.id, dep, plan, config_path))
        except SelmaError as e:
            if world_size == 1:
                raise
            decision = {"error": e}
    decision = distributed.broadcast_object(decision)
    if "error" in decision:
        raise decision["error"]
    if "skipped" in decision:
        return decision["skipped"]
    if rank != 0:  # a helper: computes with rank 0, records and commits nothing
        ctx = JobContext(cfg, skills, plan, job, store, NullJobRun(), commits=False)
        result = run_phase(phase, ctx, skill, shard)
        return {"job": job.id, "status": "helped", "rank": rank, "result": result}
    tracker = open_patiently(lambda: open_tracker(cfg.tracking), cfg.tracking.flush_budget_s, "tracking")
    tags = {
        TAG_PHASE: phase,
        TAG_SKILL: skill or "",
        TAG_CONFIG_HASH: cfg.config_hash(),
        TAG_GIT_COMMIT: git_commit(),
        TAG_PIPELINE: cfg.name,
    }
    if workers > 1:
        tags[TAG_WORKER] = f"{worker}/{workers}"
    run = tracker.start_job_run(cfg.name, os.environ.get(ENV_PARENT_RUN), job.name, tags)
    ok = False
    try:
        params = {phase: to_dict(cfg.phase_config(phase)), "base_model": cfg.base_model}
        if phase == "images":  # weak-to-strong: another model draws the images
            params |= {"generator_model": cfg.generator, "generator_model_revision": cfg.generator_revision}
        run.log_params(params)
        ctx = JobContext(cfg, skills, plan, job, store, run, commits=True)
        options = {}
        if workers > 1:  # one of an images job's processes
            # A forced run replaces the output committed before it, not one its other processes commit.
            replace_before = started if force else None
            options = {"shard_index": worker, "num_shards": workers, "replace_before": replace_before}
        result = run_phase(phase, ctx, skill, shard, **options)
        if result.get("committed", True):
            run.set_tags({TAG_OUTPUT: store.url(job.key)})
        run.log_dict({"job": job.id, "output": store.url(job.key), "result": result}, "job_result.json")
        ok = True
    finally:
        tracker.end_job_run(run, ok)
        keep_unsent_records(store, run)  # what MLflow did not take: kept where it outlives this machine
    outcome = {
        "job": job.id,
        "status": "ran",
        "output": store.url(job.key),
        "run_id": run.run_id,
        "result": result,
    }
    if workers > 1:  # one of an images job's processes: did this one commit the output?
        outcome.update(shard_index=worker, num_shards=workers, committed=bool(result.get("committed")))
    return outcome


def _claim(store, job, force: bool, state: dict, worker: int = 0, workers: int = 1) -> dict:
    """Hold the job's in-flight lease (waiting for a live holder), or decide to skip: the output got
    committed while this process waited, or between its first look and its claim. Process ``worker``
    of an images job's ``workers`` holds a lease of its own (``<key>/_workers/I-of-N``): the others
    draw at the same time; the one that commits takes the output's own lease for the commit."""
    from selma_core.storage.lease import acquire, describe

    def committed() -> bool:
        return not force and store.is_committed(job.key)

    lease_key, lease_job = job.key, job.id
    if workers > 1:
        lease_key, lease_job = f"{job.key}/{WORKERS}/{worker}-of-{workers}", f"{job.id} [{worker}/{workers}]"
    claim = acquire(store, lease_key, lease_job, done=committed)
    skipped = {"job": job.id, "status": "skipped", "output": store.url(job.key)}
    if claim.lease is None and claim.waited_for is None:  # committed between the first look and now
        return {"skipped": skipped}
    if claim.lease is None:
        note = f"committed by {describe(claim.waited_for)} while this job waited {claim.waited_s:.0f}s"
        return {"skipped": {**skipped, "note": note, "waited_s": round(claim.waited_s, 2)}}
    state["leases"].append(claim.lease)
    claim.lease.start_heartbeat(on_lost=_interrupt_main)
    if force:  # a forced rerun starts afresh, resuming nothing (no live holder's _partial: ours now)
        store.delete_prefix(f"{job.key}/_partial")
    return {}


def open_patiently(open_service, budget_s: float, what: str, sleep=time.sleep):
    """``open_service()`` (a store or tracker, which checks it can reach its service). Started by a
    controller, which reached both services before it began (its pipeline run exists): a service
    not answering now is an outage, waited out for ``budget_s`` as one in the middle of a job is
    (the local executor does not retry a job that fails). Run by hand, it fails at once."""
    if not os.environ.get(ENV_PARENT_RUN):
        return open_service()
    deadline = time.monotonic() + budget_s
    delay = 2.0
    while True:
        try:
            return open_service()
        except EndpointError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            print(f"{what}: {e}; trying again for up to {left:.0f} s", file=sys.stderr, flush=True)
            sleep(min(delay, left))
            delay = min(delay * 2, 30.0)


def failed_result(args: argparse.Namespace, error: str, exit_code: int, shard: int | None = None) -> dict:
    """The last line of a job that failed: its id as ``jobs.submit`` names it (``train:counting``,
    ``merge-search#003``), as a job that ran or skipped says it."""
    candidate = shard if args.phase == "merge-search" else None
    job = JobSpec(args.phase, args.skill, "", (), shard=candidate).id
    return {"job": job, "skill": args.skill, "status": "failed", "error": error, "exit_code": exit_code}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(build_parser(), argv, {"job": None, "status": "failed", "exit_code": 2})
    if isinstance(args, int):
        return args
    terminate_as_interrupt()
    rank, world_size, _ = distributed.world()
    if args.nproc_per_node and world_size == 1:
        return launch_torchrun(args, argv)
    shard = args.shard_index
    if args.shards is not None and args.num_shards is not None:
        error = "--shards and --num-shards: give one (--shards picks merge-search candidates)"
        print(f"error: {error}", file=sys.stderr)
        print_json_line(failed_result(args, error, ConfigError.exit_code))
        return ConfigError.exit_code
    if args.shards is not None:
        try:
            shards = [int(s) for s in args.shards.split(",")]
            shard = shards[int(os.environ.get("JOB_COMPLETION_INDEX", "0"))]
        except (ValueError, IndexError):
            error = (
                f"--shards {args.shards}: expected comma-separated shard numbers with one at "
                f"$JOB_COMPLETION_INDEX={os.environ.get('JOB_COMPLETION_INDEX')}"
            )
            print(f"error: {error}", file=sys.stderr)
            print_json_line(failed_result(args, error, ConfigError.exit_code))
            return ConfigError.exit_code
    # Under torchrun rank 0 reports the job; the others report only their own failure, marked with
    # their rank (and say it on stderr), so the launcher can tell a configuration error on one rank
    # from the collective errors it causes on the rest.
    where = f" (rank {rank} of {world_size})" if world_size > 1 else ""

    def report(outcome: dict) -> None:
        if rank == 0:
            print_json_line(outcome)
        elif outcome.get("status") == "failed":
            print_json_line({**outcome, "rank": rank})

    try:
        outcome = run_job(args.phase, args.skill, args.config, shard, args.force, args.num_shards)
    except SelmaError as e:
        print(f"error{where}: {e}", file=sys.stderr)
        report(failed_result(args, str(e), e.exit_code, shard))
        return e.exit_code
    except KeyboardInterrupt as e:
        # Under torchrun, most often: another rank failed (its error is in the log) and torchrun
        # stopped this one. Training stopped by SIGTERM at a step's end says where it saved.
        said = f": {e}" if str(e) and not str(e).startswith("signal ") else ""
        # Every process of a training stopped at a step's end says so; any other was stopped.
        stopped = (
            " (stopped by torchrun: another rank may have failed)"
            if where and "stopped after step" not in said
            else ""
        )
        why = "interrupted" + said + stopped
        print(f"error{where}: {why} (the output was not committed)", file=sys.stderr)
        report(failed_result(args, why, 130, shard))
        return 130
    except Exception as e:  # anything unforeseen: worth a retry, with the traceback in the log
        if where:
            print(f"error{where}:", file=sys.stderr)
        traceback.print_exc()
        report(failed_result(args, repr(e), EXIT_RETRYABLE, shard))
        return EXIT_RETRYABLE
    finally:
        # Under torchrun: leave the process group, after the result is reported (a process that
        # exits without leaving aborts in gloo/NCCL's destructors).
        distributed.shutdown()
    report(outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
