"""Prefect tasks of the snapshot operations (flows/snapshot.py): each one step, idempotent and
retryable, every catalog write fenced by the flow run that holds the image LOCKED
(catalog/snapshots.py decides; these find the objects and move them)."""

from __future__ import annotations

from prefect import task

from blocks.datastore import ObjectRef, load_datastore
from catalog import rules, snapshots
from catalog.model import Image, ImageState, NotFound
from catalog.permissions import Right
from catalog.snapshots import Change, Snapshot, SnapshotRequest, SnapshotState
from catalog.store import open_catalog
from tasks.images import current_flow_run_id
from tasks.objects import remove_objects, snapshot_object, snapshot_objects
from tasks.progress import ProgressArtifact
from tasks.retry import IO_TASK


def image_object(image: Image) -> ObjectRef:
    return ObjectRef.parse(image.datastore, image.source)


@task(**IO_TASK)
def begin_snapshot_create(request: SnapshotRequest) -> Snapshot:
    """Step 1 of a snapshot: the image LOCKED by this run and the snapshot's row (CREATING, its bytes
    counted against capacity and quotas), at an object key of this run's (a retry finds the same)."""
    catalog, actor, run_id = open_catalog(), request.actor(), current_flow_run_id()
    image = catalog.get_for(actor, request.image_id, Right.MANAGE)
    store = load_datastore(image.datastore)
    return snapshots.begin_create(catalog, actor, image.id, request.snapshot,
                                  object_uri=str(store.snapshot_ref(image.id, run_id)),
                                  limit_bytes=store.limit_bytes, run_id=run_id)


@task(**IO_TASK)
def finish_snapshot_create(image_id: int, etag: str) -> Image | None:
    """Last step of a snapshot: its row READY, the image READY with one snapshot more."""
    return snapshots.finish_create(open_catalog(), image_id, etag=etag, run_id=current_flow_run_id())


@task(**IO_TASK)
def begin_snapshot_change(request: SnapshotRequest, change: Change) -> Snapshot:
    """Step 1 of a revert, delete or flatten: the image LOCKED by this run; the snapshot it acts on."""
    catalog, actor = open_catalog(), request.actor()
    image = catalog.get_for(actor, request.image_id, Right.MANAGE)
    return snapshots.begin_change(catalog, actor, image.id, request.snapshot, change,
                                  limit_bytes=load_datastore(image.datastore).limit_bytes, run_id=current_flow_run_id())


@task(**IO_TASK)
def record_snapshot_content(image_id: int, number: int, etag: str) -> Image:
    """The image's object holds the snapshot's bytes now: the image records their sha256 and sizes."""
    return snapshots.record_content(open_catalog(), image_id, number, etag=etag, run_id=current_flow_run_id())


@task(**IO_TASK)
def finish_snapshot_revert(image_id: int, number: int) -> Image | None:
    return snapshots.finish_revert(open_catalog(), image_id, number, run_id=current_flow_run_id())


@task(**IO_TASK)
def finish_snapshot_delete(image_id: int, number: int) -> Image | None:
    return snapshots.finish_delete(open_catalog(), image_id, number, run_id=current_flow_run_id())


@task(**IO_TASK)
def finish_snapshot_flatten(image_id: int, number: int) -> Image | None:
    return snapshots.finish_flatten(open_catalog(), image_id, number, run_id=current_flow_run_id())


@task(**IO_TASK)
def remove_snapshot_objects(image_id: int, number: int | None = None) -> list[str]:
    """Delete the object of snapshot `number`, or (None) every snapshot object of the image."""
    image = open_catalog().get(image_id)
    rules.owned_by(image, current_flow_run_id())  # a superseded run deletes nothing
    store = load_datastore(image.datastore)
    if number is None:
        refs = snapshot_objects(store, image)
    else:
        refs = [snapshot_object(s) for s in snapshots.snapshots_of(open_catalog(), image_id) if s.number == number]
    progress = ProgressArtifact(len(refs), f"Removing {len(refs)} snapshot object(s) of image {image_id}")
    remove_objects(store, refs, progress)
    progress.finish()
    return [str(ref) for ref in refs]


def settle_failed_run(image_id: int, run_id: str, reason: str, *, copying_from: str | None) -> Image | None:
    """What a failed snapshot run leaves, made true (its failure hook; reconcile runs it again if
    it could not): the object of the snapshot it was creating removed, rows whose objects are gone
    dropped, an image object already overwritten by the snapshot `copying_from` (a revert or
    flatten) recorded as such, and the image READY with the error. Only while the run holds it."""
    catalog = open_catalog()
    image = catalog.find(image_id)
    if image is None or image.flow_run_id != run_id or image.state is not ImageState.LOCKED:
        return image
    store = load_datastore(image.datastore)
    found = snapshots.snapshots_of(catalog, image_id)
    remove_objects(store, [snapshot_object(s) for s in found
                           if s.state is SnapshotState.CREATING and s.flow_run_id == run_id])
    missing = {s.number for s in found if s.state is SnapshotState.READY and not store.exists(snapshot_object(s))}
    content = None
    if copying_from is not None and image.source:
        try:
            now = store.head(image_object(image))
            source = snapshots.resolve(found, image_id, copying_from)
        except NotFound:
            now = None
        if now is not None and now.etag != image.source_etag:
            content = (source.number, now.etag)  # only this run writes there while it holds the image
    return snapshots.settle_failure(catalog, image_id, reason, run_id=run_id, missing=missing, content=content)
