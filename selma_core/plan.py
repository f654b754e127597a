"""The pipeline's jobs and where each one's output lives in the store.

Keys are content-addressed: each contains a hash of everything that determines the output (the
phase's config, the skill definition, model ids and revisions, and the keys of its inputs). The
controller and every job compute the same keys from the same config, so "is this work done?" is one
look-up, and a change anywhere gives new keys for exactly the outputs downstream of it.

A skill that names an external dataset (``dataset:`` in its file) has no prompts or images job: its
train job has no dependencies, and its key hashes the dataset's listing fingerprint (every file the
layout reads, with its size and SHA-256 locally or ETag in S3: ``selma_core.datasets``), so changed
data gives a new expert. Eval and merge-search, which read its held-out captions from the dataset,
hash the same fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from selma_core.config import PipelineConfig, stable_hash
from selma_core.errors import InputError
from selma_core.models.random_models import RANDOM_MODELS_VERSION, is_random_model
from selma_core.phases.images import SamplingConfig
from selma_core.skills import Skill
from selma_core.storage.base import sha256_file
from selma_core.typed_yaml import output_dict

PHASES = ("prompts", "images", "train", "merge-search", "merge", "eval")
PER_SKILL_PHASES = ("prompts", "images", "train")
# The phases a skill that names an external dataset has no job for: its data replaces their outputs.
DATASET_REPLACES = ("prompts", "images")
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


@dataclass(frozen=True)
class ExternalDataset:
    """A dataset skill's data as this plan keyed it."""

    uri: str  # as the skill file names it
    root: str  # where it was found: an absolute folder, or s3://bucket/prefix
    layout: str  # imagefolder or webdataset
    fingerprint: str  # selma_core.datasets.DatasetListing.fingerprint
    files: int


class NoSuchJob(InputError, KeyError):
    """A job this pipeline does not have: a ``KeyError`` (what ``Plan.job`` always raised) and an
    ``InputError`` (exit 2 in a job: retrying cannot help), whose message reads as it is."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class Plan:
    jobs: dict[str, JobSpec]
    # Skills trained on an external dataset (no prompts or images jobs), by name.
    datasets: dict[str, ExternalDataset] = field(default_factory=dict)

    def job(self, phase: str, skill: str | None = None, shard: int | None = None) -> JobSpec:
        if shard is not None:
            job_id = f"{phase}#{shard:03d}"
        else:
            job_id = f"{phase}:{skill}" if phase in PER_SKILL_PHASES else phase
        if job_id not in self.jobs:
            if skill in self.datasets and phase in DATASET_REPLACES:
                raise NoSuchJob(self.dataset_note(skill, phase))
            raise NoSuchJob(f"no job {job_id!r} in this pipeline; jobs: {', '.join(self.jobs)}")
        return self.jobs[job_id]

    def dataset_note(self, skill: str, phase: str) -> str:
        """Why a dataset skill has no ``phase`` job."""
        dataset = self.datasets[skill]
        return (
            f"skill {skill!r} uses an external dataset ({dataset.uri}): it has no {phase} job; its "
            f"train job reads the dataset (--phase train --skill {skill})"
        )

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

    def unselectable(self, phase: str, skills: list[str] | None = None) -> list[str]:
        """The dataset skills among ``skills`` (None: every skill) that have no ``phase`` job."""
        if phase not in DATASET_REPLACES:
            return []
        return [s for s in self.datasets if not skills or s in skills]


def missing_input_message(job_id: str, dep_id: str, plan: Plan | None = None, config: str = "CONFIG") -> str:
    phase, _, skill = dep_id.split("#")[0].partition(":")
    if plan is not None and skill in plan.datasets and phase in DATASET_REPLACES:
        return (
            f"{job_id} needs the output of {dep_id}, which does not exist: {plan.dataset_note(skill, phase)}"
        )
    return (
        f"{job_id} needs the output of {dep_id}, which is not in the store yet; run "
        f"`python -m jobs.submit --phase {phase}{' --skill ' + skill if skill else ''} --config {config}` "
        "first, or --phase all"
    )


def keyed_config(cfg: PipelineConfig, phase: str):
    """A phase's settings as its output key hashes them: with its own ``keyed()`` where it has one
    (settings nothing reads in this configuration put back to their defaults)."""
    section = cfg.phase_config(phase)
    if phase == "eval":  # which models the defaults compare depends on the skills
        return section.keyed(list(cfg.skills))
    return section.keyed() if hasattr(section, "keyed") else section


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
                "config": output_dict(keyed_config(cfg, phase)) if config is None else config,
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
    datasets: dict[str, ExternalDataset] = {}
    # What decides a dataset skill's held-out captions (eval and merge-search read them): its data
    # and split settings. Empty without dataset skills, so other pipelines' keys are as they were.
    heldout_data: dict[str, dict] = {}
    for name in cfg.skills:
        skill = skills[name]
        if skill.dataset is not None:
            from selma_core.datasets import skill_dataset_listing

            # The listing's fingerprint, not a digest of the bytes: every job plans the pipeline,
            # and an S3 dataset would be downloaded by each to hash it. Local files are hashed
            # (once per machine: remembered by size, mtime and inode), S3 objects are known by
            # their ETags (content hashes, listed 1,000 a request). Not the uri: the same data
            # elsewhere (or at the path a pod sees) is the same expert.
            listing = skill_dataset_listing(cfg, skill)
            datasets[name] = ExternalDataset(
                skill.dataset.uri, listing.root, listing.layout, listing.fingerprint, len(listing.files)
            )
            # "split": held-out groups of captions and the images they share (selma_core.datasets.
            # split_dataset); experts trained under the split by caption alone are trained again.
            data = {**skill.dataset.output_dict(), "files": listing.fingerprint, "split": "image-groups"}
            heldout_data[name] = data
            experts.append(add("train", name, {**base, "dataset": data}, []))
            continue
        prompts = add(
            "prompts",
            name,
            {"skill": skill.to_dict(), "benchmarks": benchmarks},
            [],
        )
        images = add("images", name, _models((cfg.generator, cfg.generator_revision)), [prompts])
        experts.append(add("train", name, base, [images]))
        prompt_jobs.append(prompts)
    held_out = {"datasets": heldout_data} if heldout_data else {}
    merge_deps = list(experts)
    if cfg.merge_search.enabled:
        from selma_core.phases.merge_search import candidate_weights

        metric = cfg.merge_search.metric
        settings = METRIC_SETTINGS[metric]
        scoring = _models((cfg.base_model, cfg.base_model_revision), (getattr(cfg.eval, settings[0]), None))
        # A candidate is its weights, scored as eval draws (its sampling settings and seeds) and
        # with the search's metric (the eval section's model and settings of it); nothing else of the
        # search or of eval's other settings.
        sampling = {
            name: value
            for name, value in output_dict(cfg.eval).items()
            if name in {f.name for f in fields(SamplingConfig)} or name in settings
        }
        sampling["max_prompts_per_skill"] = cfg.merge_search.max_prompts_per_skill
        if metric != "clip_score":  # CLIPScore's candidates keep the keys they had before the setting
            sampling["metric"] = metric
        candidates = [
            add(
                "merge-search",
                None,
                {**scoring, "weights": weights, **held_out},
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
    tifa = cfg.eval.tifa_questions
    local = cfg.executor.kind == "local"
    if cfg.eval.benchmark == "tifa" and tifa and not cfg.eval.tifa_questions_sha256 and local:
        # No hash pins this file (the registry has none for TIFA v1.0): its content does, so a
        # corrected copy at the same path is scored again, not reported from the old one. Only
        # where the controller and the jobs share the file: on Kubernetes the path may be one
        # only the pods see, and a key must not depend on who computes it (give the hash there).
        evaluated["tifa_questions"] = sha256_file(Path(tifa)) if Path(tifa).is_file() else "missing"
    if cfg.eval.benchmark == "heldout":
        evaluated.update(held_out)  # dataset skills' held-out captions: no prompts job carries them
    add("eval", None, evaluated, eval_dependencies(cfg, merged, experts, prompt_jobs))
    return Plan(jobs=jobs, datasets=datasets)


# The eval settings an image-text metric reads: its model first.
METRIC_SETTINGS = {
    "clip_score": ("clip_model",),
    "pickscore": ("pickscore_model", "pickscore_processor"),
    "image_reward": ("image_reward_model",),
    "hps": ("hps_model",),
    "vqascore": ("vqascore_model", "vqascore_backend"),
}


def eval_models(cfg: PipelineConfig) -> list[tuple[str, str | None]]:
    """The models an evaluation runs: the base model, and each metric's and the VQA model's."""
    ev = cfg.eval
    specs: list[tuple[str, str | None]] = [(cfg.base_model, cfg.base_model_revision)]
    specs += [(getattr(ev, METRIC_SETTINGS[m][0]), None) for m in ev.metrics]
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
