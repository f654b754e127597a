"""``s3://bucket/prefix`` store through boto3 (AWS, MinIO, Ceph, moto: any S3-compatible endpoint).

Large files go through boto3's managed transfers (multipart, parallel parts).

Failures are retried at two levels. botocore retries each request ``connect_retries`` times
("standard" mode: exponential backoff with jitter), which rides out a dropped connection. Above it,
an endpoint this store has reached once (its ``check`` or any operation succeeded) and that then
stops answering (a restart, a network outage) is retried per operation with exponential backoff
(capped at ``retry_backoff_max_s``) for ``retry_budget_s`` seconds from the operation's first
failure; then the operation raises ``EndpointError`` naming the endpoint, the attempts and the time
spent (exit code 1: worth retrying later). An endpoint never reached (a wrong URL, no route) fails
after botocore's retries alone: waiting minutes cannot fix a typo. Errors a retry cannot fix (no
such key, bucket, permission) are raised at once. Every retried operation is idempotent: a PUT
replaces the whole object, the commit protocol writes files under a fresh attempt folder and the
manifest last, so a retried upload never exposes half an output.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selma_core.errors import ConfigError, EndpointError
from selma_core.storage.base import MANIFEST, ArtifactStore, R, StoredObject, T, UnfinishedWrite, validate_key

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig

# Error codes that a retry cannot fix: permissions, a missing or misnamed bucket, the wrong region
# or endpoint, a key S3 cannot hold. (Names after the first entry are also looked for in the text of
# a managed transfer's error, which carries no code.)
PERMANENT_ERRORS = (
    "403",
    "AccessDenied",
    "NoSuchBucket",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "InvalidBucketName",
    "KeyTooLongError",
    "AllAccessDisabled",
    "AccountProblem",
)
# Error codes of an endpoint that is up but overloaded or restarting: retried like no answer at all.
TRANSIENT_ERRORS = (
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
)


class S3ArtifactStore(ArtifactStore):
    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_retries: int = 3,
        retry_budget_s: float = 300.0,
        retry_backoff_max_s: float = 30.0,
        transfer_threads: int = 1,
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
        self.retry_budget_s = retry_budget_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.transfer_threads = transfer_threads
        # Set once the endpoint answered: from then on, no answer is an outage worth waiting out.
        self.reached = False
        config = Config(
            retries={"max_attempts": connect_retries + 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            # A pooled connection per request in flight (botocore keeps 10), fewer would reconnect:
            # each transfer thread's, and with files over the multipart threshold, up to 10 parts each.
            max_pool_connections=max(10, transfer_threads * 10),
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self.transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)
        # A file under the multipart threshold in one request, in the calling thread: with
        # transfer_threads, that is a daemon worker (base.at_once), which an interrupted job does not
        # wait for. Larger files keep their parts side by side, in s3transfer's own threads.
        self.single_request = TransferConfig(
            multipart_threshold=64 << 20, multipart_chunksize=64 << 20, use_threads=False
        )
        # Set when the caller of side-by-side transfers was interrupted: they retry no more.
        self._abandoned = threading.Event()

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _name(self, key: str) -> str:
        """What an error names: the object's URL, or the store's for a request about the whole store."""
        return self.url(key) if key else self.uri

    def _where(self) -> str:
        return f"S3 endpoint {self.endpoint_url or 'AWS default'} (bucket {self.bucket})"

    def _call(self, what: str, key: str, fn, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, S3 errors mapped to the job contract's, outages retried (see the
        module's docstring): ``fn`` must be safe to call again after a failure."""
        attempts, first_failure = 0, None
        while True:
            attempts += 1
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                error = self._classify(what, key, e)
                if not isinstance(error, EndpointError) or not self._transient(e) or not self.reached:
                    if error is e:
                        raise
                    raise error from e
                if self._abandoned.is_set():
                    raise EndpointError(f"{error} (not retried: the job was interrupted)") from e
                # The budget counts from the first failure (after botocore's own retries of that
                # attempt); the operation gives up at most one attempt past it.
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                spent = now - first_failure
                # Full jitter: many jobs hitting one recovering endpoint do not retry in lockstep.
                delay = min(self.retry_backoff_max_s, 2.0 ** (attempts - 1)) * random.uniform(0.5, 1.0)
                if spent + delay > self.retry_budget_s:
                    raise EndpointError(
                        f"{error} (gave up after {attempts} attempts over {spent:.0f} s: "
                        f"storage.retry_budget_s is {self.retry_budget_s:g} s)"
                    ) from e
                print(
                    f"storage: {what} {self._name(key)}: {self._where()} not answering ({type(e).__name__}); "
                    f"attempt {attempts}, retrying in {delay:.1f} s (giving up {self.retry_budget_s:g} s "
                    "after the first failure)",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(delay)
                continue
            self.reached = True
            return result

    def _no_credentials(self, e: Exception) -> EndpointError | None:
        """No (or half) AWS credentials: said as such, not as an unreachable endpoint. Still exit 1
        (worth a retry): in a pod, an instance role's credentials that did not arrive in time look
        the same as none at all."""
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        if not isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return None
        return EndpointError(
            f"{self._where()}: {e}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run "
            "where an instance or pod role provides them)"
        )

    def _classify(self, what: str, key: str, e: Exception) -> Exception:
        """The error to raise for ``e``: FileNotFoundError, ConfigError (exit 2), EndpointError (exit
        1), or ``e`` itself when it is not an S3 error."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return FileNotFoundError(f"{self._name(key)}: no such object")
            if code in PERMANENT_ERRORS or code == "301":  # retrying cannot help (301: another region)
                return ConfigError(f"{what} {self._name(key)} refused by {self._where()}: {e}")
            return EndpointError(f"{what} {self._name(key)} failed at {self._where()}: {e}")
        if isinstance(e, (BotoCoreError, Boto3Error)):  # Boto3Error: S3UploadFailedError and the like
            missing = self._no_credentials(e)
            if missing is not None:
                return missing
            cause = e.__cause__ or e.__context__
            if isinstance(cause, ClientError):  # a managed transfer's wrapped refusal
                inner = self._classify(what, key, cause)
                if not isinstance(inner, EndpointError):
                    return inner
            if any(code in str(e) for code in PERMANENT_ERRORS[1:]):
                return ConfigError(f"{what} {self._name(key)} refused by {self._where()}: {e}")
            return EndpointError(f"{what} {self._name(key)}: cannot reach {self._where()}: {e}")
        return e

    @staticmethod
    def _transient(e: BaseException) -> bool:
        """No answer, a dropped connection, a timeout or an overloaded endpoint: worth waiting out.
        Missing credentials, invalid parameters and other refusals are not."""
        from boto3.exceptions import Boto3Error, RetriesExceededError
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ResponseStreamingError,
        )

        if isinstance(e, ClientError):
            error = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status == 501 or error.get("Code") == "NotImplemented":
                return False  # a feature this endpoint lacks: asking again cannot help
            return error.get("Code", "") in TRANSIENT_ERRORS or status >= 500
        if isinstance(e, (ConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)):
            return True  # EndpointConnectionError, ConnectionClosedError, timeouts, resets
        if isinstance(e, RetriesExceededError):
            # A managed download that gave up after its own retries of errors it takes for
            # transient (a reset or a timeout mid-body): an outage, for the store's budget to wait out.
            return True
        if isinstance(e, Boto3Error):  # a managed transfer's failure: transient unless it wraps a refusal
            cause = e.__cause__ or e.__context__
            if cause is not None and cause is not e:
                return S3ArtifactStore._transient(cause)
            return not any(code in str(e) for code in PERMANENT_ERRORS)
        return isinstance(e, OSError)

    def check(self, create: bool = True) -> None:
        # A bucket is never made here (``create`` is for local folders): a missing one is an error.
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            self.reached = True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "301", "NoSuchBucket", *PERMANENT_ERRORS):
                raise ConfigError(f"{self._where()}: bucket missing or not accessible: {e}") from e
            raise EndpointError(f"{self._where()}: bucket not accessible: {e}") from e
        except BotoCoreError as e:
            raise self._no_credentials(e) or EndpointError(f"cannot reach {self._where()}: {e}") from e

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return False
        return True

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:  # the body is read inside the retried call: a reset mid-read is retried too
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call("get", key, get)

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers see the old object or the new one.
        self._call("put", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def transfer_each(self, fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
        self._abandoned.clear()  # a new batch: its requests are retried again
        return super().transfer_each(fn, items, threads)

    def abandon_transfers(self) -> None:
        self._abandoned.set()

    def _transfer_config(self, size: int | None) -> TransferConfig:
        """How a file of ``size`` bytes (None: unknown) is moved."""
        small = size is not None and size < self.transfer.multipart_threshold
        return self.single_request if small and self.transfer_threads > 1 else self.transfer

    def upload_file(self, local_path: Path, key: str) -> None:
        self._call(
            "upload",
            key,
            self.client.upload_file,
            str(local_path),
            self.bucket,
            self._key(key),
            Config=self._transfer_config(Path(local_path).stat().st_size),
        )

    def download_file(self, key: str, local_path: Path, size: int | None = None) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        self._call(
            "download",
            key,
            self.client.download_file,
            self.bucket,
            self._key(key),
            str(local_path),
            Config=self._transfer_config(size),
        )

    def _listing(self, prefix: str) -> list[dict]:
        """The bucket's objects under ``prefix`` (folder markers included), as S3 lists them."""
        full = self._key(prefix).rstrip("/") + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)))
        return [obj for page in pages for obj in page.get("Contents", [])]

    def _objects(self, prefix: str) -> list[str]:
        """The bucket's object names under ``prefix``, as S3 has them (folder markers included)."""
        return [obj["Key"] for obj in self._listing(prefix)]

    def list_objects(self, prefix: str) -> list[StoredObject]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        # Not "prefix/" folder markers (the S3 console's "Create folder", rclone, s3fs): empty
        # objects that are no store key, whatever they sit in.
        return sorted(
            (
                StoredObject(
                    obj["Key"][strip:], int(obj["Size"]), obj["LastModified"].timestamp(), obj.get("ETag")
                )
                for obj in self._listing(prefix)
                if not obj["Key"].endswith("/")
            ),
            key=lambda o: o.key,
        )

    def list_keys(self, prefix: str) -> list[str]:
        return [o.key for o in self.list_objects(prefix)]

    def list_unfinished_writes(self, prefixes: Iterable[str]) -> list[UnfinishedWrite]:
        """The multipart uploads not completed under these prefixes, each with its parts' total size
        and the time of its newest part (its start, before the first)."""
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        writes = []
        for prefix in prefixes:
            full = self._key(prefix).rstrip("/") + "/"
            pages = self._call(
                "list uploads",
                prefix,
                lambda full=full: list(paginator.paginate(Bucket=self.bucket, Prefix=full)),
            )
            for upload in (u for page in pages for u in page.get("Uploads", [])):
                key = upload["Key"][strip:]
                try:
                    validate_key(key)
                except ValueError:
                    continue  # "a//b": S3 takes it, this store never writes one
                write = self._upload_state(key, upload["UploadId"], upload["Initiated"].timestamp())
                if write is not None:
                    writes.append(write)
        return writes

    def _upload_state(self, key: str, upload_id: str, initiated: float) -> UnfinishedWrite | None:
        """A multipart upload's parts, summed up; None when it is gone (completed or aborted)."""
        from botocore.exceptions import ClientError

        def parts() -> list[dict] | None:
            paginator = self.client.get_paginator("list_parts")
            try:
                pages = list(paginator.paginate(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    return None
                raise
            return [part for page in pages for part in page.get("Parts", [])]

        found = self._call("list parts", key, parts)
        if found is None:
            return None
        written = max([initiated, *(p["LastModified"].timestamp() for p in found)])
        return UnfinishedWrite(key, sum(int(p["Size"]) for p in found), written, upload_id)

    def discard_unfinished_write(self, write: UnfinishedWrite) -> bool:
        from botocore.exceptions import ClientError

        if write.upload_id is None:
            raise ValueError(f"{self.url(write.key)}: not a multipart upload")
        now = self._upload_state(write.key, write.upload_id, write.modified)
        if now is None:
            return True  # completed or aborted since: nothing left to free
        if now.modified > write.modified or now.size != write.size:
            return False  # a part was uploaded since the listing: a writer is at work

        def abort() -> None:
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._key(write.key), UploadId=write.upload_id
                )
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise

        self._call("abort upload", write.key, abort)
        return True

    def delete_prefix(self, prefix: str) -> None:
        self._delete(prefix, self._objects(prefix))  # markers too

    def delete_keys(self, keys: list[str]) -> None:
        if keys:
            self._delete(keys[0], [self._key(k) for k in keys])

    def _delete(self, prefix: str, objects: list[str]) -> None:
        """Delete these object names (as S3 has them) in batches; ``prefix`` names them in errors."""
        # Manifests first: a delete cut short must not leave a manifest listing deleted files.
        objects = sorted(objects, key=lambda k: (not k.endswith("/" + MANIFEST), k))
        for start in range(0, len(objects), 1000):
            batch = [{"Key": k} for k in objects[start : start + 1000]]
            response = self._call(
                "delete", prefix, self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch}
            )
            # A batch delete answers 200 and lists the keys it could not delete.
            failed = [
                f"{e.get('Key')} ({e.get('Code')}: {e.get('Message')})" for e in response.get("Errors") or []
            ]
            if failed:
                raise EndpointError(
                    f"delete {self.url(prefix)}: {len(failed)} object(s) not deleted by {self._where()}: "
                    + "; ".join(failed[:3])
                )
