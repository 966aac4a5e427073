"""Prefect tasks that write the catalog. Each is one compare-and-set fenced by the flow run that
owns the image, so a retry is harmless and a superseded run changes nothing."""

from __future__ import annotations

from prefect import task
from prefect.runtime import flow_run

from blocks.datastore import ObjectRef, load_datastore
from catalog import operations, rules
from catalog.model import Image, ImageState, IntegrityError, Operation, OperationRecord
from catalog.permissions import Right
from catalog.requests import CloneRequest, CreateEmptyRequest, DeleteRequest, UploadRequest
from catalog.store import open_catalog
from tasks import qemu
from tasks.retry import IO_TASK
from tasks.transfer import InspectedObject


def current_flow_run_id() -> str | None:
    return flow_run.get_id()


def take_up(image: Image, operation: Operation) -> Image:
    """This run carries on the operation an existing image waits on (after a retry, or a delete the
    CLI marked): it becomes the image's one writer, explicitly (a history row says so). A settled
    image (a re-sent request that had finished) is returned as it is."""
    if not rules.awaits_operation(image):
        return image
    return operations.claim(open_catalog(), image, current_flow_run_id(), operation)


@task(**IO_TASK)
def check_upload_request(request: UploadRequest, upload_id: str) -> None:
    """Refuse what breaks a creation rule before any byte is read."""
    load_datastore(request.datastore)
    open_catalog().check_new_image(request.actor(), name=request.name, type_=request.type,
                                   persistent=request.persistent, upload_id=upload_id)


@task(**IO_TASK)
def register_upload(request: UploadRequest, upload_id: str, inspected: InspectedObject) -> Image:
    """Step 2: the image row, LOCKED, its source the staged object (idempotent per upload_id; a
    retried upload must find the very bytes it registered). Refused if it does not fit the datastore."""
    found = inspected.inspection
    actor = request.actor()
    catalog = open_catalog()
    existing = catalog.find_by_upload_id(upload_id)
    if existing is not None:
        existing = take_up(existing, Operation.UPLOAD)  # ours from here on, so our hooks judge what follows
        if existing.sha256 != found.sha256 or existing.size != found.size:
            raise IntegrityError(
                f"The staged bytes ({found.size} bytes, sha256 {found.sha256}) are not those image "
                f"{existing.id} registered ({existing.size} bytes, sha256 {existing.sha256}): upload it again."
            )
        return existing
    limit = rules.capacity_limit(load_datastore(request.datastore).limit_bytes,
                                 skip=request.skip_capacity_check, is_admin=actor.is_admin)
    image = rules.new_image(
        actor=actor, name=request.name, type_=request.type, persistent=request.persistent, bus=request.bus,
        format_=found.format, datastore=request.datastore, run_id=current_flow_run_id(), upload_id=upload_id,
        description=request.description, source=str(inspected.ref), source_etag=inspected.etag, size=found.size,
        virtual_size=found.virtual_size, sha256=found.sha256,
        last_operation=OperationRecord(op=Operation.UPLOAD, request=request.model_dump(mode="json"),
                                       upload_id=upload_id),
    )
    return operations.register(catalog, image, limit_bytes=limit,
                               message=f"registered from {inspected.ref} ({found.detected}, {found.size} bytes)")


@task(**IO_TASK)
def record_source(image_id: int, ref: ObjectRef, etag: str) -> Image:
    """The image's bytes now lie at `ref` with this ETag (recorded before any cleanup, so they are
    never lost; clones pin their copy to it)."""
    run_id = current_flow_run_id()
    return open_catalog().transition(image_id, rules.record, source=str(ref), source_etag=etag,
                                     owner=run_id, writer=run_id, message=f"bytes at {ref}")


@task(**IO_TASK)
def record_made(image_id: int, made: InspectedObject) -> Image:
    """The bytes a flow made for the image: where, their ETag, sizes and sha256."""
    found = made.inspection
    run_id = current_flow_run_id()
    return open_catalog().transition(
        image_id, rules.record, source=str(made.ref), source_etag=made.etag, size=found.size,
        virtual_size=found.virtual_size, sha256=found.sha256, owner=run_id, writer=run_id,
        message=f"bytes at {made.ref} ({found.size} bytes)",
    )


@task(**IO_TASK)
def check_owner(image_id: int) -> Image:
    """Before bytes move for an image: this run still owns its operation (else Superseded)."""
    image = open_catalog().get(image_id)
    rules.owned_by(image, current_flow_run_id())
    return image


# --- clone -----------------------------------------------------------------------------------

@task(**IO_TASK)
def begin_clone(request: CloneRequest, object_id: str) -> Image:
    """Step 1 of a clone: the target registered LOCKED and its source taken, in one transaction
    (refused when the clone breaks a rule or does not fit its datastore: nothing is written)."""
    catalog = open_catalog()
    existing = catalog.find_by_upload_id(object_id)
    if existing is not None:  # a retry, or this task retried
        rules.clone_resume(existing)
        return take_up(existing, Operation.CLONE)
    source = catalog.get_for(request.actor(), request.source_id, Right.USE)  # whose datastore, by default
    limit = load_datastore(request.datastore or source.datastore).limit_bytes
    return operations.begin_clone(catalog, request.actor(), request, object_id=object_id, limit_bytes=limit,
                                  run_id=current_flow_run_id())


# --- empty images ----------------------------------------------------------------------------

@task(**IO_TASK)
def check_empty_request(request: CreateEmptyRequest, object_id: str) -> int:
    """Refuse what breaks a creation rule before anything is written; returns the bytes the image
    will take in its datastore (`qemu-img measure`)."""
    rules.validate_empty_image(type_=request.type)
    store = load_datastore(request.datastore)
    actor = request.actor()
    catalog = open_catalog()
    catalog.check_new_image(actor, name=request.name, type_=request.type, persistent=request.persistent,
                            upload_id=object_id)
    required = qemu.measure(request.driver, request.size)
    if catalog.find_by_upload_id(object_id) is None:
        catalog.check_capacity(actor, datastore=request.datastore, limit_bytes=store.limit_bytes,
                               required=required, skip=request.skip_capacity_check)
    return required


@task(**IO_TASK)
def register_empty(request: CreateEmptyRequest, object_id: str, required: int) -> Image:
    """The image row, LOCKED while its empty disk is written (idempotent per object id)."""
    catalog = open_catalog()
    existing = catalog.find_by_upload_id(object_id)
    if existing is not None:
        return take_up(existing, Operation.CREATE_EMPTY)
    actor = request.actor()
    limit = rules.capacity_limit(load_datastore(request.datastore).limit_bytes,
                                 skip=request.skip_capacity_check, is_admin=actor.is_admin)
    recorded = request.model_copy(update={"object_id": object_id}).model_dump(mode="json")
    image = rules.new_image(
        actor=actor, name=request.name, type_=request.type, persistent=request.persistent, bus=request.bus,
        format_=request.driver, datastore=request.datastore, run_id=current_flow_run_id(), upload_id=object_id,
        description=request.description, size=required, virtual_size=request.size,
        last_operation=OperationRecord(op=Operation.CREATE_EMPTY, request=recorded),
    )
    return operations.register(catalog, image, limit_bytes=limit,
                               message=f"registered empty {request.driver.value} disk of {request.size} bytes")


# --- delete ----------------------------------------------------------------------------------

@task(**IO_TASK)
def begin_delete(request: DeleteRequest) -> Image:
    """Step 1 of a delete: DELETE (the name is free at once), owned by this run. An image already
    in DELETE (marked by the CLI, or a retried delete) is taken up by this run."""
    catalog = open_catalog()
    image = catalog.get_for(request.actor(), request.image_id, Right.MANAGE)
    if image.state is ImageState.DELETE:
        return take_up(image, Operation.DELETE)
    return operations.delete(catalog, request.actor(), request.image_id, force=request.force,
                             run_id=current_flow_run_id())


@task(**IO_TASK)
def drop_image_row(image_id: int) -> None:
    """Last step of a delete: the row goes, once its objects are gone."""
    operations.remove(open_catalog(), image_id, run_id=current_flow_run_id())
