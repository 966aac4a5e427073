"""Monitor: used, free and total bytes of every datastore (the reference's datastore monitor),
as a `datastore-usage` table artifact and one `hcx.datastore.monitored` event per datastore."""

from __future__ import annotations

from prefect import flow
from prefect.events import emit_event
from prefect.runtime import flow_run

from catalog.model import HcxError, human_size
from flows.reporting import publish_table
from tasks.maintenance import datastore_names, measure_datastore


def _run_name() -> str:
    names = flow_run.parameters.get("datastores")
    return f"monitor {', '.join(names) if names else 'all datastores'}"


@flow(name="monitor", flow_run_name=_run_name, log_prints=True)
def monitor(datastores: list[str] | None = None) -> list[dict]:
    """Measure the datastores' use.

    Args:
        datastores: Datastores to measure (default: all).
    """
    measured, failed = [], []
    for name in datastores or datastore_names():
        state = measure_datastore(name, return_state=True)
        if not state.is_completed():
            failed.append(f"{name}: {state.message}")
            continue
        usage = state.result()
        measured.append(usage)
        emit_event(
            event="hcx.datastore.monitored",
            resource={"prefect.resource.id": f"hcx.datastore.{name}", "prefect.resource.name": name},
            payload={k: usage[k] for k in ("used", "free", "total", "objects", "catalog_used")},
        )
    publish_table("datastore-usage", [
        {"datastore": u["datastore"], "kind": u["kind"], "bucket": u["bucket"], "objects": u["objects"],
         "used": human_size(u["used"]), "free": human_size(u["free"]) if u["free"] is not None else "unlimited",
         "total": human_size(u["total"]) if u["total"] is not None else "unlimited",
         "catalog_used": human_size(u["catalog_used"])}
        for u in measured
    ], "Used, free and total space per datastore", flow_run.get_id())
    if failed:
        raise HcxError("Could not measure " + "; ".join(failed))
    return measured
