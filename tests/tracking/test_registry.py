"""Registering a merged adapter with MLflow's diffusers flavor, embedded (SQLite) tracking."""

from __future__ import annotations

from lora_helpers import trained_like_expert

from selma_core.config import TrackingConfig
from selma_core.models.random_models import materialize_random_model
from selma_core.tracking import open_tracker


def test_a_pinned_base_model_revision_is_what_the_registered_model_records(tmp_path, model_cache):
    import mlflow

    tracker = open_tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    adapter = trained_like_expert(model_cache, 0, 2, 2.0, tmp_path / "adapter")
    base = str(materialize_random_model("random:tiny-sd", model_cache))
    run = tracker.start_job_run("registry-test", None, "merge", {})
    pinned = run.register_lora_adapter(
        adapter, base, "reg", "candidate", {"k": "v"}, base_model_revision="0123abc"
    )
    unpinned = run.register_lora_adapter(adapter, base, "reg", "candidate", {})
    # Registering leaves the job's run as it was: running, and not the process's active run. A job
    # killed before its commit must not look done (only end_job_run ends the run).
    assert tracker.client.get_run(run.run_id).info.status == "RUNNING" and mlflow.active_run() is None
    tracker.end_job_run(run, True)
    assert tracker.client.get_run(run.run_id).info.status == "FINISHED"

    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)  # another test in this process may have set another
    flavor = mlflow.models.get_model_info(f"models:/reg/{pinned}").flavors["diffusers"]
    assert flavor["base_model"] == base and flavor["base_model_revision"] == "0123abc"
    assert (
        "base_model_revision"
        not in mlflow.models.get_model_info(f"models:/reg/{unpinned}").flavors["diffusers"]
    )
    version = tracker.model_version("reg", alias="candidate")
    assert version.version == unpinned and tracker.model_version("reg", version=pinned).tags["k"] == "v"
    assert tracker.model_version("reg", version="42") is None


def test_a_forced_rerun_that_commits_other_weights_under_the_same_key_registers_a_new_version(
    tmp_path, model_cache
):
    """The same output key is not the same adapter: --force commits other weights under it. Only a
    rerun of the same weights (a merge killed after registering, before committing) reuses the
    version; else eval would tag the new weights' scores onto the version of the old ones."""
    from selma_core.storage.base import sha256_file
    from selma_core.tracking.base import TAG_ADAPTER_SHA256

    tracker = open_tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    base = str(materialize_random_model("random:tiny-sd", model_cache))
    first = trained_like_expert(model_cache, 0, 2, 2.0, tmp_path / "first")
    forced = trained_like_expert(model_cache, 1, 2, 2.0, tmp_path / "forced")

    def tags(adapter):
        sha = sha256_file(adapter / "pytorch_lora_weights.safetensors")
        return {"selma.store_key": "merged/0123456789abcdef", TAG_ADAPTER_SHA256: sha}

    run = tracker.start_job_run("registry-test", None, "merge", {})
    registered = run.register_lora_adapter(first, base, "reg", "candidate", tags(first))
    killed_and_rerun = run.register_lora_adapter(first, base, "reg", "candidate", tags(first))
    rerun_forced = run.register_lora_adapter(forced, base, "reg", "candidate", tags(forced))
    tracker.end_job_run(run, True)
    assert registered == killed_and_rerun == "1" and rerun_forced == "2"
    assert tracker.model_version("reg", alias="candidate").version == "2"
