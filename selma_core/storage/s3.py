"""``s3://bucket/prefix`` store through boto3 (AWS, MinIO, Ceph, moto: any S3-compatible endpoint).

Large files go through boto3's managed transfers (multipart, parallel parts). Connection failures
are retried by botocore a bounded number of times, then reported naming the endpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selma_core.errors import ConfigError, EndpointError
from selma_core.storage.base import ArtifactStore, validate_key

# Error codes that a retry cannot fix.
PERMANENT_ERRORS = ("403", "AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch")


class S3ArtifactStore(ArtifactStore):
    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_retries: int = 3,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        rest = uri[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ConfigError(f"storage uri {uri!r}: expected s3://BUCKET/PREFIX")
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = endpoint_url
        config = Config(
            retries={"max_attempts": connect_retries + 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self.transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self) -> str:
        return f"S3 endpoint {self.endpoint_url or 'AWS default'} (bucket {self.bucket})"

    def _call(self, what: str, key: str, fn, *args: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{self.url(key)}: no such object") from e
            if code in PERMANENT_ERRORS:  # retrying cannot help: a missing bucket, no permission
                raise ConfigError(f"{what} {self.url(key)} refused by {self._where()}: {e}") from e
            raise EndpointError(f"{what} {self.url(key)} failed at {self._where()}: {e}") from e
        except (BotoCoreError, Boto3Error) as e:  # Boto3Error: managed transfers' S3UploadFailedError
            raise EndpointError(f"{what} {self.url(key)}: cannot reach {self._where()}: {e}") from e

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", *PERMANENT_ERRORS):
                raise ConfigError(f"{self._where()}: bucket missing or not accessible: {e}") from e
            raise EndpointError(f"{self._where()}: bucket not accessible: {e}") from e
        except BotoCoreError as e:
            raise EndpointError(f"cannot reach {self._where()}: {e}") from e

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return False
        return True

    def read_bytes(self, key: str) -> bytes:
        response = self._call("get", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return response["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers see the old object or the new one.
        self._call("put", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, local_path: Path, key: str) -> None:
        self._call(
            "upload",
            key,
            self.client.upload_file,
            str(local_path),
            self.bucket,
            self._key(key),
            Config=self.transfer,
        )

    def download_file(self, key: str, local_path: Path) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        self._call(
            "download",
            key,
            self.client.download_file,
            self.bucket,
            self._key(key),
            str(local_path),
            Config=self.transfer,
        )

    def list_keys(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/") + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)))
        for page in pages:
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._call(
                "delete", prefix, self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch}
            )
