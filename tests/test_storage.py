import socket
import threading

import pytest

from job.errors import AccessDenied, DatasetInvalid, InputNotFound, TemporaryFailure
from job.settings import Settings
from job.storage import Storage, safe_target
from tests.conftest import CREDENTIALS, free_port, put, start_moto


def storage_for(endpoint: str, **extra) -> Storage:
    return Storage(Settings(DATASET_URI="x", OUTPUT_URI="y", AWS_ENDPOINT_URL_S3=endpoint, **CREDENTIALS, **extra))


@pytest.fixture
def storage(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    return storage_for(s3_endpoint)


def test_an_object_downloads_into_scratch(storage, s3, bucket, tmp_path):
    uri = put(s3, bucket, "data/train.jsonl", '{"text": "a"}\n')
    [(source, path)] = storage.fetch(uri, tmp_path)
    assert source == uri and path.parent == tmp_path and path.read_text() == '{"text": "a"}\n'


def test_a_prefix_means_every_data_file_in_key_order(storage, s3, bucket, tmp_path):
    for key in ("d/2.jsonl", "d/1.csv", "d/README.md", "d/_SUCCESS", "d/sub/3.parquet", "d/sub/", "other/x.jsonl"):
        put(s3, bucket, key, "x")
    for uri in (f"s3://{bucket}/d/", f"s3://{bucket}/d"):
        fetched = storage.fetch(uri, tmp_path / "dl")
        assert [s for s, _ in fetched] == [f"s3://{bucket}/d/{k}" for k in ("1.csv", "2.jsonl", "sub/3.parquet")]
        assert all(p.is_relative_to(tmp_path / "dl") for _, p in fetched)


def test_object_keys_cannot_escape_scratch(storage, s3, bucket, tmp_path):
    put(s3, bucket, "d/ok.jsonl", "x")
    put(s3, bucket, "d/../../../escape.jsonl", "x")
    with pytest.raises(DatasetInvalid, match="outside the scratch directory"):
        storage.fetch(f"s3://{bucket}/d/", tmp_path / "scratch")
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
        storage.fetch(path.format(bucket=bucket), tmp_path)


def test_missing_local_inputs_are_not_found(storage, tmp_path):
    with pytest.raises(InputNotFound, match="no such file"):
        storage.fetch(str(tmp_path / "nope.jsonl"), tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputNotFound, match="no data files"):
        storage.fetch(str(tmp_path), tmp_path)


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
            storage.fetch("s3://locked/d.jsonl", tmp_path)
        with pytest.raises(AccessDenied, match="access denied"):
            storage.put_bytes(b"x", "s3://locked/out.json")
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
                storage_for(url).fetch("s3://b/d.jsonl", tmp_path)
    finally:
        stop.set()
