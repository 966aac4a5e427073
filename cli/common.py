"""What every command shares: error reporting, progress bars, literal output, following a flow run
through the image API."""

from __future__ import annotations

import functools
import json
import sys
import time
import unicodedata
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
)
from rich.text import Text

from catalog.model import HcxError, ImageState, human_size
from cli.client import Api, remote_requested

# Piped output (scripts, tests) gets full-width lines rather than names cut to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 240, highlight=False)
err_console = Console(stderr=True, highlight=False)
T = TypeVar("T")

BUSY_STATES = {ImageState.LOCKED.value, ImageState.LOCKED_USED.value, ImageState.LOCKED_USED_PERS.value,
               ImageState.DELETE.value}


def refusals_exit_1(command: Callable) -> Callable:
    """A refusal or failure prints its message on stderr and exits 1 (typer keeps 2 for usage)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except HcxError as exc:
            err_console.print(Text("error: ", style="red") + literal(str(exc)), soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def shown(value: object) -> str:
    """A value as it may reach a terminal: control and format characters (terminal escapes among
    them) as \\xNN instead of being sent to it."""
    text = "" if value is None else str(value)
    if text.isprintable():  # the usual case, checked at C speed
        return text
    return "".join(c if c == "\n" or unicodedata.category(c) not in ("Cc", "Cf") else f"\\x{ord(c):02x}"
                   for c in text)


def literal(value: object) -> Text:
    """A value printed as it is: never read as rich markup, and `shown` (no terminal escapes)."""
    return Text(shown(value))


def say(*parts: object) -> None:
    """One line on stdout, every part literal."""
    console.print(Text.assemble(*(literal(p) for p in parts)), soft_wrap=True)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def transfer_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar fed by byte counts; quiet when not on a terminal."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console, transient=False, disable=not err_console.is_terminal,
    ) as progress:
        task_id = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task_id, n)


IMAGE_COLUMNS = ("ID", "USER", "GROUP", "NAME", "DATASTORE", "SIZE", "TYPE", "PER", "STAT", "RVMS")


def print_image_table(images: list[dict]) -> None:
    """`oneimage list`'s columns, plainly aligned (rich's Table took 0.5 s to lay out 1,000 rows)."""
    rows = [[shown(v) for v in (
        image["id"], image["owner"], image["group"], image["name"], image["datastore"], human_size(image["size"]),
        image["type"], "Yes" if image["persistent"] else "No", ImageState(image["state"]).short,
        image["running_vms"])] for image in images]
    widths = [max([len(column), *(len(row[i]) for row in rows)]) for i, column in enumerate(IMAGE_COLUMNS)]
    right = {"ID", "SIZE", "RVMS"}

    def line(cells) -> str:
        return "  ".join(cell.rjust(width) if column in right else cell.ljust(width)
                         for column, cell, width in zip(IMAGE_COLUMNS, cells, widths)).rstrip()

    header = line(IMAGE_COLUMNS)
    sys.stdout.write((f"\033[1m{header}\033[0m" if sys.stdout.isatty() else header) + "\n")
    sys.stdout.write("".join(line(row) + "\n" for row in rows))


def said(image: dict, what: str = "") -> None:
    say(f"image {image['id']} (", image["name"], f"){what} is {image['state']}")


# --- following a flow run ------------------------------------------------------------------------

def hook_grace(run: dict) -> float:
    """How long an ended run's hooks get to move the image: a crashed run's hooks are run by the
    crash automation's reconcile on the worker, the others' by the run's own process at its end."""
    return 90.0 if run["state_type"] == "CRASHED" else 15.0


POLL_FIRST, POLL_LAST = 0.05, 0.5  # seconds between questions about a run: 0.05, 0.06, 0.072, ... up to 0.5


def follow_run(api: Api, flow_run_id: str, outcome: Callable[[dict], T | None], *,
               grace: Callable[[dict], float] = lambda run: 0.0) -> tuple[T | None, dict]:
    """Ask the API about the run until `outcome(run)` (it may raise to end the wait) has a result,
    or the run has ended and `grace(run)` seconds more passed without one (its hooks, or the crash
    automation's reconcile, may still be moving the catalog). It ends: a run whose process dies is
    marked CRASHED by the service (at once) or the zombie-run automation. Asked often at first (a
    small operation ends within a second; a fixed 0.2 s cost it 0.1 s on average), then less."""
    give_up_at: float | None = None
    poll = POLL_FIRST
    while True:
        run = api.get(f"/runs/{flow_run_id}")
        found = outcome(run)
        if found is not None:
            return found, run
        if run["final"]:
            give_up_at = give_up_at or time.monotonic() + grace(run)
            if time.monotonic() >= give_up_at:
                return None, run
        time.sleep(poll)
        poll = min(poll * 1.2, POLL_LAST)


def wait_for_image(api: Api, flow_run_id: str, *, until_settled: bool) -> dict:
    """Wait until the run has recorded its image (and, with until_settled, left LOCKED/DELETE).
    A run that ends without an image raises what happened and what to do; one whose hooks never
    moved the image raises what the run said."""

    def outcome(run: dict) -> dict | None:
        image = run["image"]
        return image if image is not None and (not until_settled or image["state"] not in BUSY_STATES) else None

    image, run = follow_run(api, flow_run_id, outcome, grace=hook_grace if until_settled else lambda run: 0.0)
    if image is not None:
        return image
    ended, message = run["state_type"], run["message"]
    if not run["image_exists"]:
        if ended == "FAILED" and message:  # a refusal: the message says what was wrong
            raise HcxError(message)
        raise HcxError(f"the flow run {run['name']} ({flow_run_id}) ended {ended} before it registered the image: "
                       f"{(message or 'no message').rstrip('.')}. Nothing was registered; run the command again.")
    image = run["image"] or {}
    raise HcxError(f"image {image.get('id', '')} is still {image.get('state', 'busy')} but its flow run ended "
                   f"{ended}: {message.rstrip('.')}. `hcx-image reconcile --wait` settles it.")


def report_new_image(api: Api, flow_run_id: str, *, wait: bool, registered_once_fetched: bool = False) -> None:
    """Say which flow run makes the new image, then its id as soon as it is recorded (not waited
    for with --remote, where a worker picks the run up when it may, nor for an image the service
    fetches, which is registered only once fetched); with `wait`, follow it until it settles (exit
    0 on READY, 1 on ERROR)."""
    say(f"FLOW RUN: {flow_run_id}")
    if registered_once_fetched and not wait:
        say("the image is registered once the service has fetched its bytes: `hcx-image list` shows it then "
            "(--wait follows it)")
    if (remote_requested() or registered_once_fetched) and not wait:
        return
    image = wait_for_image(api, flow_run_id, until_settled=False)
    say(f"ID: {image['id']}")
    if not wait:
        return
    image = wait_for_image(api, flow_run_id, until_settled=True)
    if image["state"] == ImageState.ERROR.value:
        raise HcxError(f"image {image['id']} is in ERROR: {image['error']}")
    say(f"image {image['id']} is {image['state']}")


def wait_for_removal(api: Api, image_id: int, flow_run_id: str) -> None:
    """Follow a delete until the row is gone (exit 0) or the image is in ERROR (exit 1)."""

    def outcome(run: dict) -> bool | None:
        image = run["image"]
        if image is not None and image["state"] == ImageState.ERROR.value:
            raise HcxError(f"image {image_id} is in ERROR: {image['error']}")
        return True if not run["image_exists"] else None

    removed, run = follow_run(api, flow_run_id, outcome, grace=hook_grace)
    if not removed:
        state = (run["image"] or {}).get("state", "there")
        raise HcxError(f"image {image_id} is still {state} but its flow run ended {run['state_type']}: "
                       f"{run['message'].rstrip('.')}. `hcx-image reconcile --wait` settles it.")
    say(f"image {image_id} deleted")


def wait_for_run(api: Api, flow_run_id: str) -> str:
    """Wait for a flow run to end; its final state (a failure raises with its message)."""
    _, run = follow_run(api, flow_run_id, lambda run: None)
    if run["state_type"] != "COMPLETED":
        raise HcxError(f"flow run {run['name']} ended {run['state_type']}: {run['message']}")
    return run["state_type"]
