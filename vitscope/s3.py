"""S3-compatible object storage (AWS S3, Ceph radosgw, MinIO, ...) through boto3.

The endpoint URL, credentials and region come from the standard AWS environment variables
and config files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``~/.aws/...``), as for any boto3 program.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from vitscope.store import AccessDenied, NotFound, Store, StoreError, TransientStoreError, _check_key

MiB = 1 << 20

# Codes S3 servers use for "these credentials may not do this"; HEAD answers carry no body,
# so there the code is just the HTTP status.
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
# Throttling and server-side faults: boto3 has already retried them with backoff, and a later
# try (after the flows' retry delay) may still succeed. Any 5xx status counts too.
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                    "RequestThrottled", "TooManyRequests", "TooManyRequestsException", "ServiceUnavailable",
                    "InternalError", "RequestTimeout", "429"}


class S3Store(Store):
    """Objects under ``prefix`` in one S3 bucket.

    Every object is written by a single PUT or a completed multipart upload, both of which S3
    makes visible all at once, so readers never see a partial object.

    ``multipart_threshold``/``multipart_chunksize`` tune :meth:`put_file` (S3 parts must be at
    least 5 MiB); ``page_size`` is the number of keys asked for per LIST call; ``max_attempts``
    bounds retries (with backoff) of throttled, failed or unreachable requests.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        multipart_threshold: int = 16 * MiB,
        multipart_chunksize: int = 16 * MiB,
        page_size: int = 1000,
        max_attempts: int = 5,
    ):
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        prefix = prefix.strip("/")
        if prefix:
            _check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.page_size = page_size
        self._root = f"{prefix}/" if prefix else ""
        self._bucket_checked = False
        config = Config(
            # radosgw and MinIO on an IP address cannot serve virtual-host-style bucket names.
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=10,
            read_timeout=60,
            tcp_keepalive=True,
            # Recent boto3 adds CRC checksums (and aws-chunked uploads) that older S3-compatible
            # servers such as Ceph Pacific reject; send them only where S3 requires them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self.endpoint_url: str = self._client.meta.endpoint_url
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize
        )

    # -- helpers -------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._root + _check_key(key)

    def _where(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def _translate(self, exc: Exception, key: str | None) -> StoreError:
        """Turn a boto3 failure into the :class:`StoreError` that says whether retrying can help
        (what is still failing after boto3's own retries), naming the object and the endpoint."""
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, (ClientError, BotoCoreError)):
            exc = exc.__context__  # boto3 wraps the real error in a message-only exception
        at = f"at {self.endpoint_url}"
        what = self._where(key) if key is not None else f"bucket {self.bucket!r}"
        if isinstance(exc, RetriesExceededError):  # boto3 gave up re-reading a download's dropped body
            return TransientStoreError(f"reading {what} {at} kept failing: {exc.last_exception} "
                                       "(a dropped connection: retrying can help)")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist {at}")
            if code in _MISSING_KEY_CODES and key is not None:
                return NotFound(self._where(key))
            if code in _AUTH_CODES:
                return AccessDenied(
                    f"access to {what} {at} denied ({code}): check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions"
                )
            if code == "InvalidRange":
                return StoreError(f"range runs past the end of {self._where(key or '')}")
            failed = f"S3 request for {what} {at} failed: {code} {err.get('Message') or ''}".rstrip()
            if code in _TRANSIENT_CODES or status >= 500:
                return TransientStoreError(f"{failed} (throttled or a server fault: retrying can help)")
            return StoreError(failed)
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return AccessDenied(f"cannot sign requests for {what} {at}: {exc}: set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY (or an AWS profile)")
        dropped = (BotoConnectionError, HTTPClientError, IncompleteReadError)
        if isinstance(exc, dropped) and not isinstance(exc, SSLError):  # a bad certificate stays bad
            return TransientStoreError(f"cannot use S3 endpoint {self.endpoint_url} for {what}: {exc} "
                                       "(a refused, dropped or timed-out connection: retrying can help)")
        if isinstance(exc, BotoCoreError):
            return StoreError(f"cannot use S3 endpoint {self.endpoint_url} (bucket {self.bucket!r}): {exc}")
        return StoreError(f"S3 request for {what} {at} failed: {exc}")

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError, S3UploadFailedError, RetriesExceededError) as exc:
            raise self._translate(exc, key) from exc

    def _not_found(self, key: str) -> NotFound:
        """A HEAD 404 means a missing key *or* a missing bucket; tell the caller which."""
        if not self._bucket_checked:
            with self._errors():
                try:
                    self._client.head_bucket(Bucket=self.bucket)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") in _MISSING_KEY_CODES:
                        raise StoreError(
                            f"bucket {self.bucket!r} does not exist at {self.endpoint_url}"
                        ) from exc
                    raise
            self._bucket_checked = True
        return NotFound(self._where(key))

    # -- Store ---------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet (used by tests and deployment)."""
        with self._errors():
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in _MISSING_KEY_CODES:
                    raise
            region = self._client.meta.region_name
            kwargs = {}
            if region and region != "us-east-1":  # us-east-1 rejects an explicit constraint
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self._client.create_bucket(Bucket=self.bucket, **kwargs)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise

    def put_bytes(self, key: str, data: bytes | memoryview) -> None:
        """Write ``data`` at ``key`` with one PUT."""
        k = self._key(key)
        with self._errors(key):
            # botocore takes bytes or a file, not a memoryview: the request body is a copy anyway
            self._client.put_object(Bucket=self.bucket, Key=k, Body=bytes(data))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload a local file; above ``multipart_threshold`` as a multipart upload, which S3
        publishes only when it completes (boto3 aborts it on failure)."""
        k = self._key(key)
        with self._errors(key):
            self._client.upload_file(os.fspath(path), self.bucket, k, Config=self._transfer)

    def get_bytes(self, key: str) -> bytes:
        """Read a whole object."""
        k = self._key(key)
        with self._errors(key):
            return self._client.get_object(Bucket=self.bucket, Key=k)["Body"].read()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes from ``start`` with one ranged GET."""
        if start < 0 or length < 0:
            raise ValueError("start and length must be non-negative")
        if length == 0:  # HTTP cannot express an empty range; still report a missing key
            self.size(key)
            return b""
        k = self._key(key)
        with self._errors(key):
            resp = self._client.get_object(
                Bucket=self.bucket, Key=k, Range=f"bytes={start}-{start + length - 1}"
            )
            data = resp["Body"].read()
        # S3 clips a range that starts inside the object but ends past it.
        if len(data) != length:
            raise StoreError(f"range {start}+{length} runs past the end of {self._where(key)}")
        return data

    def size(self, key: str) -> int:
        """Object size from a HEAD request."""
        k = self._key(key)
        try:
            with self._errors(key):
                return int(self._client.head_object(Bucket=self.bucket, Key=k)["ContentLength"])
        except NotFound:
            raise self._not_found(key) from None

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists (a HEAD request)."""
        try:
            self.size(key)
        except NotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix``, following LIST continuation tokens."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=self._root + prefix,
            PaginationConfig={"PageSize": self.page_size},
        )
        keys: list[str] = []
        with self._errors():
            for page in pages:
                keys.extend(obj["Key"][len(self._root) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove one object (S3 treats a missing key as already deleted)."""
        k = self._key(key)
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=k)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` with batched DeleteObjects calls."""
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):  # S3's limit per DeleteObjects call
            batch = [{"Key": self._root + k} for k in keys[i : i + 1000]]
            with self._errors():
                resp = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            if resp.get("Errors"):
                first = resp["Errors"][0]
                throttled = all(e.get("Code") in _TRANSIENT_CODES for e in resp["Errors"])
                raise (TransientStoreError if throttled else StoreError)(
                    f"could not delete {len(resp['Errors'])} objects under {self._where(prefix)} "
                    f"at {self.endpoint_url}, e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message', '')}"
                )
        return len(keys)

    def discard_incomplete(self, prefix: str) -> int:
        """Abort multipart uploads under ``prefix`` that a killed writer never completed (their
        parts cost storage but are invisible to readers)."""
        aborted = 0
        with self._errors():
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._root + prefix)
            for page in pages:
                for upload in page.get("Uploads", []):
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                        UploadId=upload["UploadId"])
                    aborted += 1
        return aborted

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download to ``path`` (boto3 writes a temporary file and renames it into place)."""
        k = self._key(key)
        try:
            with self._errors(key):
                self._client.download_file(self.bucket, k, os.fspath(path), Config=self._transfer)
        except NotFound:
            raise self._not_found(key) from None
