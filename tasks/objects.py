"""Prefect tasks over objects: each small, idempotent and retryable; they take names, never clients."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from blocks.datastore import ObjectRef, load_datastore
from catalog.model import DiskFormat, IntegrityError
from tasks import transfer
from tasks.progress import ProgressArtifact
from tasks.retry import IO_TASK


@task(**IO_TASK)
def stage_local_file(path: str, datastore: str, upload_id: str) -> str:
    """Step 1 of an upload given a path on the worker: copy it into the staging area."""
    real = transfer.check_local_source(Path(path))
    store = load_datastore(datastore)
    progress = ProgressArtifact(real.stat().st_size, f"Staging {real.name} into {datastore}")
    transfer.stage_file(real, store, upload_id, progress=progress)
    progress.finish()
    return str(store.staging_ref(upload_id))


@task(**IO_TASK)
def inspect_staged(datastore: str, upload_id: str, declared: DiskFormat | None,
                   expected_sha256: str | None = None) -> transfer.InspectedObject:
    """Read the staged bytes once: format (refusing unsafe or mismatched images), size, sha256, ETag."""
    store = load_datastore(datastore)
    ref = store.staging_ref(upload_id)
    progress = ProgressArtifact(store.head(ref).size, f"Inspecting {ref}")
    inspected = transfer.inspect_object(store, ref, declared, progress=progress)
    progress.finish()
    if expected_sha256 and inspected.inspection.sha256 != expected_sha256:
        raise IntegrityError(
            f"Staged bytes hash to {inspected.inspection.sha256}, expected {expected_sha256}: "
            "they were damaged on the way; upload again."
        )
    return inspected


@task(**IO_TASK)
def copy_into_datastore(*, src: ObjectRef, dst: ObjectRef, etag: str, size: int, sha256: str) -> ObjectRef:
    """Adopt, server-side copy or stream the inspected object into the image datastore."""
    src_store, dst_store = load_datastore(src.datastore), load_datastore(dst.datastore)
    progress = ProgressArtifact(size, f"Copying {src} to {dst}")
    transfer.copy_object(src_store=src_store, src=src, dst_store=dst_store, dst=dst,
                         etag=etag, size=size, sha256=sha256, progress=progress)
    progress.finish()
    return dst


@task(**IO_TASK)
def delete_object(ref: ObjectRef) -> None:
    load_datastore(ref.datastore).delete(ref)
