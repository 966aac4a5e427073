"""Prefect tasks over objects: each small, idempotent and retryable; they take names, never clients."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from blocks.datastore import MAX_PARTS, ObjectInfo, ObjectRef, S3Datastore, load_datastore, service_buckets
from blocks.sealed_urls import drop_sealed_url, unseal_url
from catalog import rules
from catalog.model import DiskFormat, HcxError, Image, IntegrityError, Refused, StorageError, human_size
from catalog.requests import Checksum, UploadRequest
from catalog.settings import S3_MAX_OBJECT, get_settings
from catalog.snapshots import Snapshot, snapshots_of
from catalog.staging import StagedInspection, StagedUpload, open_staging
from catalog.store import open_catalog
from tasks import qemu, transfer
from tasks.inspection import Inspection, InspectingReader, inspect_stream
from tasks.progress import ProgressArtifact
from tasks.retry import IO_TASK
from tasks.url_source import UrlPolicy, UrlStream, open_url


# --- staging: the first step of an upload ------------------------------------------------------

def _staged_before(store: S3Datastore, staged: ObjectRef, upload_id: str) -> bool:
    """Whether a retried upload keeps what it staged before: the size is the one its image
    registered (the bytes' hash is checked when they are registered again). Refused, before
    anything is staged, over a settled image's bytes or under another run's operation."""
    registered = open_catalog().find_by_upload_id(upload_id)
    rules.check_staging_target(registered, flow_run.get_id())
    return registered is not None and store.exists(staged) and store.head(staged).size == registered.size


def record_staging(staged: ObjectRef, upload_id: str, *, owner: str, group: str) -> StagedUpload:
    """Staged bytes are recorded (by `owner`) before their first byte is written, so that reconcile
    may sweep them."""
    return open_staging().record(upload_id=upload_id, datastore=staged.datastore, bucket=staged.bucket, key=staged.key,
                          owner=owner, group=group)


def record_inspection(upload_id: str, etag: str, inspection: Inspection) -> None:
    """What the bytes staged for `upload_id` (the object of `etag`) were, found as they were staged:
    the upload flow trusts it (`inspect_staged`) instead of reading them back."""
    open_staging().record_inspection(upload_id, StagedInspection(
        etag=etag, size=inspection.size, sha256=inspection.sha256, format=inspection.format,
        detected=inspection.detected, virtual_size=inspection.virtual_size))


def drop_staged(store: S3Datastore, staged: ObjectRef, upload_id: str) -> None:
    """Staged bytes and their records go: nothing stays of a refused or abandoned upload, not even
    the parts of an unfinished multipart upload (a run killed while it fetched a URL leaves one)."""
    remove_objects(store, [staged])
    open_staging().forget(upload_id)


@contextmanager
def _nothing_left_on_failure(store: S3Datastore, staged: ObjectRef, upload_id: str) -> Iterator[None]:
    """Whatever stops a staging (refused or mismatched bytes, a source that went away) drops what
    it wrote and its record before the error goes on; a retry stages afresh."""
    try:
        yield
    except BaseException:
        try:
            drop_staged(store, staged, upload_id)
        except HcxError as exc:
            get_run_logger().warning("Staged object %s stays for reconcile: %s", staged, exc)
        raise


def _stage_stream(source: BinaryIO, *, store: S3Datastore, staged: ObjectRef, upload_id: str, size: int | None,
                  declared: DiskFormat | None, checksum: Checksum | None, origin: str,
                  progress: ProgressArtifact) -> Inspection:
    """Send `source` into the staged object through the inspector (format, safety, sizes, sha256,
    the published checksum): the bytes pass once, and what was found is recorded for the object's
    ETag. `size`: the source's announced length, if any (it sizes the parts)."""
    reader = InspectingReader(source, progress, checksum)
    stored = store.upload(reader, staged, size_hint=size)
    inspection = reader.inspection(declared=declared, origin=origin)
    if stored.size != inspection.size or size not in (None, inspection.size):
        announced = f", {size} announced" if size is not None else ""
        raise IntegrityError(f"Staging {origin} into {staged}: {inspection.size} bytes read, {stored.size} "
                             f"stored{announced}: import it again.")
    record_inspection(upload_id, stored.etag, inspection)
    progress.finish()
    return inspection


@task(**IO_TASK)
def stage_local_file(path: str, datastore: str, upload_id: str, *, owner: str, group: str) -> str:
    """Step 1 of an upload given a path on the worker: copy it into the staging area, recorded
    first (by `owner`) so that reconcile may sweep it. A retried upload keeps what it staged before
    if the size is the one it registered (inspection re-hashes it)."""
    real = transfer.check_local_source(Path(path))
    store = load_datastore(datastore)
    staged = store.staging_ref(upload_id)
    if _staged_before(store, staged, upload_id):
        return str(staged)
    record_staging(staged, upload_id, owner=owner, group=group)
    progress = ProgressArtifact(real.stat().st_size, f"Staging {real.name} into {datastore}")
    transfer.stage_file(real, store, upload_id, progress=progress)
    progress.finish()
    return str(store.staging_ref(upload_id))


def url_policy() -> UrlPolicy:
    """How tenant URLs are fetched: only global addresses, and the networks of
    HCX_URL_ALLOW_NETWORKS; at most what one datastore object holds (S3_MAX_OBJECT: the staged
    image is one object; HCX_MAX_VIRTUAL_SIZE bounds what the image is, which the inspector judges
    on the way, not its bytes)."""
    return UrlPolicy.from_json(get_settings().url_allow_networks, max_bytes=S3_MAX_OBJECT)


class _UnknownLength:
    """A URL's body that announced no length: S3 takes it in parts of HCX_PART_SIZE, at most
    MAX_PARTS of them, so it is refused past that (a clear refusal rather than S3's at part 10,001)."""

    def __init__(self, stream: UrlStream):
        self._stream = stream
        self.limit = get_settings().part_size * MAX_PARTS
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._stream.read(size)
        self.received += len(chunk)
        if self.received > self.limit:
            raise Refused(
                f"{self._stream.final_url} announced no length (no Content-Length) and sent more than "
                f"{human_size(self.limit)}, what an image of unknown length may be here ({MAX_PARTS} parts of "
                "HCX_PART_SIZE): give a URL whose server announces the length, or have an administrator raise "
                "HCX_PART_SIZE."
            )
        return chunk


@task(**IO_TASK)
def stage_url(request: UploadRequest, upload_id: str) -> str:
    """Step 1 of an import from an http(s) URL: fetch it into the staging area (every hop checked,
    tasks/url_source.py), inspected and hashed on the way and its published checksum checked;
    recorded first so that reconcile may sweep it. A retried import keeps what it fetched before
    (`_staged_before`)."""
    store = load_datastore(request.datastore)
    staged = store.staging_ref(upload_id)
    if _staged_before(store, staged, upload_id):
        return str(staged)
    policy = url_policy()
    url = unseal_url(request.sealed_url) if request.sealed_url else request.url
    record_staging(staged, upload_id, owner=request.owner, group=request.actor().group)
    with _nothing_left_on_failure(store, staged, upload_id), open_url(url, policy) as stream:
        what = f"{stream.final_url} ({stream.size} bytes)" if stream.size is not None else stream.final_url
        progress = ProgressArtifact(stream.size, f"Fetching {what} into {request.datastore}")
        _stage_stream(stream if stream.size is not None else _UnknownLength(stream), store=store, staged=staged,
                      upload_id=upload_id, size=stream.size, declared=request.driver, checksum=request.checksum,
                      origin=f"The image at {stream.final_url}", progress=progress)
    drop_sealed_url(request.sealed_url)  # the bytes are staged: the URL's credential is needed no more
    return str(staged)


@task(**IO_TASK)
def stage_s3_object(request: UploadRequest, upload_id: str) -> str:
    """Step 1 of an import from an S3 object: read with the endpoint and keys of the request's
    source datastore (a non-administrator never from a bucket of this service:
    `rules.check_import_bucket`), inspected and hashed on the way into the staging area and its
    published checksum checked; recorded first so that reconcile may sweep it."""
    actor = request.actor()
    source = ObjectRef.parse(request.source_datastore, request.s3_uri)
    source_store = load_datastore(source.datastore)
    rules.check_import_bucket(actor, source.bucket, service_buckets())
    store = load_datastore(request.datastore)
    staged = store.staging_ref(upload_id)
    if _staged_before(store, staged, upload_id):
        return str(staged)
    record_staging(staged, upload_id, owner=actor.user, group=actor.group)
    with _nothing_left_on_failure(store, staged, upload_id):
        body, info = source_store.open_read(source)
        with body:
            S3Datastore.check_fits(info.size, f"The image at {source}")
            progress = ProgressArtifact(info.size, f"Reading {source} ({info.size} bytes) into {request.datastore}")
            _stage_stream(body, store=store, staged=staged, upload_id=upload_id, size=info.size,
                          declared=request.driver, checksum=request.checksum, origin=f"The image at {source}",
                          progress=progress)
    return str(staged)


@task(**IO_TASK)
def inspect_staged(datastore: str, upload_id: str, declared: DiskFormat | None,
                   expected_sha256: str | None = None) -> transfer.InspectedObject:
    """What the staged bytes are: format (refusing unsafe or mismatched images), size, sha256, ETag.
    Bytes the image API inspected while it staged them are not read again: its record holds, for
    the object of that very ETag. Others (staged by a flow from a path, or whose record is gone)
    are read once here."""
    store = load_datastore(datastore)
    ref = store.staging_ref(upload_id)
    info = store.head(ref)
    recorded = open_staging().inspection_of(upload_id)
    if (recorded is not None and (recorded.etag, recorded.size) == (info.etag, info.size)
            and declared in (None, recorded.format)):  # else read: the refusal names the mismatch
        inspected = transfer.InspectedObject(ref=ref, etag=info.etag, inspection=Inspection(
            format=recorded.format, detected=recorded.detected, size=recorded.size,
            virtual_size=recorded.virtual_size, sha256=recorded.sha256))
    else:
        progress = ProgressArtifact(info.size, f"Inspecting {ref}")
        inspected = transfer.inspect_object(store, ref, declared, progress=progress)
        progress.finish()
    if expected_sha256 and inspected.inspection.sha256 != expected_sha256:
        raise IntegrityError(
            f"Staged bytes hash to {inspected.inspection.sha256}, expected {expected_sha256}: "
            "they were damaged on the way; upload again."
        )
    return inspected


@task(**IO_TASK)
def copy_into_datastore(*, src: ObjectRef, dst: ObjectRef, etag: str, size: int, sha256: str,
                        reuse: bool = True) -> ObjectInfo:
    """Adopt, server-side copy or stream the inspected object into the image datastore. A copy
    already at `dst` (an earlier run that failed later) is reused only if it re-hashes to `sha256`;
    `reuse` False skips that check (and its full read of `dst`) where `dst` is known to hold other
    bytes (a snapshot copied over its image)."""
    src_store, dst_store = load_datastore(src.datastore), load_datastore(dst.datastore)
    progress = ProgressArtifact(size, f"Copying {src} to {dst}")
    if reuse and dst != src and transfer.matches(dst_store, dst, size=size, sha256=sha256):
        info = dst_store.head(dst)
        get_run_logger().info("%s already holds the %d verified bytes: reused", dst, size)
    else:
        info = transfer.copy_object(src_store=src_store, src=src, dst_store=dst_store, dst=dst,
                                    etag=etag, size=size, sha256=sha256, progress=progress)
    progress.finish()
    return info


@task(**IO_TASK)
def delete_object(ref: ObjectRef) -> None:
    load_datastore(ref.datastore).delete(ref)


@task(**IO_TASK)
def write_empty_image(image_id: int) -> transfer.InspectedObject:
    """The empty disk of a LOCKED image into its datastore, at its object key. raw: zeros uploaded
    part by part from /dev/zero and hashed meanwhile (never a part in memory, nothing on disk);
    qcow2: `qemu-img create` in a temp directory, inspected again, then uploaded; the temp file goes
    whatever happens."""
    image = open_catalog().get(image_id)
    store = load_datastore(image.datastore)
    ref = store.image_ref(image.upload_id)
    size = image.virtual_size
    if image.format is DiskFormat.RAW:
        progress = ProgressArtifact(size, f"Writing {size} zero bytes to {ref}")
        info, sha256 = transfer.upload_zeros(store, ref, size=size, progress=progress)
        progress.finish()
        made = Inspection(format=DiskFormat.RAW, detected="raw", size=size, virtual_size=size, sha256=sha256)
        return transfer.InspectedObject(ref=ref, etag=info.etag, inspection=made)
    with tempfile.TemporaryDirectory(prefix="hcx-empty-") as workdir:
        path = Path(workdir) / f"{image.upload_id}.{image.format.value}"
        qemu.create(path, image.format, size)
        with open(path, "rb") as made_file:
            made = inspect_stream(made_file, declared=image.format, origin=f"qemu-img output {path.name}",
                                  chunk_size=get_settings().stream_chunk)
        if made.virtual_size != size:
            raise IntegrityError(f"qemu-img made a disk of {made.virtual_size} bytes, {size} were asked for")
        with open(path, "rb") as made_file:
            info = store.upload(made_file, ref, size_hint=made.size)
    if info.size != made.size:
        store.delete(ref)
        raise IntegrityError(f"Upload to {ref}: {info.size} bytes stored, {made.size} expected")
    return transfer.InspectedObject(ref=ref, etag=info.etag, inspection=made)


def snapshot_object(snapshot: Snapshot) -> ObjectRef:
    return ObjectRef.parse(snapshot.datastore, snapshot.object)


def snapshot_objects(store: S3Datastore, image: Image) -> list[ObjectRef]:
    """Every snapshot object of an image: those its rows record, and anything else in its snapshot
    area (a copy a crashed run left before its row could say so)."""
    refs = [snapshot_object(s) for s in snapshots_of(open_catalog(), image.id)]
    bucket, prefix = store.snapshot_area(image.id)
    refs += [store.ref(o["Key"], bucket=bucket) for o in store.list_keys(bucket, prefix)]
    return list(dict.fromkeys(refs))


def image_objects(store: S3Datastore, image: Image) -> list[ObjectRef]:
    """Every object an image may have in its datastore: its recorded source, its object key (a
    copy in progress may lie there), its staged upload and its snapshots."""
    refs = [ObjectRef.parse(image.datastore, image.source)] if image.source else []
    if image.upload_id:
        refs += [store.image_ref(image.upload_id), store.staging_ref(image.upload_id)]
    return list(dict.fromkeys(refs + snapshot_objects(store, image)))


def remove_objects(store: S3Datastore, refs: list[ObjectRef], progress: ProgressArtifact | None = None) -> None:
    """Delete objects, abort their incomplete multipart uploads, and prove them gone. Idempotent:
    what is already gone is fine."""
    for ref in refs:
        store.delete(ref)
        for upload in store.list_multipart_uploads(ref.bucket, ref.key):
            if upload["Key"] == ref.key:
                store.abort_multipart_upload(ref.bucket, ref.key, upload["UploadId"])
        if store.exists(ref):
            raise StorageError(f"{ref} is still there after its deletion")
        if progress is not None:
            progress(1)


@task(**IO_TASK)
def remove_image_objects(image_id: int) -> list[str]:
    """Delete every object of an image being deleted (its snapshots' too), abort its incomplete
    multipart uploads, and prove they are gone. Idempotent: what is already gone is fine."""
    image = open_catalog().get(image_id)
    rules.owned_by(image, flow_run.get_id())  # a superseded delete run deletes nothing
    store = load_datastore(image.datastore)
    refs = image_objects(store, image)
    remove_objects(store, refs)
    return [str(ref) for ref in refs]
