"""Empty image: check -> register (LOCKED) -> write the empty disk -> record what was written.

An OS or DATABLOCK disk of a given size, as `qemu-img create -f raw|qcow2` makes it: a raw one is
zeros streamed to the datastore (full size there, never whole in memory or on disk), a qcow2 one
is made in a temp directory, inspected again, then uploaded. The hooks move the image to READY, or
to ERROR with "Error copying image in the datastore: <reason>".
"""

from __future__ import annotations

from prefect.runtime import flow_run

from catalog import rules
from catalog.requests import CreateEmptyRequest
from catalog.store import open_catalog
from flows.hooks import fail_image, failure_reason, image_operation, unlock_image
from tasks.images import check_empty_request, record_made, register_empty
from tasks.objects import write_empty_image


def object_id_of(request: CreateEmptyRequest, flow_run_id) -> str:
    return request.object_id or str(flow_run_id)


def _image_of(run):
    request = CreateEmptyRequest.model_validate(run.parameters["request"])
    return open_catalog().find_by_upload_id(object_id_of(request, run.id))


def _on_success(flow, run, state) -> None:
    unlock_image(_image_of(run), str(run.id))


def _on_failure(flow, run, state) -> None:
    fail_image(_image_of(run), str(run.id), f"Error copying image in the datastore: {failure_reason(state)}")


def _run_name() -> str:
    request = CreateEmptyRequest.model_validate(flow_run.parameters["request"])
    return f"create empty {request.driver.value} {request.name} -> {request.datastore}"


@image_operation("create-empty", run_name=_run_name, on_failure=_on_failure, on_success=_on_success)
def create_empty(request: CreateEmptyRequest) -> int:
    """Create an empty OS or DATABLOCK image of a given size (raw or qcow2)."""
    object_id = object_id_of(request, flow_run.get_id())
    required = check_empty_request(request, object_id)
    image = register_empty(request, object_id, required)
    if not rules.awaits_operation(image):  # sent again after it had finished: nothing left to do
        return image.id
    made = write_empty_image(image.id)
    record_made(image.id, made)
    return image.id
