"""hf://datasets/OWNER/NAME[/path or /SPLIT], read-only: huggingface_hub lists the dataset once (HF_TOKEN,
HF_ENDPOINT) and downloads its files pinned to the commit that the listing found. classify_hub_error maps the Hub's
failures to the job's exit codes, for datasets here and for BASE_MODEL in job/model.py."""

import glob
import logging
import re
from contextlib import contextmanager
from pathlib import Path

from job.errors import AccessDenied, ConfigInvalid, InputNotFound, JobError, TemporaryFailure, first_line
from job.storage import DATA_SUFFIXES, MAX_CONCURRENCY, hub_token, is_data_file, safe_target, split_hub

log = logging.getLogger(__name__)

HUB_TIMEOUT = 60  # seconds for the Hub's listing of a dataset; huggingface_hub would wait forever
# The datasets library's names of its splits (datasets.data_files.SPLIT_KEYWORDS): a file is in a split when a word of
# its path (cut at "/", "-", "_", ".", spaces and digits) is one of them; another split name stands for itself.
SPLITS = (("train", "training"), ("validation", "valid", "dev", "val"), ("test", "testing", "eval", "evaluation"))


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


def classify_hub_error(exc: Exception, where: str, what: str) -> JobError | None:
    """The job's error for exc, raised by huggingface_hub or by a library that wraps its errors (transformers raises
    OSError from them, the Hub's error its __cause__); None when exc is no failure of the Hub. where names the setting,
    "DATASET_URI=hf://..." or "BASE_MODEL=org/name"; what is the repo's kind, "dataset" or "model". No server text goes
    into a 401 or 403 message."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    status = next(
        (e.response.status_code for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None
    )
    broken = next((e for e in chain if isinstance(e, httpx.TransportError)), None)
    # HfApi raises OfflineModeIsEnabled; a file download finds nothing in the cache and says LocalEntryNotFoundError.
    uncached = any(isinstance(e, OfflineModeIsEnabled | LocalEntryNotFoundError) for e in chain)
    if uncached and constants.is_offline_mode():
        return ConfigInvalid(
            f"{where}: HF_HUB_OFFLINE=1 keeps the job off the Hub: unset it, or copy the {what} to s3:// or a path"
        )
    if any(isinstance(e, GatedRepoError) for e in chain):
        return AccessDenied(
            f"{where}: the {what} is gated ({status}): accept its terms on its Hub page, and set HF_TOKEN to a token "
            "of that account"
        )
    if status in (401, 403):
        return AccessDenied(
            f"{where}: the Hub refused access ({status}): the {what} is private, or HF_TOKEN is invalid, or there is "
            f"no such {what}: check OWNER/NAME, and set HF_TOKEN to a token of an account with access"
        )
    if status == 404:
        return InputNotFound(f"{where}: not found on the Hub (404): check OWNER/NAME")
    if broken is not None or (status or 0) >= 500 or status in (408, 429):
        reason = f"HTTP {status}" if status else first_line(broken, 200)
        return TemporaryFailure(
            f"{where}: the Hub is unreachable ({reason}): check the network and HF_ENDPOINT, or try again later"
        )
    return None


@contextmanager
def hub_errors(where: str, what: str = "dataset"):
    """Raises the job's error (classify_hub_error) for a failure of the Hub inside."""
    try:
        yield
    except Exception as exc:
        error = classify_hub_error(exc, where, what)
        if error is None:
            raise
        raise error from None


class Hub:
    def __init__(self, settings):
        self.settings = settings
        self._listings = {}  # OWNER/NAME: its dataset_info, read once: the files identified are those downloaded

    def locate(self, uri: str, dest: Path, keep) -> list[tuple[str, Path]]:
        """The files that uri selects (hub_select), downloaded into dest."""
        from huggingface_hub import snapshot_download

        commit, files = self._files(uri, keep)
        repo, names = split_hub(uri)[0], [f.rfilename for f in files]
        targets = [safe_target(dest, name) for name in names]
        log.info("%s: %d files of commit %s", uri, len(names), commit)
        with hub_errors(self._named(uri)):
            snapshot_download(
                repo, repo_type="dataset", revision=commit, allow_patterns=[glob.escape(name) for name in names],
                local_dir=dest, token=hub_token(self.settings), max_workers=MAX_CONCURRENCY,
            )  # fmt: skip
        return [(f"hf://datasets/{repo}/{name}", target) for name, target in zip(names, targets)]

    def identify(self, uri: str) -> list[dict]:
        repo, _ = split_hub(uri)
        return [
            {"uri": f"hf://datasets/{repo}/{f.rfilename}", "bytes": f.size}
            | ({"sha256": f.lfs.sha256} if f.lfs else {"etag": f.blob_id})
            for f in self._files(uri, is_data_file)[1]
        ]

    def _files(self, uri: str, keep) -> tuple[str, list]:
        """The commit the Hub resolves the dataset's main branch to, and the RepoSibling (rfilename, size, blob_id,
        lfs) of each file that uri selects (hub_select), from one listing of the repo for the whole run."""
        from huggingface_hub import HfApi

        repo, path = split_hub(uri)
        if repo not in self._listings:
            with hub_errors(self._named(uri)):
                self._listings[repo] = HfApi().dataset_info(
                    repo, files_metadata=True, timeout=HUB_TIMEOUT, token=hub_token(self.settings)
                )
        info = self._listings[repo]
        files = {f.rfilename: f for f in info.siblings or []}
        selected = hub_select(list(files), path, keep)
        if not selected:
            raise InputNotFound(
                f"{self._named(uri)}: no such file, folder or split in the dataset (commit {info.sha}), or no data "
                f"files ({', '.join(DATA_SUFFIXES)}) in it: check the path, or name a file, folder or split"
            )
        return info.sha, [files[name] for name in selected]

    def _named(self, uri: str) -> str:
        """uri after the name of the setting that holds it (DATASET_URI=hf://...), for error messages."""
        name = next((n for n in ("DATASET_URI", "SAMPLE_PROMPTS_URI") if getattr(self.settings, n, None) == uri), None)
        return f"{name}={uri}" if name else uri
