"""What every operation leaves behind, from one place: an event on each image it moved, a table
artifact of those images, and on failure a markdown summary with the reason and what to do.

`with_reporting` appends `report_run` to a flow's state hooks, after the flow's own hooks (so it
sees the states they left). The images a run moved are read from the catalog's history (every
transition records its flow run), so no flow has to list them. Reconcile calls the same hooks for
runs whose process died, so their report is attached to the run it belongs to.

Nothing secret goes out: events and artifacts carry image fields and the failure reason, never a
datastore block (whose credentials are SecretStr), and `redact` masks anything that looks like a
credential in free text.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from uuid import UUID

from prefect import Flow
from prefect.client.schemas.actions import ArtifactCreate
from prefect.events import emit_event

from blocks.prefect_api import prefect_client
from catalog.model import Image, ImageState, NotFound, human_size
from catalog.store import open_catalog
from flows.hooks import failure_reason

log = logging.getLogger("hcx.reporting")

_CREDENTIAL = re.compile(
    r"(?i)((?:aws_)?(?:secret[_-]?(?:access[_-]?)?key|access[_-]?key(?:[_-]?id)?|password|token|signature)"
    r"[\"']?\s*[=:]\s*[\"']?)[^\s\"',}&]+"
)


def redact(text: str) -> str:
    """Mask `secret_key=...`-like assignments in free text (exception messages, reasons)."""
    return _CREDENTIAL.sub(r"\1****", text)


# --- events ----------------------------------------------------------------------------------

def image_resource(image_id: int, name: str | None = None) -> dict[str, str]:
    resource = {"prefect.resource.id": f"hcx.image.{image_id}"}
    if name:
        resource["prefect.resource.name"] = name
    return resource


def image_event_name(image: Image | None) -> str:
    """`hcx.image.ready`, `hcx.image.error`, ... after the image's state; `hcx.image.deleted` once gone."""
    return f"hcx.image.{image.state.value.lower()}" if image is not None else "hcx.image.deleted"


def emit_image_event(image_id: int, image: Image | None, *, operation: str, flow_run_id: str | None) -> None:
    payload: dict[str, Any] = {"operation": operation, "flow_run_id": flow_run_id}
    related = []
    if image is not None:
        payload.update(
            state=image.state.value, prev_state=image.prev_state.value if image.prev_state else None,
            datastore=image.datastore, type=image.type.value, format=image.format.value, size=image.size,
            sha256=image.sha256, error=redact(image.error) if image.error else None,
        )
        related.append({"prefect.resource.id": f"hcx.datastore.{image.datastore}",
                        "prefect.resource.role": "datastore", "prefect.resource.name": image.datastore})
    if flow_run_id:
        related.append({"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"})
    emit_event(
        event=image_event_name(image),
        resource=image_resource(image_id, image.name if image else None),
        related=related,
        payload=payload,
    )


# --- artifacts -------------------------------------------------------------------------------

def image_row(image_id: int, image: Image | None) -> dict[str, Any]:
    if image is None:
        return {"id": image_id, "name": "-", "state": "-", "datastore": "-", "type": "-", "format": "-",
                "size": "-", "sha256": "-", "error": "", "note": "deleted: its row is gone"}
    return {
        "id": image.id, "name": image.name, "state": image.state.value, "datastore": image.datastore,
        "type": image.type.value, "format": image.format.value, "size": human_size(image.size),
        "sha256": (image.sha256 or "-")[:16], "error": redact(image.error or ""), "note": "",
    }


def publish_table(key: str, rows: list[dict[str, Any]], description: str, flow_run_id: str) -> UUID:
    """A table artifact attached to `flow_run_id` (explicitly: hooks may run outside its context)."""
    return _create_artifact(key=key, type_="table", data=json.dumps(rows, default=str),
                            description=description, flow_run_id=flow_run_id)


def publish_markdown(key: str, markdown: str, description: str, flow_run_id: str) -> UUID:
    return _create_artifact(key=key, type_="markdown", data=markdown, description=description,
                            flow_run_id=flow_run_id)


def _create_artifact(*, key: str, type_: str, data: str, description: str, flow_run_id: str) -> UUID:
    with prefect_client() as client:
        artifact = client.create_artifact(ArtifactCreate(
            key=_artifact_key(key), type=type_, data=data, description=description,
            flow_run_id=UUID(str(flow_run_id)),
        ))
    return artifact.id


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "hcx"


def what_to_do(images: dict[int, Image | None], reason: str, crashed: bool) -> list[str]:
    """Next steps a user can take, from what the failure left behind."""
    steps = []
    in_error = [i for i, image in images.items() if image is not None and image.state is ImageState.ERROR]
    if crashed:
        steps.append("The process running this flow died (worker stopped or killed, host lost). "
                     "The scheduled `reconcile` flow settles what it left; `hcx-image reconcile` runs it now.")
    if "transient" in reason.lower() or "unreachable" in reason.lower() or "timeout" in reason.lower():
        steps.append("The datastore could not be reached: check its endpoint with `hcx-image datastore list`.")
    for image_id in in_error:
        steps.append(f"Image {image_id} is in ERROR: `hcx-image show {image_id}` shows why; once the cause is "
                     f"fixed, `hcx-image retry {image_id}` runs the operation again, or "
                     f"`hcx-image delete {image_id}` removes it.")
    if not images:
        steps.append("No image was registered or changed: correct the request as the reason says and send it again.")
    elif not in_error and not crashed:
        steps.append("`hcx-image show ID` shows each image's state and history.")
    return steps


def failure_markdown(flow_name: str, run_name: str, state_name: str, reason: str,
                     images: dict[int, Image | None], crashed: bool) -> str:
    lines = [f"# {flow_name} {state_name.lower()}: {run_name}", "", f"**Reason:** {reason}", ""]
    if images:
        lines += ["**Images:**", "", "| id | name | state | error |", "|---|---|---|---|"]
        for image_id, image in images.items():
            row = image_row(image_id, image)
            lines.append(f"| {row['id']} | {row['name']} | {row['state']} | {row['error'] or '-'} |")
        lines.append("")
    lines += ["**What to do:**", ""] + [f"- {step}" for step in what_to_do(images, reason, crashed)]
    return "\n".join(lines) + "\n"


# --- the hook --------------------------------------------------------------------------------

def _current_images(image_ids: list[int]) -> dict[int, Image | None]:
    catalog = open_catalog()
    found: dict[int, Image | None] = {}
    for image_id in image_ids:
        try:
            found[image_id] = catalog.get(image_id)
        except NotFound:
            found[image_id] = None
    return found


def report_run(flow: Flow, flow_run, state) -> None:
    """State hook: events, the affected-images table and, on failure, the summary."""
    run_id = str(flow_run.id)
    try:
        images = _current_images(open_catalog().touched_by(run_id))
        for image_id, image in images.items():
            emit_image_event(image_id, image, operation=flow.name, flow_run_id=run_id)
        if images:
            publish_table(f"{flow.name}-images", [image_row(i, image) for i, image in images.items()],
                          f"Images affected by {flow.name} run {flow_run.name} ({state.name})", run_id)
        if not state.is_completed():
            reason = redact(failure_reason(state))
            publish_markdown(
                f"{flow.name}-failure",
                failure_markdown(flow.name, flow_run.name, state.name, reason, images, state.is_crashed()),
                f"Why {flow.name} run {flow_run.name} ended {state.name} and what to do", run_id,
            )
    except Exception:  # a report must never turn an outcome into another failure
        log.exception("could not report flow run %s", run_id)


def with_reporting(flow: Flow) -> Flow:
    """The same flow with `report_run` after its own hooks, for every final state."""
    if getattr(flow, "hcx_reporting", False):
        return flow
    reported = flow.with_options(
        on_completion=[*flow.on_completion_hooks, report_run],
        on_failure=[*flow.on_failure_hooks, report_run],
        on_crashed=[*flow.on_crashed_hooks, report_run],
        on_cancellation=[*flow.on_cancellation_hooks, report_run],
    )
    reported.hcx_reporting = True
    return reported
