"""What every command shares: error reporting, progress bars, output, following a flow run."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar
from uuid import UUID

import typer
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.flow_runs import wait_for_flow_run
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
    recorded; with `wait`, follow it until it settles (exit 0 on READY, 1 on ERROR). A run that
    ends without recording the image exits 1 with what happened. A run sent to a worker (`remote`)
    without `wait` is not followed: the worker registers the image when it starts."""
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


def _wait_for_run(flow_run_id: str) -> FlowRun:
    """Prefect's own wait (`prefect.flow_runs.wait_for_flow_run`, on the run's state events) for
    the run to end. It ends: a run whose process dies is marked CRASHED by the zombie-run
    automation (flows/platform.py) within HCX_STALE_RUN_SECONDS."""
    return wait_for_flow_run(UUID(flow_run_id), timeout=None)


def follow_flow_run(outcome: Callable[[], T | None], flow_run_id: str, *,
                    grace: Callable[[FlowRun], float] = lambda run: 0.0,
                    poll: float = 0.2) -> tuple[T | None, FlowRun | None]:
    """Wait until `outcome()` (a catalog read; it may raise to end the wait) has a result, or the
    flow run has ended and `grace(run)` seconds more passed without one (its hooks, or the crash
    automation's reconcile, may still be moving the catalog). Returns (result or None, the ended
    run or None when `outcome` answered first)."""

    from flows.launcher import crash_if_its_process_died  # the CLI supervises what it launched

    async def follow() -> tuple[T | None, FlowRun | None]:
        loop = asyncio.get_running_loop()
        ended = asyncio.ensure_future(_wait_for_run(flow_run_id))
        give_up_at: float | None = None
        try:
            while True:
                found = outcome()
                if found is not None:
                    return found, ended.result() if ended.done() and not ended.cancelled() else None
                if not ended.done():
                    await asyncio.wait({ended}, timeout=poll)
                    crash_if_its_process_died(flow_run_id)  # the run then ends: `ended` says so
                    continue
                run = ended.result()
                give_up_at = give_up_at or loop.time() + grace(run)
                if loop.time() >= give_up_at:
                    return None, run
                await asyncio.sleep(poll)
        finally:
            ended.cancel()
            await asyncio.gather(ended, return_exceptions=True)

    return asyncio.run(follow())


def run_outcome(run: FlowRun) -> tuple[str, str]:
    """(the run's final state type, its message as a user should read it)."""
    state = run.state
    return (state.type.value if state else "UNKNOWN"), _clean_run_message((state.message or "") if state else "")


def hook_grace(run: FlowRun) -> float:
    """How long an ended run's hooks get to move the image: a crashed run's hooks are run by the
    crash automation's reconcile on the worker, the others' by the run's own process at its end."""
    return 90.0 if run.state and run.state.type is StateType.CRASHED else 15.0


def wait_for_image(find: Callable[[], Image | None], flow_run_id: str, *, until_settled: bool) -> Image:
    """Wait until the run has recorded its image (and, with until_settled, left LOCKED/DELETE).
    A run that ends without an image raises what happened and what to do; one whose hooks never
    moved the image raises what the run said."""

    def outcome() -> Image | None:
        image = find()
        return image if image is not None and (not until_settled or image.state not in _BUSY_STATES) else None

    image, run = follow_flow_run(outcome, flow_run_id, grace=hook_grace if until_settled else lambda run: 0.0)
    if image is not None:
        return image
    ended, message = run_outcome(run)
    image = find()
    if image is None:
        if ended == "FAILED" and message:  # a refusal: the message says what was wrong
            raise HcxError(message)
        raise HcxError(f"the flow run {run.name} ({flow_run_id}) ended {ended} before it registered the image: "
                       f"{(message or 'no message').rstrip('.')}. Nothing was registered; run the command again.")
    raise HcxError(f"image {image.id} is still {image.state.value} but its flow run ended {ended}: "
                   f"{message.rstrip('.')}. `hcx-image reconcile --wait` settles it.")


_BUSY_STATES = {ImageState.LOCKED, ImageState.LOCKED_USED, ImageState.LOCKED_USED_PERS, ImageState.DELETE}


def _clean_run_message(message: str) -> str:
    for prefix in ("Flow run encountered an exception: ", "Task run encountered an exception: "):
        message = message.replace(prefix, "")
    for type_name in ("Refused: ", "NotFound: ", "IntegrityError: ", "StorageError: ", "PermissionDenied: "):
        message = message.replace(type_name, "")
    return message.strip()
