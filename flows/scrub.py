"""Scrub: re-hash READY images and compare with the recorded sha256; a mismatch (or a missing
object) moves the image to ERROR through the catalog's rules. Results in `scrub-report`."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from catalog.model import HcxError, ImageState
from catalog.store import open_catalog
from flows.reporting import publish_table
from tasks.maintenance import rehash_image, row, scrub_candidates


def _run_name() -> str:
    ids = flow_run.parameters.get("image_ids")
    stores = flow_run.parameters.get("datastores")
    if ids:
        return f"scrub images {', '.join(map(str, ids))}"
    return f"scrub {', '.join(stores) if stores else 'all datastores'}"


@flow(name="scrub", flow_run_name=_run_name, log_prints=True)
def scrub(datastores: list[str] | None = None, image_ids: list[int] | None = None) -> dict[str, int]:
    """Re-hash READY images against their recorded size and sha256.

    Args:
        datastores: Only images in these datastores (default: all).
        image_ids: Only these images (default: all READY images).
    """
    report, failed, checked = [], [], []
    for image_id in scrub_candidates(datastores, image_ids):
        state = rehash_image(image_id, return_state=True)
        if state.is_completed():
            report.append(state.result())
            checked.append(image_id)
        else:
            failed.append(image_id)
            report.append(row("scrub", f"image {image_id}", f"not checked: {state.message}"))
    publish_table("scrub-report", report or [row("scrub", "-", "no READY image to check")],
                  f"Re-hash of {len(report)} image(s)", flow_run.get_id())
    if failed:
        raise HcxError(f"Could not re-hash image(s) {', '.join(map(str, failed))}; see the report.")
    catalog = open_catalog()
    damaged = [i for i in checked if (image := catalog.find(i)) is not None and image.state is ImageState.ERROR]
    return {"checked": len(checked), "damaged": len(damaged)}
