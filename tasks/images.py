"""Prefect tasks that write the catalog. Each is one compare-and-set, so a retry is harmless."""

from __future__ import annotations

from prefect import task
from prefect.runtime import flow_run

from blocks.datastore import ObjectRef, load_datastore
from catalog import rules
from catalog.model import Image, ImageState, Operation
from catalog.requests import UploadRequest
from catalog.store import open_catalog
from tasks.retry import IO_TASK
from tasks.transfer import InspectedObject


def current_flow_run_id() -> str | None:
    return flow_run.get_id()


@task(**IO_TASK)
def check_upload_request(request: UploadRequest, upload_id: str) -> None:
    """Refuse what breaks a creation rule before any byte is read."""
    load_datastore(request.datastore)
    open_catalog().check_new_image(request.actor(), name=request.name, type_=request.type,
                                   persistent=request.persistent, upload_id=upload_id)


@task(**IO_TASK)
def register_upload(request: UploadRequest, upload_id: str, inspected: InspectedObject) -> Image:
    """Step 2: the image row, LOCKED, its source the staged object (idempotent per upload_id)."""
    found = inspected.inspection
    return open_catalog().register(
        actor=request.actor(),
        name=request.name,
        type_=request.type,
        persistent=request.persistent,
        bus=request.bus,
        format_=found.format,
        datastore=request.datastore,
        state=ImageState.LOCKED,
        flow_run_id=current_flow_run_id(),
        upload_id=upload_id,
        description=request.description,
        source=str(inspected.ref),
        source_etag=inspected.etag,
        size=found.size,
        virtual_size=found.virtual_size,
        sha256=found.sha256,
        last_operation={"op": Operation.UPLOAD.value, "request": request.model_dump(mode="json"),
                        "upload_id": upload_id},
        message=f"registered from {inspected.ref} ({found.detected}, {found.size} bytes)",
    )


@task(**IO_TASK)
def record_source(image_id: int, ref: ObjectRef) -> Image:
    """The image's bytes now lie at `ref` (recorded before any cleanup, so they are never lost)."""
    return open_catalog().transition(image_id, rules.record, source=str(ref),
                                     flow_run_id=current_flow_run_id(), message=f"bytes at {ref}")
