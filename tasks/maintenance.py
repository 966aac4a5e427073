"""Tasks of the maintenance flows (reconcile, monitor, scrub): each one question asked of the
catalog, the Prefect API or a datastore, answered by a report row; every change goes through a
catalog rule (`catalog.rules`) or an idempotent object operation."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import Flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from blocks.datastore import ObjectRef, S3Datastore, load_datastore
from catalog import rules
from catalog.model import HcxError, Image, ImageState, NotFound, Refused, human_size
from catalog.settings import get_settings
from catalog.store import Move, open_catalog
from tasks.images import current_flow_run_id
from tasks.progress import ProgressArtifact
from tasks.retry import IO_TASK
from tasks.transfer import HashingReader

log = logging.getLogger("hcx.maintenance")

Row = dict[str, Any]


def row(kind: str, target: str, action: str) -> Row:
    """One line of a maintenance report."""
    return {"kind": kind, "target": target, "action": action}


def datastore_names() -> list[str]:
    with get_client(sync_client=True) as client:
        documents = client.read_block_documents_by_type(S3Datastore.get_block_type_slug())
    return sorted(doc.name for doc in documents)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; the catalog writes UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# --- images whose operation died -------------------------------------------------------------

def _operation_flows() -> dict[str, Flow]:
    """The image-operation flows (with their hooks) by flow name; maintenance runs are not operations."""
    from flows.launcher import deployable, registry

    flows = deployable()
    return {flows[name].name: flows[name] for name in registry()}


@task(**IO_TASK)
def images_awaiting_operations() -> list[int]:
    return [image.id for image in open_catalog().list() if rules.awaits_operation(image)]


def _last_sign_of_life(client, run: FlowRun) -> datetime:
    """The run's latest heartbeat event, else when it started."""
    since = run.start_time or run.created or _now()
    page = client.read_events(EventFilter(
        occurred=EventOccurredFilter(since=since, until=_now() + timedelta(minutes=1)),
        event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
    ), limit=1)
    beats = [event.occurred for event in page.events]
    return max([since, *beats])


_HOOKS = {
    StateType.COMPLETED: "on_completion_hooks",
    StateType.FAILED: "on_failure_hooks",
    StateType.CRASHED: "on_crashed_hooks",
    StateType.CANCELLED: "on_cancellation_hooks",
}


@task(**IO_TASK)
def settle_image(image_id: int, stale_after_seconds: int) -> Row | None:
    """An image waits on an operation: if that operation's run has ended (or its process is gone,
    judged by heartbeats), run the flow's own hooks as its process would have (resume), and if
    the image still waits, apply `rules.abandon`."""
    catalog = open_catalog()
    try:
        image = catalog.get(image_id)
    except NotFound:
        return None
    if not rules.awaits_operation(image):
        return None
    target = f"image {image.id} ({image.name}, {image.state.value})"
    age = (_now() - _utc(image.updated_at)).total_seconds() if image.updated_at else 0
    if not image.flow_run_id:
        if age < stale_after_seconds:
            return None
        return _abandon(image, target, "no flow run was recorded for its operation")

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(image.flow_run_id)
        except ObjectNotFound:
            if age < stale_after_seconds:
                return None
            return _abandon(image, target, f"its flow run {image.flow_run_id} no longer exists")
        flow_name = client.read_flow(run.flow_id).name
        flow = _operation_flows().get(flow_name)
        if flow is None:  # moved last by a maintenance run: nothing to resume
            return None
        state_type = run.state.type if run.state else None
        if state_type is StateType.RUNNING:
            last = _last_sign_of_life(client, run)
            silent = (_now() - last).total_seconds()
            if silent < stale_after_seconds:
                return None
            client.set_flow_run_state(run.id, Crashed(message=(
                f"No heartbeat for {silent:.0f}s (since {last:%Y-%m-%d %H:%M:%S}Z): the process running "
                "this flow is gone; marked crashed by reconcile.")), force=True)
            run = client.read_flow_run(run.id)
        elif state_type not in _HOOKS:
            return None  # scheduled, pending, paused: not ours to judge
        elif run.end_time and (_now() - run.end_time).total_seconds() < min(stale_after_seconds, 30):
            return None  # its own hooks may be running right now
        elif run.end_time and image.updated_at and _utc(image.updated_at) > run.end_time:
            # Moved after that run ended (a retry, a delete marked by the CLI): the run taking the
            # operation up records itself when it starts; judge only if none did in time.
            if age < stale_after_seconds:
                return None
            return _abandon(image, target, f"no flow run took up its operation within {stale_after_seconds}s")

    for hook in getattr(flow, _HOOKS[run.state.type]):
        try:
            hook(flow, run, run.state)
        except Exception:
            log.exception("hook %s of flow run %s failed", getattr(hook, "__name__", hook), run.id)
    try:
        settled = catalog.get(image_id)
    except NotFound:
        return row("stuck image", target, f"resumed: flow run {run.name} ended {run.state.type.value}, image deleted")
    if rules.awaits_operation(settled) and settled.flow_run_id == image.flow_run_id:
        return _abandon(settled, target, f"its flow run {run.name} ended {run.state.type.value}: "
                                         f"{run.state.message or 'no message'}")
    return row("stuck image", target,
               f"resumed: flow run {run.name} ended {run.state.type.value}, image now {settled.state.value}")


def _abandon(image: Image, target: str, why: str) -> Row:
    """`rules.abandon`, or for a clone target still holding its source `rules.finish_clone` on
    both rows (the source is released in the same transaction)."""
    reason = f"The operation on the image did not finish ({why})"
    catalog = open_catalog()

    def plan(read) -> list[Move]:
        current = read(image.id)
        if current is None:
            return []
        source_id = rules.held_clone_source(current)
        if source_id is not None and current.state in rules.LOCKED_STATES:
            source = read(source_id)
            target_changes, source_changes = rules.finish_clone(current, source, reason)
            moves = [Move(current, target_changes, f"reconcile: {why}")]
            if source is not None and source_changes is not None:
                moves.append(Move(source, source_changes, f"reconcile: clone to image {image.id} abandoned"))
            return moves
        return [Move(current, rules.abandon(current, reason), f"reconcile: {why}")]

    try:
        moved = catalog.transition_all(plan, flow_run_id=current_flow_run_id())
    except Refused as exc:  # someone moved it meanwhile
        return row("stuck image", target, f"left alone: {exc}")
    states = ", ".join(f"image {m.id} -> {m.state.value}" for m in moved) or "image gone"
    return row("stuck image", target, f"{why}: {states}")


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


@task(**IO_TASK)
def sweep_staging(datastore: str, ttl_hours: float) -> list[Row]:
    """Remove staged objects no image claims and abort incomplete multipart uploads, both older
    than the TTL (younger ones may be uploads in flight)."""
    store = load_datastore(datastore)
    cutoff = _now() - timedelta(hours=ttl_hours)
    referenced = _referenced(store, datastore)
    bucket, prefix = store.staging_area()
    report = []
    for obj in store.list_keys(bucket, prefix):
        uri = f"s3://{bucket}/{obj['Key']}"
        if uri not in referenced and obj["LastModified"] < cutoff:
            store.delete(store.ref(obj["Key"], bucket=bucket))
            report.append(row("staging object", uri, f"removed: no image claims it, older than {ttl_hours:g}h"))
    for area_bucket, area_prefix in {(bucket, prefix), _image_area(store)}:
        for upload in store.list_multipart_uploads(area_bucket, area_prefix):
            if upload["Initiated"] < cutoff:
                store.abort_multipart_upload(area_bucket, upload["Key"], upload["UploadId"])
                report.append(row("incomplete multipart upload", f"s3://{area_bucket}/{upload['Key']}",
                                  f"aborted: started {upload['Initiated']:%Y-%m-%d %H:%M:%S}Z"))
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
    in_staging_area = (bucket, prefix) == store.staging_area()
    for obj in store.list_keys(bucket, prefix):
        uri = f"s3://{bucket}/{obj['Key']}"
        if uri not in referenced:
            action = ("reported: no catalog row; removed as staging once older than the staging TTL"
                      if in_staging_area else "reported: no catalog row claims it (left for an administrator)")
            report.append(row("orphan object", uri, f"{action} ({human_size(obj['Size'])})"))
    for image in catalog.list(datastore=datastore):
        if not rules.holds_bytes(image) or store.exists(ObjectRef.parse(datastore, image.source)):
            continue
        try:
            moved = catalog.transition(image.id, rules.object_missing, image.source,
                                       flow_run_id=current_flow_run_id(), message="reconcile: object missing")
        except Refused as exc:
            report.append(row("missing object", image.source, f"image {image.id} left alone: {exc}"))
            continue
        report.append(row("missing object", image.source, f"image {image.id} ({image.name}) -> {moved.state.value}"))
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
        moved = open_catalog().transition(image.id, rule, argument, flow_run_id=current_flow_run_id(),
                                          message=f"scrub: {what}")
    except HcxError as exc:  # moved meanwhile (deleted, disabled, ...): not ours to judge now
        return row("scrub", target, f"{what}; left alone: {exc}")
    return row("scrub", target, f"{what} -> {moved.state.value}")
