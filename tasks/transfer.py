"""Moving image bytes: staging, inspection, adopt/copy into a datastore, export.

Plain functions (the CLI calls them too); `tasks/objects.py` wraps them as retryable Prefect tasks.
Memory stays bounded: bytes pass through in chunks of Settings.stream_chunk or, for multipart
transfers of streams, Settings.part_size * (max_concurrency + queued_parts); an empty raw image is
read from /dev/zero by name, part by part as it is sent, so it holds no part at all.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from blocks.datastore import ObjectInfo, ObjectRef, S3Datastore
from catalog.model import DiskFormat, IntegrityError, NotFound, Refused
from catalog.settings import Settings, get_settings
from tasks.inspection import HashingReader, Inspection, inspect_stream

Progress = Callable[[int], None]

# Server-side reads of local paths (a flow given `path`) are refused under these, as the reference
# does with RESTRICTED_DIRS, unless the path lies under one of Settings.safe_dirs.
_RESTRICTED_DIRS = (Path("/etc"), Path("/root"), Path("/home"), Path("/proc"), Path("/sys"), Path("/dev"), Path("/var/lib"))


# Where empty raw images come from: the kernel's zeros, read by s3transfer part by part as it
# sends them (no part held in memory, no file on disk).
ZERO_DEVICE = "/dev/zero"


def zeros(size: int, chunk_size: int) -> Iterator[bytes]:
    """`size` zero bytes in chunks of at most `chunk_size` (one shared block, never all of them)."""
    block = bytes(min(chunk_size, size))
    remaining = size
    while remaining > 0:
        step = min(chunk_size, remaining)
        yield block if step == len(block) else bytes(step)
        remaining -= step


def sha256_of_zeros(size: int, chunk_size: int, stop: threading.Event | None = None) -> str | None:
    """The sha256 of `size` zero bytes (None if `stop` was set first)."""
    digest = hashlib.sha256()
    for chunk in zeros(size, chunk_size):
        if stop is not None and stop.is_set():
            return None
        digest.update(chunk)
    return digest.hexdigest()


def upload_zeros(datastore: S3Datastore, ref: ObjectRef, *, size: int,
                 progress: Progress | None = None) -> tuple[ObjectInfo, str]:
    """`size` zero bytes at `ref` (a multipart upload from ZERO_DEVICE: memory stays bounded whatever
    the size and part size), hashed meanwhile by another thread; returns what the store holds and
    the sha256."""
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="hcx-sha256-zeros") as pool:
        digest = pool.submit(sha256_of_zeros, size, get_settings().stream_chunk, stop)
        try:
            info = datastore.upload_path(ZERO_DEVICE, ref, size=size, progress=progress)
        except BaseException:
            stop.set()
            raise
        sha256 = digest.result()
    if info.size != size:
        datastore.delete(ref)
        raise IntegrityError(f"Upload to {ref}: {info.size} bytes stored, {size} expected")
    return info, sha256


@dataclass(frozen=True)
class InspectedObject:
    ref: ObjectRef
    etag: str
    inspection: Inspection


def check_local_source(path: Path, settings: Settings | None = None) -> Path:
    """Resolve symlinks, then refuse a missing file or one under a restricted directory."""
    settings = settings or get_settings()
    real = Path(path).expanduser().resolve()
    if not real.is_file():
        raise Refused(f"File {path} does not exist or is not a regular file: check the --path.")
    restricted = (*_RESTRICTED_DIRS, settings.home.expanduser().resolve())
    safe = [Path(d).expanduser().resolve() for d in settings.safe_dirs]
    if any(real.is_relative_to(d) for d in restricted) and not any(real.is_relative_to(d) for d in safe):
        raise Refused(
            f"File {path} lies in a restricted directory; the service does not read from there. "
            "Upload it with the CLI, or add its directory to HCX_SAFE_DIRS."
        )
    return real


def stage_file(path: Path, datastore: S3Datastore, upload_id: str, progress: Progress | None = None) -> ObjectInfo:
    """Upload a local file into the datastore's staging area, by name: s3transfer reads each part
    as it sends it, so no part is held in memory whatever the file's size."""
    return datastore.upload_path(str(path), datastore.staging_ref(upload_id), size=path.stat().st_size,
                                 progress=progress)


def inspect_object(datastore: S3Datastore, ref: ObjectRef, declared: DiskFormat | None,
                   progress: Progress | None = None) -> InspectedObject:
    """Stream the object once through the format inspector and sha256; pin what was read by ETag."""
    body, info = datastore.open_read(ref)
    with body:
        inspection = inspect_stream(
            body, declared=declared, origin=f"Object {ref}", chunk_size=get_settings().stream_chunk,
            progress=progress,
        )
    if inspection.size != info.size:
        raise IntegrityError(f"Object {ref}: read {inspection.size} bytes, the store announced {info.size}")
    return InspectedObject(ref=ref, etag=info.etag, inspection=inspection)


def copy_object(*, src_store: S3Datastore, src: ObjectRef, dst_store: S3Datastore, dst: ObjectRef,
                etag: str, size: int, sha256: str, progress: Progress | None = None) -> ObjectInfo:
    """Put the inspected bytes at `dst`, moving no byte twice:
    same key -> adopt where it lies; same endpoint -> server-side copy; else a streamed copy.
    Every path proves the bytes are the inspected ones (ETag pin, size and sha256)."""
    if src_store.same_endpoint(dst_store) and (src.bucket, src.key) == (dst.bucket, dst.key):
        info = dst_store.head(dst, if_match=etag)
        if progress is not None:
            progress(info.size)
    elif src_store.same_endpoint(dst_store):
        info = dst_store.server_copy(src, dst, if_match=etag, size=size, progress=progress)
    else:
        info = _stream_copy(src_store, src, dst_store, dst, etag=etag, size=size, sha256=sha256, progress=progress)
    if info.size != size:
        dst_store.delete(dst)
        raise IntegrityError(f"Copy to {dst} has {info.size} bytes, expected {size}")
    return info


def _stream_copy(src_store: S3Datastore, src: ObjectRef, dst_store: S3Datastore, dst: ObjectRef, *,
                 etag: str, size: int, sha256: str, progress: Progress | None) -> ObjectInfo:
    body, _ = src_store.open_read(src, if_match=etag)
    with body:
        reader = HashingReader(body, progress)
        info = dst_store.upload(reader, dst, size_hint=size)
    if reader.sha256 != sha256:
        dst_store.delete(dst)
        raise IntegrityError(f"Copy to {dst}: sha256 {reader.sha256} differs from the inspected {sha256}")
    return info


def matches(datastore: S3Datastore, ref: ObjectRef, *, size: int, sha256: str) -> bool:
    """Whether `ref` already holds exactly these bytes (re-hashed, never trusted by name)."""
    try:
        body, info = datastore.open_read(ref)
    except NotFound:
        return False
    with body:
        if info.size != size:
            return False
        reader = HashingReader(body)
        while reader.read(get_settings().stream_chunk):
            pass
    return reader.sha256 == sha256


def export_object(datastore: S3Datastore, ref: ObjectRef, dest: Path, *, sha256: str | None,
                  etag: str | None = None, progress: Progress | None = None) -> str:
    """Download to `dest` and verify the recorded sha256; a mismatch leaves no file behind."""
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        body, _ = datastore.open_read(ref, if_match=etag)
        with body, open(partial, "wb") as out:
            reader = HashingReader(body, progress)
            while chunk := reader.read(get_settings().stream_chunk):
                out.write(chunk)
        if sha256 and reader.sha256 != sha256:
            raise IntegrityError(
                f"Image bytes at {ref} hash to {reader.sha256}, the catalog records {sha256}: "
                "the stored copy is damaged; do not use this export."
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return reader.sha256
