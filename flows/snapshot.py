"""Snapshots of OS and DATABLOCK images, four operations, each a flow:

- snapshot-create: lock the image and record the snapshot (its bytes charged) -> server-side copy
  of the image object to a snapshot object beside it, pinned to the recorded ETag -> READY;
- snapshot-revert: lock -> copy the snapshot over the image object -> the image records the
  snapshot's sha256 and sizes -> READY;
- snapshot-delete: lock -> remove the snapshot's object -> its row -> READY;
- snapshot-flatten: lock -> copy the snapshot over the image object -> record -> remove every
  snapshot object -> every snapshot row -> READY.

Only from READY (catalog.rules.snapshot_begin); the image is LOCKED, owned by the run, while objects
move. A failure (or a crash: reconcile runs the same hook) returns the image to READY with the error
and leaves nothing half-made (`tasks.snapshots.settle_failed_run`).
"""

from __future__ import annotations

import logging
from typing import Callable

from prefect.runtime import flow_run

from catalog.model import HcxError
from catalog.snapshots import Change, Snapshot, SnapshotRequest
from catalog.store import open_catalog
from flows.hooks import failure_reason, image_operation
from tasks.objects import copy_into_datastore, snapshot_object
from tasks.snapshots import (
    begin_snapshot_change, begin_snapshot_create, finish_snapshot_create, finish_snapshot_delete,
    finish_snapshot_flatten, finish_snapshot_revert, image_object, record_snapshot_content, remove_snapshot_objects,
    settle_failed_run,
)

log = logging.getLogger("hcx.snapshot")


def _settle(copies_snapshot: bool) -> Callable:
    """The failure hook: what the run leaves is made whole and the image READY with the error. A
    revert or flatten may have overwritten the image object with the snapshot already."""

    def on_failure(flow, run, state) -> None:
        request = SnapshotRequest.model_validate(run.parameters["request"])
        try:
            settle_failed_run(request.image_id, str(run.id), failure_reason(state),
                              copying_from=request.snapshot if copies_snapshot else None)
        except HcxError:
            log.exception("could not settle image %s after flow run %s; reconcile will", request.image_id, run.id)

    return on_failure


def _request() -> SnapshotRequest:
    return SnapshotRequest.model_validate(flow_run.parameters["request"])


def _copy_over_image(image_id: int, snapshot: Snapshot) -> None:
    """The snapshot's bytes become the image's: a server-side copy over the image object (none when
    it holds them already; the catalog says so, no byte is read to find out), then the image records
    them. Run again, the copy is made again: the object is replaced whole, never half-written."""
    image = open_catalog().get(image_id)
    etag = image.source_etag
    if (image.sha256, image.size) != (snapshot.sha256, snapshot.size):
        etag = copy_into_datastore(src=snapshot_object(snapshot), dst=image_object(image), etag=snapshot.etag,
                                   size=snapshot.size, sha256=snapshot.sha256, reuse=False).etag
    record_snapshot_content(image_id, snapshot.number, etag)


@image_operation("snapshot-create", on_failure=_settle(False),
                 run_name=lambda: f"snapshot image {_request().image_id} as {_request().snapshot}")
def snapshot_create(request: SnapshotRequest) -> int:
    """Take a snapshot of an image: a copy of its bytes beside it in its datastore. Returns its number."""
    snapshot = begin_snapshot_create(request)
    image = open_catalog().get(request.image_id)
    copied = copy_into_datastore(src=image_object(image), dst=snapshot_object(snapshot), etag=image.source_etag,
                                 size=image.size, sha256=image.sha256)
    finish_snapshot_create(request.image_id, copied.etag)
    return snapshot.number


@image_operation("snapshot-revert", on_failure=_settle(True),
                 run_name=lambda: f"revert image {_request().image_id} to snapshot {_request().snapshot}")
def snapshot_revert(request: SnapshotRequest) -> int:
    """Make a snapshot's bytes the image's content again (the snapshot stays)."""
    snapshot = begin_snapshot_change(request, Change.REVERT)
    _copy_over_image(request.image_id, snapshot)
    finish_snapshot_revert(request.image_id, snapshot.number)
    return snapshot.number


@image_operation("snapshot-delete", on_failure=_settle(False),
                 run_name=lambda: f"delete snapshot {_request().snapshot} of image {_request().image_id}")
def snapshot_delete(request: SnapshotRequest) -> int:
    """Delete one snapshot: its object, then its row."""
    snapshot = begin_snapshot_change(request, Change.DELETE)
    remove_snapshot_objects(request.image_id, snapshot.number)
    finish_snapshot_delete(request.image_id, snapshot.number)
    return snapshot.number


@image_operation("snapshot-flatten", on_failure=_settle(True),
                 run_name=lambda: f"flatten image {_request().image_id} to snapshot {_request().snapshot}")
def snapshot_flatten(request: SnapshotRequest) -> int:
    """Make a snapshot the image's content and remove every snapshot (objects, then rows)."""
    snapshot = begin_snapshot_change(request, Change.FLATTEN)
    _copy_over_image(request.image_id, snapshot)
    remove_snapshot_objects(request.image_id)
    finish_snapshot_flatten(request.image_id, snapshot.number)
    return snapshot.number
