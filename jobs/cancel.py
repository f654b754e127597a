"""Cancel a pipeline on Kubernetes: delete its Jobs (their pods go with them), Services and ConfigMaps.

    python -m jobs.cancel --config configs/sdxl.yaml --backend kubernetes

Everything labelled ``selma.io/pipeline=<the config's name>`` in the configured namespace is
deleted with propagation ``Background``. Committed outputs stay in the store, so a later
``jobs.submit`` resumes from them. Local pipelines stop with their controller (Ctrl-C or SIGTERM to
``jobs.submit``). The last line printed is one JSON object: ``{"deleted": [...]}``.
Exit code: 0 done, 2 invalid configuration, 1 the API server failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import parse_args
from selma_core.errors import ConfigError, SelmaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.cancel",
        description=__doc__.split("\n\n")[0],
        epilog="Exit code: 0 done, 2 invalid configuration, 1 the API server failed. The last line "
        "printed is one JSON object.",
    )
    parser.add_argument("--config", required=True, help="the pipeline config YAML it was submitted with")
    parser.add_argument(
        "--backend",
        choices=("kubernetes",),
        help="the executor the pipeline runs on (default: the config's executor.kind)",
    )
    return parser


def cancel_pipeline(config_path: str, backend: str | None = None) -> list[str]:
    """Delete the pipeline's Jobs and Services; returns what was deleted, as ``kind/name``."""
    from jobs.executors import require_kubernetes_client
    from selma_core.config import load_config

    cfg = load_config(config_path)
    if (backend or cfg.executor.kind) != "kubernetes":
        raise ConfigError(
            f"{config_path}: executor.kind is {cfg.executor.kind}: local jobs stop with their controller "
            "(Ctrl-C or SIGTERM to jobs.submit); pass --backend kubernetes for a pipeline on a cluster"
        )
    require_kubernetes_client()
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from jobs.executors.kubernetes import UNREACHABLE, _api_error, api_client
    from jobs.executors.kubernetes_manifests import LABEL_PIPELINE

    namespace = cfg.executor.kubernetes.namespace
    selector = f"{LABEL_PIPELINE}={cfg.name}"
    api = api_client(cfg)
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    deleted = []
    kinds = (
        ("job", batch.list_namespaced_job, batch.delete_namespaced_job),
        ("service", core.list_namespaced_service, core.delete_namespaced_service),
        ("configmap", core.list_namespaced_config_map, core.delete_namespaced_config_map),
    )
    try:
        for kind, list_them, delete in kinds:
            listing = json.loads(list_them(namespace, label_selector=selector, _preload_content=False).data)
            for item in listing["items"]:
                name = item["metadata"]["name"]
                try:
                    # The API answers a delete with a Status or the deleted object: left unread.
                    delete(name, namespace, propagation_policy="Background", _preload_content=False)
                    deleted.append(f"{kind}/{name}")
                except ApiException as e:
                    if e.status != 404:  # already gone is what we want
                        raise
    except (ApiException, *UNREACHABLE) as e:
        raise _api_error(f"cancel pipeline {cfg.name}", batch, e) from e
    return deleted


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, {"deleted": []})
    if isinstance(args, int):
        return args
    try:
        deleted = cancel_pipeline(args.config, args.backend)
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({"deleted": [], "error": str(e)}))
        return e.exit_code
    for name in deleted:
        print(f"deleted {name}", file=sys.stderr)
    if not deleted:
        print("nothing to cancel: the pipeline has no Jobs in the cluster", file=sys.stderr)
    print(json.dumps({"deleted": deleted}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
