"""Reconcile: the backstop for hooks that never ran and uploads never finished.

1. images waiting on an operation whose flow run has ended -> the flow's own hooks are run as its
   process would have (resumed), and an image still waiting goes through `rules.abandon` (ERROR
   with the reason, or a clone source released). A run whose process died is marked CRASHED by
   Prefect (the zombie-run automation of flows/platform.py, from its heartbeats); its crash runs
   reconcile with `flow_run_ids` = that run, which runs its hooks even when it registered no image
   (its staged bytes are removed);
2. per datastore, only what the service recorded: an upload a staging record knows that was never
   registered, and staged objects and incomplete multipart uploads of images the catalog knows that
   no longer use them, older than the staging TTL -> removed (never an image's source, nor what an
   operation still running may use); objects and multipart uploads nothing records -> reported,
   never deleted; image objects no catalog row claims -> reported; rows whose object is missing ->
   ERROR.
A staging TTL or stale-run limit below its floor (catalog/settings.py) is refused, nothing done,
unless `requested_by` is in the admin group; the scheduled run (nobody) uses the settings.
Everything it did is in the `reconcile-report` table artifact.
"""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from catalog.model import HcxError
from catalog.requests import RequestedBy
from catalog.settings import get_settings
from catalog.staging import reconcile_limits
from flows.reporting import publish_table
from flows.settle import images_awaiting_operations, settle_image, settle_run
from tasks.maintenance import Row, audit_objects, datastore_names, row, sweep_staging

Scope = Literal["all", "images", "objects"]


def _run_name() -> str:
    params = flow_run.parameters
    ttl = params.get("staging_ttl_hours")
    ttl = get_settings().staging_ttl_hours if ttl is None else ttl
    return f"reconcile {params.get('scope', 'all')} (staging TTL {ttl:g}h)"


@flow(name="reconcile", flow_run_name=_run_name, log_prints=True)
def reconcile(
    scope: Scope = "all",
    staging_ttl_hours: Annotated[float | None, Field(ge=0)] = None,
    stale_after_seconds: Annotated[int | None, Field(gt=0)] = None,
    datastores: list[str] | None = None,
    flow_run_ids: list[UUID] | None = None,
    requested_by: RequestedBy | None = None,
) -> dict[str, int]:
    """Settle images left waiting by dead operations, sweep stale staging, audit objects.

    Args:
        scope: "images" (stuck images only), "objects" (staging and object audit only) or "all".
        staging_ttl_hours: Age after which recorded uploads never registered, and staged bytes
            no image uses, are removed (default: HCX_STAGING_TTL_HOURS; below 1h admin group only).
        stale_after_seconds: Grace before an image whose operation recorded no (or a vanished)
            flow run is abandoned (default: HCX_STALE_RUN_SECONDS).
        datastores: Datastores to sweep and audit (default: all).
        flow_run_ids: Ended image-operation runs whose hooks to run (the crash automation passes
            the crashed run); with them, only those runs are settled.
        requested_by: Who asks (the CLI passes its user); None is the scheduled run. Only the
            admin group may ask for limits below the floors.
    """
    ttl, stale = reconcile_limits(get_settings(), requested_by.actor() if requested_by else None,
                                  staging_ttl_hours=staging_ttl_hours, stale_after_seconds=stale_after_seconds)
    report: list[Row] = []
    failed: list[str] = []
    for flow_run_id in flow_run_ids or []:
        report += settle_run(str(flow_run_id))
    if scope in ("all", "images") and not flow_run_ids:
        for image_id in images_awaiting_operations():
            if (line := settle_image(image_id, stale)) is not None:
                report.append(line)
    if scope in ("all", "objects") and not flow_run_ids:
        for name in datastores or datastore_names():
            for state in (sweep_staging(name, ttl, return_state=True), audit_objects(name, return_state=True)):
                if state.is_completed():
                    report += state.result()
                else:
                    failed.append(name)
                    report.append(row("datastore", name, f"not checked: {state.message}"))
    publish_table("reconcile-report", report or [row("-", "-", "nothing to reconcile")],
                  f"What reconcile found and did ({len(report)} items)", flow_run.get_id())
    for line in report:
        get_run_logger().info("%s %s: %s", line["kind"], line["target"], line["action"])
    if failed:
        raise HcxError(f"Reconcile could not check datastore(s) {', '.join(sorted(set(failed)))}; see the report.")
    counts: dict[str, int] = {}
    for line in report:
        counts[line["kind"]] = counts.get(line["kind"], 0) + 1
    return counts
