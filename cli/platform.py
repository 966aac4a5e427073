"""The platform side of the CLI: `up` (services, work pool, deployments, worker, image API, your
administrator token), `status`, the maintenance flows on demand, `--remote` (send operations
through the deployments) and `platform yaml` (rewrite prefect.yaml from the flows). Only `up`,
`down` and `platform ...` load Prefect; the rest ask the image API."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Optional

import httpx
import typer

from catalog.model import HcxError, Refused
from cli.client import TOKEN_FILE, Api, home, remote_param, use_remote
from cli.common import console, print_json, refusals_exit_1, say, wait_for_run
from cli.stack import Stack

REPO_ROOT = Path(__file__).resolve().parent.parent

platform_app = typer.Typer(help="The Prefect side: deployments and prefect.yaml.", no_args_is_help=True)


def global_options(
    remote: Optional[bool] = typer.Option(
        None, "--remote/--local",
        help="Have the service send operations through the Prefect deployments (a worker runs them) or "
             "run them in a process of its own (default: the service's HCX_REMOTE)."),
) -> None:
    """Manage virtual-machine disk images in S3 datastores."""
    use_remote(remote)  # set on every invocation, so nothing carries over


def register(app: typer.Typer) -> None:
    app.callback()(global_options)
    app.command()(status)
    app.command()(reconcile)
    app.command()(monitor)
    app.command()(scrub)
    app.add_typer(platform_app, name="platform")


# --- up / status -----------------------------------------------------------------------------

def bring_up(redeploy: bool = False) -> dict:
    """Everything the platform needs, started if missing (idempotent), and an administrator with
    a token for the OS user who ran it; returns `status`'s data."""
    from cli.runtime import running_platform

    with running_platform(worker=True, redeploy=redeploy):
        write_admin_token(getpass.getuser())
    return platform_status()


def write_admin_token(user: str) -> Path:
    """The OS user who ran `up` is an administrator; their token file (mode 600) is kept while it
    still works, so `make demo` and the CLI need no extra step."""
    from catalog.identity import open_directory

    directory = open_directory()
    directory.ensure_user(user, admin=True)
    path = home() / TOKEN_FILE
    if path.exists() and directory.authenticate(path.read_text().strip()) is not None:
        return path
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(directory.issue_token(user) + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    return path


def _answers(url: str | None) -> bool:
    if not url:
        return False
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def local_status() -> dict:
    """What this machine's stack runs (from $HCX_HOME/stack.json; never a credential)."""
    from catalog.settings import get_settings

    stack = Stack(get_settings())
    state = stack.load()
    api_url = state.api_url
    return {
        "home": str(stack.home),
        "api_url": api_url,
        "api": {"running": _answers(f"{api_url}/health" if api_url else None), "log": str(stack.logs / "api.log")},
        "s3_endpoint": state.s3_endpoint if state.s3.ports else None,
        "s3": {"running": stack.running(state.s3) and stack.s3_ready(state), "pid": state.s3.pid,
               "log": str(stack.logs / "seaweedfs.log")},
        "prefect": {"pid": state.prefect.pid if stack.running(state.prefect) else None,
                    "log": str(stack.logs / "prefect-server.log")},
        "worker": {"pool": get_settings().work_pool, "running": stack.running(state.worker),
                   "pid": state.worker.pid if stack.running(state.worker) else None,
                   "log": str(stack.logs / "worker.log")},
    }


def platform_status() -> dict:
    """This machine's stack, and what the image API says of the platform (when it answers)."""
    data = local_status()
    try:
        service = Api().get("/status")
    except HcxError as exc:
        service = {"prefect": {"running": False}, "worker": {"online": False}, "deployments": [], "last_runs": {},
                   "unavailable": str(exc)}
    merged = {part: {**data[part], **service.pop(part, {})} for part in ("prefect", "worker")}
    return {**data, **service, **merged}


def print_status(data: dict) -> None:
    def said(running: bool) -> str:
        return "[green]running[/green]" if running else "[red]stopped[/red]"

    worker = data["worker"]
    console.print(f"Home:           {data['home']}  (catalog {data.get('catalog', '-')})")
    console.print(f"Image API:      {data['api_url'] or '-'}  {said(data['api']['running'])}")
    console.print(f"S3 endpoint:    {data['s3_endpoint'] or '-'}  {said(data['s3']['running'])}")
    console.print(f"Prefect API:    {data.get('prefect_api_url') or '-'}  {said(data['prefect'].get('running', False))}")
    console.print(f"Prefect UI:     {data.get('prefect_ui_url') or '-'}")
    console.print(f"Worker:         pool {worker['pool']}, {said(worker['running'])}"
                  f"{', online' if worker.get('online') else ''}{', pid ' + str(worker['pid']) if worker['pid'] else ''}")
    if "unavailable" in data:
        console.print(f"(the image API did not answer: {data['unavailable']})")
        return
    console.print(f"Operations run: {data['mode']}ly (--remote/--local, HCX_REMOTE)")
    for deployment in data["deployments"]:
        when = ", ".join(deployment["schedules"]) or "on demand"
        console.print(f"  deployment {deployment['name']:<24} {when}")
    for name, last in data["last_runs"].items():
        if last is None:
            said_last = "never ran"
        else:
            how = "by its schedule" if last["scheduled"] else "by hand or an automation"
            said_last = f"{last['state']} at {last['at']}, {how}"
        console.print(f"  last {name + ':':<10} {said_last}")


@refusals_exit_1
def status(json_: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
    """What runs where: the image API, S3 endpoint, Prefect API and UI, worker, deployments."""
    data = platform_status()
    if json_:
        print_json(data)
    else:
        print_status(data)


# --- maintenance on demand -------------------------------------------------------------------

def _run_maintenance(api: Api, name: str, started: dict, wait: bool) -> None:
    say(f"FLOW RUN: {started['flow_run_id']}")
    if wait:
        say(f"{name} {wait_for_run(api, started['flow_run_id'])}")


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
    api = Api()
    started = api.post("/maintenance/reconcile", {"ttl_hours": ttl_hours, "stale_after": stale_after},
                       **remote_param())
    _run_maintenance(api, "reconcile", started, wait)


@refusals_exit_1
def monitor(wait: bool = typer.Option(False, "--wait")) -> None:
    """Measure used/free/total space of every datastore (table artifact `datastore-usage`; administrators)."""
    api = Api()
    _run_maintenance(api, "monitor", api.post("/maintenance/monitor", **remote_param()), wait)


@refusals_exit_1
def scrub(image_ids: Optional[list[int]] = typer.Argument(None, help="Only these images"),
          wait: bool = typer.Option(False, "--wait")) -> None:
    """Re-hash READY images against their recorded sha256; a mismatch moves the image to ERROR (administrators)."""
    api = Api()
    _run_maintenance(api, "scrub", api.post("/maintenance/scrub", None, image_ids=image_ids or None,
                                            **remote_param()), wait)


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
