"""Tasks of the maintenance flows (reconcile, monitor, scrub): each one question asked of the
catalog, the Prefect API or a datastore, answered by a report row; every change goes through a
catalog rule (`catalog.rules`) or an idempotent object operation."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from prefect import task

from blocks.prefect_api import prefect_client
from blocks.datastore import ObjectRef, S3Datastore, load_datastore
from catalog import rules
from catalog.model import HcxError, Image, ImageState, NotFound, Refused, human_size, utcnow
from catalog.settings import get_settings
from catalog.snapshots import SnapshotState, snapshots_in
from catalog.staging import open_staging
from catalog.store import open_catalog
from tasks.images import current_flow_run_id
from tasks.progress import ProgressArtifact
from tasks.retry import IO_TASK
from tasks.inspection import HashingReader

log = logging.getLogger("hcx.maintenance")

Row = dict[str, Any]


def row(kind: str, target: str, action: str) -> Row:
    """One line of a maintenance report."""
    return {"kind": kind, "target": target, "action": action}


def datastore_names() -> list[str]:
    with prefect_client() as client:
        documents = client.read_block_documents_by_type(S3Datastore.get_block_type_slug())
    return sorted(doc.name for doc in documents)


# --- objects against the catalog -------------------------------------------------------------

def _referenced(store: S3Datastore, datastore: str) -> set[str]:
    """Every object URI a catalog row points at or will adopt (its source, its staged upload)."""
    uris: set[str] = set()
    for image in open_catalog().list():
        if image.source:
            uris.add(image.source)
        if image.upload_id and image.datastore == datastore:
            uris.update({str(store.staging_ref(image.upload_id)), str(store.image_ref(image.upload_id))})
    return uris


def _image_area(store: S3Datastore) -> tuple[str, str]:
    return store.bucket, f"{store.prefix}images/"


def _at(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"


def _unknown(what: str) -> str:
    return f"left alone: no staging record or image knows it ({what}); another tool's, or an administrator's to judge"


def _sweep_records(store: S3Datastore, datastore: str, cutoff: datetime, ttl_hours: float,
                   sources: set[str]) -> list[Row]:
    """Recorded uploads of `datastore`: one never registered whose last sign of life (its record,
    its staged object, its multipart uploads) is older than the TTL is removed (object deleted,
    multipart uploads aborted, record forgotten); a younger one is in flight and kept. A record
    whose upload the catalog registered is forgotten once old (the image row knows it now)."""
    catalog, records = open_catalog(), open_staging()
    report = []
    for record in records.list(datastore=datastore):
        image = catalog.find_by_upload_id(record.upload_id)
        if image is not None:
            if record.recorded_at < cutoff and not rules.awaits_operation(image):
                records.forget(record.upload_id, recorded_at=record.recorded_at)
            continue
        uploads = [u for u in store.list_multipart_uploads(record.bucket, record.key) if u["Key"] == record.key]
        staged = [o for o in store.list_keys(record.bucket, record.key) if o["Key"] == record.key]
        last = max([record.recorded_at, *(u["Initiated"] for u in uploads), *(o["LastModified"] for o in staged)])
        recorded = f"recorded by {record.owner} ({record.group}) at {_at(record.recorded_at)}"
        if last >= cutoff:
            report.append(row("staged upload", record.uri, f"kept: in flight ({recorded}, last written "
                                                             f"{_at(last)}: younger than {ttl_hours:g}h)"))
            continue
        if record.uri in sources or catalog.find_by_upload_id(record.upload_id) is not None:
            continue  # registered meanwhile: the catalog knows it now
        for upload in uploads:
            store.abort_multipart_upload(record.bucket, record.key, upload["UploadId"])
        if staged:
            store.delete(store.ref(record.key, bucket=record.bucket))
        records.forget(record.upload_id, recorded_at=record.recorded_at)
        report.append(row("staged upload", record.uri, (
            f"removed: {recorded}, never registered, nothing written for {ttl_hours:g}h"
            f"{'; staged object deleted' if staged else ''}"
            f"{f'; {len(uploads)} incomplete multipart upload(s) aborted' if uploads else ''}; record forgotten")))
    return report


@task(**IO_TASK)
def sweep_staging(datastore: str, ttl_hours: float) -> list[Row]:
    """Remove what the service recorded and nobody finished, never anything else: uploads a
    staging record knows that were never registered (`_sweep_records`), staged objects and
    incomplete multipart uploads of images the catalog knows that no longer use them, all older
    than the TTL; never an image's source, nor what an image waiting on its operation may still
    use. Objects and multipart uploads no record or image knows are reported, whatever their age."""
    store = load_datastore(datastore)
    cutoff = utcnow() - timedelta(hours=ttl_hours)
    catalog = open_catalog()
    sources = {image.source for image in catalog.list() if image.source}
    report = _sweep_records(store, datastore, cutoff, ttl_hours, sources)

    recorded = {record.uri for record in open_staging().list(datastore=datastore)}  # in flight: kept above
    claimed = set(sources)  # image objects: the audit's to judge
    staged: dict[str, Image] = {}  # the staged bytes of registered uploads, by URI
    written: dict[str, Image] = {}  # every object an image's operation writes, by URI
    for image in catalog.list(datastore=datastore):
        if image.upload_id:
            target, staging = str(store.image_ref(image.upload_id)), str(store.staging_ref(image.upload_id))
            claimed.add(target)
            staged[staging] = written[staging] = written[target] = image
    bucket, prefix = store.staging_area()
    for obj in store.list_keys(bucket, prefix):
        uri = f"s3://{bucket}/{obj['Key']}"
        if uri in claimed or uri in recorded:
            continue
        image = staged.get(uri)
        if image is None:
            report.append(row("staging object", uri, _unknown(
                f"{human_size(obj['Size'])}, last modified {_at(obj['LastModified'])}")))
        elif not rules.awaits_operation(image) and obj["LastModified"] < cutoff:
            store.delete(store.ref(obj["Key"], bucket=bucket))
            report.append(row("staging object", uri, f"removed: staged for image {image.id} ({image.state.value}), "
                                                     f"which does not use it, older than {ttl_hours:g}h"))

    for area_bucket, area_prefix in sorted({(bucket, prefix), _image_area(store)}):
        for upload in store.list_multipart_uploads(area_bucket, area_prefix):
            uri = f"s3://{area_bucket}/{upload['Key']}"
            if uri in recorded:
                continue
            image = written.get(uri)
            if image is None:
                report.append(row("incomplete multipart upload", uri, _unknown(f"started {_at(upload['Initiated'])}")))
            elif not rules.awaits_operation(image) and upload["Initiated"] < cutoff:
                store.abort_multipart_upload(area_bucket, upload["Key"], upload["UploadId"])
                report.append(row("incomplete multipart upload", uri, (
                    f"aborted: started {_at(upload['Initiated'])} for image {image.id} ({image.state.value}), "
                    f"which waits on no operation, older than {ttl_hours:g}h")))
    return report


@task(**IO_TASK)
def audit_objects(datastore: str) -> list[Row]:
    """Report image objects no catalog row claims (never deleted here); move rows whose object is
    missing to ERROR (rules.object_missing)."""
    store = load_datastore(datastore)
    catalog = open_catalog()
    referenced = _referenced(store, datastore)
    report = []
    bucket, prefix = _image_area(store)
    in_staging_area = (bucket, prefix) == store.staging_area()  # then sweep_staging reports them
    for obj in [] if in_staging_area else store.list_keys(bucket, prefix):
        uri = f"s3://{bucket}/{obj['Key']}"
        if uri not in referenced:
            report.append(row("orphan object", uri, "reported: no catalog row claims it (left for an administrator) "
                                                    f"({human_size(obj['Size'])})"))
    for image in catalog.list(datastore=datastore):
        if not rules.holds_bytes(image) or store.exists(ObjectRef.parse(datastore, image.source)):
            continue
        try:
            moved = catalog.transition(image.id, rules.object_missing, image.source,
                                       writer=current_flow_run_id(), message="reconcile: object missing")
        except Refused as exc:
            report.append(row("missing object", image.source, f"image {image.id} left alone: {exc}"))
            continue
        report.append(row("missing object", image.source, f"image {image.id} ({image.name}) -> {moved.state.value}"))
    return report + _audit_snapshots(store, datastore)


def _audit_snapshots(store: S3Datastore, datastore: str) -> list[Row]:
    """Snapshot objects no snapshot row claims, and READY snapshots whose object is missing:
    reported, never deleted nor moved here (a snapshot being created has a row before its object)."""
    recorded = snapshots_in(open_catalog(), datastore)
    claimed = {s.object for s in recorded}
    bucket, prefix = store.bucket, f"{store.prefix}snapshots/"
    report = [row("orphan snapshot object", uri, "reported: no snapshot row claims it (left for an administrator) "
                                                 f"({human_size(obj['Size'])})")
              for obj in store.list_keys(bucket, prefix) if (uri := f"s3://{bucket}/{obj['Key']}") not in claimed]
    for snapshot in recorded:
        if snapshot.state is SnapshotState.READY and not store.exists(ObjectRef.parse(datastore, snapshot.object)):
            report.append(row("missing snapshot object", snapshot.object, (
                f"reported: {snapshot.label} of image {snapshot.image_id} has lost its object; "
                f"`hcx-image snapshot-delete {snapshot.image_id} {snapshot.number}` drops it")))
    return report


# --- monitor ---------------------------------------------------------------------------------

@task(**IO_TASK)
def measure_datastore(datastore: str) -> Row:
    """Used, free and total bytes of a datastore (as the reference's datastore monitor reports
    USED_MB/FREE_MB/TOTAL_MB): used = bytes of the objects under its prefix, total = its limit."""
    store = load_datastore(datastore)
    objects = store.list_keys(store.bucket, store.prefix)
    used = sum(obj["Size"] for obj in objects)
    total = store.limit_bytes
    return {
        "datastore": datastore, "kind": store.kind, "bucket": store.bucket, "prefix": store.prefix,
        "objects": len(objects), "used": used, "catalog_used": open_catalog().used_bytes(datastore),
        "total": total, "free": max(total - used, 0) if total is not None else None,
    }


# --- scrub -----------------------------------------------------------------------------------

@task(**IO_TASK)
def scrub_candidates(datastores: list[str] | None, image_ids: list[int] | None) -> list[int]:
    """READY images with a recorded sha256 (persistent ones a VM has written to are skipped by
    `rehash_image`, since their bytes change legitimately)."""
    found = []
    for image in open_catalog().list():
        if image.state is not ImageState.READY or not image.sha256 or not image.source:
            continue
        if datastores and image.datastore not in datastores:
            continue
        if image_ids and image.id not in image_ids:
            continue
        found.append(image.id)
    return found


@task(**IO_TASK)
def rehash_image(image_id: int) -> Row:
    """Read the image's bytes once and compare with the recorded size and sha256; a mismatch or a
    missing object moves it to ERROR through the catalog's rules."""
    catalog = open_catalog()
    image = catalog.get(image_id)
    target = f"image {image.id} ({image.name})"
    if image.persistent and any(h["to_state"] == ImageState.USED_PERS.value for h in catalog.history(image.id)):
        return row("scrub", target, "skipped: persistent and written by VMs since it was hashed")
    store = load_datastore(image.datastore)
    ref = ObjectRef.parse(image.datastore, image.source)
    try:
        body, info = store.open_read(ref)
    except NotFound:
        return _scrub_transition(image, target, rules.object_missing, image.source, "object missing")
    progress = ProgressArtifact(info.size, f"Re-hashing {target} at {ref}")
    with body:
        reader = HashingReader(body, progress)
        while reader.read(get_settings().stream_chunk):
            pass
    progress.finish()
    if reader.size == image.size and reader.sha256 == image.sha256:
        return row("scrub", target, f"ok: {human_size(reader.size)}, sha256 {reader.sha256[:16]} matches")
    return _scrub_transition(image, target, rules.checksum_mismatch, reader.sha256,
                             f"{human_size(reader.size)} hashing to {reader.sha256[:16]}, recorded "
                             f"{human_size(image.size)} {image.sha256[:16]}")


def _scrub_transition(image: Image, target: str, rule, argument: str, what: str) -> Row:
    try:
        moved = open_catalog().transition(image.id, rule, argument, writer=current_flow_run_id(),
                                          message=f"scrub: {what}")
    except HcxError as exc:  # moved meanwhile (deleted, disabled, ...): not ours to judge now
        return row("scrub", target, f"{what}; left alone: {exc}")
    return row("scrub", target, f"{what} -> {moved.state.value}")
