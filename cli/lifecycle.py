"""The image lifecycle verbs: clone, delete, retry, enable, disable, persistent, nonpersistent,
rename, update, chtype, chmod, chown, chgrp. Every decision is the service's (the catalog's rules):
these commands ask the image API, say what happened and, with --wait, follow the flow run."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import typer

from catalog.model import HcxError, ImageType, Refused
from cli.app import app
from cli.client import Api, ApiError, remote_param
from cli.common import (
    refusals_exit_1, report_new_image, said, say, transfer_bar, wait_for_image, wait_for_removal,
)

ImageId = typer.Argument(..., metavar="ID", help="Image id (see `hcx-image list`)")
WAIT_HELP = "Follow the flow; exit 0 when it succeeded, 1 when the image is in ERROR"


# --- verbs that start a flow -----------------------------------------------------------------

@app.command()
@refusals_exit_1
def clone(
    image_id: int = ImageId,
    name: str = typer.Argument(..., metavar="NAME", help="Name of the new image"),
    datastore: Optional[str] = typer.Option(None, "--datastore", help="Datastore of the clone (default: the source's)"),
    persistent: bool = typer.Option(False, "--persistent", help="Make the clone persistent"),
    skip_capacity_check: bool = typer.Option(False, "--skip-capacity-check", help="Administrators only"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Clone image ID into a new image NAME: same type, format and sha256; copied server-side when
    the datastores share an endpoint, streamed otherwise, and verified."""
    api = Api()
    started = api.post(f"/images/{image_id}/clone", {"name": name, "datastore": datastore, "persistent": persistent,
                                                     "skip_capacity_check": skip_capacity_check}, **remote_param())
    report_new_image(api, started["flow_run_id"], wait=wait)


@app.command()
@refusals_exit_1
def delete(
    image_id: int = ImageId,
    force: bool = typer.Option(False, "--force", help="Delete a LOCKED image too (needs the ADMIN right)"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Delete an image: DELETE at once (its name is free again), then a flow removes its objects
    and, once they are gone, its row."""
    api = Api()
    started = api.delete(f"/images/{image_id}", force=str(force).lower(), **remote_param())
    said(started["image"], ", its name free again,")
    say(f"FLOW RUN: {started['flow_run_id']}")
    if wait:
        wait_for_removal(api, image_id, started["flow_run_id"])


@app.command()
@refusals_exit_1
def retry(image_id: int = ImageId, wait: bool = typer.Option(False, "--wait", help=WAIT_HELP)) -> None:
    """Re-run the operation that left image ID in ERROR, from where it failed: staged bytes and
    partial copies are reused when their size and sha256 check out; an upload whose staged bytes
    are gone is sent again from the file it came from, if it is unchanged."""
    api = Api()
    try:
        started = api.post(f"/images/{image_id}/retry", None, **remote_param())
    except ApiError as refusal:
        if not refusal.body.get("needs_bytes"):
            raise
        started = _send_again(api, image_id, refusal)
    image = started["image"]
    said(image, f", retrying its {started['operation']},")
    say(f"FLOW RUN: {started['flow_run_id']}")
    if not wait:
        return
    if image["state"] == "DELETE":
        wait_for_removal(api, image_id, started["flow_run_id"])
        return
    image = wait_for_image(api, started["flow_run_id"], until_settled=True)
    if image["state"] == "ERROR":
        raise HcxError(f"image {image['id']} is in ERROR: {image['error']}")
    said(image)


def _send_again(api: Api, image_id: int, refusal: ApiError) -> dict:
    """The file a retried upload came from, sent again if it still hashes to the image's sha256."""
    image = api.get(f"/images/{image_id}")
    where = refusal.body.get("client_path")
    refused = f"Cannot retry image {image_id}: its staged bytes are gone"
    if not where:
        raise Refused(f"{refused} and no local file was recorded for them; delete the image and upload again.")
    path = Path(where)
    if not path.is_file():
        raise Refused(f"{refused} and {path} no longer exists; delete the image and upload again.")
    digest = hashlib.sha256()
    with open(path, "rb") as source, transfer_bar(f"checking {path.name}", path.stat().st_size) as advance:
        while chunk := source.read(1024 * 1024):
            digest.update(chunk)
            advance(len(chunk))
    if digest.hexdigest() != image["sha256"]:
        raise Refused(f"{refused} and {path} has changed since (sha256 {digest.hexdigest()}, the image "
                      f"recorded {image['sha256']}); delete the image and upload the file again.")
    with transfer_bar(f"sending {path.name} again", path.stat().st_size) as advance:
        return api.send_file(f"/images/{image_id}/retry", path, params=remote_param(), progress=advance)


# --- verbs that only move the catalog --------------------------------------------------------

@app.command()
@refusals_exit_1
def enable(image_id: int = ImageId) -> None:
    """DISABLED -> READY; an image in ERROR goes back to what its VMs need (READY, USED, ...)."""
    said(Api().post(f"/images/{image_id}/enable"))


@app.command()
@refusals_exit_1
def disable(image_id: int = ImageId) -> None:
    """READY or ERROR -> DISABLED: no new VM may use the image."""
    said(Api().post(f"/images/{image_id}/disable"))


@app.command()
@refusals_exit_1
def persistent(image_id: int = ImageId) -> None:
    """Make the image persistent: one VM at a time, writing into the image itself."""
    said(Api().post(f"/images/{image_id}/persistent"), " (persistent)")


@app.command()
@refusals_exit_1
def nonpersistent(image_id: int = ImageId) -> None:
    """Make the image non-persistent: every VM gets its own copy."""
    said(Api().post(f"/images/{image_id}/nonpersistent"), " (non-persistent)")


@app.command()
@refusals_exit_1
def rename(image_id: int = ImageId, name: str = typer.Argument(..., metavar="NAME", help="The new name")) -> None:
    """Rename an image (names are unique per owner)."""
    said(Api().post(f"/images/{image_id}/rename", {"name": name}))


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise typer.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--set")
    return key, value


@app.command()
@refusals_exit_1
def update(
    image_id: int = ImageId,
    description: Optional[str] = typer.Option(None, "--description", help="The new description"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE: set a free attribute (repeatable)"),
    unset: Optional[list[str]] = typer.Option(None, "--unset", help="KEY: remove a free attribute (repeatable)"),
) -> None:
    """Change an image's description and free attributes."""
    if description is None and not set_ and not unset:
        raise typer.BadParameter("give --description, --set KEY=VALUE or --unset KEY")
    body = {"description": description, "set": dict(_key_value(item) for item in set_ or []), "unset": unset or []}
    said(Api().post(f"/images/{image_id}/update", body))


@app.command()
@refusals_exit_1
def chtype(
    image_id: int = ImageId,
    type_: ImageType = typer.Argument(..., metavar="TYPE", case_sensitive=False, help="OS, DATABLOCK or CDROM"),
) -> None:
    """Change the type of an image (a CDROM is always non-persistent)."""
    said(Api().post(f"/images/{image_id}/chtype", {"type": type_.value}), f" ({type_.value})")


@app.command()
@refusals_exit_1
def chmod(image_id: int = ImageId,
          mode: str = typer.Argument(..., metavar="OCTAL", help="owner/group/other x use/manage/admin, e.g. 640")) -> None:
    """Change who may use and manage the image: 640 shares it with its group, 604 with everyone."""
    image = Api().post(f"/images/{image_id}/chmod", {"mode": mode})
    said(image, f" (permissions {image['permissions']})")


@app.command()
@refusals_exit_1
def chown(image_id: int = ImageId, user: str = typer.Argument(..., metavar="USER"),
          group: Optional[str] = typer.Argument(None, metavar="[GROUP]")) -> None:
    """Give the image to USER (and GROUP): administrators only, unless USER is you."""
    image = Api().post(f"/images/{image_id}/chown", {"user": user, "group": group})
    said(image, f" (owner {image['owner']}, group {image['group']})")


@app.command()
@refusals_exit_1
def chgrp(image_id: int = ImageId, group: str = typer.Argument(..., metavar="GROUP")) -> None:
    """Change the image's group (one you are in, unless you are an administrator)."""
    image = Api().post(f"/images/{image_id}/chgrp", {"group": group})
    said(image, f" (group {image['group']})")
