"""What a phase is handed: the config, its skills, the plan, the store and its tracking run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selma_core.config import PipelineConfig
from selma_core.plan import JobSpec, Plan, missing_input_message
from selma_core.skills import Skill
from selma_core.storage import ArtifactStore
from selma_core.tracking import JobRun


@dataclass
class JobContext:
    config: PipelineConfig
    skills: dict[str, Skill]
    plan: Plan
    job: JobSpec
    store: ArtifactStore
    run: JobRun

    @property
    def scratch_dir(self) -> Path:
        return Path(self.config.cache_dir)

    def lineage(self) -> dict:
        """Stored in the output's manifest: what it was made from, by which code, in which run."""
        from selma_core.provenance import code_version, git_commit

        return {
            "phase": self.job.phase,
            "skill": self.job.skill,
            "inputs": {dep: self.plan.jobs[dep].key for dep in self.job.deps},
            "config_hash": self.config.config_hash(),
            "selma_version": code_version(),
            "git_commit": git_commit(),
            "mlflow_run_id": self.run.run_id,
        }

    def output(self):
        """A local folder that is committed as this job's output when the ``with`` block succeeds."""
        return self.store.staged_output(self.job.key, self.scratch_dir, self.lineage())

    def fetch(self, phase: str, skill: str | None = None) -> Path:
        """A verified local copy of an upstream job's committed output."""
        from selma_core.errors import InputError

        upstream = self.plan.job(phase, skill)
        if not self.store.is_committed(upstream.key):
            raise InputError(missing_input_message(self.job.id, upstream.id))
        return self.store.fetch_dir(upstream.key, self.scratch_dir)
