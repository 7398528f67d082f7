"""Local paths: a mounted volume, or the scratch disk in tests and dry runs."""

# Local.list shadows the builtin in the class body, where annotations would otherwise be evaluated.
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from job.errors import InputNotFound
from job.settings import HUB_ID
from job.storage import DATA_SUFFIXES, files_under, is_data_file, nothing_under, safe_target, sha256_of


class Local:
    def locate(self, uri: str, dest: Path, keep) -> list[tuple[str, Path]]:
        """The file at uri, or the files under it that keep() accepts, where they are (dest is not used)."""
        path = Path(uri)
        if path.is_file():
            return [(uri, path)]
        if not path.is_dir():
            hub_id = HUB_ID.fullmatch(uri) and not uri.endswith(DATA_SUFFIXES)
            hint = f", or for the Hub dataset give hf://datasets/{uri}" if hub_id else ""
            raise InputNotFound(f"{uri}: no such file or folder: check the path{hint}")
        return [(str(p), p) for p in files_under(path) if keep(p.name)] or nothing_under(uri)

    def identify(self, uri: str) -> list[dict]:
        return [
            {"uri": source, "sha256": sha256_of(path), "bytes": path.stat().st_size}
            for source, path in self.locate(uri, Path(), is_data_file)
        ]

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def list(self, uri: str) -> list[str]:
        return [p.relative_to(uri).as_posix() for p in files_under(Path(uri))]

    def copy_tree(self, uri: str, dest: Path) -> list[Path]:
        sources = files_under(Path(uri))
        targets = [safe_target(dest, p.relative_to(uri).as_posix()) for p in sources]
        for source, target in zip(sources, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        return targets

    def put_files(self, files: list[tuple[Path, str]], update) -> None:
        """Copies each (file, path); update(bytes) counts them."""
        for path, target in files:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            update(path.stat().st_size)

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    def delete_tree(self, uri: str) -> None:
        if Path(uri).exists():
            shutil.rmtree(uri)

    def get_bytes(self, uri: str) -> tuple[bytes, str] | None:
        try:
            data = Path(uri).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put_bytes(self, data: bytes, uri: str, if_absent: bool, if_match: str | None) -> str | None:
        """Writes through a temporary file, so that readers never see half a file. if_match compares the sha256,
        then replaces: one writer per folder."""
        path = Path(uri)
        if if_match is not None and (not path.is_file() or sha256_of(path) != if_match):
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        temp.write_bytes(data)
        try:
            if if_absent:
                os.link(temp, path)  # fails when path exists, where os.replace would overwrite it
            else:
                os.replace(temp, path)
            return hashlib.sha256(data).hexdigest()
        except FileExistsError:
            return None
        finally:
            temp.unlink(missing_ok=True)
