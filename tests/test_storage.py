import hashlib
import http.client
import io
import json
import logging
import os
import socket
import threading
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ReadTimeoutError
from tqdm import tqdm

from job import logs
from job.errors import AccessDenied, DatasetInvalid, InputNotFound, TemporaryFailure
from job.settings import Settings
from job.storage import Storage, safe_target
from tests.conftest import CREDENTIALS, FaultyProxy, _boto_credentials, free_port, put, read_objects, start_moto


def storage_for(endpoint: str, **extra) -> Storage:
    return Storage(Settings(DATASET_URI="x", OUTPUT_URI="y", AWS_ENDPOINT_URL_S3=endpoint, **CREDENTIALS, **extra))


@pytest.fixture
def storage(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    return storage_for(s3_endpoint)


def test_an_object_downloads_into_scratch(storage, s3, bucket, tmp_path):
    uri = put(s3, bucket, "data/train.jsonl", '{"text": "a"}\n')
    [(source, path)] = storage.locate(uri, tmp_path)
    assert source == uri and path.parent == tmp_path and path.read_text() == '{"text": "a"}\n'


def test_a_prefix_means_every_data_file_in_key_order(storage, s3, bucket, tmp_path):
    for key in ("d/2.jsonl", "d/1.csv", "d/README.md", "d/_SUCCESS", "d/sub/3.parquet", "d/sub/", "other/x.jsonl"):
        put(s3, bucket, key, "x")
    for uri in (f"s3://{bucket}/d/", f"s3://{bucket}/d"):
        fetched = storage.locate(uri, tmp_path / "dl")
        assert [s for s, _ in fetched] == [f"s3://{bucket}/d/{k}" for k in ("1.csv", "2.jsonl", "sub/3.parquet")]
        assert all(p.is_relative_to(tmp_path / "dl") for _, p in fetched)


def test_object_keys_cannot_escape_scratch(storage, s3, bucket, tmp_path):
    put(s3, bucket, "d/ok.jsonl", "x")
    put(s3, bucket, "d/../../../escape.jsonl", "x")
    with pytest.raises(DatasetInvalid, match="outside the scratch directory"):
        storage.locate(f"s3://{bucket}/d/", tmp_path / "scratch")
    assert not list(tmp_path.rglob("*.jsonl")), "nothing is written when one key is unsafe"
    for key in ("../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(DatasetInvalid):
            safe_target(tmp_path, key)
    assert safe_target(tmp_path, "a/../b.jsonl") == (tmp_path / "b.jsonl").resolve()


@pytest.mark.parametrize(
    "path", ["s3://{bucket}/missing.jsonl", "s3://{bucket}/empty/", "s3://no-such-bucket-x/d.jsonl"]
)
def test_missing_inputs_are_not_found(storage, bucket, tmp_path, path):
    with pytest.raises(InputNotFound, match="check"):
        storage.locate(path.format(bucket=bucket), tmp_path)


def test_missing_local_inputs_are_not_found(storage, tmp_path, monkeypatch):
    with pytest.raises(InputNotFound, match="no such file") as error:
        storage.locate(str(tmp_path / "nope.jsonl"), tmp_path)
    assert "hf://" not in str(error.value)
    monkeypatch.chdir(tmp_path)  # a Hub id where a path is expected: the Hub address is named
    with pytest.raises(InputNotFound) as error:
        storage.locate("tatsu-lab/alpaca", tmp_path)
    assert str(error.value).endswith("check the path, or for the Hub dataset give hf://datasets/tatsu-lab/alpaca")
    with pytest.raises(InputNotFound) as error:
        storage.locate("data/train.jsonl", tmp_path)
    assert "hf://" not in str(error.value)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputNotFound, match="no data files"):
        storage.locate(str(tmp_path), tmp_path)


def test_put_if_absent_never_overwrites(storage, s3, bucket, tmp_path):
    uri = f"s3://{bucket}/run/manifest.json"
    assert storage.put_bytes(b"first", uri, if_absent=True)
    assert not storage.put_bytes(b"second", uri, if_absent=True)
    assert s3.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read() == b"first"
    local = str(tmp_path / "run" / "manifest.json")
    assert storage.put_bytes(b"first", local, if_absent=True)
    assert not storage.put_bytes(b"second", local, if_absent=True)
    assert (tmp_path / "run" / "manifest.json").read_bytes() == b"first"


def test_a_tree_uploads_with_relative_keys(storage, s3, bucket, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "a.bin").write_bytes(b"\0" * 10)
    (tmp_path / "report.md").write_text("# r")
    storage.put_tree(tmp_path, f"s3://{bucket}/runs/r1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["runs/r1/adapter/a.bin", "runs/r1/report.md"]


def test_unknown_credentials_are_denied(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    # moto checks credentials once its first (here: 2) unauthenticated actions are used up.
    server, endpoint = start_moto(INITIAL_NO_AUTH_ACTION_COUNT="2")
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="a",
                          aws_secret_access_key="b")  # fmt: skip
        s3.create_bucket(Bucket="locked")
        s3.put_object(Bucket="locked", Key="d.jsonl", Body=b"{}")
        storage = storage_for(endpoint)
        with pytest.raises(AccessDenied, match="access denied"):
            storage.locate("s3://locked/d.jsonl", tmp_path)
        with pytest.raises(AccessDenied, match="access denied"):
            storage.put_bytes(b"x", "s3://locked/out.json")
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree" / "a.bin").write_bytes(b"a")
        with pytest.raises(AccessDenied, match=r"s3://locked/out/a.bin: access denied"):  # raised in a transfer thread
            storage.put_tree(tmp_path / "tree", "s3://locked/out")
    finally:
        server.kill()


def closing_server() -> tuple[str, threading.Event]:
    """An endpoint that accepts connections and closes them at once: a store that is up but broken."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except TimeoutError:
                continue
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", stop


def test_unreachable_storage_is_temporary(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    endpoint, stop = closing_server()
    try:
        for url in (f"http://127.0.0.1:{free_port()}", endpoint):  # nothing listening; a connection dropped
            with pytest.raises(TemporaryFailure, match="unreachable after retries.*AWS_ENDPOINT_URL_S3"):
                storage_for(url).locate("s3://b/d.jsonl", tmp_path)
    finally:
        stop.set()


def md5(data: bytes) -> str:
    """A single-part PUT's ETag (unquoted): S3's version token of the object."""
    return hashlib.md5(data).hexdigest()


def sha256s(files: dict) -> dict:
    return {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}


def make_tree(folder, sizes: dict[str, int]) -> dict[str, bytes]:
    """Files of random bytes under folder; returns {relative path: content}."""
    files = {name: os.urandom(size) for name, size in sizes.items()}
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return files


def test_identify_names_what_locate_takes(storage, s3, bucket, tmp_path):
    for key in ("d/2.jsonl", "d/1.csv", "d/README.md", "d/sub/3.parquet"):
        put(s3, bucket, key, key * 3)
    for uri in (f"s3://{bucket}/d", f"s3://{bucket}/d/sub/3.parquet"):
        identities = storage.identify(uri)
        assert [i["uri"] for i in identities] == [source for source, _ in storage.locate(uri, tmp_path / "dl")]
        for identity in identities:
            key = identity["uri"].removeprefix(f"s3://{bucket}/")
            assert identity["etag"] == hashlib.md5(key.encode() * 3).hexdigest()  # a single PUT's ETag, unquoted
            assert identity["bytes"] == len(key) * 3
    local = tmp_path / "local"
    files = make_tree(local, {"b.jsonl": 5, "a/c.csv": 7, "notes.txt": 3})
    assert storage.identify(str(local)) == [
        {"uri": str(local / name), "sha256": hashlib.sha256(files[name]).hexdigest(), "bytes": len(files[name])}
        for name in ("a/c.csv", "b.jsonl")
    ]
    assert [i["uri"] for i in storage.identify(str(local / "b.jsonl"))] == [str(local / "b.jsonl")]
    for missing in (f"s3://{bucket}/nothing/", f"s3://{bucket}/d/README.md/", str(tmp_path / "nope")):
        with pytest.raises(InputNotFound):
            storage.identify(missing)


def test_list_gives_relative_paths_under_a_prefix(storage, s3, bucket, tmp_path):
    for key in ("run/b.json", "run/ckpt/a.bin", "run/", "run2/other.json", "top.json"):
        put(s3, bucket, key, "x")
    assert storage.list(f"s3://{bucket}/run") == ["b.json", "ckpt/a.bin"]
    assert storage.list(f"s3://{bucket}/run/ckpt/") == ["a.bin"]
    assert storage.list(f"s3://{bucket}/none") == []
    with pytest.raises(InputNotFound, match="does not exist"):
        storage.list("s3://no-such-bucket-x/run")
    make_tree(tmp_path / "run", {"b.json": 1, "ckpt/a.bin": 1})
    assert storage.list(str(tmp_path / "run")) == ["b.json", "ckpt/a.bin"]
    assert storage.list(str(tmp_path / "none")) == []


@pytest.mark.parametrize("where", ["s3", "local"])
def test_writes_conditional_on_the_version(storage, bucket, tmp_path, where):
    uri = f"s3://{bucket}/run/lease.json" if where == "s3" else str(tmp_path / "run" / "lease.json")
    version_of = (lambda data: hashlib.md5(data).hexdigest()) if where == "s3" else (
        lambda data: hashlib.sha256(data).hexdigest())  # fmt: skip
    assert storage.get_bytes(uri) is None
    assert storage.put_bytes(b"one", uri, if_match=version_of(b"one")) is None, "nothing there to match"
    assert storage.get_bytes(uri) is None
    assert storage.put_bytes(b"one", uri) == version_of(b"one"), "the version written, as get_bytes gives it"
    assert storage.get_bytes(uri) == (b"one", version_of(b"one"))
    assert storage.put_bytes(b"two", uri, if_match=version_of(b"other")) is None
    assert storage.put_bytes(b"two", uri, if_match=version_of(b"one")) == version_of(b"two")
    assert storage.put_bytes(b"three", uri, if_match=version_of(b"one")) is None, "a stale version"
    assert storage.get_bytes(uri) == (b"two", version_of(b"two"))
    if where == "local":
        assert os.listdir(tmp_path / "run") == ["lease.json"], "no temporary files are left behind"


def test_stores_without_conditional_writes_compare_first(faulty_s3, bucket, caplog, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    faulty_s3.refuse_conditional = True
    storage, uri = storage_for(faulty_s3.endpoint), f"s3://{bucket}/run/manifest.json"
    assert storage.put_bytes(b"first", uri, if_absent=True) == md5(b"first")
    assert storage.put_bytes(b"second", uri, if_absent=True) is None
    assert storage.put_bytes(b"second", uri, if_match=md5(b"other")) is None
    assert storage.put_bytes(b"second", uri, if_match=md5(b"first")) == md5(b"second")
    assert storage.get_bytes(uri)[0] == b"second"
    assert caplog.text.count("refuses conditional writes") == 4


def test_delete_tree_removes_everything_under_a_prefix_only(faulty_s3, s3, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setattr("job.storage.s3.DELETE_BATCH", 2)  # moto takes any number; S3 takes 1000
    storage = storage_for(faulty_s3.endpoint)
    make_tree(tmp_path / "up", {"a": 1, "b/c": 1, "b/d": 1, "e": 1})
    storage.put_tree(tmp_path / "up", f"s3://{bucket}/run1")
    put(s3, bucket, "run1/", "")
    put(s3, bucket, "run10/keep.json", "x")
    storage.delete_tree(f"s3://{bucket}/run1")
    assert list(read_objects(s3, bucket)) == ["run10/keep.json"]
    deletes = [r for r in faulty_s3.requests if r.startswith(f"POST /{bucket}?delete")]
    assert len(deletes) == 3, "five keys (with the folder marker) in batches of two"
    storage.delete_tree(f"s3://{bucket}/run1")  # nothing there is fine
    make_tree(tmp_path / "local", {"a/b.bin": 1, "c.bin": 1})
    storage.delete_tree(str(tmp_path / "local"))
    storage.delete_tree(str(tmp_path / "local"))
    assert not (tmp_path / "local").exists()


def recording_bars(monkeypatch) -> list[tqdm]:
    """Storage.put_tree's progress bars, counting (into a buffer) whatever the log format, kept for the test to read."""
    bars = []

    def bar(**kwargs):
        bars.append(tqdm(file=io.StringIO(), **kwargs))
        return bars[-1]

    monkeypatch.setattr("job.storage.progress", bar)
    return bars


@pytest.mark.parametrize("where", ["s3", "local"])
def test_trees_go_up_and_come_back(storage, s3, bucket, tmp_path, monkeypatch, where):
    bars = recording_bars(monkeypatch)
    files = make_tree(tmp_path / "up", {"adapter/weights.bin": 300_000, "report.md": 10, "x/y/z": 1})
    uri = f"s3://{bucket}/runs/r1" if where == "s3" else str(tmp_path / "out" / "r1")
    storage.put_tree(tmp_path / "up", uri)
    assert bars[-1].n == bars[-1].total == sum(map(len, files.values())), "the upload bar counts every byte"
    if where == "s3":
        assert read_objects(s3, bucket) == {f"runs/r1/{name}": content for name, content in files.items()}
    fetched = storage.copy_tree(uri, tmp_path / "down")
    assert fetched == [(tmp_path / "down" / name).resolve() for name in sorted(files)]
    assert {p.relative_to((tmp_path / "down").resolve()).as_posix(): p.read_bytes() for p in fetched} == files
    assert storage.copy_tree(uri + "-none", tmp_path / "none") == []


def test_copy_tree_keeps_keys_inside_dest(storage, s3, bucket, tmp_path):
    put(s3, bucket, "ckpt/ok.bin", "x")
    put(s3, bucket, "ckpt/../../escape.bin", "x")
    with pytest.raises(DatasetInvalid, match="outside the scratch directory"):
        storage.copy_tree(f"s3://{bucket}/ckpt", tmp_path / "scratch")
    assert not list(tmp_path.rglob("*.bin"))


def test_a_failed_transfer_is_the_jobs_error(storage, tmp_path):
    make_tree(tmp_path, {"a.bin": 1, "b.bin": 1})
    with pytest.raises(InputNotFound, match="bucket 'no-such-bucket-x' does not exist"):
        storage.put_tree(tmp_path, "s3://no-such-bucket-x/run")


def test_transfers_survive_a_faulty_store(faulty_s3, s3, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")
    storage, uri = storage_for(faulty_s3.endpoint), f"s3://{bucket}/run"
    # 9 MiB goes up and down in 8 MiB parts: multipart upload and ranged downloads, each part a request
    files = make_tree(tmp_path / "up", {f"data/{i}.jsonl": 1000 * i for i in range(1, 7)} | {"big.bin": 9 << 20})
    faulty_s3.fault_rate = 0.3
    storage.put_tree(tmp_path / "up", uri)
    faulty_s3.fault_rate = 0.0
    assert sha256s(read_objects(s3, bucket)) == sha256s({f"run/{name}": data for name, data in files.items()})
    faulty_s3.fault_rate = 0.3
    assert storage.list(uri) == sorted(files)
    fetched = storage.copy_tree(uri, tmp_path / "down")
    down = (tmp_path / "down").resolve()
    assert sha256s({p.relative_to(down).as_posix(): p.read_bytes() for p in fetched}) == sha256s(files)
    identities = storage.identify(join_uri := f"{uri}/data")
    assert [i["uri"] for i in identities] == [f"{join_uri}/{i}.jsonl" for i in range(1, 7)]
    assert [i["etag"] for i in identities] == [hashlib.md5(files[f"data/{i}.jsonl"]).hexdigest() for i in range(1, 7)]
    assert storage.put_bytes(b"first", f"{uri}/manifest.json", if_absent=True)
    assert not storage.put_bytes(b"second", f"{uri}/manifest.json", if_absent=True)
    assert storage.get_bytes(f"{uri}/manifest.json")[0] == b"first"
    assert set(faulty_s3.faulted) == {"503", "500", "reset"}, f"every kind of fault was injected: {faulty_s3.faulted}"


@pytest.mark.parametrize("fault", ["503", "500", "reset"])
def test_a_store_that_always_fails_is_temporary(faulty_s3, bucket, tmp_path, monkeypatch, fault):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage, uri = storage_for(faulty_s3.endpoint), f"s3://{bucket}/run"
    storage.put_bytes(b"x", f"{uri}/d.jsonl")
    make_tree(tmp_path / "up", {"a.bin": 10, "b.bin": 10})
    faulty_s3.fault_rate, faulty_s3.faults = 1.0, (fault,)
    for operation in (
        lambda: storage.put_tree(tmp_path / "up", uri),
        lambda: storage.copy_tree(uri, tmp_path / "down"),
        lambda: storage.locate(f"{uri}/d.jsonl", tmp_path / "down"),
        lambda: storage.put_bytes(b"x", f"{uri}/manifest.json", if_absent=True),
        lambda: storage.get_bytes(f"{uri}/d.jsonl"),
        lambda: storage.list(uri),
        lambda: storage.identify(uri),
    ):
        with pytest.raises(TemporaryFailure, match=f"{uri}.*after retries") as caught:
            operation()
        assert caught.value.exit_code == 75


def test_a_conditional_write_whose_answer_was_lost_still_counts(faulty_s3, s3, bucket, monkeypatch):
    """The store applies the write, the answer never arrives, and boto3's retry then fails its own condition."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    storage, uri = storage_for(faulty_s3.endpoint), f"s3://{bucket}/run/lease.json"
    faulty_s3.fault_rate, faulty_s3.faults, faulty_s3.max_faults = 1.0, ("lost",), 1
    assert storage.put_bytes(b"mine", uri, if_absent=True) == md5(b"mine")
    faulty_s3.faulted.clear()
    assert storage.put_bytes(b"mine, renewed", uri, if_match=md5(b"mine")) == md5(b"mine, renewed")
    assert faulty_s3.faulted["lost"] == 1
    assert s3.get_object(Bucket=bucket, Key="run/lease.json")["Body"].read() == b"mine, renewed"
    assert not storage.put_bytes(b"theirs", uri, if_absent=True), "another writer's attempt still fails"


def test_two_faults_in_a_row_on_every_request_are_carried_by_three_attempts(faulty_s3, bucket, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    """The first two attempts of every request fail (503 SlowDown, 500, a reset before or after the store acted), for
    some 60 requests of one Storage: more than the ~40 after which a retry quota like botocore's standard mode's
    stops retrying. Three attempts carry each one: transfers, reads and conditional writes."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    storage, uri = storage_for(faulty_s3.endpoint), f"s3://{bucket}/run"
    faulty_s3.fail_first, faulty_s3.faults = 2, ("503", "500", "reset", "lost")
    files = make_tree(tmp_path / "up", {f"{i:02}.bin": 100 + i for i in range(16)})
    storage.put_tree(tmp_path / "up", uri)
    down = (tmp_path / "down").resolve()
    fetched = storage.copy_tree(uri, down)
    assert {p.relative_to(down).as_posix(): p.read_bytes() for p in fetched} == files
    lease = f"{uri}/lease.json"
    version = storage.put_bytes(b"0", lease, if_absent=True)
    assert version == md5(b"0")
    for data in (b"1", b"2"):
        version = storage.put_bytes(data, lease, if_match=version)
        assert version == md5(data) and storage.get_bytes(lease) == (data, version)
    attempts = len(faulty_s3.requests)
    assert attempts > 3 * 50 and faulty_s3.faulted.total() * 3 == attempts * 2, "every request failed twice"
    assert set(faulty_s3.faulted) == {"503", "500", "reset", "lost"}, faulty_s3.faulted


def test_a_black_holed_request_times_out_and_the_proxy_lets_go_of_it(s3_endpoint, bucket):
    """A blackhole never answers: the client's read timeout ends the request, and the proxy's exit the connection."""
    with FaultyProxy(s3_endpoint) as proxy:
        proxy.fault_rate, proxy.faults = 1.0, ("blackhole",)
        client = boto3.client("s3", endpoint_url=proxy.endpoint, **_boto_credentials(),
                              config=Config(read_timeout=0.5, retries={"total_max_attempts": 1}))  # fmt: skip
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            client.get_object(Bucket=bucket, Key="lease.json")
        assert time.monotonic() - started < 5
        held = http.client.HTTPConnection(proxy.endpoint.removeprefix("http://"), timeout=10)
        held.request("GET", f"/{bucket}/lease.json")
        deadline = time.monotonic() + 5
        while proxy.faulted["blackhole"] < 2 and time.monotonic() < deadline:  # until the proxy has read it
            time.sleep(0.01)
        assert proxy.faulted == {"blackhole": 2}
        started = time.monotonic()
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        held.getresponse()
    assert time.monotonic() - started < 2, "the held connection ends with the proxy, not at the client's timeout"


def test_the_faulty_proxy_forwards_chunked_bodies(faulty_s3, s3, bucket):
    """boto3 sends Content-Length over plain HTTP; other clients stream HTTP-chunked, some of it aws-chunked."""
    data = b"hello world " * 1000
    aws_chunked = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
    connection = http.client.HTTPConnection(faulty_s3.endpoint.removeprefix("http://"))
    for key, body, headers in (
        ("plain", data, {}),
        (
            "aws",
            aws_chunked,
            {
                "Content-Encoding": "aws-chunked",
                "X-Amz-Decoded-Content-Length": str(len(data)),
                "X-Amz-Content-Sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            },
        ),
    ):
        connection.request("PUT", f"/{bucket}/{key}", body=iter([body[:100], body[100:]]), encode_chunked=True,
                           headers={"Transfer-Encoding": "chunked", **headers})  # fmt: skip
        assert connection.getresponse().read() == b""
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    connection.close()


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_logs_show_no_credentials_or_signatures(s3_endpoint, capsys, monkeypatch, log_format):
    boto_credentials = _boto_credentials()
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logs, "_state", dict(logs._state))
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    signer = boto3.client("s3", endpoint_url=s3_endpoint, config=Config(signature_version="s3v4"), **boto_credentials)
    presigned = signer.generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "d.jsonl"})
    signature = presigned.partition("X-Amz-Signature=")[2]
    assert len(signature) == 64
    endpoint = "https://user:canary-p4ss@minio.example:9000/bucket"
    logs.setup(log_format)
    log = logging.getLogger("job.test")
    log.info("reading %s", presigned, extra={"fields": {"endpoint": endpoint, "nested": {"url": presigned}}})
    problem = f"cannot reach {endpoint}?token=canary-token"  # the traceback shows the raise line's source
    try:
        raise ConnectionError(problem)
    except ConnectionError:
        log.exception("failed")
    err = capsys.readouterr().err
    assert "canary" not in err and signature not in err and "X-Amz-Credential" not in err
    assert f"{presigned.partition('?')[0]}?***" in err
    assert "https://***@minio.example:9000/bucket" in err
    if log_format == "json":
        lines = [json.loads(line) for line in err.splitlines()]
        assert lines[0]["endpoint"] == "https://***@minio.example:9000/bucket"
        assert lines[1]["traceback"].endswith("ConnectionError: cannot reach https://***@minio.example:9000/bucket?***")
