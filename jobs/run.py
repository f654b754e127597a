"""The job entry point: the same command runs in a local subprocess and in a Kubernetes pod.

    python -m jobs.run --phase train --skill counting --config configs/demo.yaml

Everything else comes from the config and the environment: ``SELMA_PARENT_RUN_ID`` (the pipeline's
MLflow run), ``SELMA_GIT_COMMIT``, S3 credentials (``AWS_*``), ``HF_TOKEN``.
Exit codes: 0 done or already committed (skipped), 2 invalid configuration or input (a retry cannot
help), anything else a failure worth retrying. The last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from jobs.signals import terminate_as_interrupt
from selma_core.errors import EXIT_RETRYABLE, ConfigError, SelmaError
from selma_core.plan import PER_SKILL_PHASES, PHASES

ENV_PARENT_RUN = "SELMA_PARENT_RUN_ID"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.run",
        description="Run one SELMA job (one phase, one skill) and commit its output to the store.",
    )
    parser.add_argument("--phase", required=True, choices=PHASES, help="the phase to run")
    parser.add_argument("--skill", help="the skill (required for prompts, images and train)")
    parser.add_argument("--config", required=True, help="pipeline config YAML file")
    parser.add_argument(
        "--shard-index",
        type=int,
        help="which of a phase's parallel jobs (merge-search candidates); default $JOB_COMPLETION_INDEX "
        "when --num-shards is given (Kubernetes Indexed Jobs)",
    )
    parser.add_argument("--num-shards", type=int, help="how many parallel jobs the phase has")
    parser.add_argument("--force", action="store_true", help="run even if the output is already committed")
    return parser


def run_job(
    phase: str, skill: str | None, config_path: str, shard: int | None = None, force: bool = False
) -> dict:
    from selma_core.config import load_config
    from selma_core.context import JobContext
    from selma_core.phases import run_phase
    from selma_core.plan import build_plan
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
        open_tracker,
    )
    from selma_core.typed_yaml import to_dict

    if phase in PER_SKILL_PHASES and not skill:
        raise ConfigError(f"--phase {phase} needs --skill")
    if phase not in PER_SKILL_PHASES and skill:
        raise ConfigError(f"--phase {phase} runs once for all skills; drop --skill {skill}")
    cfg = load_config(config_path)
    if skill and skill not in cfg.skills:
        raise ConfigError(f"--skill {skill}: not one of the pipeline's skills ({', '.join(cfg.skills)})")
    skills = load_skills(cfg.skills_path, cfg.skills)
    plan = build_plan(cfg, skills)
    try:
        job = plan.job(phase, skill, shard)
    except KeyError as e:
        raise ConfigError(
            f"--phase {phase}{f' --shard-index {shard}' if shard is not None else ''}: {e}"
        ) from e
    store = open_store(cfg.storage)
    if force:
        store.delete_prefix(f"{job.key}/_partial")  # a forced rerun starts afresh, resuming nothing
    elif store.is_committed(job.key):
        return {"job": job.id, "status": "skipped", "output": store.url(job.key)}
    tracker = open_tracker(cfg.tracking)
    tags = {
        TAG_PHASE: phase,
        TAG_SKILL: skill or "",
        TAG_CONFIG_HASH: cfg.config_hash(),
        TAG_GIT_COMMIT: git_commit(),
        TAG_PIPELINE: cfg.name,
    }
    run = tracker.start_job_run(cfg.name, os.environ.get(ENV_PARENT_RUN), job.name, tags)
    ok = False
    try:
        run.log_params({phase: to_dict(cfg.phase_config(phase)), "base_model": cfg.base_model})
        result = run_phase(phase, JobContext(cfg, skills, plan, job, store, run), skill, shard)
        run.set_tags({TAG_OUTPUT: store.url(job.key)})
        run.log_dict({"job": job.id, "output": store.url(job.key), "result": result}, "job_result.json")
        ok = True
    finally:
        tracker.end_job_run(run, ok)
    return {
        "job": job.id,
        "status": "ran",
        "output": store.url(job.key),
        "run_id": run.run_id,
        "result": result,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    terminate_as_interrupt()
    shard = args.shard_index
    if shard is None and args.num_shards is not None and os.environ.get("JOB_COMPLETION_INDEX"):
        shard = int(os.environ["JOB_COMPLETION_INDEX"])
    try:
        outcome = run_job(args.phase, args.skill, args.config, shard, args.force)
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({"job": args.phase, "skill": args.skill, "status": "failed", "error": str(e)}))
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (the output was not committed)", file=sys.stderr)
        failed = {"job": args.phase, "skill": args.skill, "status": "failed", "error": "interrupted"}
        print(json.dumps(failed))
        return 130
    except Exception as e:  # anything unforeseen: worth a retry, with the traceback in the log
        traceback.print_exc()
        print(json.dumps({"job": args.phase, "skill": args.skill, "status": "failed", "error": repr(e)}))
        return EXIT_RETRYABLE
    print(json.dumps(outcome, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
