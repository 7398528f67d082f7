"""s3://bucket/key through boto3: s3transfer's TransferManager for concurrent and multipart transfers, botocore's
retries for throttling and dropped connections (attempts from AWS_MAX_ATTEMPTS, default 3), AWS_ENDPOINT_URL_S3 for
MinIO and other S3-compatible stores, and conditional writes (If-None-Match, If-Match) for the run's records."""

# S3.list shadows the builtin in the class body, where annotations would otherwise be evaluated.
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path

from job.errors import AccessDenied, ConfigInvalid, InputNotFound, TemporaryFailure
from job.logs import progress
from job.storage import MAX_CONCURRENCY, is_data_file, nothing_under, safe_target, split_s3

log = logging.getLogger(__name__)

MISSING = {"NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "AllAccessDisabled"}
TEMPORARY = {"SlowDown", "RequestTimeout", "Throttling", "InternalError", "ServiceUnavailable"}
# A conditional write that did not hold; S3 answers If-Match on a missing object with NoSuchKey.
NOT_WRITTEN = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"}
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes


def as_prefix(key: str) -> str:
    """The listing prefix of everything under key: "d" and "d/" both mean "d/"; "" is the whole bucket."""
    return key.rstrip("/") + "/" if key else ""


def error_code(exc) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def etag_of(response: dict) -> str:
    """The version token of an object: its ETag without the quotes."""
    return response["ETag"].strip('"')


@contextmanager
def s3_errors(uri: str):
    """Turns boto3's exceptions into the job's, each naming the location and the fix."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError
    from s3transfer.exceptions import RetriesExceededError

    try:
        yield
    except NoCredentialsError:
        raise AccessDenied(
            f"{uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or give the pod an IAM role"
        ) from None
    except ClientError as exc:
        code, status = error_code(exc), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            raise InputNotFound(f"{uri}: bucket {split_s3(uri)[0]!r} does not exist: check the bucket name") from None
        if code in MISSING:
            raise InputNotFound(f"{uri}: no such object: check the key") from None
        if code in DENIED:
            raise AccessDenied(
                f"{uri}: access denied ({code}): check the credentials and that their policy allows this bucket"
            ) from None
        if status >= 500 or code in TEMPORARY:
            raise TemporaryFailure(f"{uri}: storage failed after retries ({code}): try again later") from None
        raise
    except ParamValidationError as exc:
        raise ConfigInvalid(
            f"{uri}: not a valid S3 address: check the bucket name ({str(exc).splitlines()[-1][:120]})"
        ) from None
    except (BotoCoreError, RetriesExceededError) as exc:  # s3transfer retries broken downloads itself
        cause = getattr(exc, "last_exception", None) or exc
        raise TemporaryFailure(
            f"{uri}: storage unreachable after retries ({cause}): check AWS_ENDPOINT_URL_S3 and the network"
        ) from None


class S3:
    def __init__(self, settings):
        self.settings = settings
        self._client = None
        self._transfers = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            import botocore.session
            from botocore.config import Config

            s, core = self.settings, botocore.session.get_session()
            session = boto3.session.Session(
                aws_access_key_id=s.AWS_ACCESS_KEY_ID and s.AWS_ACCESS_KEY_ID.get_secret_value(),
                aws_secret_access_key=s.AWS_SECRET_ACCESS_KEY and s.AWS_SECRET_ACCESS_KEY.get_secret_value(),
                aws_session_token=s.AWS_SESSION_TOKEN and s.AWS_SESSION_TOKEN.get_secret_value(),
                region_name=s.AWS_REGION or s.AWS_DEFAULT_REGION,
                botocore_session=core,
            )
            # Retries in botocore's "legacy" mode: "standard" mode also keeps a retry quota per client (botocore 1.44,
            # retries/standard.py and quota.py): 500 tokens, 14 taken per retry (5 after a throttle), and a request
            # that then succeeds gives back only its last retry's. So each request that needs two retries keeps 5 to
            # 14 tokens, and after about 40 of them (35 with 500s, 100 with SlowDowns) the next fault fails at once,
            # whatever the attempts: a store failing every request twice ended runs with 75. Legacy mode retries the
            # same faults (500, 502, 503, 504, throttling, dropped connections, S3's RequestTimeout) without a quota,
            # backing off rand(0, 1) * 2^n s; its own default of 5 attempts is set back to boto3's 3.
            attempts = core.get_config_variable("max_attempts") or 3  # AWS_MAX_ATTEMPTS, or ~/.aws/config's
            self._client = session.client(
                "s3",
                endpoint_url=s.AWS_ENDPOINT_URL_S3 or s.AWS_ENDPOINT_URL,
                config=Config(
                    retries={"mode": "legacy", "total_max_attempts": attempts},
                    connect_timeout=10,
                    read_timeout=120,
                    # A connection for each thread that may ask at once: the transfers' request threads, s3transfer's 5
                    # submission threads (each HEADs a download first), and the main thread's, the lease's and the
                    # checkpoint commit's own requests. botocore keeps 10 and drops any beyond, logging "Connection
                    # pool is full" for each (a resumed run's checkpoint download).
                    max_pool_connections=MAX_CONCURRENCY + 5 + 3,
                ),
            )
        return self._client

    @property
    def transfers(self):
        """boto3's managed transfer (s3transfer's TransferManager): many files at once, large ones in parts."""
        if self._transfers is None:
            from boto3.s3.transfer import TransferConfig, create_transfer_manager

            self._transfers = create_transfer_manager(self.client, TransferConfig(max_concurrency=MAX_CONCURRENCY))
        return self._transfers

    def locate(self, uri: str, dest: Path, keep) -> list[tuple[str, Path]]:
        """The object at uri, or the objects under it that keep() accepts, downloaded into dest."""
        bucket = split_s3(uri)[0]
        with s3_errors(uri):
            selected = self._select(uri, keep)
        targets = [safe_target(dest, relative) for _, relative in selected]
        objects = [obj for obj, _ in selected]
        self._download(bucket, objects, targets)
        return [(f"s3://{bucket}/{obj['Key']}", target) for obj, target in zip(objects, targets)]

    def identify(self, uri: str) -> list[dict]:
        bucket = split_s3(uri)[0]
        with s3_errors(uri):
            selected = self._select(uri, is_data_file)
        return [
            {"uri": f"s3://{bucket}/{obj['Key']}", "etag": etag_of(obj), "bytes": obj["Size"]} for obj, _ in selected
        ]

    def exists(self, uri: str) -> bool:
        with s3_errors(uri):
            return self._head(*split_s3(uri)) is not None

    def list(self, uri: str) -> list[str]:
        bucket, key = split_s3(uri)
        prefix = as_prefix(key)
        with s3_errors(uri):
            return [obj["Key"][len(prefix) :] for obj in self._objects(bucket, prefix)]

    def copy_tree(self, uri: str, dest: Path) -> list[Path]:
        bucket, key = split_s3(uri)
        prefix = as_prefix(key)
        with s3_errors(uri):
            objects = self._objects(bucket, prefix)
        targets = [safe_target(dest, obj["Key"][len(prefix) :]) for obj in objects]
        self._download(bucket, objects, targets)
        return targets

    def put_files(self, files: list[tuple[Path, str]], update) -> None:
        """Uploads each (file, address) at once; update(bytes) counts them as they go."""
        from boto3.s3.transfer import ProgressCallbackInvoker

        subscribers = [ProgressCallbackInvoker(update)]
        self._wait([(t, self.transfers.upload(str(p), *split_s3(t), subscribers=subscribers)) for p, t in files])

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            self.client.delete_object(Bucket=bucket, Key=key)

    def delete_tree(self, uri: str) -> None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        with s3_errors(uri):
            keys = [{"Key": obj["Key"]} for obj in self._objects(bucket, as_prefix(key), markers=True)]
            for start in range(0, len(keys), DELETE_BATCH):
                batch = keys[start : start + DELETE_BATCH]
                response = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch})
                if errors := response.get("Errors"):  # answered per key, with status 200
                    raise ClientError({"Error": errors[0]}, "DeleteObjects")

    def get_bytes(self, uri: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        with s3_errors(uri):
            try:
                response = self.client.get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if error_code(exc) in MISSING:
                    return None
                raise
            return response["Body"].read(), etag_of(response)

    def put_bytes(self, data: bytes, uri: str, if_absent: bool, if_match: str | None) -> str | None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        condition = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": f'"{if_match}"'} if if_match else {}
        with s3_errors(uri):
            try:
                return etag_of(self.client.put_object(Bucket=bucket, Key=key, Body=data, **condition))
            except ClientError as exc:
                code = error_code(exc)
                if condition and code in NOT_WRITTEN:
                    # A retry of a write that landed, whose answer was lost, fails its own condition.
                    return self._holds(bucket, key, data)
                if not (condition and code == "NotImplemented"):
                    raise
            # Stores without conditional writes (older MinIO, Ceph): compare, then write.
            log.warning("%s: the store refuses conditional writes; comparing the current version instead", uri)
            head = self._head(bucket, key)
            if (head and etag_of(head)) != (None if if_absent else if_match):
                return None
            return etag_of(self.client.put_object(Bucket=bucket, Key=key, Body=data))

    def _holds(self, bucket: str, key: str, data: bytes) -> str | None:
        """The object's ETag when it is data already, else None; a single-part PUT's ETag is the MD5 of its bytes
        (without KMS)."""
        head = self._head(bucket, key)
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        return md5 if head is not None and etag_of(head) == md5 else None

    def _select(self, uri: str, keep) -> list[tuple[dict, str]]:
        """The objects locate(uri) takes, each with its path under dest: the object at uri, or every object
        under it whose key keep() accepts, in key order. Runs inside s3_errors."""
        bucket, key = split_s3(uri)
        head = self._head(bucket, key) if key and not key.endswith("/") else None
        if head is not None:
            return [({"Key": key, "Size": head["ContentLength"], "ETag": head["ETag"]}, Path(key).name)]
        prefix = as_prefix(key)
        selected = [(obj, obj["Key"][len(prefix) :]) for obj in self._objects(bucket, prefix) if keep(obj["Key"])]
        return selected or nothing_under(uri)

    def _head(self, bucket: str, key: str) -> dict | None:
        """The object's HEAD response (ContentLength, ETag), or None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in MISSING:
                return None
            raise

    def _objects(self, bucket: str, prefix: str, markers: bool = False) -> list[dict]:
        """Every object under prefix (Key, Size, ETag) in key order; folder markers ("d/") only when asked."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = [obj for page in pages for obj in page.get("Contents", [])]
        return sorted((obj for obj in objects if markers or not obj["Key"].endswith("/")), key=lambda o: o["Key"])

    def _download(self, bucket: str, objects: list[dict], targets: list[Path]) -> None:
        from boto3.s3.transfer import ProgressCallbackInvoker

        with progress(total=sum(obj["Size"] for obj in objects), unit="B", unit_scale=True, desc="download") as bar:
            transfers = []
            for obj, target in zip(objects, targets):
                target.parent.mkdir(parents=True, exist_ok=True)
                future = self.transfers.download(
                    bucket, obj["Key"], str(target), subscribers=[ProgressCallbackInvoker(bar.update)]
                )
                transfers.append((f"s3://{bucket}/{obj['Key']}", future))
            self._wait(transfers)

    @staticmethod
    def _wait(transfers: list[tuple[str, object]]) -> None:
        """Waits for every (address, transfer future); the first failure cancels the rest and is raised as the
        job's error for its address."""
        try:
            for uri, future in transfers:
                with s3_errors(uri):
                    future.result()
        except BaseException:
            for _, future in transfers:
                future.cancel()
            raise
