"""The platform side of the CLI: `up` (services, work pool, deployments, worker), `status`,
the maintenance flows on demand, `--remote` (send operations through the deployments) and
`platform yaml` (rewrite prefect.yaml from the flows)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import httpx
import typer
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
from sqlalchemy.engine import make_url

from catalog.model import HcxError, Refused
from catalog.settings import Settings, get_settings
from cli.common import console, follow_flow_run, print_json, refusals_exit_1, run_outcome
from cli.runtime import external_prefect_api, running_platform
from cli.stack import Stack
from flows import launcher

REPO_ROOT = Path(__file__).resolve().parent.parent

platform_app = typer.Typer(help="The Prefect side: deployments and prefect.yaml.", no_args_is_help=True)


def global_options(
    remote: Optional[bool] = typer.Option(
        None, "--remote/--local",
        help="Send operations through the Prefect deployments (a worker runs them) or run them in a "
             "background process here (default: HCX_REMOTE)."),
) -> None:
    """Manage virtual-machine disk images in S3 datastores."""
    launcher.use_remote(remote)  # set on every invocation, so nothing carries over


def register(app: typer.Typer) -> None:
    app.callback()(global_options)
    app.command()(status)
    app.command()(reconcile)
    app.command()(monitor)
    app.command()(scrub)
    app.add_typer(platform_app, name="platform")


# --- up / status -----------------------------------------------------------------------------

def bring_up(redeploy: bool = False) -> dict:
    """Everything the platform needs, started if missing (idempotent); returns `status()`'s data."""
    with running_platform(worker=True, redeploy=redeploy):
        pass
    return platform_status(get_settings())


def _healthy(api_url: str | None) -> bool:
    if not api_url:
        return False
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _deployments(api_url: str) -> list[dict]:
    """The deployments on the API, read over plain REST (status must work against any server)."""
    flows = {f["id"]: f["name"] for f in httpx.post(f"{api_url}/flows/filter", json={}, timeout=5).json()}
    found = []
    for deployment in httpx.post(f"{api_url}/deployments/filter", json={}, timeout=5).json():
        schedules = [f"every {s['schedule']['interval']:g}s" if "interval" in s["schedule"] else
                     s["schedule"].get("cron") or s["schedule"].get("rrule") or "scheduled"
                     for s in deployment.get("schedules", []) if s.get("active", True)]
        found.append({"name": f"{flows.get(deployment['flow_id'], '?')}/{deployment['name']}",
                      "id": deployment["id"], "work_pool": deployment.get("work_pool_name"),
                      "schedules": schedules, "paused": deployment.get("paused", False)})
    return sorted(found, key=lambda d: d["name"])


def _last_runs(api_url: str) -> dict[str, dict | None]:
    """Each maintenance flow's latest run that started: {"state", "at", "scheduled"} (None when it
    never ran), so an operator sees at once whether the backstop runs. `scheduled` says the
    deployment's schedule made it (Prefect's `auto_scheduled`), not a user or an automation."""
    found: dict[str, dict | None] = {}
    for name in launcher.maintenance():
        runs = httpx.post(f"{api_url}/flow_runs/filter", timeout=5, json={
            "flows": {"name": {"any_": [launcher.deployable()[name].name]}},
            "flow_runs": {"start_time": {"is_null_": False}},
            "sort": "START_TIME_DESC", "limit": 1,
        }).raise_for_status().json()
        found[name] = {"state": runs[0]["state_name"] or runs[0]["state_type"],
                       "at": runs[0]["end_time"] or runs[0]["start_time"],
                       "scheduled": bool(runs[0].get("auto_scheduled")),
                       "flow_run_id": runs[0]["id"]} if runs else None
    return found


def _safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def platform_status(settings: Settings) -> dict:
    """What runs where (never starts anything; credentials never shown)."""
    stack = Stack(settings)
    state = stack.load()
    external = external_prefect_api()
    api_url = external or (f"{state.prefect_url}/api" if state.prefect.ports else None)
    api_up = _healthy(api_url)
    if external:
        with temporary_settings(updates={PREFECT_API_URL: external}):
            ui_url = PREFECT_UI_URL.value()
    else:
        ui_url = state.prefect_url if state.prefect.ports else None
    worker_running = stack.running(state.worker)
    return {
        "home": str(stack.home),
        "catalog": _safe_url(settings.catalog_url),
        "mode": "remote" if launcher.remote_mode() else "local",
        "s3_endpoint": state.s3_endpoint if state.s3.ports else None,
        "s3": {"running": stack.running(state.s3) and stack.s3_ready(state), "pid": state.s3.pid,
               "log": str(stack.logs / "seaweedfs.log")},
        "prefect_api_url": api_url,
        "prefect_ui_url": ui_url,
        "prefect": {"running": api_up, "external": bool(external), "pid": None if external else state.prefect.pid,
                    "log": None if external else str(stack.logs / "prefect-server.log")},
        "worker": {"pool": settings.work_pool, "running": worker_running,
                   "pid": state.worker.pid if worker_running else None,
                   "online": api_up and stack.worker_online(api_url), "log": str(stack.logs / "worker.log")},
        "deployments": _deployments(api_url) if api_up else [],
        "last_runs": _last_runs(api_url) if api_up else {name: None for name in launcher.maintenance()},
    }


def print_status(data: dict) -> None:
    def said(running: bool) -> str:
        return "[green]running[/green]" if running else "[red]stopped[/red]"

    worker = data["worker"]
    console.print(f"Home:           {data['home']}  (catalog {data['catalog']})", highlight=False)
    console.print(f"S3 endpoint:    {data['s3_endpoint'] or '-'}  {said(data['s3']['running'])}", highlight=False)
    console.print(f"Prefect API:    {data['prefect_api_url'] or '-'}  {said(data['prefect']['running'])}"
                  f"{' (external)' if data['prefect']['external'] else ''}", highlight=False)
    console.print(f"Prefect UI:     {data['prefect_ui_url'] or '-'}", highlight=False)
    console.print(f"Worker:         pool {worker['pool']}, {said(worker['running'])}"
                  f"{', pid ' + str(worker['pid']) if worker['pid'] else ''}"
                  f"{', online' if worker['online'] else ''}", highlight=False)
    console.print(f"Operations run: {data['mode']}ly (--remote/--local, HCX_REMOTE)", highlight=False)
    for deployment in data["deployments"]:
        when = ", ".join(deployment["schedules"]) or "on demand"
        console.print(f"  deployment {deployment['name']:<24} {when}", highlight=False)
    for name, last in data["last_runs"].items():
        if last is None:
            said_last = "never ran"
        else:
            how = "by its schedule" if last["scheduled"] else "by hand or an automation"
            said_last = f"{last['state']} at {last['at']}, {how}"
        console.print(f"  last {name + ':':<10} {said_last}", highlight=False)


@refusals_exit_1
def status(json_: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
    """What runs where: S3 endpoint, Prefect API and UI, worker, deployments."""
    data = platform_status(get_settings())
    if json_:
        print_json(data)
    else:
        print_status(data)


# --- maintenance on demand -------------------------------------------------------------------

def follow_run(flow_run_id: str) -> str:
    """Wait for a flow run to end (Prefect's wait_for_flow_run); its final state type (a failure
    raises with its message)."""
    _, run = follow_flow_run(lambda: None, flow_run_id)
    ended, message = run_outcome(run)
    if ended != "COMPLETED":
        raise HcxError(f"flow run {run.name} ended {ended}: {message}")
    return ended


def _run_maintenance(name: str, parameters: dict, wait: bool) -> None:
    with running_platform():
        flow_run_id = launcher.submit(name, parameters)
        console.print(f"FLOW RUN: {flow_run_id}")
        if wait:
            console.print(f"{name} {follow_run(flow_run_id)}")


@refusals_exit_1
def reconcile(
    ttl_hours: Optional[float] = typer.Option(None, "--ttl-hours", min=0, help="Staging TTL (default: "
                                              "HCX_STAGING_TTL_HOURS; below 1h the admin group only)"),
    stale_after: Optional[int] = typer.Option(None, "--stale-after", min=1,
                                              help="Seconds before an image whose operation recorded no "
                                                   "flow run is abandoned (a RUNNING run is Prefect's to "
                                                   "judge) (below 60 the admin group only)"),
    wait: bool = typer.Option(False, "--wait", help="Follow the flow run; exit 1 if it fails"),
) -> None:
    """Settle images left by dead operations, sweep old uploads the service recorded (unknown objects
    are only reported), audit datastores."""
    from catalog.requests import RequestedBy
    from catalog.staging import reconcile_limits
    from cli.common import acting_user

    actor = acting_user()  # the caller's word until the image API authenticates it
    reconcile_limits(get_settings(), actor, staging_ttl_hours=ttl_hours, stale_after_seconds=stale_after)
    _run_maintenance("reconcile", {"staging_ttl_hours": ttl_hours, "stale_after_seconds": stale_after,
                                   "requested_by": RequestedBy(owner=actor.user, group=actor.group).model_dump()},
                     wait)


@refusals_exit_1
def monitor(wait: bool = typer.Option(False, "--wait")) -> None:
    """Measure used/free/total space of every datastore (table artifact `datastore-usage`)."""
    _run_maintenance("monitor", {}, wait)


@refusals_exit_1
def scrub(image_ids: Optional[list[int]] = typer.Argument(None, help="Only these images"),
          wait: bool = typer.Option(False, "--wait")) -> None:
    """Re-hash READY images against their recorded sha256; a mismatch moves the image to ERROR."""
    _run_maintenance("scrub", {"image_ids": image_ids or None}, wait)


# --- prefect.yaml ----------------------------------------------------------------------------

@platform_app.command("deploy")
@refusals_exit_1
def deploy() -> None:
    """Apply every deployment again (schedules from the HCX_*_EVERY settings) and start the worker."""
    print_status(bring_up(redeploy=True))


@platform_app.command("yaml")
@refusals_exit_1
def write_yaml(check: bool = typer.Option(False, "--check", help="Only say whether prefect.yaml is current")) -> None:
    """Rewrite prefect.yaml from the deployable flows (run it after adding a flow to the registry)."""
    from flows.platform import render_prefect_yaml

    path = REPO_ROOT / "prefect.yaml"
    rendered = render_prefect_yaml()
    if check:
        if not path.exists() or path.read_text() != rendered:
            raise Refused(f"{path} is out of date: run `hcx-image platform yaml`.")
        console.print(f"{path} is current")
        return
    path.write_text(rendered)
    console.print(f"wrote {path}")
