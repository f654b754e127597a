"""What a phase is handed: the config, its skills, the plan, the store and its tracking run."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma_core import distributed
from selma_core.config import PipelineConfig
from selma_core.plan import JobSpec, Plan, missing_input_message
from selma_core.skills import Skill
from selma_core.storage import ArtifactStore
from selma_core.tracking import JobRun


class NullJobRun(JobRun):
    """The run of a helper process (torchrun rank > 0): records nothing; rank 0 tracks the job."""

    run_id = ""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def tag_model_version(
        self,
        name: str,
        version: str,
        tags: dict[str, str],
        replace_prefixes: tuple[str, ...] = (),
        expect: dict[str, str] | None = None,
    ) -> bool:
        return False

    def register_lora_adapter(
        self,
        adapter_dir: Path,
        base_model: str,
        model_name: str,
        alias: str,
        tags: dict[str, str],
        base_model_revision: str | None = None,
    ) -> str:
        return ""


@dataclass
class JobContext:
    config: PipelineConfig
    skills: dict[str, Skill]
    plan: Plan
    job: JobSpec
    store: ArtifactStore
    run: JobRun
    # False in torchrun's helper processes (rank > 0): they compute, rank 0 commits.
    commits: bool = field(default_factory=distributed.is_main)

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
        """A local folder that is committed as this job's output when the ``with`` block succeeds.

        In a process that does not commit (``commits`` False: a torchrun rank > 0) the folder is
        thrown away: only rank 0 writes the output.
        """
        if not self.commits:
            return self._discarded_output()
        return self.store.staged_output(self.job.key, self.scratch_dir, self.lineage())

    @contextlib.contextmanager
    def _discarded_output(self):
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="discard-", dir=self.scratch_dir))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def fetch(self, phase: str, skill: str | None = None) -> Path:
        """A verified local copy of an upstream job's committed output."""
        from selma_core.errors import InputError

        upstream = self.plan.job(phase, skill)
        if not self.store.is_committed(upstream.key):
            raise InputError(missing_input_message(self.job.id, upstream.id))
        return self.store.fetch_dir(upstream.key, self.scratch_dir)
