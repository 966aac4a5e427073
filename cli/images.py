"""The image verbs of `hcx-image`: up, down, create, list, show, export (typer + rich, as Prefect's
own CLI). All but `up` and `down` are calls to the image API."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import typer

from catalog.model import Bus, DiskFormat, HcxError, ImageType, Refused
from cli.app import app
from cli.client import IDEMPOTENCY_HEADER, Api, remote_param
from cli.common import (
    console, literal, print_image_table, print_json, refusals_exit_1, report_new_image, say, transfer_bar,
)

CHUNK = 1024 * 1024


@app.command()
@refusals_exit_1
def up() -> None:
    """Start the platform in the background (S3 server, Prefect server and UI, a worker on the
    process pool, the image API) and apply the deployments; idempotent. Writes an administrator's
    API token for you under HCX_HOME."""
    from cli.platform import bring_up, print_status

    print_status(bring_up())


@app.command()
@refusals_exit_1
def down() -> None:
    """Stop the embedded services started by `up`."""
    from catalog.settings import get_settings
    from cli.stack import Stack

    stopped = Stack(get_settings()).down()
    say(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
@refusals_exit_1
def create(
    name: str = typer.Option(..., "--name", help="Image name, unique per owner"),
    type_: ImageType = typer.Option(ImageType.OS, "--type", case_sensitive=False),
    datastore: str = typer.Option(None, "--datastore", help="Image datastore (default: the service's default)"),
    path: Path = typer.Option(None, "--path", help="Local file to upload"),
    url: Optional[str] = typer.Option(None, "--url", help="Instead of --path: an http(s) URL the service fetches "
                                      "the image from (no user:password@; a pre-signed URL, say)"),
    s3: Optional[str] = typer.Option(None, "--s3", metavar="s3://BUCKET/KEY",
                                     help="Instead of --path: an S3 object the service reads the image from"),
    s3_datastore: Optional[str] = typer.Option(None, "--s3-datastore", help="The datastore whose endpoint and keys "
                                               "read --s3 (default: --datastore)"),
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
    idempotency_key: Optional[str] = typer.Option(
        None, "--idempotency-key", help="Send the same create again with this key and get the first one's image "
        "(default: made from the name and the file's path, size and mtime, the URL or S3 object, or the size of "
        "an empty image)"),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="The file's published sha256: checked as it arrives"),
    sha1: Optional[str] = typer.Option(None, "--sha1", help="The file's published sha1 (instead of --sha256)"),
    md5: Optional[str] = typer.Option(None, "--md5", help="The file's published md5 (instead of --sha256)"),
) -> None:
    """Register an image from a local file (sent to the image API with a progress bar, then copied
    by a flow), from a URL or an S3 object the service fetches itself (--url, --s3), or with --size
    an empty OS or DATABLOCK image. Sending the same create again (after a timeout, say) returns the
    same image."""
    sources = [option for option, value in (("--path", path), ("--url", url), ("--s3", s3), ("--size", size))
               if value is not None]
    if len(sources) != 1:
        together = f"; not {' and '.join(sources)} together" if sources else ""
        raise typer.BadParameter("give one of --path FILE (upload a file), --url URL or --s3 s3://BUCKET/KEY (the "
                                 f"service fetches it), --size SIZE (an empty image){together}")
    if s3_datastore is not None and s3 is None:
        raise typer.BadParameter("--s3-datastore says which datastore's keys read --s3: give it with --s3 only")
    api = Api()
    if url is not None or s3 is not None:
        body = {"name": name, "type": type_.value, "datastore": datastore, "persistent": persistent,
                "bus": bus.value, "driver": driver.value if driver else None, "description": description,
                "skip_capacity_check": skip_capacity_check, "sha256": sha256, "sha1": sha1, "md5": md5,
                "url": url, "s3": s3, "s3_datastore": s3_datastore}
        key = idempotency_key or (derived_key("url", name, url) if url is not None
                                  else derived_key("s3", name, s3, s3_datastore or ""))
        started = api.post("/images/import", body, headers={IDEMPOTENCY_HEADER: key}, **remote_param())
        report_new_image(api, started["flow_run_id"], wait=wait, registered_once_fetched=True)
        return
    if size is not None:
        body = {"name": name, "type": type_.value, "size": size, "datastore": datastore, "persistent": persistent,
                "bus": bus.value, "driver": (driver or DiskFormat.RAW).value, "description": description,
                "skip_capacity_check": skip_capacity_check}
        key = idempotency_key or derived_key("empty", name, size)
        started = api.post("/images", body, headers={IDEMPOTENCY_HEADER: key}, **remote_param())
        report_new_image(api, started["flow_run_id"], wait=wait)
        return
    if not path.is_file():
        raise Refused(f"File {path} does not exist or is not a regular file: check the --path.")
    from tasks.inspection import precheck_file  # format inspection only: no Prefect, no boto3

    driver = precheck_file(path, driver)  # refuse a wrong file before sending it (the service inspects again)
    params = {"name": name, "type": type_.value, "datastore": datastore, "persistent": persistent, "bus": bus.value,
              "driver": driver.value, "description": description, "skip_capacity_check": skip_capacity_check,
              "client_path": str(path.resolve()), "sha256": sha256, "sha1": sha1, "md5": md5}
    stat = path.stat()
    key = idempotency_key or derived_key("file", name, params["client_path"], stat.st_size, stat.st_mtime_ns)
    # A session: sent again (the same key), it is the same one, and only the parts it lacks are sent.
    session = api.post("/uploads", {**params, "size": stat.st_size}, headers={IDEMPOTENCY_HEADER: key})
    if "upload_id" in session:
        from cli.uploads import remember, send_parts

        remember(session["upload_id"], path.resolve(), api.base_url)
        started = send_parts(api, session, path)
    else:  # completed before: its flow run
        started = session
    report_new_image(api, started["flow_run_id"], wait=wait)


@app.command("upload-resume")
@refusals_exit_1
def upload_resume(
    upload_id: str = typer.Argument(..., help="The upload's id (printed when it started; "
                                    "`ls $HCX_HOME/uploads` lists the unfinished ones)"),
    path: Optional[Path] = typer.Option(None, "--path", help="The file (default: the one the upload started with)"),
    wait: bool = typer.Option(False, "--wait", help="Follow the flow; exit 0 on READY, 1 on ERROR"),
) -> None:
    """Finish an upload cut off with its client (killed, rebooted): only the parts the service lacks
    are sent."""
    from cli.uploads import remembered_file, send_parts

    file = remembered_file(upload_id, path)
    api = Api()
    session = api.get(f"/uploads/{upload_id}")
    started = send_parts(api, session, file)
    report_new_image(api, started["flow_run_id"], wait=wait)


def derived_key(*parts: object) -> str:
    """The idempotency key of a create: the same request (the service adds who sends it) gets the
    same key, so sending it again finds the first one."""
    return "cli-" + hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:40]


@app.command("list")
@refusals_exit_1
def list_images(json_: bool = typer.Option(False, "--json", help="Print a JSON list"),
                mine: bool = typer.Option(False, "--mine", help="Only your own images")) -> None:
    """The images you can use (yours, your group's shared ones, everyone's shared ones)."""
    images = Api().get("/images", mine=str(mine).lower())
    if json_:
        print_json(images)
    else:
        print_image_table(images)


@app.command()
@refusals_exit_1
def show(image_id: int, json_: bool = typer.Option(False, "--json")) -> None:
    """One image in full, with its state history."""
    api = Api()
    image = api.get(f"/images/{image_id}")
    if json_:
        print_json(image)
        return
    for key, value in image.items():
        console.print(literal(f"{key.upper():<14} {value if value is not None else '-'}"), soft_wrap=True)
    console.print("[bold]HISTORY[/bold]")
    for row in api.get(f"/images/{image_id}/history"):
        console.print(literal(f"  {row['at'][:19].replace('T', ' ')}  {row['from_state'] or '-':>16} -> "
                              f"{row['to_state'] or '(removed)':<16} {row['message']}"), soft_wrap=True)


@app.command()
@refusals_exit_1
def export(image_id: int, file: Path) -> None:
    """Download an image's bytes to FILE, verified against the recorded sha256."""
    partial = file.with_name(f".{file.name}.partial")
    digest = hashlib.sha256()
    try:
        with Api().stream(f"/images/{image_id}/content") as response, open(partial, "wb") as out:
            expected = response.headers.get("x-image-sha256")
            size = int(response.headers.get("content-length", 0))
            with transfer_bar(f"exporting image {image_id}", size) as advance:
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    advance(len(chunk))
        if expected and digest.hexdigest() != expected:
            raise HcxError(f"Image {image_id}'s bytes hash to {digest.hexdigest()}, the catalog records {expected}: "
                           f"the stored copy is damaged; nothing was written to {file}.")
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)
    say(f"exported {size} bytes to {file} (sha256 {digest.hexdigest()} verified)")
