"""Upload: stage -> register (LOCKED) -> copy into the datastore -> delete the staging object.

Bytes are staged by the image API (a client's file), or by step 1 here from a source the flow
reads itself: a file on the worker, an http(s) URL or an S3 object (import), inspected as they pass
in the last two. An import is registered only once staged, when its size and format are known.

The user gets the image id as soon as step 2 is recorded; steps 3-4 run on. The hooks move the
image to READY, or to ERROR with "Error copying image in the datastore: <reason>". The staging
object goes whatever the outcome, but for one case: an image registered in ERROR keeps its staged
bytes (they are its recorded source) so that `retry` can reuse them after checking their hash;
deleting the image removes them, and bytes proven wrong are never kept.
"""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.runtime import flow_run

from blocks.datastore import load_datastore
from blocks.sealed_urls import drop_sealed_url
from catalog.model import HcxError, IntegrityError
from catalog import rules
from catalog.requests import UploadRequest
from catalog.staging import open_staging
from catalog.store import open_catalog
from flows.hooks import fail_image, failure_exception, failure_reason, image_operation, owns, unlock_image
from tasks.images import check_upload_request, record_source, register_upload
from tasks.objects import (
    copy_into_datastore, delete_object, drop_staged, inspect_staged, stage_local_file, stage_s3_object, stage_url,
)

log = logging.getLogger("hcx.upload")


def upload_id_of(request: UploadRequest, flow_run_id: str) -> str:
    """The staged object's id: given by whoever staged it, else this run's id."""
    return request.upload_id or str(flow_run_id)


def _request_of(run) -> UploadRequest:
    return UploadRequest.model_validate(run.parameters["request"])


def _on_success(flow, run, state) -> None:
    request = _request_of(run)
    unlock_image(open_catalog().find_by_upload_id(upload_id_of(request, run.id)), str(run.id))


def _on_failure(flow, run, state) -> None:
    request = _request_of(run)
    _drop_sealed_url(request)
    upload_id = upload_id_of(request, run.id)
    image = open_catalog().find_by_upload_id(upload_id)
    mine = owns(image, str(run.id))
    fail_image(image, str(run.id), f"Error copying image in the datastore: {failure_reason(state)}")
    # Staged bytes go when nothing was registered from them, or when this run proved them wrong;
    # never under an image another run now drives (it may be reading them).
    if image is None or (mine and isinstance(failure_exception(state), IntegrityError)):
        _drop_staging(request.datastore, upload_id)


def _drop_staging(datastore: str, upload_id: str) -> None:
    """The staging object goes in all cases (reconcile sweeps it if even this fails)."""
    try:
        store = load_datastore(datastore)
        drop_staged(store, store.staging_ref(upload_id), upload_id)
    except HcxError:
        log.exception("could not delete the staging object of upload %s; reconcile will", upload_id)


def _drop_sealed_url(request: UploadRequest) -> None:
    """A failed import keeps no credential: one fetched again is imported again, with a fresh URL."""
    try:
        drop_sealed_url(request.sealed_url)
    except Exception:  # noqa: BLE001  (a hook must finish; the block holds one tenant's URL, logged by name)
        log.exception("could not drop the sealed URL %s of a failed import", request.sealed_url)


def _run_name() -> str:
    request = UploadRequest.model_validate(flow_run.parameters["request"])
    return f"upload {request.name} -> {request.datastore}"


@image_operation("upload", run_name=_run_name, on_failure=_on_failure, on_success=_on_success)
def upload(request: UploadRequest) -> int:
    """Register an image from staged bytes, a file on the worker, a URL or an S3 object; copy it in."""
    upload_id = upload_id_of(request, flow_run.get_id())
    check_upload_request(request, upload_id)
    if request.path:
        stage_local_file(request.path, request.datastore, upload_id, owner=request.owner,
                         group=request.actor().group)
    elif request.url:
        stage_url(request, upload_id)
    elif request.s3_uri:
        stage_s3_object(request, upload_id)
    inspected = inspect_staged(request.datastore, upload_id, request.driver, request.expected_sha256)
    image = register_upload(request, upload_id, inspected)
    if not rules.awaits_operation(image):  # sent again after it had finished: nothing left to do
        return image.id
    target = load_datastore(request.datastore).image_ref(upload_id)
    copied = copy_into_datastore(src=inspected.ref, dst=target, etag=inspected.etag,
                                 size=image.size, sha256=image.sha256)
    record_source(image.id, target, copied.etag)
    if target != inspected.ref:
        cleanup = delete_object(inspected.ref, return_state=True)
        if cleanup.is_failed():
            get_run_logger().warning("Staging object %s stays for reconcile: %s", inspected.ref, cleanup.message)
    if target == inspected.ref or cleanup.is_completed():
        open_staging().forget(upload_id)  # the staged bytes are adopted or deleted: nothing left to sweep
    return image.id
