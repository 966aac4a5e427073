"""Tasks that ask Prefect about other flow runs: stopping the run a forced delete superseded."""

from __future__ import annotations

from uuid import UUID

from prefect import task
from prefect.exceptions import FlowRunWaitTimeout, ObjectNotFound
from prefect.flow_runs import wait_for_flow_run
from prefect.states import Cancelled, Cancelling
from prefect.utilities.asyncutils import run_coro_as_sync

from blocks.prefect_api import prefect_client
from catalog.model import ConcurrentChange
from catalog.settings import get_settings
from tasks.retry import IO_TASK


@task(**IO_TASK)
def stop_superseded_run(flow_run_id: str | None, image_id: int) -> str:
    """A forced delete took image `image_id` from a run that may still be writing its objects:
    cancel that run and wait until it has ended, so no object it writes can outlive the image's
    row. A run that never started is cancelled at once; one still running is asked to stop
    (its worker, or our launcher, ends its process) and waited for; one that will not end in time
    fails this task (retried), and the delete with it: `retry` runs it again."""
    if flow_run_id is None:
        return "no run to stop"
    reason = f"Image {image_id} was force-deleted: this run no longer owns it."
    with prefect_client() as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return f"flow run {flow_run_id} no longer exists"
        if run.state is None or run.state.is_final():
            return f"flow run {flow_run_id} had already ended ({run.state.type.value if run.state else 'no state'})"
        if run.state.is_running() or run.state.is_cancelling():
            if not run.state.is_cancelling():
                client.set_flow_run_state(run.id, Cancelling(message=reason), force=True)
        else:  # scheduled, pending, paused: no process holds it
            client.set_flow_run_state(run.id, Cancelled(message=reason), force=True)
    try:
        ended = run_coro_as_sync(wait_for_flow_run(UUID(flow_run_id), timeout=get_settings().stop_run_seconds))
    except FlowRunWaitTimeout:
        raise ConcurrentChange(
            f"Flow run {flow_run_id}, which was writing image {image_id}, has not stopped within "
            f"{get_settings().stop_run_seconds}s; its objects are left until it has (retry the delete)."
        ) from None
    return f"flow run {flow_run_id} stopped ({ended.state.type.value})"
