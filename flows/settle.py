"""Reconcile's settling of dead operations: the flow-layer tasks that need the operation flows
themselves (their own hooks), so they live beside the flows and not in `tasks/`, which never
imports `flows/`.

A flow run that ended without its hooks having moved its image (its process died, a hook
failed) is settled by running the flow's own hooks for its final state, as its process would
have; an image still waiting after that is abandoned (`catalog.operations.abandon`), fenced by
the run it waited on. A RUNNING run is Prefect's to judge: its zombie-run automation marks it
CRASHED when the heartbeats stop, and the crash automation brings reconcile back for it.
"""

from __future__ import annotations

import logging

from prefect import Flow, task
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound

from blocks.prefect_api import prefect_client
from catalog import operations, rules
from catalog.model import Image, NotFound, Refused, Superseded, as_utc, utcnow
from catalog.store import open_catalog
from tasks.images import current_flow_run_id
from tasks.maintenance import Row, row
from tasks.retry import IO_TASK

log = logging.getLogger("hcx.settle")


def _operation_flows() -> dict[str, Flow]:
    """The image-operation flows (with their hooks) by flow name; maintenance runs are not operations.
    (Imported here: the registry imports the reconcile flow, which imports this module.)"""
    from flows.launcher import deployable, registry

    flows = deployable()
    return {flows[name].name: flows[name] for name in registry()}


@task(**IO_TASK)
def images_awaiting_operations() -> list[int]:
    return [image.id for image in open_catalog().list() if rules.awaits_operation(image)]


_HOOKS = {
    StateType.COMPLETED: "on_completion_hooks",
    StateType.FAILED: "on_failure_hooks",
    StateType.CRASHED: "on_crashed_hooks",
    StateType.CANCELLED: "on_cancellation_hooks",
}


def _run_hooks(flow: Flow, run: FlowRun) -> None:
    """The flow's own hooks for the run's final state, as its process would have run them
    (resumed); they are idempotent, so a second run of them changes nothing."""
    for hook in getattr(flow, _HOOKS[run.state.type]):
        try:
            hook(flow, run, run.state)
        except Exception:
            log.exception("hook %s of flow run %s failed", getattr(hook, "__name__", hook), run.id)


@task(**IO_TASK)
def settle_image(image_id: int, stale_after_seconds: int) -> Row | None:
    """An image waits on an operation: if that operation's run has ended, run the flow's own hooks
    as its process would have (resume), and if the image still waits, apply `rules.abandon`.
    A RUNNING run is left to Prefect: the zombie-run automation (flows/platform.py) marks it
    CRASHED when its heartbeats stop, and its crash brings reconcile back for it (`settle_run`).
    `stale_after_seconds` is the grace given to an image whose operation recorded no run yet."""
    catalog = open_catalog()
    try:
        image = catalog.get(image_id)
    except NotFound:
        return None
    if not rules.awaits_operation(image):
        return None
    target = f"image {image.id} ({image.name}, {image.state.value})"
    age = (utcnow() - as_utc(image.updated_at)).total_seconds() if image.updated_at else 0
    if not image.flow_run_id:
        if age < stale_after_seconds:
            return None
        return _abandon(image, target, "no flow run was recorded for its operation")

    with prefect_client() as client:
        try:
            run = client.read_flow_run(image.flow_run_id)
        except ObjectNotFound:
            if age < stale_after_seconds:
                return None
            return _abandon(image, target, f"its flow run {image.flow_run_id} no longer exists")
        flow = _operation_flows().get(client.read_flow(run.flow_id).name)
    if flow is None:  # moved last by a maintenance run: nothing to resume
        return None
    state_type = run.state.type if run.state else None
    if state_type not in _HOOKS:
        return None  # scheduled, pending, running, paused: Prefect's to judge
    if run.end_time and (utcnow() - run.end_time).total_seconds() < min(stale_after_seconds, 30):
        return None  # its own hooks may be running right now
    if run.end_time and image.updated_at and as_utc(image.updated_at) > run.end_time:
        # Moved after that run ended (a retry, a delete marked by the CLI): the run taking the
        # operation up records itself when it starts; judge only if none did in time.
        if age < stale_after_seconds:
            return None
        return _abandon(image, target, f"no flow run took up its operation within {stale_after_seconds}s")

    _run_hooks(flow, run)
    try:
        settled = catalog.get(image_id)
    except NotFound:
        return row("stuck image", target, f"resumed: flow run {run.name} ended {run.state.type.value}, image deleted")
    if rules.awaits_operation(settled) and settled.flow_run_id == image.flow_run_id:
        return _abandon(settled, target, f"its flow run {run.name} ended {run.state.type.value}: "
                                         f"{run.state.message or 'no message'}")
    return row("stuck image", target,
               f"resumed: flow run {run.name} ended {run.state.type.value}, image now {settled.state.value}")


@task(**IO_TASK)
def settle_run(flow_run_id: str) -> list[Row]:
    """A flow run named by the crash automation (flows/platform.py): if it is an image operation
    that has ended, run its flow's own hooks for its final state (the image to ERROR, staged bytes
    removed, also when no image was registered yet), then abandon any image it still holds."""
    with prefect_client() as client:
        try:
            run = client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return [row("flow run", flow_run_id, "left alone: no such flow run")]
        flow = _operation_flows().get(client.read_flow(run.flow_id).name)
    target = f"{run.name} ({run.id})"
    state_type = run.state.type if run.state else None
    if flow is None:
        return [row("flow run", target, "left alone: not an image operation")]
    if state_type not in _HOOKS:
        return [row("flow run", target, f"left alone: it is {state_type.value if state_type else 'new'}")]
    _run_hooks(flow, run)
    report = [row("flow run", target, f"ran the {state_type.value} hooks of flow {flow.name}")]
    for image in open_catalog().list():
        if image.flow_run_id == str(run.id) and rules.awaits_operation(image):
            report.append(_abandon(image, f"image {image.id} ({image.name}, {image.state.value})",
                                   f"its flow run {run.name} ended {state_type.value}: "
                                   f"{run.state.message or 'no message'}"))
    return report


def _abandon(image: Image, target: str, why: str) -> Row:
    """`operations.abandon` on the image as it was judged: fenced by the run it waited on, so an
    image another run took up meanwhile is left alone."""
    reason = f"The operation on the image did not finish ({why})"
    try:
        moved = operations.abandon(open_catalog(), image.id, reason, owner=image.flow_run_id,
                                   writer=current_flow_run_id())
    except (Refused, Superseded) as exc:  # someone moved it meanwhile
        return row("stuck image", target, f"left alone: {exc}")
    states = ", ".join(f"image {m.id} -> {m.state.value}" for m in moved) or "image gone"
    return row("stuck image", target, f"{why}: {states}")
