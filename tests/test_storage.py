"""The storage layer against a local folder and a real S3 server (moto on loopback), the cluster checks, and a
multi-node smoke test: a task on a worker node writes to s3:// and the driver reads it back."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from qcrd_ray import storage


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """A fresh run location: a local folder, or a fresh prefix in the S3 server's bucket."""
    if request.param == "local":
        return str(tmp_path / "run")
    return storage.join(request.getfixturevalue("s3_server"), f"run-{uuid.uuid4().hex[:8]}")


def test_paths_and_uris_join_and_resolve():
    assert storage.is_uri("s3://b/k") and storage.is_uri("file:///tmp/x") and storage.is_uri("gs://b")
    assert not storage.is_uri("runs/x") and not storage.is_uri("/abs/x") and not storage.is_uri(r"C:\x")
    assert storage.join("s3://b/run/", "teacher", "part-0.parquet") == "s3://b/run/teacher/part-0.parquet"
    assert storage.join("s3://b/run?endpoint_override=h:9", "m") == "s3://b/run/m?endpoint_override=h:9"
    assert storage.join("runs/x", "teacher") == os.path.join("runs/x", "teacher")
    assert storage.basename("s3://b/run/model/") == "model"
    fs, path = storage.resolve("runs/x")
    assert fs.type_name == "local" and path == os.path.abspath("runs/x")
    assert storage.resolve("file:///tmp/x")[1] == "/tmp/x"
    assert storage.train_storage("runs/x") == (os.path.abspath("runs/x"), None)


def test_json_readers_give_none_or_nothing_for_a_missing_file_and_skip_a_cut_line(location):
    doc, lines = storage.join(location, "metrics.json"), storage.join(location, "metrics.jsonl")
    assert storage.read_json(doc) is None and storage.read_jsonl(lines) == []
    storage.write_json(doc, {"accuracy": 0.5})
    storage.write_text(lines, '{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')  # a writer killed mid-line
    assert storage.read_json(doc) == {"accuracy": 0.5}
    assert storage.read_jsonl(lines) == [{"step": 1}, {"step": 2}]


def test_read_write_list_delete(location):
    a = storage.join(location, "a.json")
    assert not storage.exists(a) and storage.list_files(location) == []
    with pytest.raises(FileNotFoundError, match="a.json does not exist"):
        storage.read_text(a)
    storage.write_json(a, {"x": 1})
    storage.write_json(a, {"x": 2})  # replaced whole
    assert json.loads(storage.read_text(a)) == {"x": 2} and storage.is_file(a)
    storage.write_bytes(storage.join(location, "sub", "b.bin"), b"\x00\x01")
    table = pa.table({"id": ["e0", "e1"], "n": [1, 2]})
    for i in (1, 0):
        storage.write_parquet(storage.join(location, f"part-{i:05d}.parquet"), table)
    assert [storage.basename(p) for p in storage.list_files(location, "part-*.parquet")] == [
        "part-00000.parquet", "part-00001.parquet"]  # sorted, files only, the subfolder is not listed
    assert storage.read_parquet(storage.join(location, "part-00001.parquet")).equals(table)
    batches = list(storage.iter_parquet_batches(storage.join(location, "part-00001.parquet"), batch_size=1))
    assert [b.num_rows for b in batches] == [1, 1] and pa.Table.from_batches(batches).equals(table)
    assert storage.read_bytes(storage.join(location, "sub", "b.bin")) == b"\x00\x01"
    storage.delete(a)
    storage.delete(a)  # missing is fine
    assert not storage.exists(a)
    storage.delete_dir(location)
    assert storage.list_files(location) == []


def test_local_write_is_atomic_and_cleans_up_after_a_failed_write(tmp_path):
    target = tmp_path / "out" / "summary.json"
    storage.write_text(target, "old")

    with pytest.raises(TypeError):  # fails after the temporary file was opened
        storage.write_bytes(target, "text is not bytes")
    assert target.read_text() == "old"  # the reader still sees the complete old file
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]  # no temporary left behind
    (target.parent / ".part-00001.parquet.tmp-999-abc").write_bytes(b"torn")  # what a killed writer leaves
    storage.remove_partial_writes(target.parent)
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_streamed_write_replaces_whole_or_not_at_all(location):
    target = storage.join(location, "errors.jsonl")
    storage.write_text(target, "old\n")

    def records():
        yield {"id": "e0"}
        assert not storage.read_text(target).startswith('{"id"')  # nothing visible before the block ends
        yield {"id": "e1"}
        raise RuntimeError("the writer failed mid-file")

    with pytest.raises(RuntimeError, match="mid-file"):
        storage.write_jsonl_stream(target, records())
    assert storage.read_text(target) == "old\n"  # not a torn half of the new content
    assert storage.write_jsonl_stream(target, ({"id": f"e{i}", "t": "é"} for i in range(3))) == 3
    assert [json.loads(line) for line in storage.read_text(target).splitlines()] == [
        {"id": f"e{i}", "t": "é"} for i in range(3)]
    with storage.open_write(storage.join(location, "sub", "b.bin")) as f:
        f.write(b"\x00")
        f.write(b"\x01")
    assert storage.read_bytes(storage.join(location, "sub", "b.bin")) == b"\x00\x01"
    assert sorted(storage.basename(p) for p in storage.list_files(location)) == ["errors.jsonl"]  # no temporaries


def test_upload_download_needs_the_completeness_marker(location, tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"d": 8}')
    (model / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    dest = storage.join(location, "model")

    # an upload that stopped before its marker: its files are there, but nobody may load it
    storage.write_bytes(storage.join(dest, "config.json"), b"{}")
    assert not storage.is_complete(dest)
    with pytest.raises(storage.StorageError, match="incomplete"):
        storage.download_dir(dest, tmp_path / "cache")

    storage.upload_dir(model, dest)
    assert storage.is_complete(dest)
    got = storage.download_dir(dest, tmp_path / "cache")
    assert (got / "config.json").read_text() == '{"d": 8}'
    assert (got / "sub" / "weights.bin").read_bytes() == (model / "sub" / "weights.bin").read_bytes()
    assert storage.download_dir(dest, tmp_path / "cache") == got  # a second replica reuses the cached copy
    if storage.is_uri(location):
        assert not got.is_relative_to(tmp_path / "run")
        # a new upload to the same URI is fetched anew, not served stale from the cache
        (model / "config.json").write_text('{"d": 16}')
        storage.upload_dir(model, dest)
        assert (storage.download_dir(dest, tmp_path / "cache") / "config.json").read_text() == '{"d": 16}'


def test_copy_file_streams_in_chunks_both_ways(s3_server, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "COPY_CHUNK_BYTES", 4096)  # so that the file takes many chunks
    payload = os.urandom(100_000)
    (tmp_path / "w.bin").write_bytes(payload)
    remote = storage.join(s3_server, f"copy-{uuid.uuid4().hex[:8]}", "w.bin")
    assert storage.copy_file(tmp_path / "w.bin", remote) == len(payload)
    assert storage.copy_file(remote, tmp_path / "back" / "w.bin") == len(payload)
    assert (tmp_path / "back" / "w.bin").read_bytes() == payload
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.copy_file(storage.join(s3_server, "no-such-file"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _two_file_model(folder, a: str, b: str):
    folder.mkdir(exist_ok=True)
    (folder / "a.txt").write_text(a)
    (folder / "b.txt").write_text(b)
    return folder


def test_a_download_that_a_re_upload_overtakes_is_dropped_and_the_new_upload_fetched(s3_server, tmp_path,
                                                                                     monkeypatch):
    src = storage.join(s3_server, f"reup-{uuid.uuid4().hex[:8]}", "model")
    model = _two_file_model(tmp_path / "model", "old-a", "old-b")
    storage.upload_dir(model, src)
    real_copy = storage.copy_file
    uploads = []

    def re_upload_after_the_first_file(from_, to):
        size = real_copy(from_, to)
        if not storage.is_uri(to) and not uploads:  # the download's first file is here: a new upload, equal sizes
            uploads.append(_two_file_model(model, "new-a", "new-b"))
            storage.upload_dir(model, src)
        return size

    monkeypatch.setattr(storage, "copy_file", re_upload_after_the_first_file)
    got = storage.download_dir(src, tmp_path / "cache")
    # not old-a beside new-b under the old upload's name: the whole new upload
    assert ((got / "a.txt").read_text(), (got / "b.txt").read_text()) == ("new-a", "new-b")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [got.name]


def test_a_folder_uploaded_again_during_every_download_is_refused_by_name(s3_server, tmp_path, monkeypatch):
    src = storage.join(s3_server, f"reup-{uuid.uuid4().hex[:8]}", "model")
    model = _two_file_model(tmp_path / "model", "a", "b")
    storage.upload_dir(model, src)
    real_copy = storage.copy_file

    def re_upload_during_each_download(from_, to):
        size = real_copy(from_, to)
        if not storage.is_uri(to) and Path(to).name == "b.txt":
            storage.upload_dir(model, src)
        return size

    monkeypatch.setattr(storage, "copy_file", re_upload_during_each_download)
    with pytest.raises(storage.StorageError, match=f"uploaded again during each of {storage.DOWNLOAD_ATTEMPTS}"):
        storage.download_dir(src, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_train_storage_of_a_uri_is_a_filesystem_and_a_bucket_path(s3_server):
    path, fs = storage.train_storage(storage.join(s3_server, "run", "train"))
    assert path == "qcrd-test/run/train" and isinstance(fs, pafs.S3FileSystem)
    with fs.open_output_stream(f"{path}/probe") as f:  # what Ray Train does with the pair
        f.write(b"ok")
    assert storage.read_bytes(storage.join(s3_server, "run", "train", "probe")) == b"ok"


def test_check_shared_refuses_what_other_nodes_cannot_reach():
    storage.check_shared("runs/x", multi_node=False)  # one machine: anything goes
    storage.check_shared("s3://bucket/run", multi_node=True)
    storage.check_shared("/mnt/efs/run", multi_node=True, fstype="nfs4")
    with pytest.raises(storage.StorageError, match="relative path.*s3://bucket/run"):
        storage.check_shared("runs/x", multi_node=True)
    with pytest.raises(storage.StorageError, match="node-local disk .ext4"):
        storage.check_shared("/home/me/run", multi_node=True, fstype="ext4")
    with pytest.raises(storage.StorageError, match="node-local"):
        storage.check_shared("file:///tmp/run", multi_node=True, fstype="tmpfs")


def test_mount_fstype_takes_the_longest_mount_point():
    mounts = "overlay / overlay rw 0 0\nfs-1.efs:/ /mnt/efs nfs4 rw 0 0\ntmpfs /mnt/efsx tmpfs rw 0 0\n"
    assert storage.mount_fstype("/mnt/efs/run", mounts) == "nfs4"
    assert storage.mount_fstype("/mnt/efsx/run", mounts) == "tmpfs"
    assert storage.mount_fstype("/home/run", mounts) == "overlay"


def test_cluster_smoke_a_worker_node_writes_to_s3_the_driver_reads_it(multinode_cluster, s3_server):
    import ray

    assert storage.is_multi_node()
    head = ray.get_runtime_context().get_node_id()
    target = storage.join(s3_server, "smoke", "from-worker.json")

    @ray.remote(num_cpus=1)  # the head has no CPUs: this runs on a worker node's raylet
    def write(location):
        node = ray.get_runtime_context().get_node_id()
        storage.write_json(location, {"node": node, "pid": os.getpid()})
        return node

    node = ray.get(write.remote(target))
    written = json.loads(storage.read_text(target))
    assert written["node"] == node != head and written["pid"] != os.getpid()
    with pytest.raises(storage.StorageError, match="relative path"):
        storage.check_shared("runs/x", storage.is_multi_node())
