"""One run location, a local path or a URI (``s3://``, ``gs://``, any ``pyarrow.fs`` URI), read and written the same
way from the driver, a train worker, an actor or a Serve replica.

Locations are plain strings (``str`` or ``Path`` accepted), so they travel to Ray workers as they are and each
process opens its own filesystem. Endpoints and credentials come from the usual environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
``GOOGLE_APPLICATION_CREDENTIALS``...) or from the URI's query string (``s3://b/run?endpoint_override=...``).

Writes are atomic: a reader sees the old file, the new file or no file, never a torn one. Locally that is a
temporary file in the same folder renamed into place; on an object store it is one object upload, which becomes
visible only when it completes. Folders are uploaded file by file, then a completeness marker is written LAST,
and a download refuses a folder without it.

A misbehaving store (503 SlowDown, 500, dropped connections, hung answers) is retried by the AWS SDK's standard
retry mode with backoff (``S3_RETRY_ATTEMPTS``, timeouts ``S3_*_TIMEOUT_S``), in this process and in the copies
of the filesystem Ray hands to its workers; tests/test_storage_faults.py proves it through a fault-injecting proxy.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import hashlib
import itertools
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

Location = str | os.PathLike

# written last by upload_dir: its presence means every file it lists is in place
COMPLETE_MARKER = "_COMPLETE.json"
# temporary files of local atomic writes (".<name>.tmp-<pid>-<hex>"); a killed writer may leave one behind
TMP_PATTERN = ".*.tmp-*"
COPY_CHUNK_BYTES = 8 << 20  # what memory holds of a file being copied
DOWNLOAD_ATTEMPTS = 3  # downloads of a folder that is uploaded again meanwhile, before download_dir gives up
# filesystem types of /proc/mounts that every node of a cluster can share
SHARED_FSTYPES = ("nfs", "nfs4", "efs", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "fuse")


class StorageError(RuntimeError):
    pass


def is_uri(location: Location) -> bool:
    """True for ``scheme://...`` (``file://`` included); False for a plain local path."""
    text = os.fspath(location)
    scheme = urlsplit(text).scheme
    return "://" in text and len(scheme) > 1  # a Windows drive letter is not a scheme


def join(base: Location, *parts: str) -> str:
    """``base/part/...`` for a path or a URI (a URI's query string stays at the end)."""
    base = os.fspath(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    head, sep, query = base.partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def basename(location: Location) -> str:
    return os.fspath(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


# environment that changes which endpoint or account a cached client talks to
_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "AWS_PROFILE")


# S3 requests are retried by the AWS SDK's standard mode: 503 SlowDown, 500, dropped connections and timeouts
# (tests/test_storage_faults.py checks each through a fault-injecting proxy), after a jittered backoff of up to
# 2^n s (capped at 20 s): 10 attempts ride out a store failing for about a minute (111 s of backoff at most)
S3_RETRY_ATTEMPTS = 10
# seconds to connect, and without a byte of the answer (curl's low-speed limit on Linux): past either, a hung
# request is abandoned and retried (the SDK's default 3 s would retry a busy but working store's slow answers)
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 20.0


@functools.lru_cache(maxsize=16)
def _filesystem(root: str, env_key: tuple) -> pafs.FileSystem:
    # one client per bucket and environment: from_uri may look up the bucket's region over the network
    fs = pafs.FileSystem.from_uri(root)[0]
    # rebuilt from pyarrow's own reading of the URI (its query options included), with our retries and timeouts
    return _retrying_s3(fs.__reduce__()[1][0]) if isinstance(fs, pafs.S3FileSystem) else fs


def _retrying_s3(options: dict) -> pafs.S3FileSystem:
    return _RetryingS3(**{**options, "connect_timeout": S3_CONNECT_TIMEOUT_S, "request_timeout": S3_REQUEST_TIMEOUT_S,
                          "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS)})


class _RetryingS3(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, pickled with its retry strategy: ``S3FileSystem.__reduce__`` leaves the strategy
    out, so the copy Ray hands to Train workers and Data tasks (``train_storage``, ``read_parquet``) would retry
    only 3 times."""

    def __reduce__(self):
        return _retrying_s3, (super().__reduce__()[1][0],)


def resolve(location: Location) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and the path inside it."""
    text = os.fspath(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(text)
    parts = urlsplit(text)
    if parts.scheme == "file":
        return pafs.LocalFileSystem(), parts.path
    root = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
    fs = _filesystem(root, tuple(os.environ.get(k) for k in _ENV))
    # object stores name the bucket first (s3://bucket/key -> bucket/key); others (hdfs://host/p) the path only
    path = f"{parts.netloc}{parts.path}" if parts.scheme in ("s3", "gs", "gcs") else parts.path
    return fs, path.rstrip("/")


def _is_local(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "local"


def exists(location: Location) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: Location) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


# pyarrow reads an S3 range into a buffer of the range's size: an error answer longer than that (a 503 SlowDown's
# XML, a few hundred bytes, on a small file or a Parquet footer) overflows it, and the AWS SDK reports a
# non-retryable INTERNAL_FAILURE, "Failed to flush response stream", instead of the 503 (tests/test_storage_faults.py
# meets it). A read has no side effect: those are tried again here.
_MISREAD = "Failed to flush response stream"


def _after_misread(error: OSError, attempt: int) -> None:
    """Raise ``error`` unless it is that misreport and tries remain; else back off as the SDK's standard mode."""
    if _MISREAD not in str(error) or attempt + 1 >= S3_RETRY_ATTEMPTS:
        raise error
    time.sleep(min(random.random() * 2**attempt, 20.0))


def _reading(read):
    for attempt in itertools.count():
        try:
            return read()
        except OSError as e:
            _after_misread(e, attempt)


def read_bytes(location: Location) -> bytes:
    fs, path = resolve(location)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return _reading(read)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{os.fspath(location)} does not exist") from e


def read_text(location: Location) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: Location, data: bytes) -> None:
    """Atomically replace ``location`` with ``data``."""
    fs, path = resolve(location)
    if _is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    # the whole payload is in memory before the stream opens: the object appears when the upload completes
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: Location, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: Location, obj) -> None:
    write_text(location, json.dumps(obj, indent=2) + "\n")


def write_jsonl(location: Location, records) -> None:
    write_text(location, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_json(location: Location):
    """The JSON document at ``location``; None when there is none (a stage that has not written it yet)."""
    return json.loads(read_text(location)) if exists(location) else None


def read_jsonl(location: Location) -> list:
    """The records of a JSON-lines file; [] when there is none. A line cut by an interrupted write is skipped:
    the lines before it are still good."""
    if not exists(location):
        return []
    records = []
    for line in read_text(location).splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@contextlib.contextmanager
def open_write(location: Location) -> Iterator[BinaryIO]:
    """A binary file to write ``location``'s new content into, piece by piece, so the content is never whole in
    memory. It replaces ``location`` atomically when the block exits normally; if the block raises, ``location``
    is left as it was. Locally: a temporary file in the same folder, renamed into place. On an object store: a
    node-local temporary file, uploaded in one streamed copy at the end (the object appears when that completes;
    written straight to the store's stream, an error mid-block would publish the part written so far)."""
    fs, path = resolve(location)
    local = _is_local(fs)
    parent = os.path.dirname(path) if local else tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    # named like write_bytes' temporaries, so remove_partial_writes clears what a killed writer leaves
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
        if local:
            os.replace(tmp, path)
        else:
            pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    finally:
        Path(tmp).unlink(missing_ok=True)


def jsonl_line(record) -> bytes:
    """One JSON-lines record as written by ``write_jsonl`` / ``write_jsonl_stream``."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def write_jsonl_stream(location: Location, records: Iterable) -> int:
    """``write_jsonl`` one record at a time (``records`` may be a generator): memory holds one line, not the
    file. Returns the number of records written."""
    n = 0
    with open_write(location) as f:
        for record in records:
            f.write(jsonl_line(record))
            n += 1
    return n


def write_parquet(location: Location, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(location, sink.getvalue().to_pybytes())


def read_parquet(location: Location) -> pa.Table:
    fs, path = resolve(location)
    return _reading(lambda: pq.read_table(path, filesystem=fs))


def iter_parquet_batches(location: Location, batch_size: int = 64) -> Iterator[pa.RecordBatch]:
    """The rows of a Parquet file, ``batch_size`` at a time: memory holds one batch, not the file (a whole-table
    read through ``read_parquet`` also warms up Arrow's dataset reader and thread pools, tens of MiB)."""
    fs, path = resolve(location)
    done = 0  # batches handed out: a read tried again skips them (a file's batches always come in one order)
    for attempt in itertools.count():
        try:
            with fs.open_input_file(path) as f:
                batches = pq.ParquetFile(f).iter_batches(batch_size=batch_size, use_threads=False)
                for batch in itertools.islice(batches, done, None):
                    done += 1
                    yield batch
            return
        except OSError as e:
            _after_misread(e, attempt)


def parquet_num_rows(location: Location) -> int | None:
    """The row count in a Parquet file's footer; None when the file is missing, truncated or not Parquet."""
    fs, path = resolve(location)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (OSError, pa.ArrowInvalid):
        return None


def list_files(location: Location, pattern: str = "*") -> list[str]:
    """Locations of the files directly in folder ``location`` whose name matches ``pattern``, sorted by name.
    A missing folder lists as empty."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)
    return [join(location, n) for n in names if fnmatch.fnmatchcase(n, pattern)]


def delete(location: Location) -> None:
    """Remove a file (missing is fine)."""
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(location: Location) -> None:
    """Remove a folder and everything under it (missing is fine)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def remove_partial_writes(folder: Location) -> None:
    """Temporary files that a writer killed mid-write left in ``folder`` (only local writes make them)."""
    for tmp in list_files(folder, TMP_PATTERN):
        delete(tmp)


# ---------------------------------------------------------------------------------------------------- folders


def copy_file(src: Location, dest: Location) -> int:
    """Copy the file at ``src`` to ``dest`` (each a path or a URI) in chunks, never whole in memory (a model's
    weights are gigabytes); returns its size. ``dest`` appears whole or not at all, as a write does; a read the
    store misreports (``_MISREAD``) starts the copy again."""
    fs, path = resolve(src)
    dest_fs, dest_path = resolve(dest)
    if _is_local(fs) and not _is_local(dest_fs):  # one streamed upload: the object appears when it completes
        pafs.copy_files(path, dest_path, source_filesystem=fs, destination_filesystem=dest_fs)
        return os.path.getsize(path)

    def copy() -> int:
        with fs.open_input_stream(path) as f, open_write(dest) as out:
            shutil.copyfileobj(f, out, COPY_CHUNK_BYTES)
            return out.tell()

    try:
        return _reading(copy)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{os.fspath(src)} does not exist") from e


def upload_dir(local_dir: Location, dest: Location) -> None:
    """Copy every file under ``local_dir`` to ``dest`` (each write atomic), then write the completeness marker
    listing them, last. A previous marker is removed first, so an interrupted re-upload is never taken as done."""
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if not files:
        raise StorageError(f"{local_dir} holds no files to upload")
    delete(join(dest, COMPLETE_MARKER))
    listing = {}
    for p in files:
        rel = p.relative_to(local_dir).as_posix()
        listing[rel] = copy_file(p, join(dest, *rel.split("/")))
    # a fresh id per upload: download_dir caches by (URI, marker), and a re-upload with equal sizes must not hit it
    write_json(join(dest, COMPLETE_MARKER), {"files": listing, "upload": uuid.uuid4().hex})


def is_complete(location: Location) -> bool:
    return is_file(join(location, COMPLETE_MARKER))


def cache_dir(*parts: str, root: Location | None = None) -> Path:
    """A node-local cache folder (created): ``root`` or the system temp dir, then ``qcrd-cache/<parts>``."""
    path = Path(root if root is not None else tempfile.gettempdir(), "qcrd-cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_dir(src: Location, cache: Location | None = None) -> Path:
    """A local folder holding the complete upload at ``src``.

    Refuses a folder without the completeness marker (an upload still running or killed). A local ``src`` is
    returned as it is; a remote one is downloaded into ``cache`` (default ``cache_dir("downloads")``) under a name
    derived from the URI and the marker, into a temporary folder renamed into place, so concurrent callers on one
    node (Serve replicas) never load a half-copied folder and a later upload to the same URI is fetched anew.
    Files are streamed to disk. The marker is read again once they are all here: a re-upload that began meanwhile
    (it removes the marker first) may have replaced some of them, so that copy is dropped and the new upload
    fetched, up to ``DOWNLOAD_ATTEMPTS`` times.
    """
    fs, path = resolve(src)
    if _is_local(fs):
        _marker(src)
        return Path(path)
    root = Path(cache) if cache is not None else cache_dir("downloads")
    for _ in range(DOWNLOAD_ATTEMPTS):
        marker = _marker(src)
        key = hashlib.sha256(os.fspath(src).encode() + b"\0" + marker).hexdigest()[:16]
        target = root / f"{basename(src)}-{key}"
        if (target / COMPLETE_MARKER).exists() or _fetch(src, marker, target):
            return target
    raise StorageError(f"{os.fspath(src)} was uploaded again during each of {DOWNLOAD_ATTEMPTS} downloads; "
                       "retry once its uploads have stopped")


def _marker(src: Location) -> bytes:
    """The completeness marker's bytes at ``src``; a StorageError saying the folder is incomplete without one."""
    try:
        return read_bytes(join(src, COMPLETE_MARKER))
    except FileNotFoundError:
        raise StorageError(
            f"{os.fspath(src)} is incomplete (no {COMPLETE_MARKER}): its upload is still running or was "
            "interrupted; rerun the step that writes it"
        ) from None


def _fetch(src: Location, marker: bytes, target: Path) -> bool:
    """Download the upload that ``marker`` lists into ``target``; False when ``src``'s marker changed meanwhile
    (nothing is kept then)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    files = json.loads(marker)["files"]
    need = sum(files.values())
    if need > shutil.disk_usage(target.parent).free:  # fail before fetching gigabytes that cannot be kept
        raise _no_space(target.parent, src, need)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for rel, size in files.items():
            got = copy_file(join(src, *rel.split("/")), tmp / rel)
            if got != size:
                raise StorageError(f"{join(src, rel)} has {got} bytes, its upload recorded {size}")
        try:
            unchanged = read_bytes(join(src, COMPLETE_MARKER)) == marker
        except FileNotFoundError:  # a re-upload is running
            unchanged = False
        if not unchanged:
            return False
        (tmp / COMPLETE_MARKER).write_bytes(marker)
        try:
            os.rename(tmp, target)
        except OSError:  # another process on this node finished the same download first
            if not (target / COMPLETE_MARKER).exists():
                raise
    except OSError as e:  # the disk filled up meanwhile (another writer on this node)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(target.parent, src, need) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial copy is never renamed into place, so never reused
    return True


def _no_space(folder: Path, src: Location, need: int) -> StorageError:
    free = shutil.disk_usage(folder).free
    return StorageError(f"no space left in {folder} to download {os.fspath(src)}: it needs {need / 2**20:.1f} MiB, "
                        f"{free / 2**20:.1f} MiB are free; free some, or move the node cache to a larger disk "
                        "(it lives in the system temp folder: set TMPDIR)")


# ---------------------------------------------------------------------------------------------------- clusters


def train_storage(location: Location) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``: a URI's filesystem and the path in
    it; a local path made absolute, with Ray's default filesystem."""
    fs, path = resolve(location)
    return (path, None) if _is_local(fs) else (path, fs)


def mount_fstype(path: Location, mounts: str | None = None) -> str:
    """Filesystem type of the mount holding ``path`` (longest mount-point prefix in ``/proc/mounts``)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    path = os.path.abspath(os.fspath(path))
    best, fstype = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, fstype = point, fields[2]
    return fstype


def check_shared(location: Location, multi_node: bool, fstype: str | None = None) -> None:
    """Refuse a location that other nodes of a multi-node cluster cannot reach: a relative path (on a cluster it
    lands in the job's temporary working directory) or a node-local disk. A URI, or an absolute path on a network
    filesystem (NFS, EFS, Lustre, a FUSE mount of a bucket...), passes. ``fstype`` defaults to the mount's type."""
    text = os.fspath(location)
    if not multi_node or (is_uri(text) and urlsplit(text).scheme != "file"):
        return
    path = urlsplit(text).path if is_uri(text) else text
    hint = ("use a URI every node reaches (s3://bucket/run, gs://bucket/run) or an absolute path on a "
            "filesystem mounted on every node (NFS/EFS; see cluster.yaml)")
    if not os.path.isabs(path):
        raise StorageError(f"{text!r} is a relative path on a multi-node cluster: it would stay in one node's "
                           f"temporary working directory; {hint}")
    kind = mount_fstype(path) if fstype is None else fstype
    if not kind.startswith(SHARED_FSTYPES):
        raise StorageError(f"{text!r} is on a node-local disk ({kind or 'unknown'} filesystem) that the other "
                           f"nodes of this cluster cannot read; {hint}")


def is_multi_node() -> bool:
    """Whether the connected Ray cluster has more than one alive node."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive")) > 1


__all__ = [
    "COMPLETE_MARKER", "StorageError", "is_uri", "join", "basename", "resolve", "exists", "is_file", "read_bytes",
    "read_text", "write_bytes", "write_text", "write_json", "write_jsonl", "read_json", "read_jsonl", "open_write",
    "jsonl_line", "write_jsonl_stream",
    "write_parquet", "read_parquet", "iter_parquet_batches",
    "list_files", "delete", "delete_dir", "remove_partial_writes", "upload_dir", "is_complete", "cache_dir",
    "copy_file", "download_dir", "train_storage", "mount_fstype", "check_shared", "is_multi_node",
]
