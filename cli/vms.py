"""`hcx-image vm ...`: the minimal VMs that use images as disks (what image persistency means).
Every decision is the service's: these commands ask the image API and, with --wait, follow the
prolog or epilog flow run."""

from __future__ import annotations

import sys
from typing import List
from urllib.parse import quote

import typer

from catalog.model import HcxError
from cli.client import Api, remote_param
from cli.common import follow_run, print_json, refusals_exit_1, say, shown

app = typer.Typer(help="VMs using images as disks: persistent ones linked, non-persistent ones copied.",
                  no_args_is_help=True)

VmName = typer.Argument(..., metavar="NAME", help="Name of your VM (see `hcx-image vm list`)")
DiskId = typer.Argument(..., metavar="ID", help="Image id (see `hcx-image list`)")
WAIT_HELP = "Follow the flow; exit 0 when it succeeded, 1 when it failed"
VM_COLUMNS = ("ID", "USER", "NAME", "STAT", "DISKS", "ERROR")


def _path(name: str) -> str:
    """A VM's name as one segment of a URL path (spaces, '?' and '#' included)."""
    return quote(name, safe="")


def _started(started: dict, what: str, *, wait: bool, api: Api) -> None:
    vm = started["vm"]
    say(f"VM {vm['id']} (", vm["name"], f") {what}: {vm['state']}")
    say(f"FLOW RUN: {started['flow_run_id']}")
    if not wait:
        return
    _, run = follow_run(api, started["flow_run_id"], lambda run: None)
    if run["state_type"] != "COMPLETED":
        raise HcxError(f"flow run {run['name']} ended {run['state_type']}: {run['message']}")
    after = next((v for v in api.get("/vms", terminated="true") if v["id"] == vm["id"]), None)
    if after is None:
        raise HcxError(f"VM {vm['id']} is gone")
    if after["state"] == "FAILED":
        raise HcxError(f"VM {after['name']} FAILED: {after['error']}")
    say(f"VM {after['id']} (", after["name"], f") is {after['state']}")


@app.command("create")
@refusals_exit_1
def create(
    name: str = VmName,
    disks: List[int] = typer.Option(..., "--disk", metavar="ID", help="An image to use (repeat; exactly one OS)"),
    container: bool = typer.Option(False, "--container", help="An LXD container (no DATABLOCK disks)"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Create VM NAME using the images: each acquired at once (a persistent one by this VM only), then
    a flow links persistent images and copies non-persistent ones into the system datastore."""
    api = Api()
    started = api.post("/vms", {"name": name, "disks": disks, "container": container}, **remote_param())
    _started(started, "created", wait=wait, api=api)


@app.command("terminate")
@refusals_exit_1
def terminate(
    name: str = VmName,
    failed: bool = typer.Option(False, "--failed", help="The VM failed while active: its persistent images go "
                                                       "to ERROR (their data may be inconsistent)"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Terminate VM NAME: its copies deleted, its images released (persistent ones keep their data)."""
    api = Api()
    started = api.post(f"/vms/{_path(name)}/terminate", None, failed=str(failed).lower(), **remote_param())
    _started(started, "terminating", wait=wait, api=api)


@app.command("attach")
@refusals_exit_1
def attach(name: str = VmName, image_id: int = DiskId, wait: bool = typer.Option(False, "--wait", help=WAIT_HELP)) -> None:
    """Hot-attach image ID to the RUNNING VM NAME (a LOCKED image is refused)."""
    api = Api()
    started = api.post(f"/vms/{_path(name)}/attach", {"image_id": image_id}, **remote_param())
    _started(started, f"attaching image {image_id}", wait=wait, api=api)


@app.command("detach")
@refusals_exit_1
def detach(name: str = VmName, image_id: int = DiskId, wait: bool = typer.Option(False, "--wait", help=WAIT_HELP)) -> None:
    """Detach image ID from the RUNNING VM NAME: its copy deleted, the image released."""
    api = Api()
    started = api.post(f"/vms/{_path(name)}/detach", {"image_id": image_id}, **remote_param())
    _started(started, f"detaching image {image_id}", wait=wait, api=api)


@app.command("list")
@refusals_exit_1
def list_vms(json_: bool = typer.Option(False, "--json", help="Print a JSON list")) -> None:
    """Your VMs (administrators: everyone's)."""
    found = Api().get("/vms")
    if json_:
        print_json(found)
        return
    rows = [[shown(v) for v in (vm["id"], vm["owner"], vm["name"], vm["state"],
                                ",".join(str(d["image_id"]) for d in vm["disks"]), vm["error"] or "")] for vm in found]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(VM_COLUMNS)]
    for row in [list(VM_COLUMNS), *rows]:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")


@app.command("show")
@refusals_exit_1
def show(name: str = VmName, json_: bool = typer.Option(False, "--json")) -> None:
    """VM NAME and its disks: image id, link or copy, the object it uses, state."""
    vm = Api().get(f"/vms/{_path(name)}")
    if json_:
        print_json(vm)
        return
    say(f"VM {vm['id']}: ", vm["name"])
    say("OWNER: ", vm["owner"], "  GROUP: ", vm["group"])
    say(f"STATE: {vm['state']}{'  (container)' if vm['container'] else ''}")
    if vm["error"]:
        say("ERROR: ", vm["error"])
    say("DISKS:")
    for disk in vm["disks"]:
        say(f"  image {disk['image_id']} {disk['type']} {disk['mode']} {disk['state']} ", disk["object"] or "-")
