"""Reconcile touches only what it recorded: staging records written before any staged byte, the
sweep of recorded uploads never registered after their TTL, objects nobody recorded reported and
left alone, the bytes a registered image uses kept, and the floors of the TTL and stale-run limit
(only the admin group goes below them). Reconcile runs in this process against the session's
SeaweedFS and Prefect harness, on datastores of its own (scope "objects")."""

from __future__ import annotations

import io
import json
import os
import uuid
from datetime import timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from blocks.datastore import ObjectRef, S3Datastore
from catalog.model import ImageState, PermissionDenied, utcnow
from catalog.requests import RequestedBy
from catalog.settings import STAGING_TTL_FLOOR_HOURS, STALE_RUN_FLOOR_SECONDS, Settings
from catalog.staging import open_staging, staging_records
from flows.reconcile import reconcile
from flows.upload import upload
from tasks.objects import stage_local_file

ADMIN = RequestedBy(owner="root", group="oneadmin")
ALICE = RequestedBy(owner="alice", group="users")
MODES = pytest.mark.parametrize("separate_staging", [True, False], ids=["staging-bucket", "own-bucket"])


# --- helpers ----------------------------------------------------------------------------------

def _record(name: str, store: S3Datastore, upload_id: str, *, hours_ago: float = 0.0):
    """A staging record as the CLI writes it before staging; `hours_ago` backdates it."""
    staged = store.staging_ref(upload_id)
    record = open_staging().record(upload_id=upload_id, datastore=name, bucket=staged.bucket, key=staged.key,
                                   owner="alice", group="users")
    if hours_ago:
        with open_staging().engine.begin() as conn:
            conn.execute(staging_records.update().where(staging_records.c.upload_id == upload_id)
                         .values(recorded_at=utcnow() - timedelta(hours=hours_ago)))
    return record


def _stalled_multipart(store: S3Datastore, ref: ObjectRef) -> str:
    """An incomplete multipart upload with one part at `ref` (a client that stopped, or is still sending)."""
    started = store.client().create_multipart_upload(Bucket=ref.bucket, Key=ref.key)
    store.client().upload_part(Bucket=ref.bucket, Key=ref.key, UploadId=started["UploadId"], PartNumber=1,
                               Body=b"p" * 1024)
    return started["UploadId"]


def _multiparts(store: S3Datastore, ref: ObjectRef) -> list[str]:
    return [u["UploadId"] for u in store.list_multipart_uploads(ref.bucket, ref.key) if u["Key"] == ref.key]


def _report(state) -> dict[tuple[str, str], str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    table = next(a for a in found if a.key == "reconcile-report")
    return {(r["kind"], r["target"]): r["action"] for r in json.loads(table.data)}


def _world(name: str, store: S3Datastore) -> tuple:
    """Everything reconcile could change in a datastore: objects, multipart uploads, records."""
    bucket, prefix = store.staging_area()
    objects = sorted((o["Key"], o["Size"]) for o in store.list_keys(store.bucket, "") + store.list_keys(bucket, ""))
    uploads = sorted(u["UploadId"] for b in {store.bucket, bucket} for u in store.list_multipart_uploads(b, ""))
    return objects, uploads, open_staging().list(datastore=name)


@pytest.fixture
def datastore(new_datastore):
    """A datastore of the test's own (name, block), its staging in a bucket of its own or not."""

    def make(separate_staging: bool) -> tuple[str, S3Datastore]:
        name = new_datastore(staging_bucket=separate_staging)
        return name, S3Datastore.load(name, _sync=True)

    return make


# --- the records ------------------------------------------------------------------------------

def test_staging_records_record_find_list_and_forget(stack_state):
    records = open_staging()
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    datastore = f"ds-{uuid.uuid4().hex[:8]}"
    made = records.record(upload_id=first, datastore=datastore, bucket="b", key=f"staging/{first}",
                          owner="alice", group="users")
    records.record(upload_id=second, datastore=datastore, bucket="b", key=f"staging/{second}",
                   owner="bob", group="staff")
    assert records.find(first) == made and made.uri == f"s3://b/staging/{first}"
    assert [r.upload_id for r in records.list(datastore=datastore)] == [first, second]
    assert records.list(datastore=datastore, older_than=made.recorded_at) == []

    again = records.record(upload_id=first, datastore=datastore, bucket="b", key=f"staging/{first}",
                           owner="carol", group="users")  # a retry staging it again restarts its clock
    assert again.recorded_at > made.recorded_at and records.find(first) == again
    assert records.forget(first, recorded_at=made.recorded_at) is False  # recorded again since: kept
    assert records.find(first) == again
    assert records.forget(first) is True and records.find(first) is None
    assert records.forget(first) is False
    assert [r.upload_id for r in records.list(datastore=datastore)] == [second]


def test_a_flow_staging_a_path_records_it_first_and_forgets_it_once_adopted(stack_state, datastore, tmp_path,
                                                                          make_request, unique_name, catalog):
    name, store = datastore(True)
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(1024 * 1024 + 7))
    upload_id = uuid.uuid4().hex
    staged = stage_local_file.fn(str(path), name, upload_id, owner="alice", group="users")
    record = open_staging().find(upload_id)
    assert (record.datastore, record.uri, record.owner, record.group) == (name, staged, "alice", "users")
    assert store.exists(ObjectRef.parse(name, staged))

    image_id = upload(make_request(unique_name("rec"), path=str(path), datastore=name, upload_id=upload_id))
    assert catalog.get(image_id).state is ImageState.READY
    assert open_staging().find(upload_id) is None  # the staged bytes are copied and deleted: forgotten
    assert not store.exists(ObjectRef.parse(name, staged))


def test_cli_create_records_before_staging_and_forgets_a_refused_upload(cli, new_datastore, cuttable_proxy,
                                                                         raw_file, unique_name, catalog):
    """S3 refuses the staged bytes: the command says so, exits 1, and leaves no object and no record."""
    name = new_datastore(cuttable_proxy.endpoint)
    store = S3Datastore.load(name, _sync=True)
    rows = catalog.list()
    cuttable_proxy.deny(rb"\APUT ")
    result = cli("create", "--name", unique_name(), "--type", "DATABLOCK", "--path", raw_file, "--datastore", name)
    cuttable_proxy.deny(None)
    assert result.exit_code == 1 and cuttable_proxy.denied >= 1
    assert "AccessDenied" in result.stderr
    assert _world(name, store) == ([], [], []) and catalog.list() == rows


def test_cli_create_whose_cleanup_fails_leaves_its_record_for_reconcile(cli, new_datastore, cuttable_proxy,
                                                                        raw_file, unique_name):
    """The record is written before the first byte: when neither the upload nor its cleanup gets
    through, it stays, and reconcile (admin, TTL 0) forgets it once nothing of it is left."""
    name = new_datastore(cuttable_proxy.endpoint)
    store = S3Datastore.load(name, _sync=True)
    cuttable_proxy.deny(rb"\A(PUT|DELETE) ")
    result = cli("create", "--name", unique_name(), "--type", "DATABLOCK", "--path", raw_file, "--datastore", name)
    cuttable_proxy.deny(None)
    assert result.exit_code == 1
    [left] = open_staging().list(datastore=name)
    assert (left.owner, left.group, left.uri) == ("alice", "users", str(store.staging_ref(left.upload_id)))

    state = reconcile(scope="objects", staging_ttl_hours=0, datastores=[name], requested_by=ADMIN,
                      return_state=True)
    assert state.is_completed(), state.message
    assert open_staging().list(datastore=name) == []
    assert _report(state)[("staged upload", left.uri)].startswith("removed: recorded by alice (users)")


# --- what reconcile removes and what it leaves --------------------------------------------------

@MODES
def test_admin_ttl_zero_sweeps_recorded_uploads_and_leaves_what_nobody_recorded(datastore, separate_staging):
    name, store = datastore(separate_staging)
    foreign = store.staging_ref(f"other-tool-{uuid.uuid4().hex}")  # dropped there by another tool
    store.upload(io.BytesIO(b"not ours" * 512), foreign)
    foreign_part = store.staging_ref(f"other-tool-{uuid.uuid4().hex}")
    foreign_multipart = _stalled_multipart(store, foreign_part)

    abandoned = uuid.uuid4().hex  # recorded by a client that staged, then died before registering
    _record(name, store, abandoned, hours_ago=2)
    abandoned_ref = store.staging_ref(abandoned)
    store.upload(io.BytesIO(b"staged, never registered" * 512), abandoned_ref)
    _stalled_multipart(store, abandoned_ref)

    state = reconcile(scope="objects", staging_ttl_hours=0, datastores=[name], requested_by=ADMIN,
                      return_state=True)
    assert state.is_completed(), state.message

    assert not store.exists(abandoned_ref) and _multiparts(store, abandoned_ref) == []
    assert open_staging().find(abandoned) is None
    assert store.exists(foreign) and _multiparts(store, foreign_part) == [foreign_multipart]
    report = _report(state)
    assert report[("staged upload", str(abandoned_ref))].startswith("removed: recorded by alice (users)")
    assert "1 incomplete multipart upload(s) aborted" in report[("staged upload", str(abandoned_ref))]
    assert report[("staging object", str(foreign))].startswith("left alone: no staging record or image knows it")
    assert report[("incomplete multipart upload", str(foreign_part))].startswith("left alone")


def test_young_recorded_uploads_are_in_flight_and_kept_old_empty_records_go(datastore):
    name, store = datastore(True)
    sending = uuid.uuid4().hex  # recorded now, its multipart upload still receiving parts
    _record(name, store, sending)
    sending_ref = store.staging_ref(sending)
    in_flight = _stalled_multipart(store, sending_ref)
    staged = uuid.uuid4().hex  # recorded now, staged, its flow about to register it
    _record(name, store, staged)
    store.upload(io.BytesIO(b"about to be registered" * 512), store.staging_ref(staged))
    died = uuid.uuid4().hex  # recorded 2 h ago by a client that died before its first byte
    _record(name, store, died, hours_ago=STAGING_TTL_FLOOR_HOURS + 1)

    # at the floor: a non-admin may ask for it
    state = reconcile(scope="objects", staging_ttl_hours=STAGING_TTL_FLOOR_HOURS, datastores=[name],
                      requested_by=ALICE, return_state=True)
    assert state.is_completed(), state.message

    assert _multiparts(store, sending_ref) == [in_flight] and open_staging().find(sending) is not None
    assert store.exists(store.staging_ref(staged)) and open_staging().find(staged) is not None
    assert open_staging().find(died) is None
    report = _report(state)
    assert report[("staged upload", str(sending_ref))].startswith("kept: in flight")
    assert report[("staged upload", str(store.staging_ref(staged)))].startswith("kept: in flight")
    assert report[("staged upload", str(store.staging_ref(died)))].startswith("removed: recorded by alice")


def test_registered_images_keep_their_bytes_and_leftovers_of_settled_ones_go(datastore, put_image, catalog):
    name, store = datastore(True)
    kept_id = uuid.uuid4().hex  # ERROR with its staged bytes as source: `retry` reuses them
    kept = put_image(ImageState.ERROR, datastore=name, upload_id=kept_id, source=str(store.staging_ref(kept_id)))
    store.upload(io.BytesIO(b"for retry" * 512), store.staging_ref(kept_id))
    done_id = uuid.uuid4().hex  # READY, copied; its staged bytes stayed when the cleanup step failed
    done = put_image(ImageState.READY, datastore=name, upload_id=done_id, source=str(store.image_ref(done_id)))
    store.upload(io.BytesIO(b"copied" * 512), store.image_ref(done_id))
    store.upload(io.BytesIO(b"copied" * 512), store.staging_ref(done_id))
    busy_id = uuid.uuid4().hex  # LOCKED: its copy is running
    put_image(ImageState.LOCKED, datastore=name, upload_id=busy_id, source=str(store.staging_ref(busy_id)))
    busy_copy = _stalled_multipart(store, store.image_ref(busy_id))
    failed_id = uuid.uuid4().hex  # ERROR, its copy stopped half way
    put_image(ImageState.ERROR, datastore=name, upload_id=failed_id, source=None)
    _stalled_multipart(store, store.image_ref(failed_id))

    state = reconcile(scope="objects", staging_ttl_hours=0, datastores=[name], requested_by=ADMIN,
                      return_state=True)
    assert state.is_completed(), state.message

    assert store.exists(store.staging_ref(kept_id)) and store.exists(store.image_ref(done_id))
    assert not store.exists(store.staging_ref(done_id))
    assert _multiparts(store, store.image_ref(busy_id)) == [busy_copy]
    assert _multiparts(store, store.image_ref(failed_id)) == []
    report = _report(state)
    assert report[("staging object", str(store.staging_ref(done_id)))] == \
        f"removed: staged for image {done.id} (READY), which does not use it, older than 0h"
    assert report[("incomplete multipart upload", str(store.image_ref(failed_id)))].startswith("aborted")
    assert ("staging object", str(store.staging_ref(kept_id))) not in report
    assert catalog.get(kept.id) == kept and catalog.get(done.id) == done


# --- the floors -------------------------------------------------------------------------------

@pytest.mark.parametrize("limits, refused", [
    ({"staging_ttl_hours": 0}, "a staging TTL of 0h is below the floor of 1h"),
    ({"staging_ttl_hours": STAGING_TTL_FLOOR_HOURS / 2}, "a staging TTL of 0.5h is below the floor of 1h"),
    ({"stale_after_seconds": 5}, f"a stale-run limit of 5s is below the floor of {STALE_RUN_FLOOR_SECONDS}s"),
])
@pytest.mark.parametrize("requested_by", [ALICE, None], ids=["non-admin", "nobody"])
def test_below_the_floors_only_for_the_admin_group(datastore, catalog, limits, refused, requested_by):
    name, store = datastore(True)
    old = uuid.uuid4().hex
    _record(name, store, old, hours_ago=2)
    store.upload(io.BytesIO(b"old" * 512), store.staging_ref(old))
    sending = uuid.uuid4().hex
    _record(name, store, sending)
    _stalled_multipart(store, store.staging_ref(sending))
    before, rows = _world(name, store), catalog.list()

    with pytest.raises(PermissionDenied) as refusal:
        reconcile(scope="objects", datastores=[name], requested_by=requested_by, **limits)
    assert refused in str(refusal.value)
    assert "Reconcile refused, nothing was done" in str(refusal.value)
    assert "Only the oneadmin group may go below the floors" in str(refusal.value)
    assert _world(name, store) == before and catalog.list() == rows


def test_cli_reconcile_is_refused_for_a_user(cli, datastore):
    """Maintenance runs touch everyone's uploads: through the image API they are for administrators
    (who may also go below the floors); a user's asking starts nothing and changes nothing."""
    name, store = datastore(True)
    sending = uuid.uuid4().hex
    _record(name, store, sending)
    _stalled_multipart(store, store.staging_ref(sending))
    before = _world(name, store)

    result = cli("reconcile", "--ttl-hours", "0", "--wait")
    assert result.exit_code == 1
    assert "User alice is not an administrator" in result.stderr
    assert "FLOW RUN" not in result.stdout
    assert _world(name, store) == before


def test_settings_cannot_set_a_ttl_below_the_floor():
    with pytest.raises(ValueError, match="staging_ttl_hours"):
        Settings(staging_ttl_hours=STAGING_TTL_FLOOR_HOURS / 4)

