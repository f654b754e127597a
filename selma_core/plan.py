"""The pipeline's jobs and where each one's output lives in the store.

Keys are content-addressed: each contains a hash of everything that determines the output (the
phase's config, the skill definition, model ids and revisions, and the keys of its inputs). The
controller and every job compute the same keys from the same config, so "is this work done?" is one
look-up, and a change anywhere gives new keys for exactly the outputs downstream of it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from selma_core.config import PipelineConfig, stable_hash
from selma_core.models.random_models import RANDOM_MODELS_VERSION, is_random_model
from selma_core.phases.images import SamplingConfig
from selma_core.skills import Skill
from selma_core.typed_yaml import output_dict

PHASES = ("prompts", "images", "train", "merge-search", "merge", "eval")
PER_SKILL_PHASES = ("prompts", "images", "train")
# Bump when an output's format changes, so old outputs are not mistaken for new ones.
FORMAT_VERSION = 2  # 2: experts also in kohya keys; the merged adapter under adapter/


@dataclass(frozen=True)
class JobSpec:
    phase: str
    skill: str | None
    key: str  # where the output is committed in the store
    deps: tuple[str, ...]  # ids of the jobs whose outputs this one reads
    shard: int | None = None  # one of several parallel jobs of a phase (merge-search candidates)

    @property
    def id(self) -> str:
        if self.shard is not None:
            return f"{self.phase}#{self.shard:03d}"
        return f"{self.phase}:{self.skill}" if self.skill else self.phase

    @property
    def name(self) -> str:
        if self.shard is not None:
            return f"{self.phase}-{self.shard:03d}"
        return f"{self.phase}-{self.skill}" if self.skill else self.phase


@dataclass
class Plan:
    jobs: dict[str, JobSpec]

    def job(self, phase: str, skill: str | None = None, shard: int | None = None) -> JobSpec:
        if shard is not None:
            job_id = f"{phase}#{shard:03d}"
        else:
            job_id = f"{phase}:{skill}" if phase in PER_SKILL_PHASES else phase
        if job_id not in self.jobs:
            raise KeyError(f"no job {job_id!r} in this pipeline; jobs: {', '.join(self.jobs)}")
        return self.jobs[job_id]

    def select(self, phase: str, skills: list[str] | None = None) -> list[JobSpec]:
        """The jobs ``--phase`` (and ``--skill``) name, in dependency order."""
        chosen = []
        for job in self.jobs.values():
            if phase != "all" and job.phase != phase:
                continue
            if skills and job.skill is not None and job.skill not in skills:
                continue
            chosen.append(job)
        return chosen


def missing_input_message(job_id: str, dep_id: str) -> str:
    phase, _, skill = dep_id.split("#")[0].partition(":")
    return (
        f"{job_id} needs the output of {dep_id}, which is not in the store yet; run "
        f"`python -m jobs.submit --phase {phase}{' --skill ' + skill if skill else ''}` first, or --phase all"
    )


def _benchmark_digest(path: str) -> str:
    """The benchmark file's prompts, by content: a file with the same prompts in another format or
    place (e.g. shipped to a pod as JSON lines) gives the same key."""
    from selma_core.prompting.contamination import read_benchmark_prompts

    if not Path(path).is_file():
        return "missing"  # the controller reports it before any job starts
    return stable_hash(read_benchmark_prompts(path))


def _models(*specs: tuple[str, str | None]) -> dict:
    """Model ids and revisions; random test models also by the version of their architecture."""
    models: dict = {"models": [list(s) for s in specs]}
    if any(is_random_model(spec) for spec, _ in specs):
        models["random_models_version"] = RANDOM_MODELS_VERSION
    return models


def build_plan(cfg: PipelineConfig, skills: dict[str, Skill]) -> Plan:
    jobs: dict[str, JobSpec] = {}

    def add(
        phase: str,
        skill: str | None,
        inputs: dict,
        deps: list[JobSpec],
        shard: int | None = None,
        config: dict | None = None,
    ) -> JobSpec:
        digest = stable_hash(
            {
                "format": FORMAT_VERSION,
                "phase": phase,
                "config": output_dict(cfg.phase_config(phase)) if config is None else config,
                "inputs": inputs,
                "upstream": {d.id: d.key for d in deps},
            }
        )
        prefix = {"train": "experts", "merge": "merged"}.get(phase, phase)
        if shard is not None:
            prefix = f"{prefix}/candidate-{shard:03d}"
        elif phase == "merge-search":
            prefix = f"{prefix}/best"
        key = f"{prefix}/{skill}/{digest}" if skill else f"{prefix}/{digest}"
        job = JobSpec(phase=phase, skill=skill, key=key, deps=tuple(d.id for d in deps), shard=shard)
        jobs[job.id] = job
        return job

    base = _models((cfg.base_model, cfg.base_model_revision))
    # The contamination guard's benchmark prompts, by content: changed prompts regenerate the prompts.
    benchmarks = sorted(_benchmark_digest(path) for path in cfg.prompts.contamination.benchmarks)
    experts = []
    prompt_jobs = []
    for name in cfg.skills:
        skill = skills[name]
        prompts = add("prompts", name, {"skill": skill.to_dict(), "benchmarks": benchmarks}, [])
        images = add("images", name, _models((cfg.generator, cfg.generator_revision)), [prompts])
        experts.append(add("train", name, base, [images]))
        prompt_jobs.append(prompts)
    merge_deps = list(experts)
    if cfg.merge_search.enabled:
        from selma_core.phases.merge_search import candidate_weights

        scoring = _models((cfg.base_model, cfg.base_model_revision), (cfg.eval.clip_model, None))
        # A candidate is its weights, scored as eval draws (its sampling settings and seeds) and
        # scores (CLIPScore); nothing else of the search or of eval's other settings.
        sampling = {
            name: value
            for name, value in output_dict(cfg.eval).items()
            if name in {f.name for f in fields(SamplingConfig)} or name == "clip_model"
        }
        sampling["max_prompts_per_skill"] = cfg.merge_search.max_prompts_per_skill
        candidates = [
            add(
                "merge-search",
                None,
                {**scoring, "weights": weights},
                [*experts, *prompt_jobs],
                shard=i,
                config=sampling,
            )
            for i, weights in enumerate(candidate_weights(cfg.merge_search, len(cfg.skills)))
        ]
        search = add("merge-search", None, {}, candidates)
        if cfg.merge.weights is None:  # the merge takes the best weights found
            merge_deps.append(search)
    merged = add("merge", None, {**base, "registered_model_name": cfg.registered_model_name}, merge_deps)
    evaluated = _models(*eval_models(cfg))
    if any(m.startswith("models:/") for m in cfg.eval.models or []):
        # NAME/VERSION means something only in one registry: staging and prod must not share results.
        evaluated["registry"] = cfg.tracking.uri
    add("eval", None, evaluated, eval_dependencies(cfg, merged, experts, prompt_jobs))
    return Plan(jobs=jobs)


def eval_models(cfg: PipelineConfig) -> list[tuple[str, str | None]]:
    """The models an evaluation runs: the base model, and each metric's and the VQA model's."""
    ev = cfg.eval
    specs: list[tuple[str, str | None]] = [(cfg.base_model, cfg.base_model_revision)]
    by_metric = {
        "clip_score": ev.clip_model,
        "pickscore": ev.pickscore_model,
        "image_reward": ev.image_reward_model,
        "hps": ev.hps_model,
        "vqascore": ev.vqascore_model,
    }
    specs += [(by_metric[m], None) for m in ev.metrics]
    if ev.benchmark != "heldout":
        specs.append((ev.vqa_model, None))
    if ev.benchmark == "tifa" and ev.tifa_matcher == "embedding":
        specs.append((ev.tifa_embedding_model, None))
    return specs


def eval_dependencies(
    cfg: PipelineConfig, merged: JobSpec, experts: list[JobSpec], prompt_jobs: list[JobSpec]
) -> list[JobSpec]:
    """What eval reads: held-out prompts (heldout benchmark), and the adapters of the models compared
    (``eval.models``; None: every expert and the merged model). Base and registry models need no job."""
    models = cfg.eval.models
    if models is None:
        models = ["merged", *([f"expert:{s}" for s in cfg.skills] if cfg.eval.compare_experts else [])]
    deps = list(prompt_jobs) if cfg.eval.benchmark == "heldout" else []
    if "merged" in models:
        deps.append(merged)
    deps += [e for e in experts if f"expert:{e.skill}" in models]
    return deps
