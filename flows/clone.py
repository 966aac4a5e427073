"""Clone: take the source and register the new image (one transaction) -> copy the bytes -> record.

The source goes READY -> CLONE (persistent) or USED (non-persistent) with CLONING_OPS+1 while the
new image is LOCKED with its CLONING_ID. The copy is server-side on one endpoint and streamed
across endpoints, pinned to the source's recorded ETag and checked for size (and sha256 when
streamed), so the clone inherits format, type and sha256 as verified facts. The hooks finish the
clone in one transaction: the new image READY, or ERROR with "Error cloning from Image N: <reason>",
and the source released in both cases. A retry reuses a copy already in place if it re-hashes right.
"""

from __future__ import annotations

import logging

from prefect.runtime import flow_run

from blocks.datastore import ObjectRef, load_datastore
from catalog import operations
from catalog.model import HcxError, Superseded
from catalog.requests import CloneRequest
from catalog.store import open_catalog
from flows.hooks import failure_reason, image_operation
from tasks.images import begin_clone, record_source
from tasks.objects import copy_into_datastore

log = logging.getLogger("hcx.clone")


def object_id_of(request: CloneRequest, flow_run_id) -> str:
    """The new image's object id: given by the caller (the CLI, to find the image), else this run's id."""
    return request.object_id or str(flow_run_id)


def _finish(run, error: str | None) -> None:
    request = CloneRequest.model_validate(run.parameters["request"])
    catalog = open_catalog()
    target = catalog.find_by_upload_id(object_id_of(request, run.id))
    if target is None:  # refused before anything was registered: nothing to finish
        return
    try:
        operations.finish_clone(catalog, target.id, error=error, run_id=str(run.id))
    except Superseded as exc:
        log.info("flow run %s was superseded on image %s: %s", run.id, target.id, exc)
    except HcxError:
        log.exception("could not finish the clone into image %s; reconcile will", target.id)


def _on_success(flow, run, state) -> None:
    _finish(run, None)


def _on_failure(flow, run, state) -> None:
    _finish(run, failure_reason(state))


def _run_name() -> str:
    request = CloneRequest.model_validate(flow_run.parameters["request"])
    return f"clone image {request.source_id} -> {request.name}"


@image_operation("clone", run_name=_run_name, on_failure=_on_failure, on_success=_on_success)
def clone(request: CloneRequest) -> int:
    """Clone an image into a new one, in the source's datastore or another."""
    target = begin_clone(request, object_id_of(request, flow_run.get_id()))
    source = open_catalog().get(request.source_id)
    dst = load_datastore(target.datastore).image_ref(target.upload_id)
    copied = copy_into_datastore(src=ObjectRef.parse(source.datastore, source.source), dst=dst,
                                 etag=source.source_etag, size=target.size, sha256=target.sha256)
    record_source(target.id, dst, copied.etag)
    return target.id
