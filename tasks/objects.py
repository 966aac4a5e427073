"""Prefect tasks over objects: each small, idempotent and retryable; they take names, never clients."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from blocks.datastore import ObjectInfo, ObjectRef, S3Datastore, load_datastore
from catalog import rules
from catalog.model import DiskFormat, Image, IntegrityError, StorageError
from catalog.settings import get_settings
from catalog.staging import open_staging
from catalog.store import open_catalog
from tasks import qemu, transfer
from tasks.inspection import Inspection, inspect_stream
from tasks.progress import ProgressArtifact
from tasks.retry import IO_TASK


@task(**IO_TASK)
def stage_local_file(path: str, datastore: str, upload_id: str, *, owner: str, group: str) -> str:
    """Step 1 of an upload given a path on the worker: copy it into the staging area, recorded
    first (by `owner`) so that reconcile may sweep it. A retried upload keeps what it staged before
    if the size is the one it registered (inspection re-hashes it)."""
    real = transfer.check_local_source(Path(path))
    store = load_datastore(datastore)
    staged = store.staging_ref(upload_id)
    registered = open_catalog().find_by_upload_id(upload_id)
    rules.check_staging_target(registered, flow_run.get_id())  # never over a registered image's bytes
    if registered is not None and store.exists(staged) and store.head(staged).size == registered.size:
        return str(staged)
    open_staging().record(upload_id=upload_id, datastore=datastore, bucket=staged.bucket, key=staged.key,
                          owner=owner, group=group)
    progress = ProgressArtifact(real.stat().st_size, f"Staging {real.name} into {datastore}")
    transfer.stage_file(real, store, upload_id, progress=progress)
    progress.finish()
    return str(store.staging_ref(upload_id))


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
def copy_into_datastore(*, src: ObjectRef, dst: ObjectRef, etag: str, size: int, sha256: str) -> ObjectInfo:
    """Adopt, server-side copy or stream the inspected object into the image datastore. A copy
    already at `dst` (an earlier run that failed later) is reused only if it re-hashes to `sha256`."""
    src_store, dst_store = load_datastore(src.datastore), load_datastore(dst.datastore)
    progress = ProgressArtifact(size, f"Copying {src} to {dst}")
    if dst != src and transfer.matches(dst_store, dst, size=size, sha256=sha256):
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


def image_objects(store: S3Datastore, image: Image) -> list[ObjectRef]:
    """Every object an image may have in its datastore: its recorded source, its object key (a
    copy in progress may lie there) and its staged upload."""
    refs = [ObjectRef.parse(image.datastore, image.source)] if image.source else []
    if image.upload_id:
        refs += [store.image_ref(image.upload_id), store.staging_ref(image.upload_id)]
    return list(dict.fromkeys(refs))


@task(**IO_TASK)
def remove_image_objects(image_id: int) -> list[str]:
    """Delete every object of an image being deleted, abort its incomplete multipart uploads, and
    prove they are gone. Idempotent: what is already gone is fine."""
    image = open_catalog().get(image_id)
    rules.owned_by(image, flow_run.get_id())  # a superseded delete run deletes nothing
    store = load_datastore(image.datastore)
    removed = []
    for ref in image_objects(store, image):
        store.delete(ref)
        for upload in store.list_multipart_uploads(ref.bucket, ref.key):
            if upload["Key"] == ref.key:
                store.abort_multipart_upload(ref.bucket, ref.key, upload["UploadId"])
        if store.exists(ref):
            raise StorageError(f"{ref} is still there after its deletion")
        removed.append(str(ref))
    return removed
