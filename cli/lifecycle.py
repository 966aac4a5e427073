"""The image lifecycle verbs: clone, delete, enable, disable, persistent, nonpersistent, rename,
update, chtype, retry, and the empty image of `create --size`.

Every decision is the catalog's (catalog/operations.py over catalog/rules.py): these commands
check what they can before anything moves, start the operation's flow where bytes move, and say
what happened. Refusals exit 1 with the reason on stderr; usage errors exit 2.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Optional

import typer

from blocks.datastore import load_datastore
from catalog import operations, rules
from catalog.model import (
    Bus, DiskFormat, HcxError, Image, ImageState, ImageType, Operation, Refused, parse_size,
)
from catalog.permissions import Right
from catalog.requests import (
    CloneRequest, CreateEmptyRequest, DeleteRequest, UploadRequest, check_empty_size, rerun_request,
)
from catalog.settings import get_settings
from catalog.staging import open_staging
from cli.common import (
    acting_user, catalog, console, follow_flow_run, hook_grace, refusals_exit_1, report_new_image, run_outcome,
    transfer_bar, wait_for_image,
)
from cli.app import app
from cli.runtime import running_platform
from flows.launcher import remote_mode, submit
from tasks import qemu, transfer

ImageId = typer.Argument(..., metavar="ID", help="Image id (see `hcx-image list`)")
WAIT_HELP = "Follow the flow; exit 0 when it succeeded, 1 when the image is in ERROR"


def _said(image: Image, what: str = "") -> None:
    console.print(f"image {image.id} ({image.name}){what} is {image.state.value}", highlight=False)


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
    actor = acting_user()
    remote = remote_mode()
    object_id = uuid.uuid4().hex
    request = CloneRequest(owner=actor.user, group=actor.group, source_id=image_id, name=name, datastore=datastore,
                           persistent=persistent, skip_capacity_check=skip_capacity_check, object_id=object_id)
    with running_platform(worker=remote):
        source = catalog().get_for(actor, image_id, Right.USE)
        store = load_datastore(datastore or source.datastore)
        operations.check_clone(catalog(), actor, request, limit_bytes=store.limit_bytes)
        flow_run_id = submit("clone", {"request": request.model_dump(mode="json")}, remote=remote)
        report_new_image(object_id, flow_run_id, wait=wait, remote=remote)


@app.command()
@refusals_exit_1
def delete(
    image_id: int = ImageId,
    force: bool = typer.Option(False, "--force", help="Delete a LOCKED image too (needs the ADMIN right)"),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
) -> None:
    """Delete an image: DELETE at once (its name is free again), then a flow removes its objects
    and, once they are gone, its row."""
    actor = acting_user()
    remote = remote_mode()
    with running_platform(worker=remote):
        image = operations.delete(catalog(), actor, image_id, force=force)
        request = DeleteRequest(owner=actor.user, group=actor.group, image_id=image_id, force=force)
        flow_run_id = submit("delete", {"request": request.model_dump(mode="json")}, remote=remote)
        _said(image, ", its name free again,")
        console.print(f"FLOW RUN: {flow_run_id}")
        if wait:  # inside: the wait talks to Prefect, which only running_platform points at
            wait_for_removal(image_id, flow_run_id)


@app.command()
@refusals_exit_1
def retry(image_id: int = ImageId, wait: bool = typer.Option(False, "--wait", help=WAIT_HELP)) -> None:
    """Re-run the operation that left image ID in ERROR, from where it failed: staged bytes and
    partial copies are reused when their size and sha256 check out."""
    actor = acting_user()
    remote = remote_mode()
    image = catalog().get_for(actor, image_id, Right.MANAGE)
    rules.retry(image)  # refuse before anything moves
    with running_platform(worker=remote):
        if image.last_operation.op is Operation.UPLOAD:
            restage_if_gone(image)
        image = operations.retry(catalog(), actor, image_id)
        operation, rerun = rerun_request(image, actor)
        flow_run_id = submit(operation.value, {"request": rerun.model_dump(mode="json")}, remote=remote)
        _said(image, f", retrying its {operation.value},")
        console.print(f"FLOW RUN: {flow_run_id}")
        if not wait:
            return
        if operation is Operation.DELETE:
            wait_for_removal(image_id, flow_run_id)
            return
        image = wait_for_image(lambda: catalog().find(image_id), flow_run_id, until_settled=True)
    if image.state is ImageState.ERROR:
        raise HcxError(f"image {image.id} is in ERROR: {image.error}")
    _said(image)


def restage_if_gone(image: Image) -> None:
    """A CLI upload whose staged bytes are gone (swept, or dropped as damaged): stage the local
    file it recorded again, if it still hashes to the image's sha256. Refused otherwise, with
    nothing written. Staged bytes still there are left to the flow, which re-hashes them."""
    last = image.last_operation
    request = UploadRequest.model_validate(last.request)
    if request.path:  # a file on the worker: the flow stages it again itself
        return
    store = load_datastore(request.datastore)
    staged = store.staging_ref(last.upload_id)
    if store.exists(staged) and store.head(staged).size == image.size:
        return
    refused = f"Cannot retry image {image.id}: its staged bytes are gone"
    if not request.client_path:
        raise Refused(f"{refused} and no local file was recorded for them; delete the image and upload again.")
    path = Path(request.client_path)
    if not path.is_file():
        raise Refused(f"{refused} and {path} no longer exists; delete the image and upload again.")
    digest = hashlib.sha256()
    with open(path, "rb") as source, transfer_bar(f"checking {path.name}", path.stat().st_size) as advance:
        while chunk := source.read(get_settings().stream_chunk):
            digest.update(chunk)
            advance(len(chunk))
    if digest.hexdigest() != image.sha256:
        raise Refused(f"{refused} and {path} has changed since (sha256 {digest.hexdigest()}, the image "
                      f"recorded {image.sha256}); delete the image and upload the file again.")
    actor, staging = acting_user(), open_staging()  # recorded before any byte, as every staged upload
    staging.record(upload_id=last.upload_id, datastore=request.datastore, bucket=staged.bucket, key=staged.key,
                   owner=actor.user, group=actor.group)
    with open(path, "rb") as source, transfer_bar(f"staging {path.name} again", image.size or 0) as advance:
        reader = transfer.HashingReader(source, advance)
        store.upload(reader, staged, size_hint=image.size)
    if reader.sha256 != image.sha256:  # it changed while being read
        store.delete(staged)
        staging.forget(last.upload_id)
        raise Refused(f"{refused} and {path} changed while it was staged again; retry when it is quiet.")


def wait_for_removal(image_id: int, flow_run_id: str) -> None:
    """Follow a delete until the row is gone (exit 0) or the image is in ERROR (exit 1)."""

    def outcome() -> bool | None:
        image = catalog().find(image_id)
        if image is not None and image.state is ImageState.ERROR:
            raise HcxError(f"image {image_id} is in ERROR: {image.error}")
        return True if image is None else None

    removed, run = follow_flow_run(outcome, flow_run_id, grace=hook_grace)
    if not removed:
        image = catalog().find(image_id)
        ended, message = run_outcome(run)
        raise HcxError(f"image {image_id} is still {image.state.value if image else 'there'} but its flow run "
                       f"ended {ended}: {message.rstrip('.')}. `hcx-image reconcile --wait` settles it.")
    console.print(f"image {image_id} deleted")


def create_empty_image(*, name: str, type_: ImageType, datastore: str, size: str, persistent: bool, bus: Bus,
                       driver: DiskFormat | None, description: str, skip_capacity_check: bool, wait: bool,
                       remote: bool) -> None:
    """`create --size`: an empty OS or DATABLOCK disk made by the create-empty flow."""
    actor = acting_user()
    rules.validate_empty_image(type_=type_)
    virtual_size = parse_size(size)
    driver = driver or DiskFormat.RAW
    check_empty_size(virtual_size, driver)  # at once, before anything starts
    with running_platform(worker=remote):
        store = load_datastore(datastore)
        catalog().check_new_image(actor, name=name, type_=type_, persistent=persistent)
        catalog().check_capacity(actor, datastore=datastore, limit_bytes=store.limit_bytes,
                                 required=qemu.measure(driver, virtual_size), skip=skip_capacity_check)
        object_id = uuid.uuid4().hex
        request = CreateEmptyRequest(
            owner=actor.user, group=actor.group, name=name, type=type_, size=virtual_size, datastore=datastore,
            persistent=persistent, bus=bus, driver=driver, description=description,
            skip_capacity_check=skip_capacity_check, object_id=object_id,
        )
        flow_run_id = submit("create-empty", {"request": request.model_dump(mode="json")}, remote=remote)
        report_new_image(object_id, flow_run_id, wait=wait, remote=remote)


# --- verbs that only move the catalog --------------------------------------------------------

@app.command()
@refusals_exit_1
def enable(image_id: int = ImageId) -> None:
    """DISABLED -> READY; an image in ERROR goes back to what its VMs need (READY, USED, ...)."""
    _said(operations.enable(catalog(), acting_user(), image_id))


@app.command()
@refusals_exit_1
def disable(image_id: int = ImageId) -> None:
    """READY or ERROR -> DISABLED: no new VM may use the image."""
    _said(operations.disable(catalog(), acting_user(), image_id))


@app.command()
@refusals_exit_1
def persistent(image_id: int = ImageId) -> None:
    """Make the image persistent: one VM at a time, writing into the image itself."""
    _said(operations.set_persistent(catalog(), acting_user(), image_id, True), " (persistent)")


@app.command()
@refusals_exit_1
def nonpersistent(image_id: int = ImageId) -> None:
    """Make the image non-persistent: every VM gets its own copy."""
    _said(operations.set_persistent(catalog(), acting_user(), image_id, False), " (non-persistent)")


@app.command()
@refusals_exit_1
def rename(image_id: int = ImageId, name: str = typer.Argument(..., metavar="NAME", help="The new name")) -> None:
    """Rename an image (names are unique per owner)."""
    _said(operations.rename(catalog(), acting_user(), image_id, name))


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
    attributes = dict(_key_value(item) for item in set_ or [])
    image = operations.update(catalog(), acting_user(), image_id, description=description,
                              set_attributes=attributes, unset=tuple(unset or ()))
    _said(image)


@app.command()
@refusals_exit_1
def chtype(
    image_id: int = ImageId,
    type_: ImageType = typer.Argument(..., metavar="TYPE", case_sensitive=False, help="OS, DATABLOCK or CDROM"),
) -> None:
    """Change the type of an image (a CDROM is always non-persistent)."""
    _said(operations.change_type(catalog(), acting_user(), image_id, type_), f" ({type_.value})")
