"""DATASET_URI=hf://datasets/OWNER/NAME[/path or /SPLIT]: the address checks, the selection of files, and the real entry
point as a subprocess against a fake Hub on loopback (HF_ENDPOINT), which answers what huggingface_hub asks for a
dataset's listing and download."""

import hashlib
import io
import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
import pytest

from job.errors import ConfigInvalid
from job.settings import Settings, read_settings
from job.storage import is_data_file
from job.storage.hub import hub_select as select
from tests.conftest import DEMO_DATA, Loopback, error_line, free_port, jsonl, log_lines

ROWS = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()][:24]
TOKEN = "hf_fake_hub_token_of_the_tests"  # the one token the fake Hub accepts for private datasets
CANARY = "hf_canary_b8f3c1d2e5a4"  # a token it refuses; it must show nowhere
REQUIRED = {"DATASET_URI": "s3://data/train.jsonl", "OUTPUT_URI": "s3://out/runs"}


def parquet(rows) -> bytes:
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer)
    return buffer.getvalue()


class FakeHub(Loopback):
    """A Hub on loopback that serves datasets added with add(): GET /api/datasets/OWNER/NAME (the listing with
    ?blobs=true), GET /api/datasets/OWNER/NAME/tree/REV (recursive), HEAD and GET
    /datasets/OWNER/NAME/resolve/REV/PATH, with the Hub's headers (X-Repo-Commit, ETag, Content-Length, X-Error-Code).
    .parquet files are stored as LFS (their ETag is the content's sha256), others in git (their blob id).
    A private dataset answers 401 without TOKEN (X-Error-Code RepoNotFound, as the Hub does) and 401 "Invalid
    credentials" with another token; a gated one 403 GatedRepo; a broken one 503; a missing one 404 RepoNotFound.
    requests lists "METHOD path Authorization" of each request."""

    def __init__(self):
        self.repos, self.private, self.gated, self.broken, self.requests = {}, set(), set(), set(), []
        super().__init__(_HubHandler)

    def add(self, repo: str, files: dict[str, bytes], private: bool = False, gated: bool = False) -> str:
        self.repos[repo] = files
        if private:
            self.private.add(repo)
        if gated:
            self.gated.add(repo)
        return self.commit(repo)

    def commit(self, repo: str) -> str:
        return hashlib.sha1(repr(sorted(self.repos[repo].items())).encode()).hexdigest()

    @staticmethod
    def entry(path: str, data: bytes) -> dict:
        """The tree listing's entry of a file: git blob id, size, and for LFS the sha256."""
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
        if path.endswith(".parquet"):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        hub: FakeHub = self.server.owner
        auth = self.headers.get("Authorization", "")
        hub.requests.append(f"{self.command} {self.path} {auth}")
        parts = unquote(urlsplit(self.path).path).strip("/").split("/")
        api = parts[0] == "api"
        if parts[api] != "datasets" or len(parts) < 3 + api:
            return self.answer(404, {"X-Error-Code": "RepoNotFound"})
        repo, rest = "/".join(parts[1 + api : 3 + api]), parts[3 + api :]
        if repo in hub.broken:
            return self.answer(503)
        if repo not in hub.repos:
            return self.answer(404, {"X-Error-Code": "RepoNotFound"})
        if repo in hub.private and auth != f"Bearer {TOKEN}":
            invalid = {"X-Error-Message": "Invalid credentials in Authorization header"}
            return self.answer(401, invalid if auth else {"X-Error-Code": "RepoNotFound"})
        if repo in hub.gated:
            return self.answer(403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is gated"})
        files, commit = hub.repos[repo], hub.commit(repo)
        if api and not rest:
            siblings = [
                {"rfilename": e["path"], "size": e["size"], "blobId": e["oid"]}
                | ({"lfs": {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}} if "lfs" in e else {})
                for e in (FakeHub.entry(path, data) for path, data in sorted(files.items()))
            ]
            return self.answer(200, body=json.dumps({"id": repo, "sha": commit, "siblings": siblings}).encode())
        if api and rest[0] == "tree":
            listing = [FakeHub.entry(path, data) for path, data in sorted(files.items())]
            return self.answer(200, body=json.dumps(listing).encode())
        path = "/".join(rest[2:])
        if api or rest[0] != "resolve" or rest[1] not in ("main", commit) or path not in files:
            return self.answer(404, {"X-Error-Code": "EntryNotFound"})
        entry = FakeHub.entry(path, files[path])
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        self.answer(200, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, files[path])

    do_HEAD = do_GET

    def answer(self, status: int, headers: dict | None = None, body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture
def hub():
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def run_hub_job(run_job, hub, tiny_model_dir, tmp_path):
    """Runs the entry point against the fake Hub, online, with a local BASE_MODEL and OUTPUT_URI (tmp_path/runs)."""

    def run(env: dict):
        base = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": None, "BASE_MODEL": str(tiny_model_dir),
                "OUTPUT_URI": str(tmp_path / "runs"), "DRY_RUN": "true", "NUM_SAMPLE_PROMPTS": "2",
                "MAX_NEW_TOKENS": "4"}  # fmt: skip
        return run_job(base | env)

    return run


def outputs(tmp_path: Path) -> dict[str, str]:
    """Every file the run wrote under OUTPUT_URI, by path relative to it (text, undecodable bytes replaced)."""
    root = tmp_path / "runs"
    return {p.relative_to(root).as_posix(): p.read_text(errors="replace") for p in root.rglob("*") if p.is_file()}


def test_a_jsonl_dataset_of_a_private_repo_trains_end_to_end(run_hub_job, hub, tmp_path):
    body, prompts = jsonl(ROWS).encode(), jsonl([{"prompt": "What is 2 + 2?", "reference": "4"}]).encode()
    commit = hub.add("acme/support", {"README.md": b"# card\n", ".gitattributes": b"*.parquet lfs\n",
                                      "data/train.jsonl": body, "prompts.jsonl": prompts}, private=True)  # fmt: skip
    result = run_hub_job({"DATASET_URI": "hf://datasets/acme/support", "HF_TOKEN": TOKEN,
                          "SAMPLE_PROMPTS_URI": "hf://datasets/acme/support/prompts.jsonl"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    files = outputs(tmp_path)
    [manifest] = [json.loads(text) for name, text in files.items() if name.endswith("/manifest.json")]
    [config] = [json.loads(text) for name, text in files.items() if name.endswith("/config.json")]
    [listed] = manifest["dataset"]["files"]
    assert listed["path"] == "hf://datasets/acme/support/data/train.jsonl"
    assert listed["sha256"] == hashlib.sha256(body).hexdigest() and manifest["dataset"]["rows"] == len(ROWS)
    # The run's identity: the Hub's listing of the file (git blob id and size), not its download.
    assert config["DATASET_FILES"] == [
        {"uri": "hf://datasets/acme/support/data/train.jsonl", "etag": git_blob_id(body), "bytes": len(body)}
    ]
    [samples] = [text for name, text in files.items() if name.endswith("/samples.jsonl")]
    assert [json.loads(line)["reference"] for line in samples.splitlines()] == ["4"]
    downloads = sorted({r.split(" ", 1)[1] for r in hub.requests if "/resolve/" in r})
    assert downloads == [f"/datasets/acme/support/resolve/{commit}/{name} Bearer {TOKEN}"
                         for name in ("data/train.jsonl", "prompts.jsonl")]  # fmt: skip
    assert all(TOKEN not in text for text in files.values()) and TOKEN not in result.stderr


def test_a_split_of_a_sharded_parquet_dataset_trains_end_to_end(run_hub_job, hub, tmp_path):
    shards = {"data/train-00000-of-00002.parquet": parquet(ROWS[:10]),
              "data/train-00001-of-00002.parquet": parquet(ROWS[10:20]),
              "data/test-00000-of-00001.parquet": parquet(ROWS[20:])}  # fmt: skip
    hub.add("acme/shards", shards)
    result = run_hub_job({"DATASET_URI": "hf://datasets/acme/shards/train", "EVAL_FRACTION": "0.1"})
    assert result.returncode == 0, result.stderr[-4000:]
    files = outputs(tmp_path)
    [manifest] = [json.loads(text) for name, text in files.items() if name.endswith("/manifest.json")]
    [config] = [json.loads(text) for name, text in files.items() if name.endswith("/config.json")]
    train = sorted(name for name in shards if "/train-" in name)
    assert [f["path"] for f in manifest["dataset"]["files"]] == [f"hf://datasets/acme/shards/{n}" for n in train]
    assert [f["sha256"] for f in manifest["dataset"]["files"]] == [hashlib.sha256(shards[n]).hexdigest() for n in train]
    assert manifest["dataset"]["rows"] == 20 and manifest["dataset"]["format"] == "alpaca"
    # LFS files are identified by the sha256 the Hub lists for them.
    assert [f["sha256"] for f in config["DATASET_FILES"]] == [hashlib.sha256(shards[n]).hexdigest() for n in train]
    assert not any("test-00000" in r for r in hub.requests)
    listings = [r for r in hub.requests if r.split()[1].split("?")[0] == "/api/datasets/acme/shards"]
    assert len(listings) == 1, hub.requests  # the identity's listing is the download's


FILES = ["README.md", "data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet",
         "data/test-00000-of-00001.parquet", "extra/notes.txt", "extra/more.jsonl", "dev.jsonl"]  # fmt: skip


@pytest.mark.parametrize(
    ("files", "path", "expected"),
    [(FILES, "", ["data/train-00000-of-00001.parquet"]),
     (FILES, "train", ["data/train-00000-of-00001.parquet"]),
     (FILES, "validation", ["data/validation-00000-of-00001.parquet", "dev.jsonl"]),
     (FILES, "val", ["data/validation-00000-of-00001.parquet", "dev.jsonl"]),
     (FILES, "test", ["data/test-00000-of-00001.parquet"]),
     (FILES, "extra", ["extra/more.jsonl"]),
     (FILES, "extra/notes.txt", ["extra/notes.txt"]),
     (FILES, "data/test-00000-of-00001.parquet", ["data/test-00000-of-00001.parquet"]),
     (FILES, "nosuch", []), (FILES, "extra/nosuch.jsonl", []), (FILES, "README", []),
     (["train.jsonl", "test.jsonl"], "", ["train.jsonl"]),
     (["training/a.csv", "training/b.csv", "eval/c.csv"], "", ["training/a.csv", "training/b.csv"]),
     (["alpaca_data_cleaned.json", "README.md"], "", ["alpaca_data_cleaned.json"]),
     (["data.jsonl", "test.jsonl"], "", ["data.jsonl"]),
     (["test.jsonl", "validation.jsonl"], "", []),
     (["data/custom-00000-of-00001.parquet", "data/train-00000-of-00001.parquet"], "custom",
      ["data/custom-00000-of-00001.parquet"])],
)  # fmt: skip
def test_an_address_selects_a_file_a_folder_or_a_split(files, path, expected):
    assert select(files, path, is_data_file) == expected


@pytest.mark.parametrize(
    ("env", "code", "texts"),
    [({"DATASET_URI": "hf://datasets/acme/missing", "HF_TOKEN": TOKEN}, 66, ["404", "check OWNER/NAME"]),
     ({"DATASET_URI": "hf://datasets/acme/private/nosuch.jsonl", "HF_TOKEN": TOKEN}, 66,
      ["no such file, folder or split"]),
     ({"DATASET_URI": "hf://datasets/acme/private"}, 77, ["(401)", "set HF_TOKEN"]),
     ({"DATASET_URI": "hf://datasets/acme/private", "HF_TOKEN": CANARY}, 77, ["(401)", "set HF_TOKEN"]),
     ({"DATASET_URI": "hf://datasets/acme/gated", "HF_TOKEN": CANARY}, 77,
      ["gated (403)", "accept its terms", "HF_TOKEN"]),
     ({"DATASET_URI": "hf://datasets/acme/broken"}, 75, ["unreachable (HTTP 503)", "try again later"]),
     ({"DATASET_URI": "hf://datasets/acme/private", "HF_HUB_OFFLINE": "1"}, 78, ["HF_HUB_OFFLINE=1", "unset it"])],
)  # fmt: skip
def test_hub_failures_exit_with_the_contracts_codes_and_never_show_the_token(run_hub_job, hub, tmp_path, env, code,
                                                                               texts):  # fmt: skip
    hub.add("acme/private", {"train.jsonl": jsonl(ROWS).encode()}, private=True)
    hub.add("acme/gated", {"train.jsonl": jsonl(ROWS).encode()}, gated=True)
    hub.add("acme/broken", {"train.jsonl": jsonl(ROWS).encode()})
    hub.broken.add("acme/broken")
    result = run_hub_job(env | {"RUN_ID": "failing"})
    message = error_line(result)
    assert result.returncode == code, result.stderr[-3000:]
    assert message.startswith(f"DATASET_URI={env['DATASET_URI']}: ")
    assert all(text in message for text in texts), message
    failure = json.loads((tmp_path / "runs" / "failing" / "failure.json").read_text())
    assert failure["exit_code"] == code and failure["message"] == message
    if env.get("HF_TOKEN") == CANARY:  # the Hub was sent the token, and it is nowhere in what the job wrote
        assert any(f"Bearer {CANARY}" in r for r in hub.requests)
    assert all(CANARY not in text for text in [result.stderr, result.stdout, *outputs(tmp_path).values()])


def test_an_unreachable_hub_is_a_temporary_failure_at_once(run_hub_job, tmp_path):
    started = time.monotonic()
    result = run_hub_job({"DATASET_URI": "hf://datasets/acme/data", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert result.returncode == 75, result.stderr[-3000:]
    assert time.monotonic() - started < 30
    message = error_line(result)
    assert message.startswith("DATASET_URI=hf://datasets/acme/data: the Hub is unreachable (")
    assert "check the network and HF_ENDPOINT" in message


class StatusHub(Loopback):
    """A Hub stand-in that answers every request with one status, as the Hub does for a model it will not serve:
    401 and 404 with X-Error-Code RepoNotFound; 503 with Retry-After: 0, so that huggingface_hub's five retries of each
    file come 1 s apart (its own backoff waits 1, 2, 4, 8 and 8 s). requests lists "METHOD path" of each request."""

    def __init__(self, status: int):
        self.status, self.requests = status, []
        super().__init__(_StatusHandler)


class _StatusHandler(_HubHandler):
    def do_GET(self):
        self.server.owner.requests.append(f"{self.command} {self.path}")
        status = self.server.owner.status
        self.answer(status, {"Retry-After": "0"} if status == 503 else {"X-Error-Code": "RepoNotFound"})

    do_HEAD = do_GET


@pytest.mark.parametrize(
    ("hub_answers", "code", "texts"),
    # Nothing listening takes ~50 s: huggingface_hub retries each of two files 5 times, 1 to 8 s apart, unbounded by
    # any setting; the job keeps those retries, which ride out a short outage of the real Hub.
    [("nothing", 75, ["the Hub is unreachable (", "check the network and HF_ENDPOINT, or try again later"]),
     (503, 75, ["the Hub is unreachable (HTTP 503)", "try again later"]),
     (404, 66, ["not found on the Hub (404)", "check OWNER/NAME"]),
     (401, 77, ["the Hub refused access (401)", "the model is private", "set HF_TOKEN"]),
     ("offline", 78, ["HF_HUB_OFFLINE=1 keeps the job off the Hub", "unset it, or copy the model to s3://"])],
)  # fmt: skip
def test_base_model_hub_failures_exit_with_the_codes_of_datasets(run_hub_job, tmp_path, hub_answers, code, texts):
    """BASE_MODEL=acme/model trained for real on CPU (a dry run carries on without the Hub): a closed port or a 503 is
    an outage (75, which Kubernetes retries), 404 no such model (66), 401 denied (77); HF_HUB_OFFLINE=1 with the model
    not in the cache a configuration error (78)."""
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(jsonl(ROWS))
    env = {"BASE_MODEL": "acme/model", "DATASET_URI": str(dataset), "DRY_RUN": "false", "TRAIN_BACKEND": "hf",
           "LOAD_IN_4BIT": "false", "OPTIMIZER": "adamw_torch", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HUB_OFFLINE": "1" if hub_answers == "offline" else None}  # fmt: skip
    if isinstance(hub_answers, int):
        with StatusHub(hub_answers) as hub:
            result = run_hub_job(env | {"HF_ENDPOINT": hub.endpoint})
    else:
        result = run_hub_job(env)
    assert result.returncode == code, result.stderr[-3000:]
    message = error_line(result)
    assert message.startswith("BASE_MODEL=acme/model: ") and all(text in message for text in texts), message


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment (no setting set) in an empty working directory; env(NAME=value) sets variables."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return lambda **values: [monkeypatch.setenv(name, value) for name, value in values.items()]


@pytest.mark.parametrize("name", ["DATASET_URI", "SAMPLE_PROMPTS_URI"])
@pytest.mark.parametrize(
    "value", ["hf://datasets/acme/support", "hf://datasets/acme/support/", "hf://datasets/acme/support/train",
              "hf://datasets/acme/support/data/train-00000-of-00001.parquet", "hf://datasets/a-b/c_d.e/x/y.jsonl"]
)  # fmt: skip
def test_hub_dataset_addresses_are_accepted(env, name, value):
    env(**REQUIRED | {name: value})
    assert getattr(read_settings(), name) == value


@pytest.mark.parametrize("name", ["DATASET_URI", "SAMPLE_PROMPTS_URI"])
@pytest.mark.parametrize(
    "value", ["hf://acme/support", "hf://models/acme/llama", "hf://datasets/acme", "hf://datasets/acme/",
              "hf://datasets//support", "hf://datasets/acme/sup port", "hf://datasets/acme/support@main",
              "hf://spaces/acme/demo", "hf:/datasets/acme/support", "hf://datasets/-x/y"]
)  # fmt: skip
def test_other_hub_addresses_are_configuration_errors(env, name, value):
    env(**REQUIRED | {name: value})
    with pytest.raises(ConfigInvalid) as error:
        read_settings()
    message = str(error.value)
    assert error.value.exit_code == 78 and "\n" not in message
    assert f"{name} (got {value!r}): give hf://datasets/OWNER/NAME, then optionally /path/in/repo or /SPLIT" in message


@pytest.mark.parametrize("name", ["OUTPUT_URI", "BASE_MODEL", "BASE_MODEL_16BIT"])
def test_hub_addresses_are_for_datasets_only(env, name):
    env(**REQUIRED | {name: "hf://datasets/acme/support"})
    with pytest.raises(ConfigInvalid) as error:
        read_settings()
    assert f"{name} (got 'hf://datasets/acme/support'): is neither s3://bucket/..." in str(error.value)


def test_a_dry_run_of_a_hub_base_model_never_asks_the_hub(run_hub_job, tmp_path):
    """The default BASE_MODEL (a Hub id), HF_HUB_OFFLINE unset, and a Hub that answers 503, which huggingface_hub
    retries five times per file: no request, and the dry run goes on with a tiny Llama and a tokenizer of the data."""
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(jsonl(ROWS))
    with StatusHub(503) as hub:
        result = run_hub_job({"BASE_MODEL": None, "DATASET_URI": str(dataset), "HF_ENDPOINT": hub.endpoint})
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.requests == []
    [manifest] = [json.loads(text) for name, text in outputs(tmp_path).items() if name.endswith("/manifest.json")]
    assert manifest["base_model"]["loaded"] == "tiny random Llama (dry run)"


def test_the_hubs_retry_warnings_come_out_once_each_in_json_mode(run_hub_job, tmp_path):
    """huggingface_hub gives its logger a stderr handler of its own: each of its warnings came out twice in JSON mode,
    as plain text, then as JSON. BASE_MODEL trained for real against a Hub that answers 503."""
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(jsonl(ROWS))
    env = {"BASE_MODEL": "acme/model", "DATASET_URI": str(dataset), "DRY_RUN": "false", "TRAIN_BACKEND": "hf",
           "LOAD_IN_4BIT": "false", "OPTIMIZER": "adamw_torch"}  # fmt: skip
    with StatusHub(503) as hub:
        result = run_hub_job(env | {"HF_ENDPOINT": hub.endpoint})
    assert result.returncode == 75, result.stderr[-3000:]
    retries = [line for line in log_lines(result) if "[Retry 1/5]" in line["message"]]
    assert retries and all(line["level"] == "warning" for line in retries), result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if not line.startswith("{")] == [], "a plain line too"
