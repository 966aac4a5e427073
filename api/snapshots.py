"""The snapshot verbs of an image: list, create, revert, delete, flatten. Each refuses what the
catalog refuses before anything is written (catalog/snapshots.py decides, and its flow decides
again atomically), then starts the operation's flow and answers at once; a client follows the flow
run through /runs/{id}, which shows the image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.auth import Caller
from api.images import ImageId, catalog
from api.shapes import Remote, Started, Strict
from blocks.datastore import load_datastore
from catalog import rules
from catalog.permissions import Actor, Right
from catalog.snapshots import Change, SnapshotName, SnapshotRequest, check_change, check_create, list_snapshots
from flows.launcher import submit

router = APIRouter(prefix="/api/v1", tags=["snapshots"])

SnapshotRef = Annotated[str, Path(min_length=1, max_length=rules.MAX_NAME,
                                  description="The snapshot's name, or its number")]


class NewSnapshot(Strict):
    name: SnapshotName


def _start(flow_name: str, actor: Actor, image_id: int, snapshot: str, remote: bool | None) -> Started:
    request = SnapshotRequest(owner=actor.user, image_id=image_id, snapshot=snapshot)
    flow_run_id = submit(flow_name, {"request": request.model_dump(mode="json")}, remote=remote)
    return Started(flow_run_id=flow_run_id, image=catalog().get(image_id).to_dict(), operation=flow_name)


@router.get("/images/{image_id}/snapshots", summary="An image's snapshots (USE)")
def list_image_snapshots(image_id: ImageId, actor: Caller) -> list[dict]:
    return [s.to_dict() for s in list_snapshots(catalog(), actor, image_id)]


@router.post("/images/{image_id}/snapshots", status_code=202, response_model=Started,
             summary="Take a snapshot of a READY OS or DATABLOCK image (MANAGE): a copy beside it in its datastore")
def create_snapshot(image_id: ImageId, body: NewSnapshot, actor: Caller, remote: Remote = None) -> Started:
    image = catalog().get_for(actor, image_id, Right.MANAGE)
    check_create(catalog(), actor, image_id, body.name, limit_bytes=load_datastore(image.datastore).limit_bytes)
    return _start("snapshot-create", actor, image_id, body.name, remote)


def _change(change: Change, image_id: int, ref: str, actor: Actor, remote: bool | None) -> Started:
    image = catalog().get_for(actor, image_id, Right.MANAGE)
    snapshot = check_change(catalog(), actor, image_id, ref, change,
                            limit_bytes=load_datastore(image.datastore).limit_bytes)
    return _start(f"snapshot-{change.value}", actor, image_id, str(snapshot.number), remote)


@router.post("/images/{image_id}/snapshots/{snapshot}/revert", status_code=202, response_model=Started,
             summary="Make the snapshot's bytes the image's content again (MANAGE)")
def revert_snapshot(image_id: ImageId, snapshot: SnapshotRef, actor: Caller, remote: Remote = None) -> Started:
    return _change(Change.REVERT, image_id, snapshot, actor, remote)


@router.delete("/images/{image_id}/snapshots/{snapshot}", status_code=202, response_model=Started,
               summary="Delete a snapshot: its object, then its row (MANAGE)")
def delete_snapshot(image_id: ImageId, snapshot: SnapshotRef, actor: Caller, remote: Remote = None) -> Started:
    return _change(Change.DELETE, image_id, snapshot, actor, remote)


@router.post("/images/{image_id}/snapshots/{snapshot}/flatten", status_code=202, response_model=Started,
             summary="Make the snapshot the image's content and remove every snapshot (MANAGE)")
def flatten_snapshot(image_id: ImageId, snapshot: SnapshotRef, actor: Caller, remote: Remote = None) -> Started:
    return _change(Change.FLATTEN, image_id, snapshot, actor, remote)
