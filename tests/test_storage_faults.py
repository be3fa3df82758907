"""Storage that misbehaves: every read and write through a fault-injecting proxy in front of the loopback S3 server
(503 SlowDown, 500, dropped connections, hung and slow answers), rank 0's metrics writer through an outage, a
snapshot publish that fails, and a full disk under the node cache."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qcrd_ray import storage
from qcrd_ray.testing import FaultProxy, patience

# A hung request is cut after 1 s here (production: storage.S3_REQUEST_TIMEOUT_S), and a store that always fails
# gets 3 tries, so the tests take seconds; the retry strategy (AWS standard) and its backoff are production's.
TIMEOUT_S, FEW_ATTEMPTS = 1.0, 3
PRODUCTION_TIMEOUT_S = storage.S3_REQUEST_TIMEOUT_S


@pytest.fixture(scope="module")
def proxy(s3_server):
    proxy = FaultProxy(os.environ["AWS_ENDPOINT_URL"])
    yield proxy
    proxy.close()


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setattr(storage, "S3_REQUEST_TIMEOUT_S", TIMEOUT_S)
    storage._filesystem.cache_clear()  # filesystems are built with the settings in force
    yield
    storage._filesystem.cache_clear()


@pytest.fixture
def few_attempts(monkeypatch):
    monkeypatch.setattr(storage, "S3_RETRY_ATTEMPTS", FEW_ATTEMPTS)
    storage._filesystem.cache_clear()


def _prefix(s3_server: str, name: str) -> str:
    return storage.join(s3_server, f"{name}-{uuid.uuid4().hex[:8]}")


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"d": 8}')
    (model / "sub" / "weights.bin").write_bytes(os.urandom(300_000))
    return model


@pytest.mark.parametrize("mode", ["503", "500", "reset", "hang", "slow"])
def test_every_read_and_write_survives_a_quarter_of_requests_failing(s3_server, proxy, tmp_path, mode):
    direct = _prefix(s3_server, f"faults-{mode}")
    run = proxy.uri(direct)  # the same objects, reached through the proxy
    proxy.configure(share=0.25, modes=(mode,), seed=1, delay_s=1.5 * TIMEOUT_S if mode == "hang" else 0.3)
    payload = os.urandom(200_000)
    table = pa.table({"id": [f"e{i}" for i in range(100)], "n": list(range(100))})
    model = _model_dir(tmp_path)

    storage.write_bytes(storage.join(run, "a.bin"), payload)
    storage.write_parquet(storage.join(run, "part-00000.parquet"), table)
    assert storage.write_jsonl_stream(storage.join(run, "rows.jsonl"), ({"i": i} for i in range(50))) == 50
    storage.upload_dir(model, storage.join(run, "model"))
    assert storage.read_bytes(storage.join(run, "a.bin")) == payload
    assert storage.read_parquet(storage.join(run, "part-00000.parquet")).equals(table)
    assert pa.Table.from_batches(storage.iter_parquet_batches(storage.join(run, "part-00000.parquet"))).equals(table)
    assert storage.exists(storage.join(run, "rows.jsonl"))
    assert [storage.basename(p) for p in storage.list_files(run)] == ["a.bin", "part-00000.parquet", "rows.jsonl"]
    got = storage.download_dir(storage.join(run, "model"), tmp_path / "cache")
    for rel in ("config.json", "sub/weights.bin"):
        assert (got / rel).read_bytes() == (model / rel).read_bytes()
    assert proxy.injected[mode] >= 3, (proxy.requests, proxy.injected)  # the faults did happen

    # what the bucket holds, read past the proxy: exactly what was written
    assert storage.read_bytes(storage.join(direct, "a.bin")) == payload
    assert storage.read_parquet(storage.join(direct, "part-00000.parquet")).equals(table)
    assert storage.read_text(storage.join(direct, "rows.jsonl")).splitlines()[-1] == '{"i": 49}'
    assert storage.is_complete(storage.join(direct, "model"))


@pytest.mark.parametrize("mode", ["503", "reset", "hang"])
def test_a_store_that_always_fails_fails_soon_with_the_key_named(s3_server, proxy, mode, few_attempts):
    direct = _prefix(s3_server, "down")
    proxy.configure(share=1.0, modes=(mode,), delay_s=1.5 * TIMEOUT_S)
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"key '.*/a\.bin' in bucket 'qcrd-test'"):  # names what failed
        storage.write_bytes(proxy.uri(storage.join(direct, "a.bin")), b"x")
    # its tries, each backed off by up to 2^n s and, when hung, cut at TIMEOUT_S: bounded, not a hang
    assert time.monotonic() - t0 < patience((2 ** FEW_ATTEMPTS + FEW_ATTEMPTS * TIMEOUT_S) * 1.5)
    assert proxy.requests == FEW_ATTEMPTS
    assert not storage.exists(storage.join(direct, "a.bin"))


def test_a_small_read_answered_503_is_retried_though_the_sdk_calls_it_internal(s3_server, proxy, monkeypatch):
    """pyarrow's S3 reads a range into a buffer of its size: a 503's XML body, longer than a small file, overflows
    it, and the AWS SDK reports INTERNAL_FAILURE ("Failed to flush response stream"), which it does not retry.
    storage retries those reads itself."""
    misreads = []
    after_misread = storage._after_misread
    monkeypatch.setattr(storage, "_after_misread", lambda e, attempt: (misreads.append(e), after_misread(e, attempt)))
    direct = _prefix(s3_server, "small")
    storage.write_json(storage.join(direct, "marker.json"), {"n": 1})  # 13 bytes, shorter than S3's error XML
    proxy.configure(share=0.3, modes=("503",), seed=3)
    for _ in range(5):
        assert json.loads(storage.read_text(proxy.uri(storage.join(direct, "marker.json")))) == {"n": 1}
    assert misreads and all("Failed to flush response stream" in str(e) for e in misreads)


def test_batches_read_again_after_a_misread_mid_file_are_neither_lost_nor_repeated(tmp_path, monkeypatch):
    table = pa.table({"id": [f"e{i}" for i in range(40)]})
    storage.write_parquet(tmp_path / "part.parquet", table)
    real = pq.ParquetFile
    opened = []

    class MisreadOnce(real):  # the first open of the file fails after two batches, as the SDK's misreport would
        def iter_batches(self, **kwargs):
            opened.append(1)
            for i, batch in enumerate(super().iter_batches(**kwargs)):
                if i == 2 and len(opened) == 1:
                    raise OSError(f"AWS Error INTERNAL_FAILURE during GetObject operation: {storage._MISREAD}")
                yield batch

    monkeypatch.setattr(pq, "ParquetFile", MisreadOnce)
    assert pa.Table.from_batches(storage.iter_parquet_batches(tmp_path / "part.parquet", batch_size=4)).equals(table)
    assert len(opened) == 2


def test_an_upload_cut_by_an_outage_is_not_complete_even_over_a_complete_one(s3_server, proxy, tmp_path,
                                                                              monkeypatch, few_attempts):
    direct = _prefix(s3_server, "cut")
    dest = proxy.uri(storage.join(direct, "model"))
    proxy.configure(share=0.0)
    model = _model_dir(tmp_path)
    # Production timeouts for this whole test: the outage below answers 503 at once, so the 1 s cut is not needed,
    # and on a loaded machine it cuts slow requests that must succeed here. An abandoned PUT of the first marker can
    # land after the re-upload removed it, and a DELETE of the marker that times out on every try is an OSError
    # that the raises below would take for the outage (docs/design.md, "What clusters do").
    monkeypatch.setattr(storage, "S3_REQUEST_TIMEOUT_S", PRODUCTION_TIMEOUT_S)
    storage._filesystem.cache_clear()
    storage.upload_dir(model, storage.join(direct, "model"))
    assert storage.is_complete(storage.join(direct, "model"))

    copy_file = storage.copy_file

    def store_goes_down_after_one_file(src, dest):
        size = copy_file(src, dest)
        if str(dest).startswith(storage.join(direct, "model")):  # this upload's, not a write of another thread
            proxy.configure(share=1.0, modes=("503",))
        return size

    monkeypatch.setattr(storage, "copy_file", store_goes_down_after_one_file)
    with pytest.raises(OSError, match="SLOW_DOWN"):  # the outage's 503 SlowDown, nothing else
        storage.upload_dir(model, dest)  # a re-upload: the old marker goes first, the new one never comes
    assert not storage.is_complete(storage.join(direct, "model"))
    with pytest.raises(storage.StorageError, match="incomplete"):
        storage.download_dir(storage.join(direct, "model"), tmp_path / "cache")


def test_the_s3_filesystem_keeps_its_retries_when_pickled_for_ray_workers(proxy, monkeypatch):
    import pickle

    monkeypatch.setattr(storage, "S3_RETRY_ATTEMPTS", 2)  # not pyarrow's default of 3

    fs, path = storage.resolve(proxy.uri("s3://qcrd-test/x"))
    proxy.configure(share=1.0, modes=("503",))
    with pytest.raises(OSError, match="503"):
        pickle.loads(pickle.dumps(fs)).get_file_info(path)
    assert proxy.requests == 2  # pyarrow's own pickling would fall back to its default, 3


def test_a_full_disk_under_the_cache_is_named_and_nothing_half_written_is_kept(s3_server, tmp_path, monkeypatch):
    src = storage.join(_prefix(s3_server, "disk"), "model")
    model = _model_dir(tmp_path)
    storage.upload_dir(model, src)
    cache = tmp_path / "cache"
    real_copy = storage.copy_file

    def disk_full_after_the_first_file(src, dest):
        if Path(dest).name == "weights.bin":
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            Path(dest).write_bytes(b"\0" * 1000)  # a partial file, as a disk filling up leaves it
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        return real_copy(src, dest)

    monkeypatch.setattr(storage, "copy_file", disk_full_after_the_first_file)
    with pytest.raises(storage.StorageError, match=rf"no space left in {cache}.*MiB are free"):
        storage.download_dir(src, cache)
    assert list(cache.iterdir()) == []  # the partial copy is gone, not left for the next call to take
    monkeypatch.undo()
    got = storage.download_dir(src, cache)
    assert (got / "sub" / "weights.bin").read_bytes() == (model / "sub" / "weights.bin").read_bytes()

    # a download that cannot fit fails before fetching anything
    storage.upload_dir(model, src)  # a new upload: not in the cache yet
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(storage.StorageError, match=r"needs 0\.3 MiB, 0\.0 MiB are free"):
        storage.download_dir(src, cache)


def test_rank_zero_metrics_survive_an_outage_without_failing_training(s3_server, proxy, caplog, monkeypatch):
    from qcrd_ray.runs import MethodLayout
    from qcrd_ray.train.loop import RankZeroLog

    monkeypatch.setattr(storage, "S3_RETRY_ATTEMPTS", 2)  # each write the outage fails costs one backoff

    direct = MethodLayout.at(_prefix(s3_server, "metrics"))
    proxy.configure(share=0.0)
    writer = RankZeroLog(MethodLayout.at(proxy.uri(direct.root)), resume_step=0)
    writer.write({"step": 1, "loss": 1.0})
    writer.sync()
    writer.drain()  # the TensorBoard upload too, before the outage

    proxy.configure(share=1.0, modes=("503", "reset"))  # the bucket goes down
    with caplog.at_level(logging.WARNING):
        writer.write({"step": 2, "loss": 0.9})
        writer.negatives({"e0": ("a negative", 0)})
        writer.sync()  # the round end: training goes on
    assert "could not write metrics.jsonl" in caplog.text and "could not write negatives.jsonl" in caplog.text
    assert len(storage.read_text(direct.metrics).splitlines()) == 1

    proxy.configure(share=0.0)  # ...and comes back: the next write carries everything kept
    writer.write({"step": 3, "loss": 0.8})
    writer.sync()
    writer.drain()
    assert [json.loads(line)["step"] for line in storage.read_text(direct.metrics).splitlines()] == [1, 2, 3]
    assert json.loads(storage.read_text(direct.negatives))["id"] == "e0"
    assert storage.list_files(direct.tensorboard, "events.out.tfevents.*")
    writer.close()

    writer = RankZeroLog(MethodLayout.at(proxy.uri(direct.root)), resume_step=3)
    proxy.configure(share=1.0, modes=("503",))
    writer.write({"step": 4, "loss": 0.7})
    with pytest.raises(storage.StorageError, match="could not write metrics.jsonl, tensorboard"):
        writer.close()  # still down at the end: the run must not finish with its record missing


@pytest.mark.ray
def test_a_failed_snapshot_publish_is_retried_then_raised_with_its_round(ray_session, tmp_path, caplog,
                                                                        monkeypatch):
    import types

    import ray
    import torch
    from safetensors.torch import load

    from qcrd_ray.actors import snapshots

    location = tmp_path / "snapshots"
    store = snapshots.SnapshotStore.remote(j=1, location=str(location))
    publisher = snapshots.Publisher(store, attempts=3, backoff_s=0.01)

    def storage_down():
        shutil.rmtree(location, ignore_errors=True)
        location.write_text("a file where the store's folder should be")  # every write under it fails

    def storage_back(_delay):
        location.unlink(missing_ok=True)

    # transient: the first try fails, storage is back during the backoff, the second try stores the weights
    assert ray.get(store.rounds.remote()) == []  # started, with its folder still reachable
    storage_down()
    monkeypatch.setattr(snapshots, "time", types.SimpleNamespace(sleep=storage_back))
    state = {"w": torch.ones(3)}
    with caplog.at_level(logging.WARNING):
        publisher.publish(4, state)
        state["w"].zero_()  # training goes on changing the weights: the retry still sends the published ones
        assert publisher.confirm() == [4]
    assert "snapshot of round 4: publish try 1 of 3 failed (FileExistsError" in caplog.text
    assert load(storage.read_bytes(snapshots.snapshot_path(location, 4)))["w"].tolist() == [1.0, 1.0, 1.0]
    assert publisher.confirm() is None  # nothing pending

    # for good: every try fails, and the caller learns which round and why
    storage_down()
    monkeypatch.setattr(snapshots, "time", types.SimpleNamespace(sleep=lambda _delay: None))
    publisher.publish(5, state)
    with pytest.raises(snapshots.SnapshotPublishError, match=r"round 5 not published after 3 tries: \w+Error"):
        publisher.confirm()

    ray.kill(store)  # a store lost for good is reported, not raised: its samplers' examples get teacher negatives
    with pytest.raises(ray.exceptions.RayActorError):  # a kill lands asynchronously: wait until calls fail
        for _ in range(600):
            ray.get(store.rounds.remote())
            time.sleep(0.1)
    publisher.publish(6, state)
    assert publisher.confirm() is None
