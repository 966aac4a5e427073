"""Delete: DELETE (the name is free at once) -> stop the run a forced delete superseded -> remove
every object of the image -> drop the row.

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
from flows.hooks import failure_reason, image_operation, owns
from tasks.images import begin_delete, drop_image_row
from tasks.objects import remove_image_objects
from tasks.runs import stop_superseded_run

log = logging.getLogger("hcx.delete")


def _on_failure(flow, run, state) -> None:
    request = DeleteRequest.model_validate(run.parameters["request"])
    catalog = open_catalog()
    image = catalog.find(request.image_id)
    # Refused, already gone, or taken over by another run: nothing of ours to fail.
    if image is None or image.state is not ImageState.DELETE or not owns(image, str(run.id)):
        return
    try:
        catalog.transition(image.id, rules.delete_failed, failure_reason(state), owner=str(run.id),
                           writer=str(run.id), message=f"delete failed: {failure_reason(state)}")
    except HcxError:
        log.exception("could not move image %s to ERROR; reconcile will", image.id)


def _run_name() -> str:
    request = DeleteRequest.model_validate(flow_run.parameters["request"])
    return f"delete image {request.image_id}{' (forced)' if request.force else ''}"


@image_operation("delete", run_name=_run_name, on_failure=_on_failure)
def delete(request: DeleteRequest) -> list[str]:
    """Delete an image: its objects from the datastore, then its row. Returns the objects removed."""
    image = begin_delete(request)
    stop_superseded_run(image.last_operation.stops_run if image.last_operation else None, image.id)
    removed = remove_image_objects(image.id)
    drop_image_row(image.id)
    return removed
