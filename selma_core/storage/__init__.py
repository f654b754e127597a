"""Artifact stores, chosen by the storage URI: ``file://`` (local folder) or ``s3://`` (boto3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from selma_core.storage.base import MANIFEST, ArtifactStore, validate_key
from selma_core.storage.local import LocalArtifactStore

if TYPE_CHECKING:
    from selma_core.config import StorageConfig

__all__ = ["MANIFEST", "ArtifactStore", "LocalArtifactStore", "open_store", "validate_key"]


def open_store(cfg: StorageConfig, check: bool = True, create: bool = True) -> ArtifactStore:
    """The store a config names; with ``check``, fail early (naming the endpoint) if unreachable or
    missing. ``create=False`` is for readers: a local store's folder is not made."""
    store: ArtifactStore
    if cfg.uri.startswith("file://"):
        store = LocalArtifactStore(cfg.uri[len("file://") :], cfg.transfer_threads)
    else:
        from selma_core.storage.s3 import S3ArtifactStore  # boto3 only where S3 is used

        store = S3ArtifactStore(
            cfg.uri,
            cfg.endpoint_url,
            cfg.region,
            cfg.connect_retries,
            retry_budget_s=cfg.retry_budget_s,
            retry_backoff_max_s=cfg.retry_backoff_max_s,
            transfer_threads=cfg.transfer_threads,
        )
    if check:
        store.check(create)
    return store
