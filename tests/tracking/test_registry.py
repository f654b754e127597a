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
    tracker.end_job_run(run, True)

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
