"""Reading and writing s3:// and local locations, and reading hf://datasets/ ones, with the contract's exit codes for
every failure.

boto3 does the work: s3transfer's TransferManager for concurrent and multipart transfers, the "standard"
retry mode for throttling and dropped connections (attempts from AWS_MAX_ATTEMPTS, default 3), and
AWS_ENDPOINT_URL_S3 for MinIO and other S3-compatible stores. huggingface_hub reads Hub datasets (HF_TOKEN,
HF_ENDPOINT), its files pinned to the commit that the listing found.
"""

# Storage.list shadows the builtin in the class body, where annotations would otherwise be evaluated.
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from job.errors import AccessDenied, ConfigInvalid, DatasetInvalid, InputNotFound, TemporaryFailure, first_line
from job.logs import progress
from job.settings import HUB_ID

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz")
MISSING = {"NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "AllAccessDisabled"}
TEMPORARY = {"SlowDown", "RequestTimeout", "Throttling", "InternalError", "ServiceUnavailable"}
# A conditional write that did not hold; S3 answers If-Match on a missing object with NoSuchKey.
NOT_WRITTEN = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"}
MAX_CONCURRENCY = 8  # parallel requests per transfer; botocore's connection pool holds 10
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
HUB_TIMEOUT = 60  # seconds for the Hub's listing of a dataset; huggingface_hub would wait forever
# The datasets library's names of its splits (datasets.data_files.SPLIT_KEYWORDS): a file is in a split when a word of
# its path (cut at "/", "-", "_", ".", spaces and digits) is one of them; another split name stands for itself.
SPLITS = (("train", "training"), ("validation", "valid", "dev", "val"), ("test", "testing", "eval", "evaluation"))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def is_hub(uri: str) -> bool:
    return uri.startswith("hf://")


def split_hub(uri: str) -> tuple[str, str]:
    """(OWNER/NAME, path in the repo, "" for none) of hf://datasets/OWNER/NAME[/path]."""
    owner, name, path = (uri.removeprefix("hf://datasets/") + "//").split("/", 2)
    return f"{owner}/{name}", path.strip("/")


def in_split(path: str, split: str) -> bool:
    names = next((names for names in SPLITS if split.lower() in names), (split.lower(),))
    return not set(names).isdisjoint(re.split(r"[-._ 0-9/]+", path.lower()))


def hub_select(files: list[str], path: str, keep) -> list[str]:
    """The repo's files that hf://datasets/OWNER/NAME/path names, sorted: the file path; or the files under the folder
    path, or else those of the split path, that keep() accepts. Without a path: the train split, or when no file is
    named for it, every file that keep() accepts and that is not named for validation or test."""
    if path in files:
        return [path]
    kept = sorted(name for name in files if keep(name))
    if any(name.startswith(path + "/") for name in files):
        return [name for name in kept if name.startswith(path + "/")]
    if path:
        return [name for name in kept if in_split(name, path)]
    return [name for name in kept if in_split(name, "train")] or [
        name for name in kept if not in_split(name, "validation") and not in_split(name, "test")
    ]


def hub_token(settings) -> str | None:
    return settings.HF_TOKEN.get_secret_value() if settings.HF_TOKEN else None


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def as_prefix(key: str) -> str:
    """The listing prefix of everything under key: "d" and "d/" both mean "d/"; "" is the whole bucket."""
    return key.rstrip("/") + "/" if key else ""


def is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


def files_under(folder: Path) -> list[Path]:
    """Every file under folder, sorted; [] when there is no such folder."""
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def error_code(exc) -> str:
    return exc.response.get("Error", {}).get("Code", "")


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


@contextmanager
def hub_errors(where: str):
    """Turns huggingface_hub's exceptions, and the ones they wrap, into the job's; where: "DATASET_URI=hf://...".
    No server text goes into a 401 or 403 message."""
    import httpx
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except Exception as exc:
        chain = [exc]
        while chain[-1].__cause__ is not None:
            chain.append(chain[-1].__cause__)
        status = next(
            (e.response.status_code for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None
        )
        broken = next((e for e in chain if isinstance(e, httpx.TransportError)), None)
        if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
            raise ConfigInvalid(
                f"{where}: HF_HUB_OFFLINE=1 keeps the job off the Hub: unset it, or copy the dataset to s3:// or a path"
            ) from None
        if any(isinstance(e, GatedRepoError) for e in chain):
            raise AccessDenied(
                f"{where}: the dataset is gated ({status}): accept its terms on its Hub page, and set HF_TOKEN to a "
                "token of that account"
            ) from None
        if status in (401, 403):
            raise AccessDenied(
                f"{where}: the Hub refused access ({status}): the dataset is private, or HF_TOKEN is invalid, or there "
                "is no such dataset: check OWNER/NAME, and set HF_TOKEN to a token of an account with access"
            ) from None
        if status == 404:
            raise InputNotFound(f"{where}: not found on the Hub (404): check OWNER/NAME and the path") from None
        if broken is not None or (status or 0) >= 500 or status in (408, 429):
            reason = f"HTTP {status}" if status else first_line(broken, 200)
            raise TemporaryFailure(
                f"{where}: the Hub is unreachable ({reason}): check the network and HF_ENDPOINT, or try again later"
            ) from None
        raise


class Storage:
    def __init__(self, settings):
        self.settings = settings
        self._client = None
        self._transfers = None
        self._hub_listings = {}  # OWNER/NAME: its dataset_info, read once: the files identified are those downloaded

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

    @property
    def transfers(self):
        """boto3's managed transfer (s3transfer's TransferManager): many files at once, large ones in parts."""
        if self._transfers is None:
            from boto3.s3.transfer import TransferConfig, create_transfer_manager

            self._transfers = create_transfer_manager(self.client, TransferConfig(max_concurrency=MAX_CONCURRENCY))
        return self._transfers

    def fetch(self, uri: str, dest: Path, keep=is_data_file) -> list[tuple[str, Path]]:
        """(address, local path) of the file at uri, or of every file under it that keep(name) accepts,
        in key order. s3:// objects and hf://datasets/ files (hub_select) are downloaded into dest; local files
        are used where they are. The default keeps data files, skipping README, _SUCCESS and the like."""
        if is_hub(uri):
            return self._fetch_hub(uri, dest, keep)
        if not is_s3(uri):
            return self._select_local(uri, keep)
        bucket = split_s3(uri)[0]
        with s3_errors(uri):
            selected = self._select(uri, keep)
        targets = [safe_target(dest, relative) for _, relative in selected]
        objects = [obj for obj, _ in selected]
        self._download(bucket, objects, targets)
        return [(f"s3://{bucket}/{obj['Key']}", target) for obj, target in zip(objects, targets)]

    def identify(self, uri: str) -> list[dict]:
        """What fetch(uri) would return, without downloading it: s3 objects by ETag and size from the listing
        (or HEAD), Hub files by their LFS sha256 (else git blob id) and size, local files by sha256 and size."""
        if is_hub(uri):
            repo, _ = split_hub(uri)
            return [
                {"uri": f"hf://datasets/{repo}/{f.rfilename}", "bytes": f.size}
                | ({"sha256": f.lfs.sha256} if f.lfs else {"etag": f.blob_id})
                for f in self._hub_files(uri, is_data_file)[1]
            ]
        if not is_s3(uri):
            return [
                {"uri": source, "sha256": sha256_of(path), "bytes": path.stat().st_size}
                for source, path in self._select_local(uri, is_data_file)
            ]
        bucket = split_s3(uri)[0]
        with s3_errors(uri):
            selected = self._select(uri, is_data_file)
        return [
            {"uri": f"s3://{bucket}/{obj['Key']}", "etag": obj["ETag"].strip('"'), "bytes": obj["Size"]}
            for obj, _ in selected
        ]

    def _hub_files(self, uri: str, keep) -> tuple[str, list]:
        """The commit the Hub resolves the dataset's main branch to, and the RepoSibling (rfilename, size, blob_id,
        lfs) of each file that uri selects (hub_select), from one listing of the repo for the whole run."""
        from huggingface_hub import HfApi

        repo, path = split_hub(uri)
        if repo not in self._hub_listings:
            with hub_errors(self._named(uri)):
                self._hub_listings[repo] = HfApi().dataset_info(
                    repo, files_metadata=True, timeout=HUB_TIMEOUT, token=hub_token(self.settings)
                )
        info = self._hub_listings[repo]
        files = {f.rfilename: f for f in info.siblings or []}
        selected = hub_select(list(files), path, keep)
        if not selected:
            raise InputNotFound(
                f"{self._named(uri)}: no such file, folder or split in the dataset (commit {info.sha}), or no data "
                f"files ({', '.join(DATA_SUFFIXES)}) in it: check the path, or name a file, folder or split"
            )
        return info.sha, [files[name] for name in selected]

    def _fetch_hub(self, uri: str, dest: Path, keep) -> list[tuple[str, Path]]:
        from huggingface_hub import snapshot_download

        commit, files = self._hub_files(uri, keep)
        repo, names = split_hub(uri)[0], [f.rfilename for f in files]
        targets = [safe_target(dest, name) for name in names]
        log.info("%s: %d files of commit %s", uri, len(names), commit)
        with hub_errors(self._named(uri)):
            snapshot_download(
                repo, repo_type="dataset", revision=commit, allow_patterns=[glob.escape(name) for name in names],
                local_dir=dest, token=hub_token(self.settings), max_workers=MAX_CONCURRENCY,
            )  # fmt: skip
        return [(f"hf://datasets/{repo}/{name}", target) for name, target in zip(names, targets)]

    def _named(self, uri: str) -> str:
        """uri after the name of the setting that holds it (DATASET_URI=hf://...), for error messages."""
        name = next((n for n in ("DATASET_URI", "SAMPLE_PROMPTS_URI") if getattr(self.settings, n, None) == uri), None)
        return f"{name}={uri}" if name else uri

    def _select(self, uri: str, keep) -> list[tuple[dict, str]]:
        """The objects fetch(uri) takes, each with its path under dest: the object at uri, or every object
        under it whose key keep() accepts, in key order. Runs inside s3_errors."""
        bucket, key = split_s3(uri)
        head = self._head(bucket, key) if key and not key.endswith("/") else None
        if head is not None:
            return [({"Key": key, "Size": head["ContentLength"], "ETag": head["ETag"]}, Path(key).name)]
        prefix = as_prefix(key)
        selected = [(obj, obj["Key"][len(prefix) :]) for obj in self._objects(bucket, prefix) if keep(obj["Key"])]
        return selected or self._nothing_under(uri)

    @classmethod
    def _select_local(cls, uri: str, keep) -> list[tuple[str, Path]]:
        path = Path(uri)
        if path.is_file():
            return [(uri, path)]
        if not path.is_dir():
            hub_id = HUB_ID.fullmatch(uri) and not uri.endswith(DATA_SUFFIXES)
            hint = f", or for the Hub dataset give hf://datasets/{uri}" if hub_id else ""
            raise InputNotFound(f"{uri}: no such file or folder: check the path{hint}")
        return [(str(p), p) for p in files_under(path) if keep(p.name)] or cls._nothing_under(uri)

    @staticmethod
    def _nothing_under(uri: str):
        suffixes = ", ".join(DATA_SUFFIXES)
        raise InputNotFound(f"{uri}: no such object, and no data files ({suffixes}) under it: check the address")

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

    def exists(self, uri: str) -> bool:
        if not is_s3(uri):
            return Path(uri).exists()
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            return self._head(bucket, key) is not None

    def list(self, uri: str) -> list[str]:
        """Relative paths of every object or file under uri, sorted; [] when there are none."""
        if not is_s3(uri):
            return [p.relative_to(uri).as_posix() for p in files_under(Path(uri))]
        bucket, key = split_s3(uri)
        prefix = as_prefix(key)
        with s3_errors(uri):
            return [obj["Key"][len(prefix) :] for obj in self._objects(bucket, prefix)]

    def fetch_tree(self, uri: str, dest: Path) -> list[Path]:
        """Every file under uri downloaded (s3) or copied (local) into dest, keeping relative paths;
        [] when there are none."""
        if not is_s3(uri):
            sources = files_under(Path(uri))
            targets = [safe_target(dest, p.relative_to(uri).as_posix()) for p in sources]
            for source, target in zip(sources, targets):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            return targets
        bucket, key = split_s3(uri)
        prefix = as_prefix(key)
        with s3_errors(uri):
            objects = self._objects(bucket, prefix)
        targets = [safe_target(dest, obj["Key"][len(prefix) :]) for obj in objects]
        self._download(bucket, objects, targets)
        return targets

    def put_tree(self, folder: Path, uri: str, skip: set[str] = frozenset()) -> None:
        """Copies every file under folder to uri, keeping relative paths; names in skip stay behind."""
        from boto3.s3.transfer import ProgressCallbackInvoker

        names = [p.relative_to(folder).as_posix() for p in files_under(folder)]
        files = [(folder / name, join(uri, name)) for name in names if name not in skip]
        with progress(total=sum(p.stat().st_size for p, _ in files), unit="B", unit_scale=True, desc="upload") as bar:
            if not is_s3(uri):
                for path, target in files:
                    self.put_file(path, target)
                    bar.update(path.stat().st_size)
                return
            subscribers = [ProgressCallbackInvoker(bar.update)]
            self._wait([(t, self.transfers.upload(str(p), *split_s3(t), subscribers=subscribers)) for p, t in files])

    def put_file(self, path: Path, uri: str, callback=None) -> None:
        if not is_s3(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, uri)
            return
        from boto3.s3.transfer import ProgressCallbackInvoker

        subscribers = [ProgressCallbackInvoker(callback)] if callback else None
        self._wait([(uri, self.transfers.upload(str(path), *split_s3(uri), subscribers=subscribers))])

    def delete(self, uri: str) -> None:
        """Removes the object or file at uri; nothing there is fine."""
        if not is_s3(uri):
            Path(uri).unlink(missing_ok=True)
            return
        bucket, key = split_s3(uri)
        with s3_errors(uri):
            self.client.delete_object(Bucket=bucket, Key=key)

    def delete_tree(self, uri: str) -> None:
        """Removes every object under the prefix uri, or the local folder; nothing there is fine."""
        if not is_s3(uri):
            if Path(uri).exists():
                shutil.rmtree(uri)
            return
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
        """The content at uri and its version token for put_bytes(if_match=...): the ETag (s3) or the sha256
        (local); None when there is nothing there."""
        if not is_s3(uri):
            try:
                data = Path(uri).read_bytes()
            except FileNotFoundError:
                return None
            return data, hashlib.sha256(data).hexdigest()
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        with s3_errors(uri):
            try:
                response = self.client.get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if error_code(exc) in MISSING:
                    return None
                raise
            return response["Body"].read(), response["ETag"].strip('"')

    def put_bytes(self, data: bytes, uri: str, if_absent: bool = False, if_match: str | None = None) -> bool:
        """Writes data to uri. With if_absent, only when nothing is there yet; with if_match, only when the
        current version token (get_bytes) equals it. False when the condition did not hold, unless the object
        holds exactly data already (as after a retried write whose first answer was lost)."""
        if not is_s3(uri):
            return write_local(Path(uri), data, if_absent, if_match)
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        condition = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": f'"{if_match}"'} if if_match else {}
        with s3_errors(uri):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
                return True
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
            current = head and head["ETag"].strip('"')
            if current != (None if if_absent else if_match):
                return False
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
            return True

    def _holds(self, bucket: str, key: str, data: bytes) -> bool:
        """Whether the object is data already; a single-part PUT's ETag is the MD5 of its bytes (without KMS)."""
        head = self._head(bucket, key)
        return head is not None and head["ETag"].strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest()


def write_local(path: Path, data: bytes, if_absent: bool = False, if_match: str | None = None) -> bool:
    """Writes data to path through a temporary file, so that readers never see half a file. With if_absent, only
    when the file does not exist; with if_match, only when its sha256 equals if_match (compared, then replaced:
    one writer per folder)."""
    if if_match is not None and (not path.is_file() or sha256_of(path) != if_match):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_bytes(data)
    try:
        if if_absent:
            os.link(temp, path)  # fails when path exists, where os.replace would overwrite it
        else:
            os.replace(temp, path)
        return True
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)


def safe_target(dest: Path, relative: str) -> Path:
    """dest/relative, refusing object keys (absolute, ../) that would land outside dest."""
    target = (dest / relative).resolve()
    if not relative or not target.is_relative_to(dest.resolve()):
        raise DatasetInvalid(
            f"object key {relative!r} would be written outside the scratch directory: rename the object"
        )
    return target
