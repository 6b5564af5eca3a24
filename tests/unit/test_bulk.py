"""Bulk generation in-process (no Ray): layout, checksums, sample identity across shard sizes,
cancel + resume, repair of a corrupted shard, refusal of another job's output, bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from genmodels import bulk
from genmodels.bulk.runner import ABANDONED_WRITE_S
from genmodels.export import export_sampler
from genmodels.models import build_model
from genmodels.models.base import ImageSpec
from genmodels.sampling import OnnxSampler
from genmodels.storage import FileStorage

TINY = {"latent_dim": 3, "hidden": (16,)}


def _export(tmp_path_factory, family: str, image: ImageSpec) -> dict[str, bytes]:
    torch.manual_seed(0)
    model = build_model(family, image, **TINY).eval()
    directory = tmp_path_factory.mktemp(family)
    export_sampler(model, directory, likelihood=False)
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.onnx"))}


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> dict[str, bytes]:
    return _export(tmp_path_factory, "vae", ImageSpec(channels=1, height=8, width=8, levels=2, num_classes=3))


@pytest.fixture(scope="module")
def cvae(tmp_path_factory) -> dict[str, bytes]:
    return _export(tmp_path_factory, "cvae", ImageSpec(channels=1, height=8, width=8, levels=256, num_classes=3))


def spec(out: Path | str, **kw) -> bulk.JobSpec:
    url = out if isinstance(out, str) else out.as_uri()
    return bulk.JobSpec(**{"model": "digits-vae", "version": "1", "n": 50, "output": url, "seed": 3,
                           "shard_size": 16, **kw})


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def decoded_by_index(root: Path) -> dict[str, np.ndarray]:
    """Every shard of a finished job decoded and concatenated in index order."""
    manifest = bulk.verify(root.as_uri())
    parts = [bulk.read_shard(root.as_uri(), r) for r in manifest["shards"]]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(out["index"])
    return {k: v[order] for k, v in out.items()}


class PutSpy:
    """Records every key written through FileStorage.put_bytes."""

    def __init__(self, monkeypatch) -> None:
        self.keys: list[str] = []
        original = FileStorage.put_bytes

        def put(storage, key, data):
            self.keys.append(key)
            return original(storage, key, data)

        monkeypatch.setattr(FileStorage, "put_bytes", put)


# --- layout and content ------------------------------------------------------------------------
def test_shard_plan_tiles_the_range():
    assert bulk.shard_plan(50, 16) == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert bulk.shard_plan(16, 16) == [(0, 16)]
    assert bulk.shard_key(7, "npz") == "shards/shard-00007.npz" and bulk.shard_key(7, "png") == "shards/shard-00007.tar"
    assert bulk.shard_key(7, "parquet") == "shards/shard-00007.parquet"


def layout(shards: range, ext: str = "npz") -> list[str]:
    """Shard objects under shards/ (nothing else there), their sidecars under sidecars/."""
    return sorted([f"shards/shard-{k:05d}.{ext}" for k in shards] + [f"sidecars/shard-{k:05d}.json" for k in shards])


def test_job_writes_shards_sidecars_and_manifest_that_match_the_sampler(vae, tmp_path):
    progress = []
    manifest = bulk.run_job(spec(tmp_path / "out"), vae, use_ray=False, on_progress=lambda d, t: progress.append((d, t)))
    root = tmp_path / "out"
    assert sorted(files_of(root)) == ["job.json", "manifest.json"] + layout(range(4))
    assert progress == [(0, 50), (16, 50), (32, 50), (48, 50), (50, 50)]
    assert manifest == json.loads((root / "manifest.json").read_text())
    assert manifest["model"]["name"] == "digits-vae" and manifest["model"]["version"] == "1"
    assert manifest["model"]["family"] == "vae" and manifest["seed"] == 3 and manifest["index_range"] == [0, 50]
    assert manifest["totals"] == {"samples": 50, "shards": 4, "bytes": sum(r["bytes"] for r in manifest["shards"])}
    for k, record in enumerate(manifest["shards"]):
        data = (root / record["key"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["bytes"] == len(data)
        assert (record["start"], record["end"], record["count"]) == (16 * k, min(50, 16 * k + 16), record["end"] - record["start"])
        assert json.loads((root / f"sidecars/shard-{k:05d}.json").read_text()) == record
    job = json.loads((root / "job.json").read_text())
    assert job["spec"] == spec(tmp_path / "out").to_dict()
    assert job["graphs"] == {name: hashlib.sha256(data).hexdigest() for name, data in vae.items()}

    got = decoded_by_index(root)
    assert set(got) == {"images", "index"}  # unconditional: no labels array
    assert got["index"].tolist() == list(range(50))
    sampler = OnnxSampler.from_dir(_write(vae, tmp_path / "graphs"))
    want = np.rint(sampler.sample(50, seed=3) * 255).astype(np.uint8)
    assert got["images"].dtype == np.uint8 and np.array_equal(got["images"], want)


def _write(files: dict[str, bytes], directory: Path) -> Path:
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


@pytest.mark.parametrize("fmt", ["npz", "png", "parquet"])
def test_sample_i_is_the_same_whatever_the_shard_size(cvae, tmp_path, fmt):
    runs = {}
    for size in (7, 10, 64):
        out = tmp_path / f"s{size}"
        bulk.run_job(spec(out, model="digits-cvae", n=45, shard_size=size, labels=[2, 0, 1, 1], format=fmt,
                          temperature=0.8), cvae, use_ray=False)
        runs[size] = decoded_by_index(out)
    for size in (10, 64):
        for key in ("images", "index", "labels"):
            assert np.array_equal(runs[size][key], runs[7][key]), (size, key)
    assert runs[7]["labels"].tolist() == [[2, 0, 1, 1][i % 4] for i in range(45)]
    assert runs[7]["images"].shape == (45, 1, 8, 8)
    assert len(np.unique(runs[7]["images"].reshape(45, -1), axis=0)) == 45  # different noise per index


def test_png_shard_is_a_sorted_webdataset_tar_with_fixed_metadata(cvae, tmp_path):
    bulk.run_job(spec(tmp_path / "o", model="c", n=12, shard_size=5, labels=1, format="png"), cvae, use_ray=False)
    with tarfile.open(tmp_path / "o/shards/shard-00001.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"{i:09d}.{ext}" for i in range(5, 10) for ext in ("png", "cls")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_encoding_is_deterministic():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 1, 4, 4), dtype=np.uint8)
    index, labels = np.arange(10, 16), np.array([0, 1, 2, 0, 1, 2])
    for fmt in ("npz", "png", "parquet"):
        a = bulk.encode_shard(images, index, labels, fmt)
        assert a == bulk.encode_shard(images.copy(), index.copy(), labels.copy(), fmt)
        back = bulk.decode_shard(a, fmt)
        assert np.array_equal(back["images"], images) and back["index"].tolist() == list(range(10, 16))
        assert back["labels"].tolist() == labels.tolist()


# --- parquet: the shard folder as standard readers see it ----------------------------------------
def test_parquet_folder_reads_with_pyarrow_and_pandas_every_row_once(cvae, tmp_path):
    import pandas as pd
    import pyarrow.dataset as ds

    kw = dict(model="digits-cvae", n=45, shard_size=10, labels=[2, 0, 1], temperature=0.8)
    bulk.run_job(spec(tmp_path / "npz", **kw), cvae, use_ray=False)
    bulk.run_job(spec(tmp_path / "pq", format="parquet", **kw), cvae, use_ray=False)
    want = decoded_by_index(tmp_path / "npz")
    folder = tmp_path / "pq" / bulk.SHARDS_DIR
    assert sorted(p.name for p in folder.iterdir()) == [f"shard-{k:05d}.parquet" for k in range(5)]
    assert bulk.read_manifest((tmp_path / "pq").as_uri())["layout"] == {"shards": "shards/"}

    table = ds.dataset(folder, format="parquet").to_table()
    assert table.schema.names == ["index", "label", "image", "height", "width", "channels"]
    assert str(table.schema.field("index").type) == "int64" and str(table.schema.field("label").type) == "int64"
    rows = sorted(table.to_pylist(), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(45))
    assert [r["label"] for r in rows] == want["labels"].tolist()
    assert {(r["height"], r["width"], r["channels"]) for r in rows} == {(8, 8, 1)}
    images = np.stack([bulk.shards.png_array(r["image"]) for r in rows])
    assert images.dtype == np.uint8 and np.array_equal(images, want["images"])

    frame = pd.read_parquet(folder).sort_values("index")
    assert len(frame) == 45 and frame["index"].tolist() == list(range(45))
    assert all(isinstance(b, bytes) and b.startswith(b"\x89PNG") for b in frame["image"])
    assert np.array_equal(np.stack([bulk.shards.png_array(b) for b in frame["image"]]), want["images"])


def test_parquet_of_an_unconditional_model_has_null_labels(vae, tmp_path):
    import pyarrow.dataset as ds

    bulk.run_job(spec(tmp_path / "o", n=20, shard_size=8, format="parquet"), vae, use_ray=False)
    table = ds.dataset(tmp_path / "o" / bulk.SHARDS_DIR, format="parquet").to_table()
    assert table.num_rows == 20 and table.column("label").null_count == 20
    assert sorted(table.column("index").to_pylist()) == list(range(20))
    assert set(decoded_by_index(tmp_path / "o")) == {"images", "index"}


def test_parquet_job_resumes_to_the_uninterrupted_bytes_and_then_writes_nothing(vae, tmp_path, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    bulk.run_job(spec(whole, format="parquet"), vae, use_ray=False)
    done = []
    with pytest.raises(bulk.JobCancelled):
        bulk.run_job(spec(cut, format="parquet"), vae, use_ray=False, on_progress=lambda d, t: done.append(d),
                     should_stop=lambda: len(done) > 2)
    kept = {k for k in files_of(cut) if k.startswith("shards/")}
    assert 2 <= len(kept) <= 3 and "manifest.json" not in files_of(cut)

    spy = PutSpy(monkeypatch)
    bulk.run_job(spec(cut, format="parquet"), vae, use_ray=False)
    assert not kept & set(spy.keys)  # verified shards are not written again
    body = lambda root: {k: v for k, v in files_of(root).items() if k.startswith(("shards/", "sidecars/"))}
    assert body(cut) == body(whole) and sorted(body(cut)) == layout(range(4), "parquet")
    bulk.verify(cut.as_uri())
    spy.keys.clear()
    bulk.run_job(spec(cut, format="parquet"), vae, use_ray=False)
    assert spy.keys == []


def test_output_with_sidecars_in_the_shard_folder_still_resumes(vae, tmp_path, monkeypatch):
    # The layout before sidecars moved out of shards/: its shards are verified, not rewritten.
    root = tmp_path / "o"
    bulk.run_job(spec(root), vae, use_ray=False)
    for k in range(4):
        (root / f"sidecars/shard-{k:05d}.json").rename(root / f"shards/shard-{k:05d}.json")
    (root / "manifest.json").unlink()
    (root / "shards/shard-00001.npz").write_bytes(b"garbage")
    spy = PutSpy(monkeypatch)
    manifest = bulk.run_job(spec(root), vae, use_ray=False)
    # Shard 1 rewritten; the sidecars of the others moved to sidecars/, none left in shards/.
    moved = [f"sidecars/shard-{k:05d}.json" for k in range(4)]
    assert sorted(spy.keys) == ["manifest.json", "shards/shard-00001.npz", *moved]
    assert bulk.verify(root.as_uri()) == manifest
    assert sorted(files_of(root)) == ["job.json", "manifest.json"] + layout(range(4))


def test_a_resumed_output_of_the_old_layout_leaves_its_shard_folder_to_the_shards(vae, tmp_path):
    import pandas as pd

    whole, old = tmp_path / "whole", tmp_path / "old"
    bulk.run_job(spec(whole, format="parquet"), vae, use_ray=False)
    bulk.run_job(spec(old, format="parquet"), vae, use_ray=False)
    for k in range(4):
        (old / f"sidecars/shard-{k:05d}.json").rename(old / f"shards/shard-{k:05d}.json")
    (old / "sidecars").rmdir()
    (old / "manifest.json").unlink()
    (old / "shards/shard-00001.parquet").write_bytes(b"garbage")  # its old sidecar vouches for nothing now
    bulk.run_job(spec(old, format="parquet"), vae, use_ray=False)
    body = lambda root: {k: v for k, v in files_of(root).items() if k.startswith(("shards/", "sidecars/"))}
    assert body(old) == body(whole) and sorted(body(old)) == layout(range(4), "parquet")
    assert pd.read_parquet(old / "shards")["index"].sort_values().tolist() == list(range(50))


def test_job_to_s3_in_multipart_uploads_matches_the_file_job(vae, tmp_path, s3_bucket, monkeypatch):
    from genmodels.storage import S3Storage, open_storage

    monkeypatch.setattr(S3Storage, "multipart_threshold", 1024)  # every shard, not the small JSON objects
    bulk.run_job(spec(tmp_path / "o", format="parquet"), vae, use_ray=False)
    manifest = bulk.run_job(spec(s3_bucket, format="parquet"), vae, use_ray=False)
    assert bulk.verify(s3_bucket) == manifest
    storage = open_storage(s3_bucket)
    for record in manifest["shards"]:
        assert storage.get_bytes(record["key"]) == (tmp_path / "o" / record["key"]).read_bytes()
        etag = storage.client.head_object(Bucket=storage.bucket, Key=storage._key(record["key"]))["ETag"]
        assert etag.strip('"').endswith("-1")  # went up as a (one-part) multipart upload


# --- resume --------------------------------------------------------------------------------------
def test_cancelled_job_resumes_to_exactly_the_uninterrupted_bytes(vae, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    bulk.run_job(spec(whole), vae, use_ray=False)

    done = []
    with pytest.raises(bulk.JobCancelled) as cancelled:
        bulk.run_job(spec(cut), vae, use_ray=False, on_progress=lambda d, t: done.append(d),
                     should_stop=lambda: len(done) > 2)  # progress at 0, 16, 32: stop after 2 shards
    # Stopped once 2 shards were done; the one already sampled while they uploaded completes too.
    done_shards = cancelled.value.done_shards
    assert cancelled.value.total_shards == 4 and 2 <= done_shards <= 3
    partial = files_of(cut)
    assert "manifest.json" not in partial
    assert sorted(k for k in partial if k.startswith(("shards/", "sidecars/"))) == layout(range(done_shards))

    manifest = bulk.run_job(spec(cut), vae, use_ray=False)
    shards = lambda root: {k: v for k, v in files_of(root).items() if k.startswith(("shards/", "sidecars/"))}
    assert shards(cut) == shards(whole)  # every shard and sidecar: same bytes
    assert len(shards(cut)) == 8
    without_output = lambda m: {**m, "spec": {**m["spec"], "output": None}}
    assert without_output(manifest) == without_output(bulk.read_manifest(whole.as_uri()))
    assert sorted(i for r in manifest["shards"] for i in range(r["start"], r["end"])) == list(range(50))
    assert decoded_by_index(cut)["index"].tolist() == list(range(50))


def test_resumed_job_removes_the_partial_file_of_its_killed_writer(vae, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    bulk.run_job(spec(whole), vae, use_ray=False)
    done = []
    with pytest.raises(bulk.JobCancelled):
        bulk.run_job(spec(cut), vae, use_ray=False, on_progress=lambda d, t: done.append(d),
                     should_stop=lambda: len(done) > 2)
    # What a writer killed between its write and its rename leaves: a hidden partial shard.
    partial = cut / "shards" / ".shard-00003.npz.0123abcd.genmodels-tmp"
    partial.write_bytes((whole / "shards/shard-00003.npz").read_bytes()[:100])
    then = time.time() - ABANDONED_WRITE_S - 60
    os.utime(partial, (then, then))
    bulk.run_job(spec(cut), vae, use_ray=False)
    assert files_of(cut) == {**files_of(whole), "job.json": files_of(cut)["job.json"],
                             "manifest.json": files_of(cut)["manifest.json"]}
    assert not partial.exists()


def test_rerun_of_finished_job_verifies_and_writes_nothing(vae, tmp_path, monkeypatch):
    first = bulk.run_job(spec(tmp_path / "o"), vae, use_ray=False)
    spy = PutSpy(monkeypatch)
    assert bulk.run_job(spec(tmp_path / "o"), vae, use_ray=False) == first
    assert spy.keys == []


def test_corrupted_shard_is_the_only_one_rewritten(vae, tmp_path, monkeypatch):
    root = tmp_path / "o"
    bulk.run_job(spec(root), vae, use_ray=False)
    before = files_of(root)
    (root / "shards/shard-00002.npz").write_bytes(b"garbage")
    with pytest.raises(bulk.ShardMismatch, match="shard-00002.npz"):
        bulk.verify(root.as_uri())
    (root / "sidecars/shard-00003.json").unlink()  # a crash between object and sidecar

    spy = PutSpy(monkeypatch)
    bulk.run_job(spec(root), vae, use_ray=False)
    # Only those two shards, each object before its sidecar (shards upload concurrently).
    assert sorted(spy.keys) == layout(range(2, 4))
    for k in (2, 3):
        assert spy.keys.index(f"shards/shard-{k:05d}.npz") < spy.keys.index(f"sidecars/shard-{k:05d}.json")
    assert files_of(root) == before
    bulk.verify(root.as_uri())


@pytest.mark.parametrize("damage", ["altered", "truncated"])
def test_a_damaged_shard_is_refused_by_read_shard_naming_its_url(vae, tmp_path, damage):
    root = tmp_path / "o"
    manifest = bulk.run_job(spec(root), vae, use_ray=False)
    record = manifest["shards"][1]
    path = root / record["key"]
    data = path.read_bytes()
    if damage == "altered":  # same size: only the checksum tells
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    else:
        path.write_bytes(data[: len(data) // 2])
    for which in (1, record):
        with pytest.raises(bulk.ShardMismatch, match=re.escape(f"{path.as_uri()}: ") + ".*corrupted or overwritten"):
            bulk.read_shard(root.as_uri(), which)
    assert bulk.read_shard(root.as_uri(), 0)["index"].tolist() == list(range(16))  # the others still read


def test_a_shard_that_matches_its_record_but_does_not_decode_is_named(vae, tmp_path):
    root = tmp_path / "o"
    bulk.run_job(spec(root), vae, use_ray=False)
    # A manifest that recorded bytes no codec reads (written by hand, or by a broken writer).
    manifest = json.loads((root / "manifest.json").read_text())
    record = manifest["shards"][2]
    garbage = b"not a zip file"
    (root / record["key"]).write_bytes(garbage)
    record.update(sha256=hashlib.sha256(garbage).hexdigest(), bytes=len(garbage))
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bulk.ShardMismatch, match=re.escape(f"{(root / record['key']).as_uri()}: ") + ".*does not decode"):
        bulk.read_shard(root.as_uri(), 2)


# --- refusals --------------------------------------------------------------------------------------
def test_other_spec_to_the_same_output_is_refused_and_nothing_changes(vae, tmp_path):
    root = tmp_path / "o"
    bulk.run_job(spec(root), vae, use_ray=False)
    before = files_of(root)
    for other, field in ((spec(root, seed=4), "seed"), (spec(root, version="2", seed=4), "seed.*version"),
                         (spec(root, shard_size=10), "shard_size")):
        with pytest.raises(bulk.JobRefused, match=f"holds another job.*{field}"):
            bulk.run_job(other, vae, use_ray=False)
    assert files_of(root) == before


def test_a_job_whose_model_moved_on_says_its_output_can_no_longer_be_resumed(vae, tmp_path):
    root = tmp_path / "o"
    with pytest.raises(bulk.JobCancelled):
        bulk.run_job(spec(root), vae, use_ray=False, should_stop=lambda: True)
    before = files_of(root)
    # The champion moved to v2: re-submitting the spec (the API resolves the champion) gets v2 again.
    with pytest.raises(bulk.JobRefused) as refused:
        bulk.run_job(spec(root, version="2"), vae, use_ray=False)
    text = str(refused.value)
    assert "written by version '1' of model 'digits-vae'" in text and "now at version '2'" in text
    assert "can no longer be resumed" in text and "Use a new output prefix" in text and "re-submit" not in text
    assert files_of(root) == before


def test_an_s3_folder_marker_does_not_make_an_output_non_empty(vae, s3_bucket):
    from genmodels.storage import open_storage

    storage = open_storage(s3_bucket)
    # What the AWS console's "Create folder" writes: a zero-byte key ending in "/".
    for key in ("run1/", "run1/sub/"):
        storage.client.put_object(Bucket=storage.bucket, Key=f"{storage.prefix}/{key}", Body=b"")
    manifest = bulk.run_job(spec(f"{s3_bucket}/run1", n=20), vae, use_ray=False)
    assert bulk.verify(f"{s3_bucket}/run1") == manifest
    storage.client.put_object(Bucket=storage.bucket, Key=f"{storage.prefix}/run2/", Body=b"data")
    with pytest.raises(bulk.JobRefused, match="not empty"):
        bulk.run_job(spec(f"{s3_bucket}/run2", n=20), vae, use_ray=False)


def test_non_empty_prefix_without_a_job_is_refused(vae, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o/data.csv").write_text("x")
    with pytest.raises(bulk.JobRefused, match="not empty"):
        bulk.run_job(spec(tmp_path / "o"), vae, use_ray=False)
    assert sorted(files_of(tmp_path / "o")) == ["data.csv"]


def test_output_inside_another_jobs_output_is_refused_and_that_job_stays_whole(vae, tmp_path):
    root = tmp_path / "o"
    bulk.run_job(spec(root), vae, use_ray=False)
    before = files_of(root)
    (tmp_path / "link").symlink_to(root)
    # A name the running job's next shard would take, a folder beside its shards, a link leading into it.
    for inner, named in ((root / "shards" / "shard-00099.npz", root), (root / "extra", root),
                         (tmp_path / "link" / "more", tmp_path / "link")):
        with pytest.raises(bulk.JobRefused, match=re.escape(f"inside the output of another job ({named.as_uri()})")):
            bulk.run_job(spec(inner, seed=9), vae, use_ray=False)
    assert files_of(root) == before
    bulk.verify(root.as_uri())
    # A job.json that is not a job's record does not make its folder a job's output.
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "job.json").write_text('{"kind": "something else"}')
    bulk.run_job(spec(tmp_path / "p" / "q"), vae, use_ray=False)


def test_a_nested_refusal_names_the_job_in_the_clients_terms_not_the_resolved_path(vae, tmp_path):
    real = tmp_path / "mnt-disk7-tenant-data"
    real.mkdir()
    (tmp_path / "outputs").symlink_to(real)  # the operator's output root is a link
    root = tmp_path / "outputs" / "run1"
    bulk.run_job(spec(root, n=20), vae, use_ray=False)
    (tmp_path / "outputs" / "into").symlink_to(root / "shards")
    for inner, named in ((root / "x", f"({root.as_uri()})"),
                         (tmp_path / "outputs" / "into" / "x",
                          f"(reached through the link {(tmp_path / 'outputs' / 'into').as_uri()})")):
        with pytest.raises(bulk.JobRefused) as refused:
            bulk.run_job(spec(inner, n=20, seed=9), vae, use_ray=False)
        assert f"inside the output of another job {named}" in str(refused.value)
        assert real.name not in str(refused.value)


def test_an_output_that_is_an_existing_file_is_refused_by_a_text_not_an_error_id(vae, tmp_path, s3_endpoint):
    from genmodels.storage import StorageError

    root, notes = tmp_path / "o", tmp_path / "notes.txt"
    bulk.run_job(spec(root), vae, use_ray=False)
    notes.write_text("x")
    before = files_of(tmp_path)
    for inner in (root / "manifest.json", root / "shards" / "shard-00000.npz"):  # a job's own: whose is said first
        with pytest.raises(bulk.JobRefused, match=re.escape(f"inside the output of another job ({root.as_uri()})")):
            bulk.run_job(spec(inner, seed=9), vae, use_ray=False)
    with pytest.raises(bulk.JobRefused, match="is an existing object, not a prefix.*Give a fresh prefix"):
        bulk.run_job(spec(notes), vae, use_ray=False)
    with pytest.raises(bulk.JobRefused, match=re.escape(f"lies under an existing object ({notes.as_uri()})")):
        bulk.run_job(spec(notes / "run"), vae, use_ray=False)
    assert files_of(tmp_path) == before
    # Storage that cannot be used stays a fault (an error id in the job's record).
    with pytest.raises(StorageError, match="no such bucket"):
        bulk.run_job(spec("s3://genmodels-no-such-bucket/p"), vae, use_ray=False)


def test_output_inside_another_jobs_output_on_s3_is_refused(vae, s3_bucket):
    bulk.run_job(spec(f"{s3_bucket}/a", n=20), vae, use_ray=False)
    with pytest.raises(bulk.JobRefused, match="inside the output of another job"):
        bulk.run_job(spec(f"{s3_bucket}/a/shards/x", n=20), vae, use_ray=False)
    bulk.verify(f"{s3_bucket}/a")


def test_a_job_that_loses_the_race_for_an_empty_output_writes_nothing(vae, tmp_path, monkeypatch):
    root, ours, theirs = tmp_path / "o", spec(tmp_path / "o"), spec(tmp_path / "o", seed=8)
    original = FileStorage.create_exclusive

    def other_job_claims_first(storage, key, data):
        # The other job passed the same emptiness check a moment earlier and claims first.
        monkeypatch.setattr(FileStorage, "create_exclusive", original)
        bulk.run_job(theirs, vae, use_ray=False)
        return original(storage, key, data)

    monkeypatch.setattr(FileStorage, "create_exclusive", other_job_claims_first)
    with pytest.raises(bulk.JobRefused, match="holds another job.*seed: 8 != 3"):
        bulk.run_job(ours, vae, use_ray=False)
    assert bulk.verify(root.as_uri())["spec"]["seed"] == 8


@pytest.mark.parametrize("ours, theirs, refusal", [
    ("o/inner", "o", "inside the output of another job"),  # a job above ours claims first
    ("o", "o/inner", "is not empty and holds no job.json"),  # a job below ours claims first
])
def test_of_two_jobs_claiming_nested_outputs_at_once_one_withdraws_having_written_nothing(
        vae, tmp_path, monkeypatch, ours, theirs, refusal):
    original = FileStorage.create_exclusive

    def other_job_claims_in_between(storage, key, data):
        # The other job checks and claims between our checks and our claim: neither saw the other.
        monkeypatch.setattr(FileStorage, "create_exclusive", original)
        bulk.run_job(spec(tmp_path / theirs, seed=8), vae, use_ray=False)
        return original(storage, key, data)

    monkeypatch.setattr(FileStorage, "create_exclusive", other_job_claims_in_between)
    with pytest.raises(bulk.JobRefused, match=refusal):
        bulk.run_job(spec(tmp_path / ours), vae, use_ray=False)
    # Every file there is the other job's: one job.json, and its output whole.
    theirs_root = tmp_path / theirs
    assert sorted(files_of(theirs_root)) == ["job.json", "manifest.json"] + layout(range(4))
    assert sorted(files_of(tmp_path)) == sorted(f"{theirs}/{key}" for key in files_of(theirs_root))
    assert bulk.verify(theirs_root.as_uri())["spec"]["seed"] == 8


@pytest.mark.parametrize("kw, field", [
    ({"n": 0}, "n"), ({"n": 100_000_001}, "n"), ({"n": True}, "n"),
    ({"output": "http://x"}, "output"), ({"output": "/tmp/plain/path"}, "output"), ({"output": "s3://"}, "output"),
    ({"temperature": 0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1e-40}, "temperature"), ({"temperature": 101}, "temperature"), ({"temperature": True}, "temperature"),
    ({"shard_size": 0}, "shard_size"), ({"shard_size": 1_000_001}, "shard_size"),
    ({"n": 100_000_000, "shard_size": 999}, "shard_size"),
    ({"format": "jpg"}, "format"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"labels": []}, "labels"), ({"labels": [1, -1]}, r"labels\[1\]"), ({"labels": "a"}, "labels"),
    ({"version": ""}, "version"), ({"model": ""}, "model"),
])
def test_bad_spec_is_a_value_error_naming_the_field(tmp_path, kw, field):
    with pytest.raises(ValueError, match=rf"^{field}\s"):
        spec(tmp_path / "o", **kw)


def test_limits_are_accepted_at_the_edges(tmp_path):
    s = spec(tmp_path / "o", n=100_000_000, shard_size=1000)
    assert s.num_shards == 100_000
    assert spec(tmp_path / "o", n=1, shard_size=1_000_000).num_shards == 1


@pytest.mark.parametrize("model, labels, match", [
    ("vae", 1, "unconditional: it takes no labels"), ("cvae", None, "class-conditional: labels are required"),
    ("cvae", [0, 3], r"must lie in \[0, 3\), got 0\.\.3"), ("cvae", 4, r"must lie in \[0, 3\), got 4$"),
])
def test_labels_that_do_not_fit_the_model_are_refused_before_writing(vae, cvae, tmp_path, model, labels, match):
    files = {"vae": vae, "cvae": cvae}[model]
    with pytest.raises(bulk.JobRefused, match=rf"^labels: .*{match}"):
        bulk.run_job(spec(tmp_path / "o", labels=labels), files, use_ray=False)
    assert not (tmp_path / "o").exists()


def test_missing_manifest_reads_as_unfinished(tmp_path):
    with pytest.raises(FileNotFoundError, match="never finished"):
        bulk.read_manifest((tmp_path / "nothing").as_uri())


class _StaleRay:
    """Ray whose free-CPU view says 0 while ``placeable`` one-CPU bundles can in fact be placed:
    what `ray.available_resources()` reads for a moment after a job released its writers."""

    def __init__(self, placeable: int):
        self.placeable, self.asked, self.removed = placeable, [], 0

    def available_resources(self):
        return {"CPU": 0.0}

    def placement_group(self, bundles, strategy):
        self.asked.append(len(bundles))
        fits = len(bundles) <= self.placeable
        return type("Group", (), {"ready": lambda _: fits})()

    def wait(self, refs, timeout):  # each ref is its group's ready(): whether it fits
        return [r for r in refs if r], [r for r in refs if not r]

    def remove_placement_group(self, group):
        self.removed += 1


@pytest.mark.parametrize("placeable, expected", [(1, 1), (0, 0)])
def test_writers_are_asked_for_even_when_the_free_cpu_view_reads_zero(monkeypatch, placeable, expected):
    import importlib

    from genmodels.bulk.on_ray import _place_writers

    pg = importlib.import_module("ray.util.placement_group")  # the module; ray.util's attribute is the function
    fake = _StaleRay(placeable)
    monkeypatch.setattr(pg, "placement_group", fake.placement_group)
    monkeypatch.setattr(pg, "remove_placement_group", fake.remove_placement_group)
    group, count = _place_writers(fake, wanted=4, should_stop=None)
    # One bundle is asked for whatever the view says; the placement group's wait decides.
    assert (count, fake.asked) == (expected, [1])
    assert (group is None) == (expected == 0) and fake.removed == 1 - expected


@pytest.mark.parametrize("storage", ["store", "./store", "STORE_ABS"])
def test_a_plain_path_storage_gives_output_roots_that_take_its_outputs(storage, tmp_path, monkeypatch):
    from genmodels.config import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GENMODELS_JOB_OUTPUT_ROOTS", raising=False)
    monkeypatch.setenv("GENMODELS_STORAGE", str(tmp_path / "store") if storage == "STORE_ABS" else storage)
    settings = Settings()
    assert settings.storage_url == (tmp_path / "store").as_uri()  # absolute: replicas run elsewhere
    bulk.check_output_root((tmp_path / "store" / "outputs" / "run1").as_uri(), settings.output_roots)
