"""Test helper: the job context ``train_expert`` is handed, as ``jobs.run`` builds it, minus MLflow.

The train phase reads the config's train, eval and model settings, the store, the job's key, its
tracking run and its output folder; these tests give it a real store and a run that records."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

from selma_core.phases.evaluate import EvalConfig
from selma_core.phases.train import TrainConfig


def tiny_train_config(**overrides) -> TrainConfig:
    """A few steps of a rank-2 LoRA on a random test model: two micro-batches of two images a step,
    every step logged; ``overrides`` on top."""
    settings = dict(rank=2, alpha=4, batch_size=2, gradient_accumulation=2, learning_rate=1e-2, log_every=1)
    return TrainConfig(**{**settings, **overrides})


class RecordingRun:
    """The job's tracking run, as the train phase uses it: what it logged, in order."""

    def __init__(self, artifacts_dir: Path | None = None) -> None:
        self.params: dict = {}
        self.tags: dict = {}
        self.metrics: list[tuple[int | None, dict]] = []
        self.artifacts_dir = artifacts_dir
        self.artifacts: list[str] = []  # "artifact_path/name" of every logged file

    def log_params(self, params: dict) -> None:
        self.params.update(params)

    def set_tags(self, tags: dict) -> None:
        self.tags.update(tags)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        """As MLflow does: a file under ``artifact_path``; a folder's contents under it."""
        local_path = Path(local_path)
        if local_path.is_dir():
            files = {str(p.relative_to(local_path)): p for p in sorted(local_path.rglob("*")) if p.is_file()}
        else:
            files = {local_path.name: local_path}
        for rel, path in files.items():
            where = f"{artifact_path}/{rel}" if artifact_path else rel
            self.artifacts.append(where)
            if self.artifacts_dir is not None:  # the caller may delete its files once this returns
                (self.artifacts_dir / where).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, self.artifacts_dir / where)

    def series(self, name: str) -> list[tuple[int | None, float]]:
        """(step, value) of every logged value of metric ``name``."""
        return [(step, m[name]) for step, m in self.metrics if name in m]


def train_job_context(
    store,
    key: str,
    train: TrainConfig,
    model_cache: Path,
    scratch: Path,
    fetched: Path,
    base_model: str = "random:tiny-sd",
    run: RecordingRun | None = None,
) -> SimpleNamespace:
    """A context for ``train_expert(ctx, skill)``: every upstream fetch returns ``fetched``."""
    config = SimpleNamespace(
        train=train,
        eval=EvalConfig(),
        device="cpu",
        allow_pickle_checkpoints=False,
        base_model=base_model,
        base_model_revision=None,
        cache_dir=str(model_cache),
    )
    return SimpleNamespace(
        config=config,
        # Every skill generated (not an external dataset): its images come from ``fetched``.
        skills=defaultdict(lambda: SimpleNamespace(is_dataset=False, dataset=None)),
        store=store,
        job=SimpleNamespace(key=key),
        run=run or RecordingRun(),
        commits=True,
        scratch_dir=scratch,
        fetch=lambda phase, skill: fetched,
        output=lambda: store.staged_output(key, scratch),
    )
