"""What every command shares: error reporting, progress bars, output, following a flow run."""

from __future__ import annotations

import functools
import json
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import typer
from prefect.client.orchestration import get_client
from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
)
from rich.table import Table

from catalog.model import HcxError, Image, ImageState, human_size
from catalog.requests import actor_for
from catalog.permissions import Actor
from catalog.settings import get_settings
from catalog.store import Catalog, open_catalog

# Piped output (scripts, tests) gets full-width lines rather than names cut to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 240)
err_console = Console(stderr=True)
T = TypeVar("T")


def refusals_exit_1(command: Callable) -> Callable:
    """A refusal or failure prints its message on stderr and exits 1 (typer keeps 2 for usage)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except HcxError as exc:
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def acting_user() -> Actor:
    settings = get_settings()
    return actor_for(settings.user, settings.group)


def catalog() -> Catalog:
    return open_catalog()


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def transfer_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar fed by byte counts (a boto3 Callback); quiet when not on a terminal."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console, transient=False, disable=not err_console.is_terminal,
    ) as progress:
        task_id = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task_id, n)


def image_table(images: list[Image]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("ID", "USER", "GROUP", "NAME", "DATASTORE", "SIZE", "TYPE", "PER", "STAT", "RVMS"):
        table.add_column(column, justify="right" if column in ("ID", "SIZE", "RVMS") else "left")
    for image in images:
        table.add_row(
            str(image.id), image.owner, image.group, image.name, image.datastore, human_size(image.size),
            image.type.value, "Yes" if image.persistent else "No", image.state.short, str(image.running_vms),
        )
    return table


def report_new_image(object_id: str, flow_run_id: str, *, wait: bool, remote: bool) -> None:
    """Say which flow run makes the new image (object id `object_id`), then its id as soon as it is
    recorded; with `wait`, follow it until it settles (exit 0 on READY, 1 on ERROR). A run sent to a
    worker (`remote`) without `wait` is not followed: the worker registers the image when it starts."""
    console.print(f"FLOW RUN: {flow_run_id}")
    if remote and not wait:
        return

    def find() -> Image | None:
        return open_catalog().find_by_upload_id(object_id)

    image = wait_for_image(find, flow_run_id, until_settled=False)
    console.print(f"ID: {image.id}")
    if not wait:
        return
    image = wait_for_image(find, flow_run_id, until_settled=True)
    if image.state is ImageState.ERROR:
        raise HcxError(f"image {image.id} is in ERROR: {image.error}")
    console.print(f"image {image.id} is {image.state.value}")


TERMINAL_RUN_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def flow_run_outcome(flow_run_id: str) -> tuple[str | None, str]:
    """(state type if the run has ended else None, its message)."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    state_type = run.state.type.value if run.state else None
    message = (run.state.message or "") if run.state else ""
    return (state_type if state_type in TERMINAL_RUN_STATES else None), message


def follow_flow_run(outcome: Callable[[], T | None], flow_run_id: str, *,
                    give_up: Callable[[float, str, str], None], poll: float = 0.2) -> T:
    """Poll `outcome()` until it has a result (it may raise to end the wait). The run's state is
    read about once a second; once the run has ended, `give_up(seconds since, final state, its
    message)` is called at every poll and raises when the hooks have had time enough."""
    last_check, ended_at, ended, message = 0.0, None, None, ""
    while True:
        found = outcome()
        if found is not None:
            return found
        now = time.monotonic()
        if ended_at is None and now - last_check > 1.0:
            last_check = now
            ended, message = flow_run_outcome(flow_run_id)
            if ended is not None:
                ended_at = now
        if ended_at is not None:
            give_up(now - ended_at, ended, _clean_run_message(message))
        time.sleep(poll)


def wait_for_image(find: Callable[[], Image | None], flow_run_id: str, *, until_settled: bool,
                   hook_grace: float = 15.0) -> Image:
    """Wait until the run has recorded its image (and, with until_settled, left LOCKED/DELETE).
    A run that ends without an image raises its failure; one whose hooks never moved the image
    (a crash) raises what the run said."""

    def outcome() -> Image | None:
        image = find()
        return image if image is not None and (not until_settled or image.state not in _BUSY_STATES) else None

    def give_up(waited: float, ended: str, message: str) -> None:
        image = find()
        if image is None and waited > 2.0:
            raise HcxError(message or f"flow run {flow_run_id} ended {ended}")
        if image is not None and waited > hook_grace:
            raise HcxError(f"image {image.id} is still {image.state.value} but its flow run ended {ended}: {message}")

    return follow_flow_run(outcome, flow_run_id, give_up=give_up)


_BUSY_STATES = {ImageState.LOCKED, ImageState.LOCKED_USED, ImageState.LOCKED_USED_PERS, ImageState.DELETE}


def _clean_run_message(message: str) -> str:
    for prefix in ("Flow run encountered an exception: ", "Task run encountered an exception: "):
        message = message.replace(prefix, "")
    for type_name in ("Refused: ", "NotFound: ", "IntegrityError: ", "StorageError: ", "PermissionDenied: "):
        message = message.replace(type_name, "")
    return message.strip()
