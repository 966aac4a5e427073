"""The snapshot verbs: snapshot-create, snapshot-list, snapshot-revert, snapshot-delete,
snapshot-flatten. The service decides (the catalog's rules); these ask the image API, say which
flow run does the work and, with --wait, follow it until the image is READY again."""

from __future__ import annotations

import sys
from urllib.parse import quote

import typer

from catalog.model import HcxError, human_size
from cli.app import app
from cli.client import Api, remote_param
from cli.common import BUSY_STATES, follow_run, hook_grace, print_json, refusals_exit_1, say, shown

ImageId = typer.Argument(..., metavar="ID", help="Image id (see `hcx-image list`)")
SnapshotRef = typer.Argument(..., metavar="SNAP", help="The snapshot's name or number (see `snapshot-list ID`)")
WAIT_HELP = "Follow the flow; exit 0 when it succeeded, 1 when it failed (the image is READY again either way)"


def _path(image_id: int, snapshot: str) -> str:
    return f"/images/{image_id}/snapshots/{quote(snapshot, safe='')}"


def _started(api: Api, started: dict, image_id: int, wait: bool) -> None:
    say(f"FLOW RUN: {started['flow_run_id']}")
    if wait:
        _wait(api, image_id, started["flow_run_id"])


def _wait(api: Api, image_id: int, flow_run_id: str) -> None:
    """Until the run has ended and its image has left LOCKED; a failed run raises its reason."""

    def outcome(run: dict) -> dict | None:
        image = run["image"]
        return image if run["final"] and image is not None and image["state"] not in BUSY_STATES else None

    image, run = follow_run(api, flow_run_id, outcome, grace=hook_grace)
    if image is None:
        state = (run["image"] or {}).get("state", "gone")
        raise HcxError(f"image {image_id} is {state} but its flow run ended {run['state_type']}: "
                       f"{run['message'].rstrip('.')}. `hcx-image reconcile --wait` settles it.")
    if run["state_type"] != "COMPLETED":
        raise HcxError(f"{run['message'].rstrip('.')}. Image {image_id} is {image['state']} again, unchanged.")
    say(f"image {image_id} is {image['state']} with {image['snapshots']} snapshot(s)")


@app.command("snapshot-create")
@refusals_exit_1
def snapshot_create(
    image_id: int = ImageId,
    name: str = typer.Argument(..., metavar="NAME", help="The snapshot's name (unique on the image, not only digits)"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Take a snapshot of a READY OS or DATABLOCK image: a copy of its bytes beside it in its datastore."""
    api = Api()
    _started(api, api.post(f"/images/{image_id}/snapshots", {"name": name}, **remote_param()), image_id, wait)


COLUMNS = ("NUM", "NAME", "PARENT", "ACTIVE", "SIZE", "TIME", "SHA256", "STATE")


@app.command("snapshot-list")
@refusals_exit_1
def snapshot_list(image_id: int = ImageId,
                  json_: bool = typer.Option(False, "--json", help="Print a JSON list")) -> None:
    """An image's snapshots: number, name, parent, whether the image's bytes came from it, size, time."""
    found = Api().get(f"/images/{image_id}/snapshots")
    if json_:
        print_json(found)
        return
    rows = [[shown(v) for v in (s["number"], s["name"], "-" if s["parent"] is None else s["parent"],
                                "*" if s["active"] else "", human_size(s["size"]), s["time"][:19],
                                (s["sha256"] or "-")[:16], s["state"])] for s in found]
    widths = [max([len(column), *(len(row[i]) for row in rows)]) for i, column in enumerate(COLUMNS)]
    for row in [list(COLUMNS), *rows]:
        sys.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


@app.command("snapshot-revert")
@refusals_exit_1
def snapshot_revert(image_id: int = ImageId, snapshot: str = SnapshotRef,
                    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP)) -> None:
    """Make a snapshot's bytes the image's content again (the snapshot stays)."""
    api = Api()
    _started(api, api.post(f"{_path(image_id, snapshot)}/revert", None, **remote_param()), image_id, wait)


@app.command("snapshot-delete")
@refusals_exit_1
def snapshot_delete(image_id: int = ImageId, snapshot: str = SnapshotRef,
                    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP)) -> None:
    """Delete a snapshot: its object, then its record."""
    api = Api()
    _started(api, api.delete(_path(image_id, snapshot), **remote_param()), image_id, wait)


@app.command("snapshot-flatten")
@refusals_exit_1
def snapshot_flatten(image_id: int = ImageId, snapshot: str = SnapshotRef,
                     wait: bool = typer.Option(False, "--wait", help=WAIT_HELP)) -> None:
    """Make a snapshot the image's content and remove every snapshot: a persistent image can then be
    cloned and made non-persistent again."""
    api = Api()
    _started(api, api.post(f"{_path(image_id, snapshot)}/flatten", None, **remote_param()), image_id, wait)
