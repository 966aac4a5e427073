"""The image verbs: list, show, create (upload, import from a URL or an S3 object, or empty),
clone, delete, retry, export and the byte-less ones. Each checks what the catalog decides, moves
bytes or starts the operation's flow, and answers at once; a client follows a flow run through
/runs/{id}."""

from __future__ import annotations

import uuid
from typing import Annotated, Callable, Iterator

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ConfigDict, Field, model_validator

from api.auth import Caller
from api.bodies import BodyReader, declared_length
from api.runs import run_left_no_image
from api.shapes import PublishedChecksum, Remote, Started, Strict
from blocks.datastore import ObjectRef, S3Datastore, load_datastore, service_buckets
from blocks.sealed_urls import drop_sealed_url, seal_url, unsealed_form
from catalog import operations, rules
from catalog.identity import open_directory
from catalog.idempotency import MAX_KEY_LENGTH, Claim, fingerprint, open_idempotency_keys
from catalog.model import Bus, DiskFormat, Image, ImageType, IntegrityError, NotFound, Operation, Refused, parse_size
from catalog.permissions import Actor, Right
from catalog.requests import (
    Checksum, CloneRequest, CreateEmptyRequest, DeleteRequest, Description, ImageName, ImageUrl, S3Uri, UploadRequest,
    check_empty_size, rerun_request,
)
from catalog.settings import get_settings
from catalog.store import Catalog, open_catalog
from flows.launcher import submit
from tasks import qemu
from tasks.inspection import Inspection, InspectingReader
from tasks.objects import drop_staged, record_inspection, record_staging

router = APIRouter(prefix="/api/v1", tags=["images"])

ImageId = Annotated[int, Field(ge=0, le=2**31 - 1)]


def catalog() -> Catalog:
    return open_catalog()


def _started(flow_run_id: str, image: Image | None = None) -> Started:
    return Started(flow_run_id=flow_run_id, image=image.to_dict() if image else None)


# --- sent again: idempotency keys ---------------------------------------------------------------

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=MAX_KEY_LENGTH, pattern=r"^[\x21-\x7e]+$",
    description="Send the same create again with the same key (after a timeout, say) and get the first "
                "one's answer instead of a second image; the CLI derives one from the name and the file.")]


def claim_key(actor: Actor, key: str | None, operation: str, request: dict) -> Claim | None:
    """The key claimed for this request (None without a key); a claim with a flow run is a repeat."""
    if key is None:
        return None
    keys = open_idempotency_keys()
    request_fingerprint = fingerprint({"operation": operation, **request})
    claim = keys.claim(actor.user, key, request_fingerprint)
    if claim.flow_run_id is not None and run_left_no_image(claim.flow_run_id):
        keys.forget(claim)  # its image is gone (deleted since): the same request makes it anew
        claim = keys.claim(actor.user, key, request_fingerprint)
    return claim


def _repeated(claim: Claim) -> Started:
    return Started(flow_run_id=claim.flow_run_id, repeated=True)


def settle_key(claim: Claim | None, started: Started) -> None:
    if claim is not None:
        open_idempotency_keys().settle(claim, started.flow_run_id)


def release_key(claim: Claim | None) -> None:
    if claim is not None:
        open_idempotency_keys().release(claim)


def _once(claim: Claim | None, start: Callable[[], Started]) -> Started:
    """`start` the operation once per key: a repeat of the same request gets the first answer; a
    refusal leaves the key free for a corrected request."""
    if claim is not None and claim.flow_run_id is not None:
        return _repeated(claim)
    try:
        started = start()
    except BaseException:
        release_key(claim)
        raise
    settle_key(claim, started)
    return started


# --- reading ----------------------------------------------------------------------------------

@router.get("/images", summary="The images you may use (admins: all)")
def list_images(actor: Caller, mine: bool = Query(False, description="Only your own images")) -> list[dict]:
    return [image.to_dict() for image in catalog().list(actor, mine=mine)]


@router.get("/images/{image_id}", summary="One image")
def show_image(image_id: ImageId, actor: Caller) -> dict:
    return catalog().get_for(actor, image_id, Right.USE).to_dict()


@router.get("/images/{image_id}/history", summary="One image's state history")
def image_history(image_id: ImageId, actor: Caller) -> list[dict]:
    catalog().get_for(actor, image_id, Right.USE)
    return catalog().history(image_id)


@router.get("/images/{image_id}/content", summary="The image's bytes (header X-Image-Sha256: verify them)",
            response_class=StreamingResponse)
def export_image(image_id: ImageId, actor: Caller) -> StreamingResponse:
    image = catalog().get_for(actor, image_id, Right.USE)
    rules.check_export(image)
    store = load_datastore(image.datastore)
    body, info = store.open_read(ObjectRef.parse(image.datastore, image.source), if_match=image.source_etag)
    chunk = get_settings().stream_chunk

    def chunks() -> Iterator[bytes]:
        with body:
            yield from iter(lambda: body.read(chunk), b"")

    headers = {"Content-Length": str(info.size), "X-Image-Sha256": image.sha256 or ""}
    return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers)


# --- creating ---------------------------------------------------------------------------------

class NewImageBytes(PublishedChecksum):
    """What every image made from bytes (an upload, an import) says about itself."""

    name: ImageName
    type: ImageType = ImageType.OS
    datastore: str | None = Field(default=None, max_length=128, description="Default: HCX_DEFAULT_DATASTORE")
    persistent: bool = False
    bus: Bus = Bus.VIRTIO
    driver: DiskFormat | None = Field(default=None, description="raw or qcow2; must match the bytes")
    description: Description = ""
    skip_capacity_check: bool = False


class UploadParameters(NewImageBytes):
    """What an upload says about itself (query parameters; the body is the file)."""

    client_path: str | None = Field(default=None, max_length=4096,
                                    description="Where the client's file is: `retry` asks for it again")


def prepare_upload(actor: Actor, params: UploadParameters, size: int) -> tuple[S3Datastore, ObjectRef, UploadRequest]:
    """Every check that can refuse before a byte is stored, then the staging record."""
    datastore, store = upload_allowed(actor, params, size)
    upload_id = uuid.uuid4().hex  # made here, never by a client
    staged = store.staging_ref(upload_id)
    record_staging(staged, upload_id, owner=actor.user, group=actor.group)
    request = UploadRequest(
        owner=actor.user, name=params.name, type=params.type, datastore=datastore, persistent=params.persistent,
        bus=params.bus, driver=params.driver, description=params.description, upload_id=upload_id,
        client_path=params.client_path, skip_capacity_check=params.skip_capacity_check,
    )
    return store, staged, request


@router.post("/images/upload/check", status_code=204, response_model=None,
             responses={200: {"model": Started, "description": "Sent before under this idempotency key: its answer"}},
             summary="Would an upload of `size` bytes with these parameters be taken now? (nothing is recorded)")
def check_upload(actor: Caller, params: Annotated[UploadParameters, Depends()],
                 size: int = Query(ge=0, le=2**63 - 1, description="The file's size in bytes"),
                 idempotency_key: IdempotencyKey = None) -> Response:
    if idempotency_key is not None:
        earlier = open_idempotency_keys().done(actor.user, idempotency_key,
                                               fingerprint({"operation": "upload", **params.model_dump(mode="json"),
                                                            "size": size}))
        if earlier is not None and not run_left_no_image(earlier):
            # no need to send the file again (a 200 with the answer: the route's 204 would drop a body)
            return JSONResponse(Started(flow_run_id=earlier, repeated=True).model_dump(), status_code=200)
    upload_allowed(actor, params, size)
    return Response(status_code=204)


def upload_allowed(actor: Actor, params: UploadParameters, size: int) -> tuple[str, S3Datastore]:
    """Every check that can refuse an upload before a byte is sent: size, name, capacity, quota."""
    params.checksum()
    datastore = params.datastore or get_settings().default_datastore
    if size <= 0:
        raise Refused("The file is empty (0 bytes): an image needs content; check the file.")
    store = load_datastore(datastore)
    catalog().check_new_image(actor, name=params.name, type_=params.type, persistent=params.persistent)
    catalog().check_capacity(actor, datastore=datastore, limit_bytes=store.limit_bytes, required=size,
                             skip=params.skip_capacity_check)
    catalog().check_quota(owner=actor.user, group=actor.group, datastore=datastore, required_bytes=size)
    return datastore, store


async def _stage_body(request: Request, store: S3Datastore, staged: ObjectRef, length: int, *, upload_id: str,
                      declared: DiskFormat | None, checksum: Checksum | None = None) -> Inspection:
    """Stream the request body into the staged object, inspecting and hashing it on the way. The
    bytes cross once: what was found is recorded for the staged object's ETag, and the upload flow
    takes it from there instead of reading the object back. A refusal leaves the bytes to the caller
    to drop."""
    body = BodyReader(request.stream(), length)
    reader = InspectingReader(body, checksum=checksum)
    stored = await run_in_threadpool(store.upload, reader, staged, size_hint=length)
    body.check_complete()
    inspection = reader.inspection(declared=declared, origin=f"The file sent ({length} bytes)")
    if stored.size != inspection.size:
        raise IntegrityError(f"Upload to {staged}: {stored.size} bytes stored, {inspection.size} sent: send it again.")
    await run_in_threadpool(record_inspection, upload_id, stored.etag, inspection)
    return inspection


@router.post("/images/upload", status_code=202, response_model=Started,
             summary="Create an image from the request body (the file); answers once it is staged",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_image(request: Request, actor: Caller, params: Annotated[UploadParameters, Depends()],
                       remote: Remote = None, idempotency_key: IdempotencyKey = None) -> Started:
    length = declared_length(request)
    claim = await run_in_threadpool(claim_key, actor, idempotency_key, "upload",
                                    {**params.model_dump(mode="json"), "size": length})
    if claim is not None and claim.flow_run_id is not None:  # sent again: the body is not read
        return _repeated(claim)
    try:
        started = await _upload(request, actor, params, length, remote)
    except BaseException:
        await run_in_threadpool(release_key, claim)
        raise
    await run_in_threadpool(settle_key, claim, started)
    return started


async def _upload(request: Request, actor: Actor, params: UploadParameters, length: int,
                  remote: bool | None) -> Started:
    store, staged, upload = await run_in_threadpool(prepare_upload, actor, params, length)
    started = False
    try:
        inspection = await _stage_body(request, store, staged, length, upload_id=upload.upload_id,
                                       declared=upload.driver, checksum=params.checksum())
        upload.expected_sha256 = inspection.sha256
        flow_run_id = await run_in_threadpool(submit, "upload", {"request": upload.model_dump(mode="json")},
                                              remote=remote)
        started = True
    finally:
        if not started:  # nothing may stay behind a refused or interrupted upload
            await run_in_threadpool(drop_staged, store, staged, upload.upload_id)
    return _started(flow_run_id)


class EmptyImage(Strict):
    name: ImageName
    type: ImageType = ImageType.DATABLOCK
    size: str = Field(min_length=1, max_length=32, description="Virtual size, e.g. 10G or 1048576")
    datastore: str | None = Field(default=None, max_length=128)
    persistent: bool = False
    bus: Bus = Bus.VIRTIO
    driver: DiskFormat = DiskFormat.RAW
    description: Description = ""
    skip_capacity_check: bool = False


@router.post("/images", status_code=202, response_model=Started, summary="Create an empty OS or DATABLOCK image")
def create_empty_image(body: EmptyImage, actor: Caller, remote: Remote = None,
                       idempotency_key: IdempotencyKey = None) -> Started:
    claim = claim_key(actor, idempotency_key, "create-empty", body.model_dump(mode="json"))
    return _once(claim, lambda: _create_empty(body, actor, remote))


def _create_empty(body: EmptyImage, actor: Actor, remote: bool | None) -> Started:
    rules.validate_empty_image(type_=body.type)
    virtual_size = parse_size(body.size)
    check_empty_size(virtual_size, body.driver)
    datastore = body.datastore or get_settings().default_datastore
    store = load_datastore(datastore)
    catalog().check_new_image(actor, name=body.name, type_=body.type, persistent=body.persistent)
    required = qemu.measure(body.driver, virtual_size)
    catalog().check_capacity(actor, datastore=datastore, limit_bytes=store.limit_bytes, required=required,
                             skip=body.skip_capacity_check)
    catalog().check_quota(owner=actor.user, group=actor.group, datastore=datastore, required_bytes=required)
    request = CreateEmptyRequest(
        owner=actor.user, name=body.name, type=body.type, size=virtual_size, datastore=datastore,
        persistent=body.persistent, bus=body.bus, driver=body.driver, description=body.description,
        skip_capacity_check=body.skip_capacity_check, object_id=uuid.uuid4().hex,
    )
    return _started(submit("create-empty", {"request": request.model_dump(mode="json")}, remote=remote))


class ImportImage(NewImageBytes, Strict):
    """An image the service fetches itself: from an http(s) URL, or an S3 object read with a
    datastore's endpoint and keys. It is registered once fetched (its size and format known)."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a refused URL may carry a password: never echoed

    url: ImageUrl | None = Field(default=None, description="An http(s) URL that needs no credentials")
    s3: S3Uri | None = Field(default=None, description="s3://BUCKET/KEY (not a bucket of this service's datastores, "
                                                       "but for administrators)")
    s3_datastore: str | None = Field(default=None, max_length=128,
                                     description="The datastore whose keys read `s3`; default: `datastore`")

    @model_validator(mode="after")
    def _one_source(self) -> "ImportImage":
        if (self.url is None) == (self.s3 is None):
            raise ValueError("give one source: `url` (http or https) or `s3` (s3://BUCKET/KEY)")
        if self.s3_datastore is not None and self.s3 is None:
            raise ValueError("`s3_datastore` says which datastore's keys read `s3`: give it with `s3` only")
        return self


@router.post("/images/import", status_code=202, response_model=Started,
             summary="Create an image from an http(s) URL or an S3 object, fetched by the service; follow the flow "
                     "run: the image appears once its bytes are fetched")
def import_image(body: ImportImage, actor: Caller, remote: Remote = None,
                 idempotency_key: IdempotencyKey = None) -> Started:
    claim = claim_key(actor, idempotency_key, "import", body.model_dump(mode="json"))
    return _once(claim, lambda: _import(body, actor, remote))


def _import(body: ImportImage, actor: Actor, remote: bool | None) -> Started:
    """Every check that can refuse before a byte is fetched (the flow checks them all again), then
    the upload flow, which fetches, inspects and registers."""
    checksum = body.checksum()
    datastore = body.datastore or get_settings().default_datastore
    store = load_datastore(datastore)
    catalog().check_new_image(actor, name=body.name, type_=body.type, persistent=body.persistent)
    required = _source_size(actor, body, datastore)
    catalog().check_capacity(actor, datastore=datastore, limit_bytes=store.limit_bytes, required=required,
                             skip=body.skip_capacity_check)
    catalog().check_quota(owner=actor.user, group=actor.group, datastore=datastore, required_bytes=required)
    upload_id = uuid.uuid4().hex  # made here, never by a client: /runs finds the image by it
    sealed = seal_url(body.url, upload_id) if body.url else None
    request = UploadRequest(
        owner=actor.user, name=body.name, type=body.type, datastore=datastore, persistent=body.persistent,
        bus=body.bus, driver=body.driver, description=body.description, s3_uri=body.s3,
        url=unsealed_form(body.url) if sealed else body.url, sealed_url=sealed,
        s3_datastore=body.s3_datastore, checksum=checksum, skip_capacity_check=body.skip_capacity_check,
        upload_id=upload_id,
    )
    try:
        return _started(submit("upload", {"request": request.model_dump(mode="json")}, remote=remote))
    except BaseException:
        drop_sealed_url(sealed)  # no run will fetch it
        raise


def _source_size(actor: Actor, body: ImportImage, datastore: str) -> int:
    """The bytes the image will take, as far as they are known now: an S3 object's size (its bucket
    allowed to this caller, the object there); 0 for a URL, whose length only the fetch tells."""
    if body.s3 is None:
        return 0
    source = ObjectRef.parse(body.s3_datastore or datastore, body.s3)
    source_store = load_datastore(source.datastore)
    rules.check_import_bucket(actor, source.bucket, service_buckets())
    try:
        return source_store.head(source).size
    except NotFound:
        raise NotFound(f"There is no object {source} where datastore {source.datastore} reads: check the bucket "
                       "and the key (and which datastore's endpoint and keys read it, s3_datastore).") from None


class Clone(Strict):
    name: ImageName
    datastore: str | None = Field(default=None, max_length=128, description="Default: the source's")
    persistent: bool = False
    skip_capacity_check: bool = False


@router.post("/images/{image_id}/clone", status_code=202, response_model=Started, summary="Clone an image (USE)")
def clone_image(image_id: ImageId, body: Clone, actor: Caller, remote: Remote = None,
                idempotency_key: IdempotencyKey = None) -> Started:
    claim = claim_key(actor, idempotency_key, "clone", {"source_id": image_id, **body.model_dump(mode="json")})
    return _once(claim, lambda: _clone(image_id, body, actor, remote))


def _clone(image_id: int, body: Clone, actor: Actor, remote: bool | None) -> Started:
    request = CloneRequest(owner=actor.user, source_id=image_id, name=body.name, datastore=body.datastore,
                           persistent=body.persistent, skip_capacity_check=body.skip_capacity_check,
                           object_id=uuid.uuid4().hex)
    source = catalog().get_for(actor, image_id, Right.USE)
    store = load_datastore(body.datastore or source.datastore)
    operations.check_clone(catalog(), actor, request, limit_bytes=store.limit_bytes)  # quotas too
    return _started(submit("clone", {"request": request.model_dump(mode="json")}, remote=remote))


# --- deleting and retrying ---------------------------------------------------------------------

@router.delete("/images/{image_id}", status_code=202, response_model=Started,
               summary="Delete an image: DELETE at once (its name is free), a flow removes its objects")
def delete_image(image_id: ImageId, actor: Caller, remote: Remote = None,
                 force: bool = Query(False, description="A LOCKED image too (ADMIN right)")) -> Started:
    image = operations.delete(catalog(), actor, image_id, force=force)
    request = DeleteRequest(owner=actor.user, image_id=image_id, force=force)
    return _started(submit("delete", {"request": request.model_dump(mode="json")}, remote=remote), image)


class BytesNeeded(Refused):
    """A retried upload whose staged bytes are gone: the client must send the file again."""

    def __init__(self, message: str, client_path: str | None):
        super().__init__(message)
        self.extra = {"needs_bytes": True, "client_path": client_path}


def _staged_bytes_gone(image: Image) -> tuple[S3Datastore, ObjectRef, UploadRequest] | None:
    """For a retried upload from a client's file: where its staged bytes go, when they are gone."""
    last = image.last_operation
    if last is None or last.op is not Operation.UPLOAD:
        return None
    request = UploadRequest.model_validate(last.request)
    if request.fetched_by_flow:  # a file on the worker, a URL, an S3 object: the flow stages it again itself
        return None
    store = load_datastore(request.datastore)
    staged = store.staging_ref(last.upload_id)
    if store.exists(staged) and store.head(staged).size == image.size:
        return None
    return store, staged, request


@router.post("/images/{image_id}/retry", status_code=202, response_model=Started,
             summary="Re-run the operation that left the image in ERROR; a body re-sends an upload's file")
async def retry_image(image_id: ImageId, request: Request, actor: Caller, remote: Remote = None) -> Started:
    image = await run_in_threadpool(catalog().get_for, actor, image_id, Right.MANAGE)
    rules.retry(image)  # refuse before anything moves
    gone = await run_in_threadpool(_staged_bytes_gone, image)
    if gone is not None:
        await _restage(request, image, *gone)
    return await run_in_threadpool(_start_retry, actor, image_id, remote)


async def _restage(request: Request, image: Image, store: S3Datastore, staged: ObjectRef,
                   upload: UploadRequest) -> None:
    """Stage the re-sent file under the image's upload id; it must hash to the recorded sha256."""
    refused = f"Cannot retry image {image.id}: its staged bytes are gone"
    length = int(request.headers.get("content-length") or 0)
    if length == 0:
        where = f" ({upload.client_path})" if upload.client_path else ""
        raise BytesNeeded(f"{refused}; send the file again{where} as the body of the retry "
                          "(`hcx-image retry` does when the file is still there).", upload.client_path)
    if length != image.size:
        raise Refused(f"{refused} and the file sent has {length} bytes, the image recorded {image.size}: "
                      "send the same file, or delete the image and upload again.")
    last = image.last_operation
    record_staging(staged, last.upload_id, owner=image.owner, group=image.group)
    try:
        digest = (await _stage_body(request, store, staged, length, upload_id=last.upload_id,
                                    declared=image.format)).sha256
    except BaseException:
        await run_in_threadpool(drop_staged, store, staged, last.upload_id)
        raise
    if digest != image.sha256:
        await run_in_threadpool(drop_staged, store, staged, last.upload_id)
        raise Refused(f"{refused} and the file sent hashes to {digest}, the image recorded {image.sha256}: "
                      "it has changed; delete the image and upload the file again.")


def _start_retry(actor: Actor, image_id: int, remote: bool | None) -> Started:
    image = operations.retry(catalog(), actor, image_id)
    operation, rerun = rerun_request(image, actor)
    flow_run_id = submit(operation.value, {"request": rerun.model_dump(mode="json")}, remote=remote)
    return Started(flow_run_id=flow_run_id, image=image.to_dict(), operation=operation.value)


# --- byte-less verbs: answered here, no flow run ----------------------------------------------------

class Rename(Strict):
    name: ImageName


class Update(Strict):
    description: Description | None = None
    set: dict[str, str] = Field(default_factory=dict, description="Attributes to set")
    unset: list[str] = Field(default_factory=list, max_length=128, description="Attributes to remove")


class ChangeType(Strict):
    type: ImageType


class Chmod(Strict):
    mode: str = Field(pattern="^[0-7]{3}$", description="Octal permission bits, e.g. 640")


class Chown(Strict):
    user: str = Field(min_length=1, max_length=64)
    group: str | None = Field(default=None, min_length=1, max_length=64)


class Chgrp(Strict):
    group: str = Field(min_length=1, max_length=64)


@router.post("/images/{image_id}/enable", summary="DISABLED -> READY; ERROR -> what its VMs need (MANAGE)")
def enable_image(image_id: ImageId, actor: Caller) -> dict:
    return operations.enable(catalog(), actor, image_id).to_dict()


@router.post("/images/{image_id}/disable", summary="READY or ERROR -> DISABLED (MANAGE)")
def disable_image(image_id: ImageId, actor: Caller) -> dict:
    return operations.disable(catalog(), actor, image_id).to_dict()


@router.post("/images/{image_id}/persistent", summary="Make the image persistent (MANAGE)")
def make_persistent(image_id: ImageId, actor: Caller) -> dict:
    return operations.set_persistent(catalog(), actor, image_id, True).to_dict()


@router.post("/images/{image_id}/nonpersistent", summary="Make the image non-persistent (MANAGE)")
def make_nonpersistent(image_id: ImageId, actor: Caller) -> dict:
    return operations.set_persistent(catalog(), actor, image_id, False).to_dict()


@router.post("/images/{image_id}/rename", summary="Rename (MANAGE; names are unique per owner)")
def rename_image(image_id: ImageId, body: Rename, actor: Caller) -> dict:
    return operations.rename(catalog(), actor, image_id, body.name).to_dict()


@router.post("/images/{image_id}/update", summary="Description and free attributes (MANAGE)")
def update_image(image_id: ImageId, body: Update, actor: Caller) -> dict:
    if body.description is None and not body.set and not body.unset:
        raise Refused("Nothing to update: give a description, attributes to set or attributes to unset.")
    return operations.update(catalog(), actor, image_id, description=body.description,
                             set_attributes=body.set, unset=tuple(body.unset)).to_dict()


@router.post("/images/{image_id}/chtype", summary="Change the type (MANAGE; a CDROM is non-persistent)")
def change_type(image_id: ImageId, body: ChangeType, actor: Caller) -> dict:
    return operations.change_type(catalog(), actor, image_id, body.type).to_dict()


@router.post("/images/{image_id}/chmod", summary="Permission bits (MANAGE; ADMIN to change ADMIN bits)")
def chmod_image(image_id: ImageId, body: Chmod, actor: Caller) -> dict:
    return operations.chmod(catalog(), actor, image_id, int(body.mode, 8)).to_dict()


@router.post("/images/{image_id}/chown", summary="Owner and group (MANAGE; administrators give images away)")
def chown_image(image_id: ImageId, body: Chown, actor: Caller) -> dict:
    return operations.chown(catalog(), open_directory(), actor, image_id, body.user, body.group).to_dict()


@router.post("/images/{image_id}/chgrp", summary="Group (MANAGE; non-admins: to a group they are in)")
def chgrp_image(image_id: ImageId, body: Chgrp, actor: Caller) -> dict:
    return operations.chgrp(catalog(), open_directory(), actor, image_id, body.group).to_dict()
