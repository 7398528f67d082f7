"""Reading and writing s3:// and local locations, with the contract's exit codes for every failure.

boto3 does the work: the transfer manager for multipart transfers, the "standard" retry mode for
throttling and dropped connections (attempts from AWS_MAX_ATTEMPTS, default 3), and
AWS_ENDPOINT_URL_S3 for MinIO and other S3-compatible stores.
"""

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from job.errors import AccessDenied, ConfigInvalid, DatasetInvalid, InputNotFound, TemporaryFailure
from job.logs import progress

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz")
NOT_FOUND = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "AllAccessDisabled"}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


@contextmanager
def s3_errors(uri: str):
    """Turns boto3's exceptions into the job's, each naming the location and the fix."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError

    try:
        yield
    except NoCredentialsError:
        raise AccessDenied(
            f"{uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or give the pod an IAM role"
        ) from None
    except (ClientError, S3UploadFailedError) as exc:
        error = exc if isinstance(exc, ClientError) else exc.__context__
        if not isinstance(error, ClientError):
            raise
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            raise InputNotFound(f"{uri}: bucket {split_s3(uri)[0]!r} does not exist: check the bucket name") from None
        if code in NOT_FOUND:
            raise InputNotFound(f"{uri}: no such object: check the key") from None
        if code in DENIED:
            raise AccessDenied(
                f"{uri}: access denied ({code}): check the credentials and that their policy allows this bucket"
            ) from None
        if status >= 500 or code in {"SlowDown", "RequestTimeout", "Throttling"}:
            raise TemporaryFailure(f"{uri}: storage failed after retries ({code}): try again later") from None
        raise
    except ParamValidationError as exc:
        raise ConfigInvalid(
            f"{uri}: not a valid S3 address: check the bucket name ({str(exc).splitlines()[-1][:120]})"
        ) from None
    except BotoCoreError as exc:
        raise TemporaryFailure(
            f"{uri}: storage unreachable after retries ({exc}): check AWS_ENDPOINT_URL_S3 and the network"
        ) from None


class Storage:
    def __init__(self, settings):
        self.settings = settings
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            s = self.settings
            session = boto3.session.Session(
                aws_access_key_id=s.AWS_ACCESS_KEY_ID and s.AWS_ACCESS_KEY_ID.get_secret_value(),
                aws_secret_access_key=s.AWS_SECRET_ACCESS_KEY and s.AWS_SECRET_ACCESS_KEY.get_secret_value(),
                aws_session_token=s.AWS_SESSION_TOKEN and s.AWS_SESSION_TOKEN.get_secret_value(),
                region_name=s.AWS_REGION or s.AWS_DEFAULT_REGION,
            )
            self._client = session.client(
                "s3",
                endpoint_url=s.AWS_ENDPOINT_URL_S3 or s.AWS_ENDPOINT_URL,
                config=Config(retries={"mode": "standard"}, connect_timeout=10, read_timeout=120),
            )
        return self._client

    def fetch(self, uri: str, dest: Path, keep=is_data_file) -> list[tuple[str, Path]]:
        """(address, local path) of the file at uri, or of every file under it that keep(name) accepts,
        in key order. s3:// objects are downloaded into dest; local files are used where they are.
        The default keeps data files, skipping README, _SUCCESS and the like."""
        if not is_s3(uri):
            path = Path(uri)
            if path.is_file():
                return [(uri, path)]
            if not path.is_dir():
                raise InputNotFound(f"{uri}: no such file or folder: check the path")
            files = [p for p in sorted(path.rglob("*")) if p.is_file() and keep(p.name)]
            return [(str(p), p) for p in files] or self._nothing_under(uri)
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            size = self._size(bucket, key) if key and not key.endswith("/") else None
            if size is not None:
                return [(uri, self._download(bucket, key, size, dest / Path(key).name))]
            prefix = key.rstrip("/") + "/" if key else ""
            objects = [(k, n) for k, n in self._list(bucket, prefix) if not k.endswith("/") and keep(k)]
            targets = [safe_target(dest, k[len(prefix) :]) for k, _ in objects]
            fetched = [(f"s3://{bucket}/{k}", self._download(bucket, k, n, t)) for (k, n), t in zip(objects, targets)]
            return fetched or self._nothing_under(uri)

    @staticmethod
    def _nothing_under(uri: str):
        suffixes = ", ".join(DATA_SUFFIXES)
        raise InputNotFound(f"{uri}: no such object, and no data files ({suffixes}) under it: check the address")

    def _size(self, bucket: str, key: str) -> int | None:
        """The object's size in bytes, or None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in NOT_FOUND - {"NoSuchBucket"}:
                return None
            raise

    def _list(self, bucket: str, prefix: str) -> list[tuple[str, int]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted((obj["Key"], obj["Size"]) for page in pages for obj in page.get("Contents", []))

    def _download(self, bucket: str, key: str, size: int, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        with progress(total=size, unit="B", unit_scale=True, desc=f"download {key}") as bar:
            self.client.download_file(bucket, key, str(target), Callback=bar.update)
        return target

    def exists(self, uri: str) -> bool:
        if not is_s3(uri):
            return Path(uri).exists()
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            return self._size(bucket, key) is not None

    def put_tree(self, folder: Path, uri: str, skip: set[str] = frozenset()) -> None:
        """Copies every file under folder to uri, keeping relative paths; names in skip stay behind."""
        files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in skip]
        with progress(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="upload") as bar:
            for path in files:
                self.put_file(path, join(uri, path.relative_to(folder).as_posix()), bar.update)

    def put_file(self, path: Path, uri: str, callback=None) -> None:
        if not is_s3(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, uri)
            return
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            self.client.upload_file(str(path), bucket, key, Callback=callback)

    def delete(self, uri: str) -> None:
        """Removes the object or file at uri; nothing there is fine."""
        if not is_s3(uri):
            Path(uri).unlink(missing_ok=True)
            return
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            self.client.delete_object(Bucket=bucket, Key=key)

    def put_bytes(self, data: bytes, uri: str, if_absent: bool = False) -> bool:
        """Writes data to uri; with if_absent, only when nothing is there yet. False when something was."""
        if not is_s3(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(uri, "xb" if if_absent else "wb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        with s3_errors(uri):
            if not if_absent:
                self.client.put_object(Bucket=bucket, Key=key, Body=data)
                return True
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                    return False
                if code != "NotImplemented":
                    raise
            # Stores without conditional writes (older MinIO, Ceph): check, then write.
            log.warning("%s: the store ignores If-None-Match; checking for an existing object instead", uri)
            if self._size(bucket, key) is not None:
                return False
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
            return True


def safe_target(dest: Path, relative: str) -> Path:
    """dest/relative, refusing object keys (absolute, ../) that would land outside dest."""
    target = (dest / relative).resolve()
    if not relative or not target.is_relative_to(dest.resolve()):
        raise DatasetInvalid(
            f"object key {relative!r} would be written outside the scratch directory: rename the object"
        )
    return target
