"""Reading and writing s3:// and local locations, and reading hf://datasets/ ones, with the contract's exit codes for
every failure.

Storage hands each call to the backend of the uri's scheme: s3.py (boto3), hub.py (huggingface_hub, read-only) and
local.py (a path: a mounted volume or the scratch disk). This module holds the helpers they share.
"""

# Storage.list shadows the builtin in the class body, where annotations would otherwise be evaluated.
from __future__ import annotations

import hashlib
from pathlib import Path

from job.errors import DatasetInvalid, InputNotFound
from job.logs import progress

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz")
MAX_CONCURRENCY = 8  # parallel requests per transfer (s3.py sizes botocore's connection pool for them)


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


def hub_token(settings) -> str | None:
    return settings.HF_TOKEN.get_secret_value() if settings.HF_TOKEN else None


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


def files_under(folder: Path) -> list[Path]:
    """Every file under folder, sorted; [] when there is no such folder."""
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe_file(path: Path, name: str) -> dict:
    """A file as manifests list it: its name there, its size and sha256."""
    return {"path": name, "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def safe_target(dest: Path, relative: str) -> Path:
    """dest/relative, refusing object keys (absolute, ../) that would land outside dest."""
    target = (dest / relative).resolve()
    if not relative or not target.is_relative_to(dest.resolve()):
        raise DatasetInvalid(
            f"object key {relative!r} would be written outside the scratch directory: rename the object"
        )
    return target


def nothing_under(uri: str):
    suffixes = ", ".join(DATA_SUFFIXES)
    raise InputNotFound(f"{uri}: no such object, and no data files ({suffixes}) under it: check the address")


class Storage:
    """Every location the job reads or writes, by address: s3://bucket/key, hf://datasets/OWNER/NAME[/path] (read
    only: the settings refuse it where the job writes), or else a local path."""

    def __init__(self, settings):
        from job.storage.hub import Hub
        from job.storage.local import Local
        from job.storage.s3 import S3

        self.s3, self.hub, self.local = S3(settings), Hub(settings), Local()

    def _backend(self, uri: str):
        return self.s3 if is_s3(uri) else self.hub if is_hub(uri) else self.local

    def locate(self, uri: str, dest: Path, keep=is_data_file) -> list[tuple[str, Path]]:
        """(address, local path) of the file at uri, or of every file under it that keep(name) accepts, in key
        order: remote files downloaded into dest, local ones used where they are. The default keeps data files,
        skipping README, _SUCCESS and the like."""
        return self._backend(uri).locate(uri, dest, keep)

    def identify(self, uri: str) -> list[dict]:
        """What locate(uri) would return, without downloading it: s3 objects by ETag and size from the listing
        (or HEAD), Hub files by their LFS sha256 (else git blob id) and size, local files by sha256 and size."""
        return self._backend(uri).identify(uri)

    def exists(self, uri: str) -> bool:
        return self._backend(uri).exists(uri)

    def list(self, uri: str) -> list[str]:
        """Relative paths of every object or file under uri, sorted; [] when there are none."""
        return self._backend(uri).list(uri)

    def copy_tree(self, uri: str, dest: Path) -> list[Path]:
        """Every file under uri downloaded or copied into dest, keeping relative paths; [] when there are none."""
        return self._backend(uri).copy_tree(uri, dest)

    def put_tree(self, folder: Path, uri: str) -> None:
        """Copies every file under folder to uri, keeping relative paths."""
        files = [(path, join(uri, path.relative_to(folder).as_posix())) for path in files_under(folder)]
        with progress(total=sum(p.stat().st_size for p, _ in files), unit="B", unit_scale=True, desc="upload") as bar:
            self._backend(uri).put_files(files, bar.update)

    def delete(self, uri: str) -> None:
        """Removes the object or file at uri; nothing there is fine."""
        self._backend(uri).delete(uri)

    def delete_tree(self, uri: str) -> None:
        """Removes every object under the prefix uri, or the local folder; nothing there is fine."""
        self._backend(uri).delete_tree(uri)

    def get_bytes(self, uri: str) -> tuple[bytes, str] | None:
        """The content at uri and its version token for put_bytes(if_match=...): the ETag (s3) or the sha256
        (local); None when there is nothing there."""
        return self._backend(uri).get_bytes(uri)

    def put_bytes(self, data: bytes, uri: str, if_absent: bool = False, if_match: str | None = None) -> str | None:
        """Writes data to uri and returns its new version token (as get_bytes gives it). With if_absent, only when
        nothing is there yet; with if_match, only when the current version token equals it. None when the
        condition did not hold, unless the object holds exactly data already (as after a retried write whose first
        answer was lost)."""
        return self._backend(uri).put_bytes(data, uri, if_absent, if_match)
