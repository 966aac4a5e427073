"""`hcx-image`: manage disk images (typer + rich, as Prefect's own CLI)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Optional

import typer

from blocks.datastore import ObjectRef, load_datastore
from catalog.model import Bus, DiskFormat, HcxError, ImageState, ImageType, Refused
from catalog.permissions import Right
from catalog.requests import UploadRequest
from catalog.settings import get_settings
from cli import datastores
from cli.common import (
    acting_user, catalog, console, image_table, print_json, refusals_exit_1, transfer_bar, wait_for_image,
)
from cli.runtime import running_platform
from cli.stack import Stack
from flows.launcher import submit
from tasks import transfer
from tasks.inspection import precheck_file

# Prefect's event sender warns while it flushes at exit; a CLI user has nothing to do about it.
logging.getLogger("EventsWorker").setLevel(logging.ERROR)

app = typer.Typer(name="hcx-image", help="Manage virtual-machine disk images in S3 datastores.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(datastores.app, name="datastore")


@app.command()
@refusals_exit_1
def up() -> None:
    """Start the embedded services (S3 server, Prefect server) in the background; idempotent."""
    with running_platform() as state:
        console.print(f"S3 endpoint:     {state.s3_endpoint}")
        console.print(f"Prefect API:     {datastores.prefect_api_url()}")
        console.print(f"Home:            {get_settings().home}")


@app.command()
@refusals_exit_1
def down() -> None:
    """Stop the embedded services started by `up`."""
    stopped = Stack(get_settings()).down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
@refusals_exit_1
def create(
    name: str = typer.Option(..., "--name", help="Image name, unique per owner"),
    type_: ImageType = typer.Option(ImageType.OS, "--type", case_sensitive=False),
    datastore: str = typer.Option(None, "--datastore", help="Image datastore (default: HCX_DEFAULT_DATASTORE)"),
    path: Path = typer.Option(None, "--path", help="Local file to upload"),
    persistent: bool = typer.Option(False, "--persistent"),
    bus: Bus = typer.Option(Bus.VIRTIO, "--bus", case_sensitive=False),
    driver: Optional[DiskFormat] = typer.Option(None, "--driver", case_sensitive=False,
                                                help="raw or qcow2; must match the file (default: detected)"),
    description: str = typer.Option("", "--description"),
    wait: bool = typer.Option(False, "--wait", help="Follow the flow; exit 0 on READY, 1 on ERROR"),
) -> None:
    """Register an image from a local file: staged with a progress bar, then copied by a flow."""
    settings = get_settings()
    datastore = datastore or settings.default_datastore
    if path is None:
        raise Refused("Give --path FILE (an empty image by --size arrives with the lifecycle commands).")
    actor = acting_user()
    with running_platform():
        store = load_datastore(datastore)
        catalog().check_new_image(actor, name=name, type_=type_, persistent=persistent)
        if not path.is_file():
            raise Refused(f"File {path} does not exist or is not a regular file: check the --path.")
        driver = precheck_file(path, driver)
        upload_id = uuid.uuid4().hex
        size = path.stat().st_size
        submitted = False
        try:
            with open(path, "rb") as source, transfer_bar(f"staging {path.name}", size) as advance:
                reader = transfer.HashingReader(source, advance)
                store.upload(reader, store.staging_ref(upload_id), size_hint=size)
            request = UploadRequest(
                owner=actor.user, group=actor.group, name=name, type=type_, datastore=datastore,
                persistent=persistent, bus=bus, driver=driver, description=description,
                upload_id=upload_id, expected_sha256=reader.sha256,
            )
            flow_run_id = submit("upload", {"request": request.model_dump(mode="json")})
            submitted = True
        finally:
            if not submitted:  # nothing may stay behind a refused or interrupted upload
                store.delete(store.staging_ref(upload_id))
        _report_new_image(lambda: catalog().find_by_upload_id(upload_id), flow_run_id, wait)


def _report_new_image(find, flow_run_id: str, wait: bool) -> None:
    image = wait_for_image(find, flow_run_id, until_settled=False)
    console.print(f"ID: {image.id}")
    if not wait:
        return
    image = wait_for_image(find, flow_run_id, until_settled=True)
    if image.state is ImageState.ERROR:
        raise HcxError(f"image {image.id} is in ERROR: {image.error}")
    console.print(f"image {image.id} is {image.state.value}")


@app.command("list")
@refusals_exit_1
def list_images(json_: bool = typer.Option(False, "--json", help="Print a JSON list")) -> None:
    """The images you can use (yours, your group's shared ones, everyone's shared ones)."""
    images = catalog().list(acting_user())
    if json_:
        print_json([i.to_dict() for i in images])
    else:
        console.print(image_table(images))


@app.command()
@refusals_exit_1
def show(image_id: int, json_: bool = typer.Option(False, "--json")) -> None:
    """One image in full, with its state history."""
    image = catalog().get_for(acting_user(), image_id, Right.USE)
    if json_:
        print_json(image.to_dict())
        return
    for key, value in image.to_dict().items():
        console.print(f"[bold]{key.upper():<14}[/bold] {value if value is not None else '-'}", highlight=False)
    console.print("[bold]HISTORY[/bold]")
    for row in catalog().history(image_id):
        console.print(f"  {row['at']:%Y-%m-%d %H:%M:%S}  {row['from_state'] or '-':>16} -> {row['to_state']:<16} "
                      f"{row['message']}", highlight=False)


@app.command()
@refusals_exit_1
def export(image_id: int, file: Path) -> None:
    """Download an image's bytes to FILE, verified against the recorded sha256."""
    image = catalog().get_for(acting_user(), image_id, Right.USE)
    if image.state in (ImageState.LOCKED, ImageState.DELETE, ImageState.INIT) or not image.source:
        raise Refused(f"Image {image.id} is {image.state.value}: its bytes are not in place to export yet.")
    with running_platform():
        store = load_datastore(image.datastore)
        ref = ObjectRef.parse(image.datastore, image.source)
        with transfer_bar(f"exporting {image.name}", image.size or 0) as advance:
            digest = transfer.export_object(store, ref, file, sha256=image.sha256, progress=advance)
    console.print(f"exported {image.size} bytes to {file} (sha256 {digest} verified)")


def main() -> None:  # pragma: no cover - console script entry
    app()
