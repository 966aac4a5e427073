"""Following an operation: a flow run's state and the image it makes or moves, for the user who
asked for it (or an administrator). Anyone else's run looks like one that does not exist."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter
from prefect.exceptions import ObjectNotFound

from api.auth import Caller
from blocks.prefect_api import prefect_client
from catalog.model import Image, NotFound
from catalog.permissions import Actor, Right, has_right
from catalog.store import open_catalog
from flows.launcher import crash_if_its_process_died

router = APIRouter(prefix="/api/v1", tags=["runs"])


def _requested_by(parameters: dict) -> str | None:
    request = parameters.get("request") or {}
    return request.get("owner") or (parameters.get("requested_by") or {}).get("owner")


def _image_of(parameters: dict) -> Image | None:
    request = parameters.get("request") or {}
    catalog = open_catalog()
    if request.get("image_id") is not None:
        return catalog.find(int(request["image_id"]))
    handle = request.get("upload_id") or request.get("object_id")
    return catalog.find_by_upload_id(handle) if handle else None


def _clean(message: str) -> str:
    for prefix in ("Flow run encountered an exception: ", "Task run encountered an exception: "):
        message = message.replace(prefix, "")
    for type_name in ("Refused: ", "NotFound: ", "IntegrityError: ", "ChecksumMismatch: ", "StorageError: ", "TransientSourceError: ",
                      "PermissionDenied: ", "HcxError: "):
        message = message.replace(type_name, "")
    return message.strip()


@router.get("/runs/{flow_run_id}", summary="A flow run you started: its state and its image")
def read_run(flow_run_id: UUID, actor: Caller) -> dict:
    missing = NotFound(f"Flow run {flow_run_id} does not exist (or is not yours).")
    crash_if_its_process_died(str(flow_run_id))  # a run whose process died before it ran ends now
    with prefect_client() as client:
        try:
            run = client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            raise missing from None
    if not _visible(actor, run.parameters):
        raise missing
    image = _image_of(run.parameters)
    state = run.state
    return {
        "id": str(run.id),
        "name": run.name,
        "state_type": state.type.value if state else "PENDING",
        "state_name": state.name if state else None,
        "final": bool(state and state.is_final()),
        "message": _clean(state.message or "") if state else "",
        "image": image.to_dict() if image is not None and has_right(actor, image, Right.USE) else None,
        "image_exists": image is not None,
    }


def run_left_no_image(flow_run_id: str) -> bool:
    """Whether the run has ended and no image is its work (never made, or deleted since)."""
    with prefect_client() as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return True
    return bool(run.state and run.state.is_final()) and _image_of(run.parameters) is None


def _visible(actor: Actor, parameters: dict) -> bool:
    return actor.is_admin or _requested_by(parameters) == actor.user
