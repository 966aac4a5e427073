"""Retry: an image in ERROR because an operation failed re-runs that operation from where it failed.

`rules.retry` moves the image back into the operation (LOCKED, or DELETE for a failed delete; a
clone target takes its source again in the same transaction), owned by no run; then the
operation's own flow runs as a subflow with the request it recorded and takes the image up
explicitly (a history row says so). Its steps are idempotent: the staged bytes or a copy already
in place are reused when their size and sha256 check out, and redone otherwise. The operation's
hooks move the image on, exactly as on a first run.
"""

from __future__ import annotations

from prefect import Flow, flow, task
from prefect.runtime import flow_run

from catalog import operations
from catalog.model import Image, Operation
from catalog.requests import RetryRequest, rerun_request
from catalog.store import open_catalog
from flows.clone import clone
from flows.create_empty import create_empty
from flows.delete import delete
from flows.upload import upload
from tasks.images import current_flow_run_id
from tasks.retry import IO_TASK

OPERATION_FLOWS: dict[Operation, Flow] = {
    Operation.UPLOAD: upload, Operation.CLONE: clone, Operation.CREATE_EMPTY: create_empty, Operation.DELETE: delete,
}


@task(**IO_TASK)
def begin_retry(request: RetryRequest) -> Image:
    """ERROR -> back into the failed operation (refused, with nothing changed, when the rules say so)."""
    return operations.retry(open_catalog(), request.actor(), request.image_id, writer=current_flow_run_id())


def _run_name() -> str:
    return f"retry image {RetryRequest.model_validate(flow_run.parameters['request']).image_id}"


@flow(name="retry", flow_run_name=_run_name, log_prints=True)
def retry(request: RetryRequest) -> int:
    """Re-run the operation that left an image in ERROR."""
    image = begin_retry(request)
    operation, rerun = rerun_request(image, request.actor())
    OPERATION_FLOWS[operation](rerun)
    return image.id
