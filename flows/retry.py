"""Retry: an image in ERROR because an operation failed re-runs that operation from where it failed.

`rules.retry` moves the image back into the operation (LOCKED, or DELETE for a failed delete; a
clone target takes its source again in the same transaction), then the operation's own flow runs
as a subflow with the request it recorded. Its steps are idempotent: the staged bytes or a copy
already in place are reused when their size and sha256 check out, and redone otherwise. The
operation's hooks move the image on, exactly as on a first run.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.runtime import flow_run

from catalog import operations
from catalog.model import Image
from catalog.requests import RetryRequest, rerun_request
from catalog.store import open_catalog
from tasks.images import current_flow_run_id
from tasks.retry import IO_TASK


@task(**IO_TASK)
def begin_retry(request: RetryRequest) -> Image:
    """ERROR -> back into the failed operation (refused, with nothing changed, when the rules say so)."""
    return operations.retry(open_catalog(), request.actor(), request.image_id, flow_run_id=current_flow_run_id())


def _run_name() -> str:
    return f"retry image {RetryRequest.model_validate(flow_run.parameters['request']).image_id}"


@flow(name="retry", flow_run_name=_run_name, log_prints=True)
def retry(request: RetryRequest) -> int:
    """Re-run the operation that left an image in ERROR."""
    from flows.launcher import registry

    image = begin_retry(request)
    operation, rerun = rerun_request(image, request.actor())
    registry()[operation.value](rerun)
    return image.id
