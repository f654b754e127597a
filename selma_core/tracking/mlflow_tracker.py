"""MLflow tracking, embedded (a SQLite file, artifacts in a folder beside it) or on a server.

The two differ only in how they are reached: the embedded store needs its folder, a server needs a
bounded wait for ``/health`` so an unreachable endpoint fails fast with its address instead of
MLflow's default of minutes of retries.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from selma_core.errors import ConfigError, EndpointError
from selma_core.tracking.base import JobRun, ModelVersion, RunRecord, Tracker

# Bound MLflow's own HTTP retries (default 7 with exponential backoff: minutes) for job processes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
# No usage telemetry from batch jobs (and no outbound calls on clusters without egress).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class MlflowJobRun(JobRun):
    def __init__(self, tracker: MlflowTracker, run_id: str) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        batch = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        if Path(local_path).is_dir():
            self.client.log_artifacts(self.run_id, str(local_path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def tag_model_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        self.tracker.set_model_version_tags(name, version, tags)

    def register_lora_adapter(
        self,
        adapter_dir: Path,
        base_model: str,
        model_name: str,
        alias: str,
        tags: dict[str, str],
        base_model_revision: str | None = None,
    ) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.tracker.uri)
        mlflow.set_registry_uri(self.tracker.uri)
        with mlflow.start_run(run_id=self.run_id):
            info = _log_adapter_model(adapter_dir, base_model, model_name, base_model_revision)
        version = str(info.registered_model_version)
        self.tracker.set_model_version_tags(model_name, version, tags)
        self.tracker.set_model_alias(model_name, alias, version)
        return version

    def download_registered_adapter(self, name: str, version: str, dst: Path) -> dict[str, str | None]:
        import mlflow.diffusers
        from mlflow.exceptions import MlflowException

        from selma_core.errors import ConfigError

        mlflow.set_tracking_uri(self.tracker.uri)
        mlflow.set_registry_uri(self.tracker.uri)
        try:
            model = mlflow.diffusers.load_model(f"models:/{name}/{version}", dst_path=str(dst))
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                where = f"models:/{name}/{version}"
                raise ConfigError(f"{where}: not in the model registry at {self.tracker.uri}: {e}") from e
            raise
        tags = self.client.get_model_version(name, str(version)).tags
        return {
            "adapter_path": model.adapter_path,
            # The base model as the pipeline config named it (the flavor records a loadable form of
            # it, e.g. the folder a random test model was built in).
            "base_model": tags.get("selma.base_model", model.base_model),
            "base_model_revision": model.base_model_revision,
        }


def _log_adapter_model(adapter_dir: Path, base_model: str, model_name: str, revision: str | None = None):
    """Log with MLflow's diffusers LoRA flavor (MLflow >= 3.17, pinned in pyproject.toml).

    The flavor stores the adapter's safetensors plus the base model reference, and its pyfunc form
    takes a prompt and returns an image, so ``models:/NAME@ALIAS`` generates directly. The flavor
    records the hub's newest commit of the base model; a revision the pipeline pinned is recorded
    instead, so the registered model loads the base it was trained on.
    """
    import mlflow.diffusers

    resolve = mlflow.diffusers._resolve_base_model_revision
    if revision:
        mlflow.diffusers._resolve_base_model_revision = lambda base: revision
    try:
        return mlflow.diffusers.log_model(
            adapter_path=str(adapter_dir),
            base_model=base_model,
            name="merged_lora",
            registered_model_name=model_name,
            pip_requirements=["diffusers", "transformers", "torch", "peft", "safetensors"],
        )
    finally:
        mlflow.diffusers._resolve_base_model_revision = resolve


class MlflowTracker(Tracker):
    def __init__(self, uri: str, connect_retries: int = 3) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.connect_retries = connect_retries
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self._experiments: dict[str, str] = {}

    def _artifact_location(self, experiment: str) -> str | None:
        return None  # the server decides (its --default-artifact-root or proxied artifacts)

    def experiment_id(self, experiment: str) -> str:
        if experiment not in self._experiments:
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                self._experiments[experiment] = found.experiment_id
            else:
                from mlflow.exceptions import MlflowException

                try:
                    self._experiments[experiment] = self.client.create_experiment(
                        experiment, artifact_location=self._artifact_location(experiment)
                    )
                except MlflowException as e:
                    # Another job of the pipeline may have created it meanwhile; anything else is real.
                    raced = self.client.get_experiment_by_name(experiment)
                    if raced is None:
                        raise EndpointError(
                            f"MLflow at {self.uri}: cannot create experiment {experiment!r}: {e}"
                        ) from e
                    self._experiments[experiment] = raced.experiment_id
            if found is not None and found.lifecycle_stage == "deleted":
                raise ConfigError(
                    f"MLflow experiment {experiment!r} at {self.uri} is deleted; restore it "
                    "(mlflow experiments restore) or rename the pipeline"
                )
        return self._experiments[experiment]

    def start_pipeline_run(
        self, experiment: str, tags: dict[str, str], params: dict[str, Any], name: str = "pipeline"
    ) -> str:
        run = self.client.create_run(self.experiment_id(experiment), tags=tags, run_name=name)
        MlflowJobRun(self, run.info.run_id).log_params(params)
        return run.info.run_id

    def end_pipeline_run(
        self, run_id: str, ok: bool, summary: dict[str, Any], logs_dir: Path | None = None
    ) -> None:
        self.client.log_dict(run_id, summary, "pipeline_summary.json")
        if logs_dir is not None and Path(logs_dir).is_dir():
            self.client.log_artifacts(run_id, str(logs_dir), "logs")
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def start_job_run(
        self, experiment: str, parent_run_id: str | None, name: str, tags: dict[str, str]
    ) -> JobRun:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = dict(tags)
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), tags=tags, run_name=name)
        return MlflowJobRun(self, run.info.run_id)

    def end_job_run(self, run: JobRun, ok: bool) -> None:
        self.client.set_terminated(run.run_id, "FINISHED" if ok else "FAILED")

    def _records(self, experiment: str, filter_string: str, max_results: int) -> list[RunRecord]:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = self.client.search_runs(
            [found.experiment_id],
            filter_string,
            max_results=max_results,
            order_by=["attributes.start_time DESC"],
        )
        return [
            RunRecord(
                r.info.run_id,
                r.info.run_name or "",
                r.info.status,
                r.info.start_time,
                r.info.end_time,
                dict(r.data.tags),
            )
            for r in runs
        ]

    def pipeline_runs(self, experiment: str, max_results: int = 20) -> list[RunRecord]:
        records = self._records(experiment, "", 1000)
        return [r for r in records if "mlflow.parentRunId" not in r.tags and r.name.startswith("pipeline")][
            :max_results
        ]

    def child_runs(self, experiment: str, parent_run_id: str) -> list[RunRecord]:
        return self._records(experiment, f"tags.mlflow.parentRunId = '{parent_run_id}'", 1000)

    def model_version(
        self, name: str, version: str | None = None, alias: str | None = None
    ) -> ModelVersion | None:
        from mlflow.exceptions import MlflowException

        try:
            found = (
                self.client.get_model_version_by_alias(name, alias)
                if alias
                else self.client.get_model_version(name, str(version))
            )
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return ModelVersion(
            name, str(found.version), dict(found.tags), list(getattr(found, "aliases", []) or [])
        )

    def set_model_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, str(version), key, str(value))

    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def check(self) -> None:
        try:
            self.client.search_experiments(max_results=1)
        except Exception as e:
            raise EndpointError(f"MLflow tracking at {self.uri} is not usable: {e}") from e


class SqliteMlflowTracker(MlflowTracker):
    """Embedded MLflow: runs and registry in one SQLite file, artifacts in ``mlartifacts/`` beside it."""

    def __init__(self, uri: str, connect_retries: int = 3) -> None:
        self.db_path = Path(uri[len("sqlite:///") :]).expanduser().resolve()
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"tracking uri {uri}: cannot create {self.db_path.parent}: {e}") from e
        super().__init__(uri, connect_retries)

    def _artifact_location(self, experiment: str) -> str | None:
        return (self.db_path.parent / "mlartifacts" / experiment).as_uri()


class ServerMlflowTracker(MlflowTracker):
    """An MLflow tracking server; reachability is checked with bounded retries before any work."""

    def check(self) -> None:
        import requests

        url = self.uri.rstrip("/") + "/health"
        last: Exception | None = None
        for attempt in range(self.connect_retries + 1):
            try:
                response = requests.get(url, timeout=5)
                if response.status_code == 200:
                    return
                last = RuntimeError(f"HTTP {response.status_code}")
            except requests.RequestException as e:
                last = e
            if attempt < self.connect_retries:
                time.sleep(min(2**attempt, 10))
        raise EndpointError(
            f"MLflow tracking server {self.uri} unreachable after {self.connect_retries + 1} attempts: {last}"
        )
