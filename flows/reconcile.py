"""Reconcile: the backstop for hooks that never ran and uploads never finished.

1. images waiting on an operation whose flow run has ended, or whose process is gone (no
   heartbeat for `stale_after_seconds`: the run is marked CRASHED) -> the flow's own hooks are run
   as its process would have (resumed), and an image still waiting goes through `rules.abandon`
   (ERROR with the reason, or a clone source released);
2. per datastore: staged objects no image claims and incomplete multipart uploads, older than
   the staging TTL -> removed; image objects no catalog row claims -> reported; rows whose object
   is missing -> ERROR.
Everything it did is in the `reconcile-report` table artifact.
"""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from catalog.model import HcxError
from catalog.settings import get_settings
from flows.reporting import publish_table
from tasks.maintenance import (
    Row, audit_objects, datastore_names, images_awaiting_operations, row, settle_image, sweep_staging,
)

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
) -> dict[str, int]:
    """Settle images left waiting by dead operations, sweep stale staging, audit objects.

    Args:
        scope: "images" (stuck images only), "objects" (staging and object audit only) or "all".
        staging_ttl_hours: Age after which unclaimed staged objects and incomplete multipart
            uploads are removed (default: HCX_STAGING_TTL_HOURS).
        stale_after_seconds: A RUNNING flow run silent (no heartbeat) this long has lost its
            process (default: HCX_STALE_RUN_SECONDS).
        datastores: Datastores to sweep and audit (default: all).
    """
    settings = get_settings()
    ttl = settings.staging_ttl_hours if staging_ttl_hours is None else staging_ttl_hours
    stale = stale_after_seconds or settings.stale_run_seconds
    report: list[Row] = []
    failed: list[str] = []
    if scope in ("all", "images"):
        for image_id in images_awaiting_operations():
            if (line := settle_image(image_id, stale)) is not None:
                report.append(line)
    if scope in ("all", "objects"):
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
