"""genmodels.storage: one behaviour suite, run against file:// and s3:// (moto over HTTP)."""

from __future__ import annotations

import os
import pickle
import threading
import time

import pytest

from genmodels.storage import (
    FileStorage,
    S3Storage,
    StorageError,
    check_reachable,
    open_storage,
    read_url,
    split_url,
)


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    if request.param == "file":
        return open_storage((tmp_path / "root").as_uri())
    return open_storage(request.getfixturevalue("s3_bucket"))


def test_round_trip_bytes_identical(storage):
    payloads = {"a.bin": bytes(range(256)) * 3, "empty": b"", "nested/deep/x.npz": os.urandom(70_000)}
    for key, data in payloads.items():
        storage.put_bytes(key, data)
    for key, data in payloads.items():
        assert storage.get_bytes(key) == data
    storage.put_bytes("a.bin", b"replaced")
    assert storage.get_bytes("a.bin") == b"replaced"


def test_list_is_sorted_recursive_and_prefix_filtered(storage):
    for key in ["b/2", "a", "b/1", "b/c/3", "bb", "c/4"]:
        storage.put_bytes(key, key.encode())
    assert storage.list() == ["a", "b/1", "b/2", "b/c/3", "bb", "c/4"]
    assert storage.list("b/") == ["b/1", "b/2", "b/c/3"]
    assert storage.list("b") == ["b/1", "b/2", "b/c/3", "bb"]  # a string prefix, as on S3
    assert storage.list("b/c/") == ["b/c/3"]
    assert storage.list("zzz/") == []


def test_child_is_a_sub_root(storage):
    storage.put_bytes("runs/r1/ckpt", b"1")
    storage.put_bytes("runs/r10/ckpt", b"10")
    child = storage.child("runs/r1")
    assert child.url == storage.url + "/runs/r1"
    assert child.list() == ["ckpt"]  # r10 is a sibling, not inside r1
    assert child.get_bytes("ckpt") == b"1"
    child.put_bytes("more/x", b"x")
    assert storage.get_bytes("runs/r1/more/x") == b"x"
    assert child.url_for("more/x") == storage.url_for("runs/r1/more/x")


def test_exists_and_delete(storage):
    assert not storage.exists("k")
    storage.put_bytes("k", b"v")
    assert storage.exists("k")
    storage.delete("k")
    assert not storage.exists("k")
    storage.delete("k")  # deleting a missing object is fine
    assert storage.list() == []


def test_missing_key_error_names_the_url(storage):
    with pytest.raises(FileNotFoundError) as info:
        storage.get_bytes("no/such/key")
    assert storage.url_for("no/such/key") in str(info.value)
    assert storage.url_for("no/such/key").endswith("/no/such/key")


def test_json_helpers_are_deterministic(storage):
    storage.put_json("m.json", {"b": [1, 2], "a": {"z": 1, "y": None}})
    assert storage.get_json("m.json") == {"a": {"y": None, "z": 1}, "b": [1, 2]}
    expected = b'{\n  "a": {\n    "y": null,\n    "z": 1\n  },\n  "b": [\n    1,\n    2\n  ]\n}\n'
    assert storage.get_bytes("m.json") == expected
    storage.put_bytes("bad.json", b"{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        storage.get_json("bad.json")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "./a", "a\\b"])
def test_invalid_keys_are_rejected(storage, key):
    with pytest.raises(ValueError, match="storage key"):
        storage.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        storage.get_bytes(key)


def test_exclusive_create_lets_exactly_one_writer_win(storage):
    results = []
    barrier = threading.Barrier(6)

    def race(i: int) -> None:
        barrier.wait()
        results.append((storage.create_exclusive("leases/x/000000000001.json", f"{i}".encode()), i))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for won, i in results if won]
    assert len(winners) == 1 and storage.get_bytes("leases/x/000000000001.json") == f"{winners[0]}".encode()


def test_parent_walks_up_to_the_root(storage):
    deep = storage.child("a/b")
    assert deep.parent().url == storage.child("a").url and deep.parent().parent().url == storage.url
    top = storage
    while top.parent() is not None:
        top = top.parent()
    assert top.url == ("file:///" if isinstance(storage, FileStorage) else f"s3://{storage.bucket}")


def test_read_url_reads_one_object(storage):
    storage.put_bytes("dir/obj.bin", b"payload")
    assert read_url(storage.url_for("dir/obj.bin")) == b"payload"


def test_read_url_reads_an_object_whose_url_quotes_its_name(storage):
    # url_for percent-encodes file:// URLs ("a b" -> "a%20b"): read_url takes them back.
    for key in ("dir/a b.npz", "dir/100%.npz"):
        storage.put_bytes(key, key.encode())
        assert read_url(storage.url_for(key)) == key.encode()


def test_check_reachable_passes_on_a_usable_root(storage):
    check_reachable(storage)
    check_reachable(storage.url)


def test_storage_pickles_for_worker_processes(storage):
    storage.put_bytes("k", b"v")  # builds the S3 client, which itself cannot be pickled
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.url == storage.url
    assert clone.get_bytes("k") == b"v"


# --- file:// specifics ------------------------------------------------------------------


def test_open_storage_forms(tmp_path):
    plain = open_storage(str(tmp_path / "d"))
    assert isinstance(plain, FileStorage)
    assert plain.url == (tmp_path / "d").as_uri()
    assert open_storage(plain.url).root == plain.root
    spaced = open_storage(tmp_path / "with space")
    assert spaced.url.endswith("/with%20space")
    assert open_storage(spaced.url).root == tmp_path / "with space"
    s3 = open_storage("s3://bucket/a/b/")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix, s3.url) == ("bucket", "a/b", "s3://bucket/a/b")
    assert open_storage("s3://bucket").url == "s3://bucket"
    for bad, msg in [("gs://b/p", "unsupported storage scheme 'gs'"), ("s3:///p", "needs a bucket"),
                     ("file://host/p", "must be absolute"), ("", "non-empty"),
                     ("S3://b/p", r"lower case \(s3://"), ("FILE:///p", r"lower case \(file://"),
                     # urlsplit drops a query or fragment: every object would land in /p/exp.
                     (f"{tmp_path.as_uri()}/exp#2", "cannot hold '\\?' or '#'"),
                     (f"{tmp_path.as_uri()}/exp?v=2/out", "cannot hold '\\?' or '#'")]:
        with pytest.raises(ValueError, match=msg):
            open_storage(bad)
    encoded = open_storage(f"{tmp_path.as_uri()}/exp%232")  # the way to name such a folder
    assert encoded.root == tmp_path / "exp#2" and open_storage(encoded.url).root == encoded.root
    assert not (tmp_path / "exp").exists()


def test_a_name_of_up_to_255_bytes_is_written(tmp_path):
    # The temporary file beside it once carried the name plus 48 bytes: 208-255 bytes failed.
    storage = FileStorage(tmp_path)
    name = "n" * 255
    storage.put_bytes(f"x/{name}", b"data")
    assert storage.get_bytes(f"x/{name}") == b"data" and storage.list("x/") == [f"x/{name}"]
    assert storage.create_exclusive(f"y/{name}", b"once") and not storage.create_exclusive(f"y/{name}", b"twice")


def test_split_url():
    storage, key = split_url("s3://b/x/y/z.npz")
    assert (storage.url, key) == ("s3://b/x/y", "z.npz")
    storage, key = split_url("file:///top.npz")
    assert (storage.url, key) == ("file:///", "top.npz")
    with pytest.raises(ValueError, match="names a bucket"):
        split_url("s3://b")


def test_file_put_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    storage = FileStorage(tmp_path)
    storage.put_bytes("x/obj", b"old")

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="cannot write .*x/obj.*No space left"):
        storage.put_bytes("x/obj", b"new")
    monkeypatch.undo()
    assert storage.get_bytes("x/obj") == b"old"  # the old object survives a failed write
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["obj"]


def test_sweep_removes_only_stale_temporaries_under_the_prefix(tmp_path):
    storage = FileStorage(tmp_path)
    storage.put_bytes("a/obj", b"x")
    stale = tmp_path / "a" / ".obj.dead.genmodels-tmp"
    live = tmp_path / "a" / ".obj.live.genmodels-tmp"
    elsewhere = tmp_path / "b" / ".obj.dead.genmodels-tmp"
    for path in (stale, live, elsewhere):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    old = time.time() - 3600
    for path in (stale, elsewhere):
        os.utime(path, (old, old))
    assert storage.sweep_temporaries("a", older_than_s=900) == 1
    assert not stale.exists() and live.exists() and elsewhere.exists()
    assert storage.get_bytes("a/obj") == b"x"  # placed objects are never touched
    assert storage.child("b").sweep_temporaries(older_than_s=900) == 1 and not elsewhere.exists()


def test_file_root_that_is_a_file_is_unreachable(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(StorageError, match="not a directory"):
        check_reachable(FileStorage(tmp_path / "f"))
    with pytest.raises(StorageError, match="cannot create the storage root"):
        check_reachable(FileStorage(tmp_path / "f" / "sub"))
    check_reachable(FileStorage(tmp_path / "not" / "yet" / "there"))  # created on first write
    assert not (tmp_path / "not").exists()  # and checking created nothing


# --- s3:// specifics ----------------------------------------------------------------------


def test_s3_missing_bucket_is_a_storage_error(s3_endpoint):
    storage = open_storage("s3://genmodels-no-such-bucket/p")
    with pytest.raises(StorageError, match=r"s3://genmodels-no-such-bucket/p: no such bucket") as info:
        check_reachable(storage)
    assert s3_endpoint in str(info.value)
    with pytest.raises(StorageError, match="no such bucket"):
        storage.get_bytes("k")


def test_s3_unreachable_endpoint_is_a_storage_error(s3_endpoint, closed_port):
    endpoint = f"http://127.0.0.1:{closed_port}"
    storage = open_storage("s3://bucket/p", endpoint_url=endpoint, max_attempts=1)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        check_reachable(storage)
    message = str(info.value)
    assert "s3://bucket/p" in message and endpoint in message and "connect" in message.lower()
    with pytest.raises(StorageError, match=r"cannot read s3://bucket/p/k"):
        storage.get_bytes("k")
    assert time.monotonic() - t0 < 20


def test_s3_list_paginates(s3_bucket, monkeypatch):
    storage = open_storage(s3_bucket)
    keys = [f"k{i}" for i in range(7)]
    for key in keys:
        storage.put_bytes(key, b"")
    calls = []
    monkeypatch.setattr(S3Storage, "list_page_size", 3)
    storage.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    assert storage.list() == keys
    assert len(calls) == 3  # 3 + 3 + 1 keys


def test_s3_list_skips_folder_markers_as_file_storage_skips_folders(s3_bucket):
    storage = open_storage(s3_bucket)
    storage.put_bytes("a/k", b"v")
    for key, body in (("", b""), ("a/", b""), ("b/", b"data")):  # a console's "Create folder": zero bytes
        storage.client.put_object(Bucket=storage.bucket, Key=f"{storage.prefix}/{key}", Body=body)
    assert storage.list() == ["a/k", "b/"]  # a key ending in "/" that holds bytes is someone's data


def test_s3_explicit_endpoint_wins_over_env(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing there
    storage = open_storage(s3_bucket, endpoint_url=s3_endpoint)
    storage.put_bytes("k", b"v")
    assert storage.get_bytes("k") == b"v"


def _multipart_small(monkeypatch) -> None:
    # 5 MiB: the smallest part S3 (and moto, and boto3's transfer manager) accepts.
    monkeypatch.setattr(S3Storage, "multipart_threshold", 1024**2)
    monkeypatch.setattr(S3Storage, "multipart_chunksize", 5 * 1024**2)


def test_s3_large_object_goes_up_in_parts_and_appears_only_when_complete(s3_bucket, monkeypatch):
    _multipart_small(monkeypatch)
    storage, reader = open_storage(s3_bucket), open_storage(s3_bucket)
    storage.put_bytes("shard", b"old")
    data = os.urandom(11 * 1024**2 + 17)  # 5 + 5 + 1 MiB and a bit: three parts
    parts, seen_before_complete = [], []
    events = storage.client.meta.events
    events.register("before-call.s3.PutObject", lambda **kw: pytest.fail("a large object went up as one PUT"))
    events.register("before-call.s3.UploadPart", lambda **kw: parts.append(1))
    events.register("before-call.s3.CompleteMultipartUpload",
                    lambda **kw: seen_before_complete.append(reader.get_bytes("shard")))
    storage.put_bytes("shard", data)
    assert len(parts) == 3
    assert seen_before_complete == [b"old"]  # until CompleteMultipartUpload, readers see the old object
    assert reader.get_bytes("shard") == data
    etag = storage.client.head_object(Bucket=storage.bucket, Key=storage._key("shard"))["ETag"]
    assert etag.strip('"').endswith("-3")  # S3's mark of a 3-part upload


def test_s3_small_object_is_one_put(s3_bucket, monkeypatch):
    _multipart_small(monkeypatch)
    storage = open_storage(s3_bucket)
    calls = []
    storage.client.meta.events.register("before-call.s3.CreateMultipartUpload", lambda **kw: calls.append(1))
    storage.put_bytes("k", b"x" * (1024**2 - 1))
    assert calls == [] and storage.get_bytes("k") == b"x" * (1024**2 - 1)


def test_s3_failed_part_aborts_the_upload_and_keeps_the_old_object(s3_bucket, monkeypatch):
    from botocore.exceptions import ClientError

    _multipart_small(monkeypatch)
    storage = open_storage(s3_bucket)
    storage.put_bytes("shard", b"old")

    def fail_second_part(params, **kw):
        if params.get("PartNumber") == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "UploadPart")

    storage.client.meta.events.register("before-parameter-build.s3.UploadPart", fail_second_part)
    with pytest.raises(StorageError, match=r"cannot write s3://.*/shard.*InternalError"):
        storage.put_bytes("shard", os.urandom(11 * 1024**2))
    assert open_storage(s3_bucket).get_bytes("shard") == b"old"
    uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])
    assert uploads == []  # aborted: no parts left behind to pay for


@pytest.mark.parametrize("env, region", [({"AWS_REGION": "eu-west-1"}, "eu-west-1"),
                                         ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-west-2"}, "us-west-2")])
def test_s3_client_takes_the_region_ray_trains_filesystem_takes(env, region, monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage = open_storage("s3://bucket/prefix", endpoint_url="http://127.0.0.1:1")
    assert storage._s3.get().meta.region_name == region


def test_listing_a_root_that_is_a_file_is_an_error_not_an_empty_storage(tmp_path):
    (tmp_path / "root").write_bytes(b"x")
    with pytest.raises(StorageError, match="storage root exists but is not a directory"):
        FileStorage(tmp_path / "root").list("jobs/")
    assert FileStorage(tmp_path / "missing").list("jobs/") == []  # not created yet: nothing in it
