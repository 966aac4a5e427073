"""The image verbs of `hcx-image`: up, down, create, list, show, export (typer + rich, as Prefect's own CLI)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional

import typer

from blocks.datastore import ObjectRef, load_datastore
from catalog import rules
from catalog.model import Bus, DiskFormat, ImageType, Refused
from catalog.permissions import Right
from catalog.requests import UploadRequest
from catalog.settings import get_settings
from catalog.staging import open_staging
from cli.app import app
from cli.common import (
    acting_user, catalog, console, image_table, print_json, refusals_exit_1, report_new_image, transfer_bar,
)
from cli.runtime import running_platform
from cli.platform import bring_up, print_status
from cli.stack import Stack
from flows.launcher import remote_mode, submit
from tasks import transfer
from tasks.inspection import precheck_file



@app.command()
@refusals_exit_1
def up() -> None:
    """Start the platform in the background (S3 server, Prefect server and UI, a worker on the
    process pool) and apply the deployments; idempotent."""
    print_status(bring_up())


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
                                                help="raw or qcow2; must match the file (default: detected); "
                                                     "an empty image's format (default: raw)"),
    description: str = typer.Option("", "--description"),
    size: Optional[str] = typer.Option(None, "--size", help="Instead of --path: an empty OS or DATABLOCK "
                                       "image of this virtual size, e.g. 10G (qemu-img create)"),
    skip_capacity_check: bool = typer.Option(False, "--skip-capacity-check",
                                             help="Ignore the datastore's capacity limit (administrators only)"),
    wait: bool = typer.Option(False, "--wait", help="Follow the flow; exit 0 on READY, 1 on ERROR"),
    remote: bool = typer.Option(False, "--remote", help="Run the flow on the upload deployment (a worker); "
                                "prints the flow-run id at once (also: HCX_REMOTE=1)"),
) -> None:
    """Register an image from a local file (staged with a progress bar, then copied by a flow), or
    with --size an empty OS or DATABLOCK image."""
    settings = get_settings()
    remote = remote or remote_mode()
    datastore = datastore or settings.default_datastore
    if (path is None) == (size is None):
        raise typer.BadParameter("give --path FILE to upload a file, or --size SIZE for an empty image (not both)")
    if size is not None:
        from cli.lifecycle import create_empty_image

        create_empty_image(name=name, type_=type_, datastore=datastore, size=size, persistent=persistent, bus=bus,
                           driver=driver, description=description, skip_capacity_check=skip_capacity_check,
                           wait=wait, remote=remote)
        return
    actor = acting_user()
    with running_platform(worker=remote):
        store = load_datastore(datastore)
        catalog().check_new_image(actor, name=name, type_=type_, persistent=persistent)
        if not path.is_file():
            raise Refused(f"File {path} does not exist or is not a regular file: check the --path.")
        driver = precheck_file(path, driver)
        upload_id = uuid.uuid4().hex
        size = path.stat().st_size
        catalog().check_capacity(actor, datastore=datastore, limit_bytes=store.limit_bytes, required=size,
                                 skip=skip_capacity_check)
        staged = store.staging_ref(upload_id)
        staging = open_staging()  # recorded before any byte: reconcile removes only recorded uploads
        staging.record(upload_id=upload_id, datastore=datastore, bucket=staged.bucket, key=staged.key,
                       owner=actor.user, group=actor.group)
        submitted = False
        try:
            with open(path, "rb") as source, transfer_bar(f"staging {path.name}", size) as advance:
                reader = transfer.HashingReader(source, advance)
                store.upload(reader, staged, size_hint=size)
            request = UploadRequest(
                owner=actor.user, group=actor.group, name=name, type=type_, datastore=datastore,
                persistent=persistent, bus=bus, driver=driver, description=description,
                upload_id=upload_id, expected_sha256=reader.sha256, client_path=str(path.resolve()),
                skip_capacity_check=skip_capacity_check,
            )
            flow_run_id = submit("upload", {"request": request.model_dump(mode="json")}, remote=remote)
            submitted = True
        finally:
            if not submitted:  # nothing may stay behind a refused or interrupted upload
                store.delete(staged)
                staging.forget(upload_id)
        report_new_image(upload_id, flow_run_id, wait=wait, remote=remote)


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
    rules.check_export(image)
    with running_platform():
        store = load_datastore(image.datastore)
        ref = ObjectRef.parse(image.datastore, image.source)
        with transfer_bar(f"exporting {image.name}", image.size or 0) as advance:
            digest = transfer.export_object(store, ref, file, sha256=image.sha256, progress=advance)
    console.print(f"exported {image.size} bytes to {file} (sha256 {digest} verified)")


