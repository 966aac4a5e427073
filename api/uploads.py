"""Resumable uploads: a file sent part by part into a server-made S3 multipart upload.

A client opens a session (POST /uploads: every check that can refuse is made before a byte is
sent), sends its parts in parallel (PUT /uploads/{id}/parts/{n}), asks which parts the server
holds when it was cut off (GET /uploads/{id}) and sends only the rest, then completes it (POST
/uploads/{id}/complete), which starts the upload flow. Parts are inspected and hashed in order as
they arrive (`PartsInOrder`), so completion reads nothing back, unless this process did not see
every part (it restarted, or parts came too far out of order): then it reads back only the rest.

A session lives as long as its staging record, whose clock each part starts again: reconcile
aborts the parts of one idle for HCX_STAGING_TTL_HOURS. The same create sent again under the same idempotency key (the CLI's, made
from the name and the file) finds the open session, which is how a client that died resumes.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Annotated

import anyio
from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from api.auth import Caller
from api.images import IdempotencyKey, UploadParameters, claim_key, settle_key, release_key, upload_allowed
from api.runs import run_left_no_image
from api.shapes import Remote, Started, Strict
from blocks.datastore import MAX_PARTS, ObjectRef, S3Datastore, load_datastore
from catalog.idempotency import fingerprint, open_idempotency_keys
from catalog.model import ConcurrentChange, IntegrityError, NotFound, Refused, utcnow
from catalog.permissions import Actor
from catalog.requests import UploadRequest
from catalog.settings import MiB, S3_MAX_OBJECT, get_settings
from catalog.staging import UploadSession, open_staging
from flows.launcher import submit
from tasks.inspection import Arrival, HoldBudget, PartsInOrder
from tasks.objects import drop_staged, record_inspection, record_staging

router = APIRouter(prefix="/api/v1", tags=["uploads"])

SMALLEST_PART = 16 * MiB
PARTS_IN_FLIGHT = 4  # part bodies read at once by this process: memory is at most this many parts...
HELD_BYTES = HoldBudget(64 * MiB)  # ...plus this much of parts waiting for their turn to be inspected
IDLE_SECONDS = 3600
TURN_WAIT_SECONDS = 60.0  # the longest a part waits for the one before it (a sender that stalled)
SENT_TOGETHER_SECONDS = 0.25  # how long a part waits for the one before it to be seen coming
_in_flight: anyio.Semaphore | None = None
_inspecting: dict[str, PartsInOrder] = {}  # by upload id, for the sessions this process saw parts of
_a_part_came_in: anyio.Event | None = None  # set (and replaced) on the event loop each time a part is in

UploadId = Annotated[str, Path(pattern="^[0-9a-f]{32}$", description="The session's id, made by the service")]


def part_size_for(size: int) -> int:
    """Parts of at least 16 MiB, larger for huge files so that they stay within S3's part count."""
    return max(SMALLEST_PART, -(-size // MAX_PARTS // MiB) * MiB)


class NewUpload(UploadParameters, Strict):
    """A file about to be sent part by part: what it is, and how large."""

    size: int = Field(gt=0, le=S3_MAX_OBJECT, description="The file's size in bytes")


class SessionState(BaseModel):
    upload_id: str
    size: int
    part_size: int
    parts: int
    received: list[int] = Field(description="The parts the service holds: send the others")
    checked: int = Field(description="Parts 1..checked are inspected and hashed already; completing reads the "
                                     "rest back from the store")
    expires_at: str
    flow_run_id: str | None = Field(default=None, description="Set once completed: the flow run registering it")


def _request_fingerprint(params: UploadParameters, size: int) -> str:
    # The same as a single-request upload's: a key names the same create whichever way it is sent.
    return fingerprint({"operation": "upload", **params.model_dump(mode="json", exclude={"size"}), "size": size})


def _expires_at(session: UploadSession):
    return session.staged.recorded_at + timedelta(hours=get_settings().staging_ttl_hours)


def _session_of(actor: Actor, upload_id: str) -> UploadSession:
    """The caller's open session; someone else's looks exactly like none."""
    session = open_staging().session(upload_id, actor.user)
    if session is None or _expires_at(session) < utcnow():
        raise NotFound(f"Upload {upload_id} does not exist or has expired (sessions end "
                       f"{get_settings().staging_ttl_hours:g} h after their last part): start the upload again.")
    return session


def _ref(session: UploadSession) -> tuple[S3Datastore, ObjectRef]:
    store = load_datastore(session.staged.datastore)
    return store, store.ref(session.staged.key, bucket=session.staged.bucket)


def _state(session: UploadSession, received: list[int]) -> SessionState:
    return SessionState(upload_id=session.upload_id, size=session.size, part_size=session.part_size,
                        parts=session.part_count, received=received,
                        checked=_checked(session),
                        expires_at=_expires_at(session).isoformat(), flow_run_id=session.flow_run_id)


def _checked(session: UploadSession) -> int:
    if session.flow_run_id is not None:
        return session.part_count
    parts = _inspecting.get(session.upload_id)
    return parts.inspected_parts if parts is not None else 0


def _received(session: UploadSession) -> list[int]:
    if session.flow_run_id is not None:
        return list(range(1, session.part_count + 1))
    return sorted(open_staging().stored_parts(session.upload_id))


# --- opening a session ---------------------------------------------------------------------------

@router.post("/uploads", status_code=201, response_model=SessionState,
             responses={200: {"description": "Opened before under this idempotency key: that session, or the "
                                             "flow run it started ({flow_run_id, repeated})"}},
             summary="Open a resumable upload of `size` bytes (checked now: nothing is sent before it may be taken)")
def open_upload(body: NewUpload, actor: Caller, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    request_fingerprint = _request_fingerprint(body, body.size)
    if idempotency_key is not None:
        earlier = open_idempotency_keys().done(actor.user, idempotency_key, request_fingerprint)
        if earlier is not None and not run_left_no_image(earlier):
            return JSONResponse(Started(flow_run_id=earlier, repeated=True).model_dump(), status_code=200)
        if (session := _open_session_under(actor, idempotency_key, request_fingerprint)) is not None:
            return JSONResponse(_state(session, _received(session)).model_dump(), status_code=200)
    _, store = upload_allowed(actor, body, body.size)
    upload_id = uuid.uuid4().hex  # made here, never by a client
    ref = store.staging_ref(upload_id)
    staged = record_staging(ref, upload_id, owner=actor.user, group=actor.group)
    multipart_id = None
    try:
        multipart_id = store.start_multipart(ref)
        session = open_staging().open_session(
            staged, idempotency_key=idempotency_key, fingerprint=request_fingerprint, multipart_id=multipart_id,
            size=body.size, part_size=part_size_for(body.size),
            parameters=body.model_dump(mode="json", exclude={"size"}))
    except BaseException:
        _abandon(store, ref, upload_id, multipart_id)
        raise
    if session is None:  # a racing request under the same key opened one first: that one it is
        _abandon(store, ref, upload_id, multipart_id)
        session = _open_session_under(actor, idempotency_key, request_fingerprint)
        if session is None:
            raise ConcurrentChange(f"Another request under idempotency key {idempotency_key!r} is opening the same "
                                   "upload: send it again in a moment.")
        return JSONResponse(_state(session, _received(session)).model_dump(), status_code=200)
    return JSONResponse(_state(session, []).model_dump(), status_code=201)


def _open_session_under(actor: Actor, key: str, request_fingerprint: str) -> UploadSession | None:
    session = open_staging().session_by_key(actor.user, key)
    if session is None:
        return None
    if _expires_at(session) < utcnow():  # gone for its client: its parts go now, and the key is free
        _abandon(*_ref(session), session.upload_id, session.multipart_id)
        return None
    if session.fingerprint != request_fingerprint:
        raise Refused(f"Idempotency key {key!r} was used for another upload: a key names one request (same name, "
                      "file and options); use a new key for a new request.")
    return session


def _abandon(store: S3Datastore, ref: ObjectRef, upload_id: str, multipart_id: str | None) -> None:
    """Nothing of a session that was not opened stays: its parts, its object, its records."""
    if multipart_id is not None:
        store.abort_multipart_upload(ref.bucket, ref.key, multipart_id)
    drop_staged(store, ref, upload_id)


@router.get("/uploads/{upload_id}", response_model=SessionState, summary="A session: which parts the service holds")
def show_upload(upload_id: UploadId, actor: Caller) -> SessionState:
    session = _session_of(actor, upload_id)
    return _state(session, _received(session))


# --- parts -----------------------------------------------------------------------------------

@router.put("/uploads/{upload_id}/parts/{number}", summary="Send part `number` (1-based) of the file",
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def put_part(upload_id: UploadId, number: Annotated[int, Path(ge=1, le=MAX_PARTS)], request: Request,
                   actor: Caller) -> dict:
    session = await run_in_threadpool(_session_of, actor, upload_id)
    if session.flow_run_id is not None:
        raise Refused(f"Upload {upload_id} is complete (flow run {session.flow_run_id}): no part can change now.")
    if number > session.part_count:
        raise Refused(f"Upload {upload_id} has {session.part_count} parts; there is no part {number}.")
    wanted = session.part_length(number)
    declared = request.headers.get("content-length")
    if declared != str(wanted):
        raise Refused(f"Part {number} of upload {upload_id} has {wanted} bytes; the request declares "
                      f"{declared or 'no Content-Length'}: send exactly bytes {(number - 1) * session.part_size}"
                      f"..{(number - 1) * session.part_size + wanted - 1} of the file.")
    parts = _inspecting.get(upload_id)
    if parts is None:
        _forget_idle_sessions()
        parts = _inspecting.setdefault(upload_id, PartsInOrder(
            session.part_size, HELD_BYTES, UploadParameters(**session.parameters).checksum()))
    arrival = await _turn_of(parts, number, wanted)
    try:
        with parts.arriving(arrival):
            async with _part_bodies():
                data = await _read_part(request, wanted)
                store, ref = _ref(session)
                etag = await run_in_threadpool(store.put_part, ref, session.multipart_id, number, data)
                await run_in_threadpool(parts.feed, arrival, data, etag)
    finally:
        _tell_a_part_came_in()  # (or failed to): parts waiting for their turn look again
    await run_in_threadpool(open_staging().part_stored, upload_id, number, etag, wanted)
    return {"part": number, "size": wanted, "etag": etag}


async def _turn_of(parts: PartsInOrder, number: int, size: int) -> Arrival:
    """A part that came too far ahead of the next one in order waits, unread (its sender waits
    too), while the next one is on its way: held or inspected once it comes, it will not be read
    back at completion. Parts sent again out of order after a cut cost 0.7 s of reading back per
    100 MiB otherwise. It looks again each time a part is in (asking every few ms instead cost
    the image API a tenth of its CPU with 16 uploads at once)."""
    started = time.monotonic()
    while (arrival := parts.admit(number, size, next_may_be_on_its_way=(
            waited := time.monotonic() - started) < SENT_TOGETHER_SECONDS)) is None:
        if waited > TURN_WAIT_SECONDS:
            return Arrival(number, 0)
        with anyio.move_on_after(SENT_TOGETHER_SECONDS / 2):  # also when parts go without one coming in
            await _next_part_in().wait()
    return arrival


def _next_part_in() -> anyio.Event:
    global _a_part_came_in
    if _a_part_came_in is None:
        _a_part_came_in = anyio.Event()
    return _a_part_came_in


def _tell_a_part_came_in() -> None:
    global _a_part_came_in
    _next_part_in().set()
    _a_part_came_in = anyio.Event()


async def _read_part(request: Request, wanted: int) -> bytearray:
    """The body, `wanted` bytes, into one buffer as it arrives (no list of chunks joined into a
    second copy: a part is in memory once)."""
    data, received = bytearray(wanted), 0
    try:
        async for chunk in request.stream():
            if received + len(chunk) > wanted:
                raise Refused(f"The part is longer than its Content-Length ({wanted} bytes): send it again.")
            data[received:received + len(chunk)] = chunk
            received += len(chunk)
    except ClientDisconnect:  # the client went away mid-part (it was logged as a 500 with a traceback)
        raise Refused(f"The part was cut off after {received} of {wanted} bytes: send it again.") from None
    if received != wanted:  # cut off on the way
        raise Refused(f"The part ended after {received} of {wanted} bytes: send it again.")
    return data


def _forget_idle_sessions() -> None:
    """Parts held for a session nobody completed (its client died and never came back) go back to
    the budget after IDLE_SECONDS; if it ever completes, what was not inspected is read back."""
    now = time.monotonic()
    for upload_id, parts in list(_inspecting.items()):
        if now - parts.last_fed > IDLE_SECONDS:
            _inspecting.pop(upload_id, None)
            parts.release()


def _part_bodies() -> anyio.Semaphore:
    global _in_flight
    if _in_flight is None:
        _in_flight = anyio.Semaphore(PARTS_IN_FLIGHT)
    return _in_flight


# --- completing and abandoning -------------------------------------------------------------------

@router.post("/uploads/{upload_id}/complete", status_code=202, response_model=Started,
             summary="Join the parts, check them (format, safety, sizes, checksum) and register the image")
def complete_upload(upload_id: UploadId, actor: Caller, remote: Remote = None) -> Started:
    session = _session_of(actor, upload_id)
    if session.flow_run_id is not None:
        return Started(flow_run_id=session.flow_run_id, repeated=True)
    params = UploadParameters(**session.parameters)
    claim = None
    if session.idempotency_key is not None:
        claim = claim_key(actor, session.idempotency_key, "upload", {**session.parameters, "size": session.size})
        if claim.flow_run_id is not None:
            return Started(flow_run_id=claim.flow_run_id, repeated=True)
    try:
        started = _complete(actor, session, params, remote)
    except BaseException:
        release_key(claim)
        raise
    settle_key(claim, started)
    return started


def _complete(actor: Actor, session: UploadSession, params: UploadParameters, remote: bool | None) -> Started:
    store, ref = _ref(session)
    stored = open_staging().stored_parts(session.upload_id)
    missing = [n for n in range(1, session.part_count + 1) if n not in stored]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise Refused(f"Upload {session.upload_id} lacks {len(missing)} of its {session.part_count} parts "
                      f"({shown}): send them (`hcx-image upload-resume {session.upload_id}`), then complete.")
    etags = [stored[n][0] for n in range(1, session.part_count + 1)]
    try:
        info = store.finish_multipart(ref, session.multipart_id, etags)
    except NotFound:  # joined by an earlier try that was cut off: inspect what it made
        info = store.head(ref)
    parts = _inspecting.pop(session.upload_id, None)
    try:
        inspection = _inspect_joined(store, ref, info.etag, session, params, parts, etags)
        if info.size != session.size:
            raise IntegrityError(f"Upload {session.upload_id} joined into {info.size} bytes, {session.size} were "
                                 "announced: start the upload again.")
        record_inspection(session.upload_id, info.etag, inspection)
        request = UploadRequest(
            owner=actor.user, name=params.name, type=params.type, datastore=session.staged.datastore,
            persistent=params.persistent, bus=params.bus, driver=params.driver, description=params.description,
            upload_id=session.upload_id, client_path=params.client_path,
            skip_capacity_check=params.skip_capacity_check, expected_sha256=inspection.sha256,
        )
        flow_run_id = submit("upload", {"request": request.model_dump(mode="json")}, remote=remote)
    except BaseException:  # refused bytes (or no flow run): nothing of them stays
        drop_staged(store, ref, session.upload_id)
        raise
    finally:
        if parts is not None:
            parts.release()
    open_staging().session_started(session.upload_id, flow_run_id)
    return Started(flow_run_id=flow_run_id)


def _inspect_joined(store: S3Datastore, ref: ObjectRef, etag: str, session: UploadSession,
                    params: UploadParameters, parts: PartsInOrder | None, etags: list[str]):
    """What the joined object is: inspected as its parts came, and read back from the store only
    past the parts this process inspected (all of it after a restart of this process)."""
    offset = parts.resume_from(etags) if parts is not None and etags else None
    if offset is None:
        parts, offset = PartsInOrder(session.part_size, HELD_BYTES, params.checksum()), 0
    if offset < session.size:
        body = store.open_range(ref, offset, if_match=etag)
        with body:
            for chunk in iter(lambda: body.read(get_settings().stream_chunk), b""):
                parts.inspector.update(chunk)
    return parts.inspector.inspection(declared=params.driver, origin=f"The file sent ({session.size} bytes)")


@router.delete("/uploads/{upload_id}", status_code=204, response_model=None,
               summary="Abandon a session: its parts are deleted")
def abandon_upload(upload_id: UploadId, actor: Caller) -> None:
    session = _session_of(actor, upload_id)
    if session.flow_run_id is not None:
        raise Refused(f"Upload {upload_id} is complete (flow run {session.flow_run_id}): delete the image instead.")
    store, ref = _ref(session)
    if (parts := _inspecting.pop(upload_id, None)) is not None:
        parts.release()
    _abandon(store, ref, upload_id, session.multipart_id)
