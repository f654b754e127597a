"""The controller: plan a pipeline's jobs, validate everything, then run them on an executor.

    python -m jobs.submit --phase all --config configs/demo.yaml
    python -m jobs.submit --phase train --skill counting --config configs/sd15.yaml --dry-run

``--phase all`` runs the DAG: per skill prompts -> images -> train (skills in parallel up to
``executor.max_parallel``; a skill with an external ``dataset`` has its train job only), then merge,
then eval. Work whose output is already in the store is skipped. The last line printed is one JSON
object: ``{"jobs": [{"phase", "skill", "status", ...}]}`` with status ``ran``, ``skipped``,
``failed``, ``blocked`` (a dependency failed, so it never started) or, with ``--dry-run``,
``planned``; on an error before any job ran, ``{"jobs": [], "error": ...}``.
Exit code: 0 when every job ran or was skipped, 2 for invalid configuration or input (found before
any job, or the reason every failed job gave), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

from jobs.cli import echo, parse_args
from jobs.dag import JobOutcome, run_dag
from jobs.executors import job_command, make_executor
from jobs.heartbeat import ControllerHeartbeat, beat_tag
from jobs.run import ENV_PARENT_RUN
from jobs.signals import interrupts_ignored, terminate_as_interrupt
from jobs.tracking_buffers import replay_kept_records
from selma_core.errors import EXIT_INVALID, ConfigError, EndpointError, InputError, SelmaError
from selma_core.plan import PHASES
from selma_core.storage.lease import process_identity
from selma_core.tracking.base import TAG_CONTROLLER, TAG_CONTROLLER_PROCESS, TAG_FORCED, TAG_JOBS

DEFAULT_CONFIG = "configs/demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.submit",
        description=(
            "Submit SELMA pipeline jobs: generate prompts, draw images, train one LoRA expert per skill, "
            "merge the experts and evaluate. Finished work (already committed to the store) is skipped."
        ),
        epilog="Example: python -m jobs.submit --phase all --config configs/demo.yaml. Exit code: 0 every "
        "job ran or was skipped, 1 a job failed (or a service, worth a retry), 2 invalid configuration or "
        "input (found before any job, or every failed job exited 2), 130 interrupted (Ctrl-C, SIGTERM). "
        "The last line printed is one JSON object.",
    )
    parser.add_argument(
        "--phase",
        required=True,
        choices=(*PHASES, "all"),
        help="which phase to run; 'all' runs the whole DAG in dependency order",
    )
    parser.add_argument(
        "--skill",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="limit per-skill phases to these skills (--skill a b, or repeated); default: every skill",
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("SELMA_CONFIG", DEFAULT_CONFIG),
        help=f"pipeline config YAML (default: $SELMA_CONFIG or {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--backend",
        choices=("local", "kubernetes"),
        help="executor to run jobs on (default: the config's executor.kind)",
    )
    parser.add_argument("--max-parallel", type=int, help="jobs at once (default: executor.max_parallel)")
    parser.add_argument(
        "--force",
        nargs="+",
        action="extend",
        default=[],
        metavar="PHASE[:SKILL]",
        help="rerun these jobs even if their output exists (e.g. prompts:counting, or train for every "
        "skill), and everything downstream of them, which --phase must select too (e.g. --phase all)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be submitted and submit nothing (Kubernetes: every manifest, as YAML "
        "documents)",
    )
    parser.add_argument(
        "--benchmark",
        choices=("heldout", "dsg1k", "tifa"),
        help="eval: what to evaluate on: each skill's held-out prompts, DSG-1k or TIFA v1.0 "
        "(default: the config's eval.benchmark)",
    )
    parser.add_argument(
        "--model",
        nargs="+",
        action="extend",
        metavar="MODEL",
        help="eval: the models compared: base, merged, expert:SKILL, models:/NAME/VERSION or "
        "models:/NAME@ALIAS (default: the config's eval.models; unset: base, every expert, merged)",
    )
    parser.add_argument(
        "--follow-logs",
        action="store_true",
        help="Kubernetes: stream the logs of running pods here, each line prefixed by its job",
    )
    return parser


def forced_jobs(plan, specs: list[str], selected: set[str]) -> set[str]:
    """The selected jobs ``--force`` names, and every selected job downstream of them."""
    named: set[str] = set()
    for spec in specs:
        jobs = _named_by(plan, spec)
        if not jobs:
            raise ConfigError(f"--force {spec}: no such job; jobs: {', '.join(plan.jobs)}")
        named |= jobs
    forced = _with_downstream(plan, named)
    named_outside = sorted(named - selected)
    if named_outside:
        # An example that this command accepts: a phase[:skill] it runs, with all downstream of it.
        example = next(
            (
                spec
                for spec in (_spec(plan.jobs[j]) for j in plan.jobs if j in selected)
                if _with_downstream(plan, _named_by(plan, spec)) <= selected
            ),
            None,
        )
        also = f", or force only jobs it runs (e.g. --force {example})" if example else ""
        raise ConfigError(
            f"--force {' '.join(specs)} names {', '.join(named_outside)}, which this command does not "
            f"run (its --phase/--skill do not select them); select them too (e.g. --phase all){also}"
        )
    outside = sorted(forced - selected)
    if outside:
        # Their inputs would change under them while they stay "committed": run them too.
        raise ConfigError(
            f"--force {' '.join(specs)} would leave {', '.join(outside)} built from the old outputs; "
            "select them too (e.g. --phase all)"
        )
    return forced


def _spec(job) -> str:
    """How ``--force`` names ``job``: its phase, and its skill where it has one."""
    return f"{job.phase}:{job.skill}" if job.skill else job.phase


def _named_by(plan, spec: str) -> set[str]:
    phase, _, skill = spec.partition(":")
    return {j.id for j in plan.jobs.values() if j.phase == phase and (not skill or j.skill == skill)}


def _with_downstream(plan, named: set[str]) -> set[str]:
    """``named`` and every job downstream of them: their outputs were made from the old ones."""
    forced = set(named)
    changed = True
    while changed:
        changed = False
        for job in plan.jobs.values():
            if job.id not in forced and forced.intersection(job.deps):
                forced.add(job.id)
                changed = True
    return forced


def apply_eval_overrides(cfg, args: argparse.Namespace) -> None:
    """``--benchmark`` and ``--model`` into ``cfg.eval``; registry aliases resolved to versions here,
    once, so every job (and the output's key) sees the same version even if the alias moves."""
    from selma_core.phases.evaluate import EvalConfig

    if (args.benchmark or args.model) and args.phase not in ("eval", "all"):
        raise ConfigError("--benchmark and --model apply to --phase eval (or all)")
    if args.benchmark:
        cfg.eval.benchmark = args.benchmark
    if args.model:
        cfg.eval.models = list(args.model)
    try:  # the same checks as the YAML's eval section
        EvalConfig(**{**vars(cfg.eval)})
    except ValueError as e:
        raise ConfigError(f"--benchmark/--model: {e}") from e
    if args.phase not in ("eval", "all"):
        return
    if any("@" in m for m in cfg.eval.models or []):
        resolve_registry_aliases(cfg)
    from selma_core.phases.evaluate import eval_variants

    with naming_the_file(cfg):
        eval_variants(cfg.eval, cfg.skills)  # an expert of no skill is an error now, not in the job


@contextlib.contextmanager
def naming_the_file(cfg):
    """A ``ConfigError`` from a check that knows the setting (``merge.weights: ...``) but not the file
    it came from gets the config's path in front, as the loader's own errors have."""
    try:
        yield
    except ConfigError as e:
        if str(e).startswith(cfg.source_path):
            raise
        raise ConfigError(f"{cfg.source_path}: {e}") from e


def resolve_registry_aliases(cfg) -> None:
    from selma_core.tracking import open_tracker

    tracker = open_tracker(cfg.tracking)
    resolved = []
    for model in cfg.eval.models or []:
        if "@" in model:
            name, _, alias = model[len("models:/") :].partition("@")
            version = tracker.model_version(name, alias=alias)
            if version is None:
                raise ConfigError(f"eval model {model}: no alias {alias!r} of {name!r} in {cfg.tracking.uri}")
            model = f"models:/{name}/{version.version}"
            echo(f"eval: {name}@{alias} is version {version.version}")
        resolved.append(model)
    cfg.eval.models = resolved


def validate(cfg, skills, dry_run: bool = False) -> None:
    """Everything that can be checked before the first job starts, so no job fails late on it."""
    from selma_core.models.random_models import is_random_model, random_model_problem
    from selma_core.phases.merge import resolve_weights
    from selma_core.plan import METRIC_SETTINGS, eval_models
    from selma_core.prompting.openai_compat import OpenAICompatibleBackend

    search = cfg.merge_search
    search_model = getattr(cfg.eval, METRIC_SETTINGS[search.metric][0]) if search.enabled else None
    for key, value in (
        ("base_model", cfg.base_model),
        ("generator_model", cfg.generator_model),
        ("images.nsfw_checker", cfg.images.nsfw_checker),
        ("train.vae_model", cfg.train.vae_model),
        (
            "prompts.transformers.model",
            cfg.prompts.transformers.model if cfg.prompts.backend == "transformers" else None,
        ),
        *(("eval", spec) for spec, _ in eval_models(cfg)[1:]),
        (f"merge_search.metric {search.metric}'s eval.{METRIC_SETTINGS[search.metric][0]}", search_model),
    ):
        if value and is_random_model(value):
            problem = random_model_problem(value, text_to_image=key in ("base_model", "generator_model"))
            if problem:
                raise ConfigError(f"{cfg.source_path}: {key}: {problem}")
        # On Kubernetes a local path is inside the pod (a mounted volume), not on this machine.
        local = cfg.executor.kind == "local"
        if local and value and value.startswith("/") and not Path(value).is_dir():
            raise ConfigError(f"{cfg.source_path}: {key}: local model folder {value} not found")
    folders = [("executor.log_dir", cfg.executor.log_dir)]  # the controller's own
    if cfg.executor.kind == "local":  # on Kubernetes, the cache is in the pods
        folders.append(("cache_dir", cfg.cache_dir))
    for key, folder in folders:
        problem = _unwritable(Path(folder))
        if problem:
            raise ConfigError(f"{cfg.source_path}: {key}: {problem}")
    ev = cfg.eval
    benchmark_file = {"dsg1k": ev.dsg_annotations, "tifa": ev.tifa_questions}.get(ev.benchmark)
    local = cfg.executor.kind == "local"
    if local and benchmark_file and "://" not in benchmark_file and not Path(benchmark_file).is_file():
        what = "dsg_annotations" if ev.benchmark == "dsg1k" else "tifa_questions"
        raise ConfigError(f"{cfg.source_path}: eval.{what}: file {benchmark_file} not found")
    if ev.benchmark == "tifa" and not ev.tifa_questions and not ev.tifa_questions_sha256:
        raise ConfigError(
            f"{cfg.source_path}: eval.benchmark tifa needs eval.tifa_questions (a path to "
            "tifa_v1.0_question_answers.json) or eval.tifa_questions_sha256 (to download upstream's "
            "and check it): its hash is not known to selma"
        )
    for path in cfg.prompts.contamination.benchmarks:
        if not Path(path).is_file():
            raise ConfigError(f"{cfg.source_path}: prompts.contamination.benchmarks: file {path} not found")
    for skill in skills.values():
        uri = skill.dataset.uri if skill.dataset is not None else ""
        if uri and cfg.executor.kind != "local" and not uri.startswith(("s3://", "/", "file:///")):
            # Pods get the skill files, not the folders beside them.
            raise ConfigError(
                f"skill {skill.name!r}: dataset {uri}: on the {cfg.executor.kind} executor a dataset must be "
                "in S3 (s3://bucket/prefix) or at an absolute path that both this machine and the pods see"
            )
    # Dataset skills have no prompts jobs: the prompt backend serves the others only.
    generated = [s for s in skills.values() if s.dataset is None]
    from selma_core.phases.prompts import seed_problems

    for skill in generated:  # a seed the prompts job would drop, silently until now
        problems = seed_problems(skill, cfg.prompts.rouge_threshold)
        if problems:
            raise ConfigError(
                f"skill {skill.name!r} ({Path(cfg.skills_path) / (skill.name + '.yaml')}): "
                + "; ".join(problems)
                + ": fix or remove it"
            )
    if generated and cfg.prompts.backend == "openai" and cfg.executor.kind == "local":
        # The key variable, where one is required. Jobs on Kubernetes read it from the pods' Secrets
        # (executor.kubernetes.secrets), which the controller need not hold. A dry run sends nothing:
        # it warns, so that the plan can be looked at without the key.
        try:
            OpenAICompatibleBackend(cfg.prompts.openai)
        except ConfigError as e:
            if not dry_run:
                raise
            echo(f"warning: {e} (the prompts jobs would stop on it)")
    elif generated and cfg.prompts.backend == "offline":
        for skill in generated:
            if not skill.offline.templates:
                raise ConfigError(
                    f"skill {skill.name!r} has no offline.templates, which prompts.backend: offline needs"
                )
    with naming_the_file(cfg):
        resolve_weights(cfg.merge, cfg.skills)


def _check_heldout_captions(cfg, skills, selected) -> None:
    """A dataset skill that holds no caption out (``dataset.heldout: 0``) has nothing for the
    selected eval (heldout benchmark) or merge-weight search to score it on: refused now, not after
    its expert is trained and merged."""
    readers = [
        what
        for phase, what in (
            ("eval", "eval.benchmark: heldout" if cfg.eval.benchmark == "heldout" else None),
            ("merge-search", "merge_search.enabled"),
        )
        if what and any(job.phase == phase for job in selected)
    ]
    for skill in skills.values():
        if readers and skill.dataset is not None and skill.dataset.heldout == 0:
            where = Path(cfg.skills_path) / f"{skill.name}.yaml"
            raise ConfigError(
                f"skill {skill.name!r} ({where}): dataset.heldout: 0 "
                f"holds out no caption, and {' and '.join(readers)} score every skill on its held-out "
                "captions: hold some out (e.g. heldout: 0.1), or evaluate on a benchmark "
                "(eval.benchmark: dsg1k or tifa)"
            )


def _unwritable(folder: Path) -> str | None:
    """Why jobs could not write in ``folder`` (made when first needed), or None. Tried for real (a
    permission check says yes to root, where a read-only mount still refuses), with a folder made
    and removed at once: nothing is left, so a dry run leaves no trace."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot make folder {folder}: {existing} is a file"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".selma-check-", dir=existing))
    except OSError as e:
        made = "" if existing == folder else f" (where {folder} would be made)"
        return f"cannot write in {existing}{made}: {e.strerror or e}"
    return None


def _print_results(store, plan) -> None:
    """The evaluation table, if the pipeline's eval output exists."""
    job = plan.job("eval")
    if not store.is_committed(job.key):
        return
    try:
        table = store.read_output_file(job.key, "results.md").decode()
    except (FileNotFoundError, EndpointError):
        return
    except InputError as e:  # a damaged table (size or checksum): say so, never print it; the jobs are done
        echo(f"\nEvaluation table not shown: {e}")
        return
    echo("\nEvaluation:\n" + table)
    attempt = store.read_manifest(job.key)["attempt"]
    echo(f"Report: {store.url(job.key)}/{attempt}/report.html (figures/ beside it)")


def write_config_snapshot(cfg, path: Path) -> None:
    """The resolved config (command-line overrides applied) where the jobs read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def submit(args: argparse.Namespace) -> tuple[int, list[JobOutcome]]:
    """Run the selected jobs; the exit code and every job's outcome. An interrupt or error while
    jobs run is re-raised with the outcomes of the jobs that had ended as its ``outcomes``."""
    from selma_core.config import load_config
    from selma_core.plan import PER_SKILL_PHASES, build_plan, missing_input_message
    from selma_core.provenance import git_commit
    from selma_core.skills import load_skills
    from selma_core.storage import open_store
    from selma_core.tracking import TAG_CONFIG_HASH, TAG_GIT_COMMIT, TAG_PHASE, TAG_PIPELINE, open_tracker

    cfg = load_config(args.config)
    if args.backend:
        cfg.executor.kind = args.backend
    if args.max_parallel is not None:
        if args.max_parallel < 1:
            raise ConfigError(f"--max-parallel: expected >= 1, got {args.max_parallel}")
        cfg.executor.max_parallel = args.max_parallel
    apply_eval_overrides(cfg, args)
    for skill in args.skill or []:
        if skill not in cfg.skills:
            raise ConfigError(
                f"--skill {skill}: not a skill of {args.config} (its skills: {', '.join(cfg.skills)})"
            )
    if args.skill and args.phase not in (*PER_SKILL_PHASES, "all"):
        # As jobs.run refuses it: the phase has one job for all skills, which --skill cannot narrow.
        raise ConfigError(
            f"--skill applies to the per-skill phases ({', '.join(PER_SKILL_PHASES)}, or all); "
            f"--phase {args.phase} has one job for every skill of the pipeline"
        )
    # Check everything before the first job starts: every skill file, models, backend settings.
    skills = load_skills(cfg.skills_path, cfg.skills)
    validate(cfg, skills, dry_run=args.dry_run)
    with naming_the_file(cfg):  # merge_search's grid
        plan = build_plan(cfg, skills)
    for name, dataset in plan.datasets.items():
        echo(
            f"skill {name}: external dataset {dataset.root} ({dataset.layout}, {dataset.files} files, "
            f"fingerprint {dataset.fingerprint[:12]}): no prompts or images jobs"
        )
    selected = plan.select(args.phase, args.skill)
    without = plan.unselectable(args.phase, args.skill)
    if not selected and without:
        raise ConfigError(
            f"--phase {args.phase}: " + "; ".join(plan.dataset_note(s, args.phase) for s in without)
        )
    if not selected:
        raise ConfigError(f"--phase {args.phase}: no such jobs in this pipeline (is merge_search.enabled?)")
    for name in without:
        echo(f"note: {plan.dataset_note(name, args.phase)}")
    _check_heldout_captions(cfg, skills, selected)
    forced = forced_jobs(plan, args.force, {j.id for j in selected})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # The pid too: two controllers started in the same second must not share (and overwrite) logs.
    log_dir = Path(cfg.executor.log_dir) / f"{cfg.name}-{stamp}-{os.getpid()}"
    executor = make_executor(cfg, cfg.executor.kind, str(log_dir), args.follow_logs, echo)
    config_snapshot = log_dir / "config.yaml"
    job_config = executor.job_config_path or str(config_snapshot)

    def command_for(job):
        return job_command(job, job_config, force=job.id in forced)

    if args.dry_run:
        try:
            executor.check_reachable()
        except ConfigError as e:
            echo(f"warning: {e}")
        if executor.job_config_path is None:  # the printed commands read it: they run as shown
            write_config_snapshot(cfg, config_snapshot)
        print(executor.dry_run(selected, command_for))
        return 0, [JobOutcome(j.phase, j.skill, "planned", job=j.id) for j in selected]
    executor.check_reachable()

    store = open_store(cfg.storage)
    tracker = open_tracker(cfg.tracking)
    try:  # records earlier jobs could not send (MLflow was down as they ended): MLflow answers now
        replay_kept_records(store, Path(cfg.cache_dir), echo=echo)
    except Exception as e:  # they stay in the store for the next controller
        echo(f"warning: could not send the tracking records kept in the store: {e}")
    selected_ids = {j.id for j in selected}
    for job in selected:
        for dep in job.deps:
            if dep not in selected_ids and not store.is_committed(plan.jobs[dep].key):
                raise InputError(missing_input_message(job.id, dep, plan, args.config))

    # Jobs read a frozen copy of the resolved config: editing the YAML mid-run changes nothing.
    write_config_snapshot(cfg, config_snapshot)
    commit = git_commit()
    parent = tracker.start_pipeline_run(
        cfg.name,
        tags={
            TAG_PIPELINE: cfg.name,
            TAG_CONFIG_HASH: cfg.config_hash(),
            TAG_GIT_COMMIT: commit,
            TAG_PHASE: args.phase,
            # Which jobs this invocation covers (jobs.status reads it while the pipeline runs).
            TAG_JOBS: ",".join(j.id for j in selected),
            TAG_FORCED: ",".join(sorted(forced)),
            "selma.log_dir": str(log_dir),
            TAG_CONTROLLER: f"{socket.gethostname()}:{os.getpid()}",
            TAG_CONTROLLER_PROCESS: process_identity(os.getpid()) or "",
            **beat_tag(),
        },
        params={"config": cfg.to_dict()},
        name=f"pipeline-{args.phase}",
    )
    env = {ENV_PARENT_RUN: parent, "SELMA_GIT_COMMIT": commit}
    executor.begin(parent, commit)
    echo(f"pipeline {cfg.name}: {len(selected)} jobs on the {executor.name} executor; logs in {log_dir}")
    outcomes: list[JobOutcome] = []
    ended: dict[str, JobOutcome] = {}
    try:
        with ControllerHeartbeat(tracker, parent):  # status tells a killed controller from anywhere
            outcomes = run_dag(
                selected,
                executor,
                command_for,
                env,
                cfg.executor.max_parallel,
                lambda job: job.id not in forced and store.is_committed(job.key),
                lambda job: store.url(job.key),
                echo=echo,
                ended=ended,
                output_exists=lambda job: store.is_committed(job.key),
            )
    except BaseException as e:
        outcomes = list(ended.values())
        e.outcomes = outcomes  # type: ignore[attr-defined]  # for the last JSON line
        raise
    finally:
        # Once begun, closing finishes: a further Ctrl-C here would leave the pipeline's run RUNNING
        # for good (jobs.status would call it running) and lose the outcomes from the JSON line.
        with interrupts_ignored():
            executor.close()
            ok = len(outcomes) == len(selected) and all(o.status in ("ran", "skipped") for o in outcomes)
            try:
                tracker.end_pipeline_run(parent, ok, {"jobs": [o.to_dict() for o in outcomes]}, log_dir)
            except Exception as e:  # the jobs' outcomes stand (their outputs are in the store)
                echo(f"warning: could not close the pipeline's MLflow run {parent}: {e}")
    for outcome in outcomes:
        if outcome.status == "failed":
            echo(f"FAILED {outcome.job}: {outcome.error}; see its log: {outcome.log}")
    if any(o.job == "eval" and o.status == "skipped" for o in outcomes):
        from selma_core.phases.evaluate import retag_registered_model

        try:  # the committed evaluation's scores back on the merged model, for jobs.promote
            said = retag_registered_model(store, plan, cfg.eval, tracker)
        except Exception as e:  # the jobs' outcomes stand; promote then says what the tags lack
            said = f"warning: could not tag the merged model with the skipped evaluation's scores: {e}"
        if said:
            echo(said)
    if args.phase in ("all", "eval"):
        _print_results(store, plan)
    echo(f"\nStore: {cfg.storage.uri}\nMLflow: {cfg.tracking.uri} (experiment {cfg.name!r}, run {parent})")
    if cfg.tracking.uri.startswith("sqlite:"):
        echo(f"  browse it with: mlflow ui --backend-store-uri {cfg.tracking.uri}")
    echo(f"Logs: {log_dir}")
    return _exit_code(ok, outcomes), outcomes


def _exit_code(ok: bool, outcomes: list[JobOutcome]) -> int:
    """0 all done; 2 when every failed job failed on invalid configuration or input (a retry of the
    pipeline cannot help: CI can tell it from an outage); else 1."""
    if ok:
        return 0
    failed = [o for o in outcomes if o.status == "failed"]
    return EXIT_INVALID if failed and all(o.exit_code == EXIT_INVALID for o in failed) else 1


def _ended(error: BaseException) -> list[dict]:
    """The jobs that had ended when ``error`` stopped the pipeline (none if it stopped before)."""
    return [outcome.to_dict() for outcome in getattr(error, "outcomes", [])]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, {"jobs": []})
    if isinstance(args, int):
        return args
    terminate_as_interrupt()
    try:
        code, outcomes = submit(args)
    except SelmaError as e:
        echo(f"error: {e}")
        print(json.dumps({"jobs": _ended(e), "error": str(e)}))
        return e.exit_code
    except KeyboardInterrupt as e:
        echo("interrupted: running jobs were cancelled")
        print(json.dumps({"jobs": _ended(e), "error": "interrupted"}))
        return 130
    except Exception as e:  # a bug or an unforeseen failure: the traceback, and still the JSON line
        traceback.print_exc()
        print(json.dumps({"jobs": _ended(e), "error": repr(e)}))
        return 1
    print(json.dumps({"jobs": [o.to_dict() for o in outcomes]}))
    return code


if __name__ == "__main__":
    sys.exit(main())
