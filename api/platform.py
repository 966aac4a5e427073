"""The platform as tenants may see it (what runs where, never a credential) and the maintenance
flows on demand."""

from __future__ import annotations

import base64

import httpx
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_UI_URL
from sqlalchemy.engine import make_url

from api.auth import Admin, Caller
from api.shapes import Remote, Started
from catalog.requests import RequestedBy
from catalog.settings import get_settings
from catalog.staging import reconcile_limits
from flows import launcher

router = APIRouter(prefix="/api/v1", tags=["platform"])


def _prefect() -> httpx.Client:
    """Plain REST on the Prefect API this service uses, with its auth string as Prefect's client
    sends it (HTTP Basic of the string)."""
    auth = PREFECT_API_AUTH_STRING.value()
    headers = {"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"} if auth else {}
    return httpx.Client(base_url=PREFECT_API_URL.value(), timeout=5, headers=headers)


def _deployments(api: httpx.Client) -> list[dict]:
    flows = {f["id"]: f["name"] for f in api.post("/flows/filter", json={}).json()}
    found = []
    for deployment in api.post("/deployments/filter", json={}).json():
        schedules = [f"every {s['schedule']['interval']:g}s" if "interval" in s["schedule"] else
                     s["schedule"].get("cron") or s["schedule"].get("rrule") or "scheduled"
                     for s in deployment.get("schedules", []) if s.get("active", True)]
        found.append({"name": f"{flows.get(deployment['flow_id'], '?')}/{deployment['name']}",
                      "work_pool": deployment.get("work_pool_name"), "schedules": schedules,
                      "paused": deployment.get("paused", False)})
    return sorted(found, key=lambda d: d["name"])


def _last_runs(api: httpx.Client) -> dict[str, dict | None]:
    """Each maintenance flow's latest run that started, so one sees at once whether the backstop
    runs; `scheduled`: its deployment's schedule made it (not a user or an automation)."""
    found: dict[str, dict | None] = {}
    for name in launcher.maintenance():
        runs = api.post("/flow_runs/filter", json={
            "flows": {"name": {"any_": [launcher.deployable()[name].name]}},
            "flow_runs": {"start_time": {"is_null_": False}},
            "sort": "START_TIME_DESC", "limit": 1,
        }).raise_for_status().json()
        found[name] = {"state": runs[0]["state_name"] or runs[0]["state_type"],
                       "at": runs[0]["end_time"] or runs[0]["start_time"],
                       "scheduled": bool(runs[0].get("auto_scheduled")),
                       "flow_run_id": runs[0]["id"]} if runs else None
    return found


def _worker_online(api: httpx.Client) -> bool:
    """Whether a worker of our pool sends heartbeats (a run sent with --remote will be picked up)."""
    workers = api.post(f"/work_pools/{get_settings().work_pool}/workers/filter", json={})
    return workers.status_code == 200 and any(w.get("status") == "ONLINE" for w in workers.json())


def platform_status() -> dict:
    settings = get_settings()
    with _prefect() as api:
        try:
            up = api.get("/health").status_code == 200
        except httpx.HTTPError:
            up = False
        return {
            "catalog": make_url(settings.catalog_url).render_as_string(hide_password=True),
            "mode": "remote" if launcher.remote_mode() else "local",
            "prefect_api_url": PREFECT_API_URL.value(),
            "prefect_ui_url": PREFECT_UI_URL.value(),
            "prefect": {"running": up},
            "worker": {"online": up and _worker_online(api)},
            "deployments": _deployments(api) if up else [],
            "last_runs": _last_runs(api) if up else {name: None for name in launcher.maintenance()},
        }


@router.get("/status", summary="What runs where (no credential is ever shown)")
def status(actor: Caller) -> dict:
    return platform_status()


class Reconcile(BaseModel):
    ttl_hours: float | None = Field(default=None, ge=0, le=24 * 365, description="Staging TTL in hours")
    stale_after: int | None = Field(default=None, ge=1, le=10**7, description="Seconds before an unrecorded operation is abandoned")


@router.post("/maintenance/reconcile", status_code=202, response_model=Started,
             summary="Settle images left by dead operations, sweep old uploads, audit datastores (administrators)")
def reconcile(body: Reconcile, actor: Admin, remote: Remote = None) -> Started:
    reconcile_limits(get_settings(), actor, staging_ttl_hours=body.ttl_hours, stale_after_seconds=body.stale_after)
    return Started(flow_run_id=launcher.submit("reconcile", {
        "staging_ttl_hours": body.ttl_hours, "stale_after_seconds": body.stale_after,
        "requested_by": RequestedBy(owner=actor.user).model_dump()}, remote=remote))


@router.post("/maintenance/monitor", status_code=202, response_model=Started,
             summary="Measure every datastore's use (administrators)")
def monitor(actor: Admin, remote: Remote = None) -> Started:
    return Started(flow_run_id=launcher.submit("monitor", {}, remote=remote))


@router.post("/maintenance/scrub", status_code=202, response_model=Started,
             summary="Re-hash READY images against their sha256 (administrators)")
def scrub(actor: Admin, remote: Remote = None,
          image_ids: list[int] | None = Query(None, max_length=1000)) -> Started:
    return Started(flow_run_id=launcher.submit("scrub", {"image_ids": image_ids or None}, remote=remote))
