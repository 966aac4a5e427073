"""Sending a file through a resumable upload session (api/uploads.py): parts in parallel, read
from the file as they go (memory: PARALLEL_PARTS parts), sent again after a dropped connection
until the service holds them all, then completed.

Each session is also noted on this machine ($HCX_HOME/uploads/UPLOAD_ID.json: the file, its size
and mtime, the service), so that `hcx-image upload-resume UPLOAD_ID` finishes it after the client
itself died; the note goes when the session completes.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import httpx

from catalog.model import HcxError, Refused
from cli.client import Api, ApiError, home, raise_for_answer, remote_param
from cli.common import err_console, literal, transfer_bar

PARALLEL_PARTS = 4
AGAIN = {503, 504}  # the service, or the datastore behind it, is away for a moment (502: the datastore refused)
GIVE_UP_AFTER = 600.0  # seconds without a part getting through before the upload stops (resumable still)


def _notes() -> Path:
    return home() / "uploads"


def _note_of(upload_id: str) -> Path:
    return _notes() / f"{Path(upload_id).name}.json"


def remember(upload_id: str, file: Path, base_url: str) -> None:
    stat = file.stat()
    _notes().mkdir(parents=True, exist_ok=True, mode=0o700)
    note = _note_of(upload_id)
    fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "api_url": base_url}, out)


def forget(upload_id: str) -> None:
    _note_of(upload_id).unlink(missing_ok=True)


def remembered_file(upload_id: str, given: Path | None) -> Path:
    """The file of session `upload_id`: `given`, or the one noted when it started, unchanged since."""
    try:
        note = json.loads(_note_of(upload_id).read_text())
    except (OSError, ValueError):
        note = None
    if given is None and note is None:
        raise Refused(f"This machine has no note of upload {upload_id} (under {_notes()}): give the file with --path.")
    file = given or Path(note["path"])
    if not file.is_file():
        raise Refused(f"File {file} of upload {upload_id} is gone: give it with --path.")
    stat = file.stat()
    if note is not None and (stat.st_size, stat.st_mtime_ns) != (note["size"], note["mtime_ns"]):
        raise Refused(f"File {file} changed since upload {upload_id} started (size or modification time): its parts "
                      "would not fit together. Start a new `hcx-image create` with it.")
    return file


def send_parts(api: Api, session: dict, file: Path) -> dict:
    """Send the parts the service lacks, again after a cut, until it holds them all; then complete
    the session. The flow run it started ({flow_run_id, ...})."""
    upload_id, size = session["upload_id"], session["size"]
    if file.stat().st_size != size:
        raise Refused(f"File {file} has {file.stat().st_size} bytes; upload {upload_id} is of {size} bytes: "
                      "give the file the upload started with.")
    part_size = session["part_size"]
    parts = f"{session['parts']} part{'s' if session['parts'] != 1 else ''}"
    err_console.print(literal(f"UPLOAD: {upload_id} ({parts}; if cut off: "
                              f"hcx-image upload-resume {upload_id})"), soft_wrap=True)
    with transfer_bar(f"uploading {file.name}", size) as advance, open(file, "rb") as source:
        received = set(session["received"])
        advance(sum(_length(n, part_size, size) for n in received))
        last_progress, pause = time.monotonic(), 0.5
        while missing := [n for n in range(1, session["parts"] + 1) if n not in received]:
            sent = _send_round(api, upload_id, source.fileno(), missing, part_size, size, advance)
            received |= sent
            if sent:
                last_progress, pause = time.monotonic(), 0.5
            elif time.monotonic() - last_progress > GIVE_UP_AFTER:
                raise HcxError(f"No part of upload {upload_id} got through for {GIVE_UP_AFTER:g} s: the service or "
                               f"the network is down. Resume later with `hcx-image upload-resume {upload_id}`.")
            if len(received) < session["parts"]:  # cut off: wait a little longer each time, then ask what it holds
                time.sleep(pause)
                pause = min(10.0, pause * 2)
                received = set(_ask_held(api, upload_id, received))
    # Completing may read back what the service did not inspect on the way (after it restarted): no read timeout.
    started = api.call("POST", f"/uploads/{upload_id}/complete", params=remote_param(),
                       timeout=httpx.Timeout(None, connect=10))
    forget(upload_id)
    return started


def _length(number: int, part_size: int, size: int) -> int:
    return min(part_size, size - (number - 1) * part_size)


def _send_round(api: Api, upload_id: str, fd: int, numbers: list[int], part_size: int, size: int,
                advance: Callable[[int], None]) -> set[int]:
    """Send `numbers` in parallel; the ones that got through. A refusal (4xx) stops the upload."""

    def send(number: int) -> int | None:
        length = _length(number, part_size, size)
        try:
            response = api.http.put(f"/uploads/{upload_id}/parts/{number}",
                                    content=_chunks(fd, (number - 1) * part_size, length),
                                    headers={"Content-Type": "application/octet-stream",
                                             "Content-Length": str(length)},
                                    timeout=httpx.Timeout(300, connect=10))
        except httpx.TransportError:
            return None  # cut off: sent again in the next round
        if response.status_code in AGAIN:
            return None
        raise_for_answer(response)  # refused: the upload cannot go on
        advance(length)
        return number

    try:
        with ThreadPoolExecutor(PARALLEL_PARTS) as pool:
            return {n for n in pool.map(send, numbers) if n is not None}
    except ApiError:
        _abandon(api, upload_id)
        raise


def _abandon(api: Api, upload_id: str) -> None:
    """A part was refused (the datastore denies the writes, say): nothing of the upload may stay.
    When even that fails, reconcile removes it after the staging TTL."""
    try:
        api.delete(f"/uploads/{upload_id}")
    except HcxError:
        pass
    forget(upload_id)


def _chunks(fd: int, offset: int, length: int, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    """A part of the file read as it is sent, a MiB at a time: a whole part is never in memory
    (16 MiB buffers freed by four threads left glibc's arenas holding 600 MiB)."""
    end = offset + length
    while offset < end:
        data = os.pread(fd, min(chunk, end - offset), offset)
        if not data:
            raise HcxError("The file got shorter while it was being sent: send it again, unchanged.")
        offset += len(data)
        yield data


def _ask_held(api: Api, upload_id: str, known: set[int]) -> list[int]:
    """The parts the service holds (what we knew when it does not answer yet)."""
    try:
        return api.get(f"/uploads/{upload_id}")["received"]
    except ApiError:
        raise
    except HcxError:
        return sorted(known)
