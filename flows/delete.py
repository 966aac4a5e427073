"""Delete: DELETE (the name is free at once) -> remove every object of the image -> drop the row.

Refused while VMs use the image or clones copy it, and for a LOCKED image unless forced by someone
with the ADMIN right (catalog.rules.delete). The row goes only once the objects are proven gone;
if removing them fails, the hook moves the image to ERROR with "Error removing image from
datastore: <reason>", and `retry` runs the delete again.
"""

from __future__ import annotations

import logging

from prefect.runtime import flow_run

from catalog import rules
from catalog.model import HcxError, ImageState
from catalog.requests import DeleteRequest
from catalog.store import open_catalog
from flows.hooks import failure_reason, image_operation
from tasks.images import begin_delete, drop_image_row
from tasks.objects import remove_image_objects

log = logging.getLogger("hcx.delete")


def _on_failure(flow, run, state) -> None:
    request = DeleteRequest.model_validate(run.parameters["request"])
    catalog = open_catalog()
    image = catalog.find(request.image_id)
    if image is None or image.state is not ImageState.DELETE:  # refused, or already gone
        return
    try:
        catalog.transition(image.id, rules.delete_failed, failure_reason(state), flow_run_id=str(run.id),
                           message=f"delete failed: {failure_reason(state)}")
    except HcxError:
        log.exception("could not move image %s to ERROR; reconcile will", image.id)


def _run_name() -> str:
    request = DeleteRequest.model_validate(flow_run.parameters["request"])
    return f"delete image {request.image_id}{' (forced)' if request.force else ''}"


@image_operation("delete", run_name=_run_name, on_failure=_on_failure)
def delete(request: DeleteRequest) -> list[str]:
    """Delete an image: its objects from the datastore, then its row. Returns the objects removed."""
    image = begin_delete(request)
    removed = remove_image_objects(image.id)
    drop_image_row(image.id)
    return removed
