"""Image snapshots against the real SeaweedFS, Prefect harness and catalogs: each operation through
its flow (objects listed in the bucket, rows, counters, history), each refusal leaving nothing
changed, a failed copy leaving no row and no object, the seed's flatten-then-clone story, quotas and
capacity counting snapshot bytes (raced on PostgreSQL), what a crashed run leaves settled by its
own hooks, and the verbs through the CLI and the API."""

from __future__ import annotations

import functools
import hashlib
import json

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Crashed

from blocks.datastore import ObjectRef, load_datastore
from catalog import operations, snapshots
from catalog.identity import Directory
from catalog.model import ImageState, ImageType, NotFound, PermissionDenied, QuotaSubject, Refused, SubjectKind
from catalog.permissions import Actor
from catalog.quotas import set_quota
from catalog.requests import CloneRequest, DeleteRequest
from catalog.snapshots import Change, SnapshotRequest, SnapshotState, snapshots_of
from catalog.store import Catalog
from flows.clone import clone
from flows.delete import delete
from flows.launcher import deployable
from flows.settle import settle_run
from flows.snapshot import snapshot_create, snapshot_delete, snapshot_flatten, snapshot_revert
from tasks import transfer
from tasks.maintenance import audit_objects
from tasks.snapshots import settle_failed_run
from tests.conftest import ALICE, BOB, all_at_once, flow_run_artifacts, recent_events, register_image

S = ImageState


def request(image_id: int, snapshot: str | int, actor: Actor = ALICE) -> SnapshotRequest:
    return SnapshotRequest(owner=actor.user, image_id=image_id, snapshot=str(snapshot))


def snapshot_keys(image) -> list[str]:
    """The objects in the image's snapshot area, listed from the bucket."""
    store = load_datastore(image.datastore)
    bucket, prefix = store.snapshot_area(image.id)
    return sorted(o["Key"] for o in store.list_keys(bucket, prefix))


def holds(image_or_snapshot, datastore: str, uri: str) -> bool:
    """The object re-hashes to the recorded sha256 (read back from the store)."""
    store = load_datastore(datastore)
    return transfer.matches(store, ObjectRef.parse(datastore, uri), size=image_or_snapshot.size,
                            sha256=image_or_snapshot.sha256)


def overwrite_object(image, data: bytes) -> None:
    """Other bytes at the image's object, behind the catalog's back (its recorded ETag goes stale)."""
    store = load_datastore(image.datastore)
    ref = ObjectRef.parse(image.datastore, image.source)
    store.client().put_object(Bucket=ref.bucket, Key=ref.key, Body=data)


def written_by_a_vm(catalog: Catalog, image, data: bytes):
    """New bytes in the image's object, recorded as its content: what a VM using a persistent image
    leaves behind (VMs are not part of this module)."""
    overwrite_object(image, data)
    etag = load_datastore(image.datastore).head(ObjectRef.parse(image.datastore, image.source)).etag
    return catalog.transition(image.id, lambda i: {"state": i.state, "sha256": hashlib.sha256(data).hexdigest(),
                                                   "size": len(data), "source_etag": etag},
                              message="written by a VM (test)")


def everything(catalog: Catalog, image) -> tuple:
    """What a refusal must leave as it was: the image row, its history, its snapshot rows, its
    snapshot objects, and the datastore's bytes in use."""
    return (catalog.get(image.id), catalog.history(image.id), snapshots_of(catalog, image.id), snapshot_keys(image),
            catalog.used_bytes(image.datastore))


def test_snapshot_story_revert_delete_flatten_then_clone(catalog, ready_image, unique_name):
    """The seed's story on a persistent image: with snapshots it can be neither cloned nor made
    non-persistent; revert gives it a snapshot's sha256; delete and flatten leave no object; after
    flatten it clones."""
    image = ready_image(persistent=True, size=256 * 1024 + 7)
    original = image.sha256

    assert snapshot_create(request(image.id, "first")) == 0
    first = snapshots_of(catalog, image.id)[0]
    after = catalog.get(image.id)
    assert (after.state, after.snapshots, after.error, after.sha256) == (S.READY, 1, None, original)
    assert (first.state, first.sha256, first.size, first.parent, first.active) == (
        SnapshotState.READY, original, image.size, None, True)
    assert holds(first, image.datastore, first.object) and first.object != image.source
    assert [h["to_state"] for h in catalog.history(image.id)][-2:] == ["LOCKED", "READY"]

    changed = written_by_a_vm(catalog, after, b"changed by a VM " * 4096)
    assert snapshot_create(request(image.id, "second")) == 1
    second = snapshots_of(catalog, image.id)[1]
    assert (second.sha256, second.size, second.parent) == (changed.sha256, 65536, 0)
    assert holds(second, image.datastore, second.object)
    assert catalog.get(image.id).snapshots == 2

    clone_request = CloneRequest(owner="alice", source_id=image.id, name=unique_name("copy"))
    before = everything(catalog, image)
    with pytest.raises(Refused, match=f"Cannot clone image {image.id}: it is persistent and has snapshots; "
                                      "flatten it first"):
        clone(clone_request)
    with pytest.raises(Refused, match=f"Cannot make image {image.id} non-persistent: it has snapshots; flatten it"):
        operations.set_persistent(catalog, ALICE, image.id, False)
    assert everything(catalog, image) == before and catalog.name_owner("alice", clone_request.name) is None

    assert snapshot_revert(request(image.id, "first")) == 0  # by name
    reverted = catalog.get(image.id)
    assert (reverted.state, reverted.sha256, reverted.size, reverted.snapshots) == (S.READY, original, image.size, 2)
    assert reverted.source == changed.source and holds(reverted, image.datastore, reverted.source)
    assert [s.active for s in snapshots_of(catalog, image.id)] == [True, False]

    assert snapshot_delete(request(image.id, 1)) == 1  # by number
    assert [s.number for s in snapshots_of(catalog, image.id)] == [0]
    assert snapshot_keys(image) == [ObjectRef.parse(image.datastore, first.object).key]
    assert catalog.get(image.id).snapshots == 1

    snapshot_flatten(request(image.id, "first"))
    flat = catalog.get(image.id)
    assert (flat.state, flat.snapshots, flat.sha256, flat.persistent) == (S.READY, 0, original, True)
    assert snapshots_of(catalog, image.id) == [] and snapshot_keys(image) == []
    assert holds(flat, image.datastore, flat.source)

    copy = catalog.get(clone(clone_request))
    assert (copy.state, copy.sha256) == (S.READY, original)
    assert catalog.get(image.id).state is S.READY
    operations.set_persistent(catalog, ALICE, image.id, False)  # and the toggle works again


def test_flatten_to_an_older_snapshot_and_delete_image_with_snapshots(catalog, ready_image):
    """Flatten to a snapshot that is not the image's content: the image takes its bytes, every
    snapshot goes. Deleting an image removes its snapshot objects with its own."""
    image = ready_image(size=128 * 1024)
    snapshot_create(request(image.id, "base"))
    written_by_a_vm(catalog, image, b"x" * 1000)
    snapshot_create(request(image.id, "later"))
    base = snapshots_of(catalog, image.id)[0]
    snapshot_flatten(request(image.id, "base"))
    flat = catalog.get(image.id)
    assert (flat.sha256, flat.size, flat.snapshots) == (base.sha256, base.size, 0)
    assert holds(flat, image.datastore, flat.source) and snapshot_keys(image) == []

    snapshot_create(request(image.id, "one"))
    snapshot_create(request(image.id, "two"))
    assert len(snapshot_keys(image)) == 2
    assert [s.number for s in snapshots_of(catalog, image.id)] == [2, 3]  # numbers are never given again
    delete(DeleteRequest(owner="alice", image_id=image.id))
    assert catalog.find(image.id) is None
    assert snapshot_keys(image) == [] and snapshots_of(catalog, image.id) == []


def test_a_failed_copy_leaves_no_row_no_object_and_the_image_ready_with_the_error(catalog, ready_image):
    """The image object changed behind the catalog's back: the copy pinned to the recorded ETag is
    refused by the store, and the failure hook removes the row it made; the image is READY again."""
    image = ready_image(size=64 * 1024)
    overwrite_object(image, b"not what the catalog recorded")
    before = catalog.used_bytes(image.datastore)
    state = deployable()["snapshot-create"](request(image.id, "doomed"), return_state=True)  # with its reporting
    assert state.is_failed() and "changed since it was inspected" in state.message
    after = catalog.get(image.id)
    assert (after.state, after.snapshots, after.flow_run_id is not None) == (S.READY, 0, True)
    assert "changed since it was inspected" in after.error
    assert snapshots_of(catalog, image.id) == [] and snapshot_keys(image) == []
    assert catalog.used_bytes(image.datastore) == before
    assert [h["to_state"] for h in catalog.history(image.id)][-2:] == ["LOCKED", "READY"]
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
    table = next(json.loads(a.data) for a in artifacts if a.key == "snapshot-create-images")
    assert [(r["id"], r["state"]) for r in table] == [(image.id, "READY")] and "changed since" in table[0]["error"]
    assert "changed since it was inspected" in next(a.data for a in artifacts if a.key == "snapshot-create-failure")
    assert any(a.type == "progress" for a in artifacts)  # the copy's progress
    assert recent_events("hcx.image.ready", f"hcx.image.{image.id}")


def test_refused_snapshot_flows_change_nothing(catalog, ready_image):
    """Refusals from the flows themselves (the API refuses earlier with the same words; every refusal
    is checked at catalog level below)."""
    image = ready_image(size=32 * 1024)
    snapshot_create(request(image.id, "kept"))
    operations.disable(catalog, ALICE, image.id)
    disabled = catalog.get(image.id)
    cases = [
        (lambda: snapshot_create(request(image.id, "more")), f"Cannot take a snapshot of image {image.id}, it is in "
                                                             "state DISABLED"),
        (lambda: snapshot_flatten(request(image.id, "kept", BOB)), f"Image {image.id} does not exist"),
    ]
    for run, message in cases:
        before = everything(catalog, disabled)
        with pytest.raises(Refused, match=message):
            run()
        assert everything(catalog, disabled) == before
    operations.enable(catalog, ALICE, image.id)
    before = everything(catalog, image)
    with pytest.raises(Refused, match="has no snapshot 'nothing'"):
        snapshot_delete(request(image.id, "nothing"))
    assert everything(catalog, image) == before


# --- catalog level, SQLite and PostgreSQL: refusals, accounting, races -----------------------------

OWNER = Actor(user="alice", group="users")
OTHER = Actor(user="bob", group="staff")
ADMIN = Actor(user="oneadmin", group="oneadmin", is_admin=True)
URI = "s3://hcx-images/snapshots/image-{}/{}"


@pytest.fixture
def directory(fresh_catalog) -> Directory:
    found = Directory(fresh_catalog.engine)
    found.add_group("staff")
    found.add_user("alice")
    found.add_user("bob", groups=["staff"])
    return found


def take(catalog: Catalog, image, name: str, *, run: str | None = None, limit: int | None = None, actor=OWNER):
    """Create a snapshot at catalog level (the rows, no object): begin, then finish."""
    run = run or f"run-{name}"
    made = snapshots.begin_create(catalog, actor, image.id, name, object_uri=URI.format(image.id, run),
                                  limit_bytes=limit, run_id=run)
    snapshots.finish_create(catalog, image.id, etag='"e"', run_id=run)
    return made


def test_refusals_name_the_rule_and_change_nothing(fresh_catalog, directory):
    catalog = fresh_catalog
    image = register_image(catalog, "disk", actor=OWNER, size=1000, sha256="a" * 64)
    take(catalog, image, "kept")
    cdrom = register_image(catalog, "iso", actor=OWNER, size=10, type_=ImageType.CDROM)
    disabled = operations.disable(catalog, OWNER, register_image(catalog, "off", actor=OWNER, size=10).id)
    shared = operations.chmod(catalog, OWNER, register_image(catalog, "shared", actor=OWNER, size=10).id, 0o604)
    set_quota(catalog, directory, QuotaSubject(SubjectKind.USER, "alice"), max_bytes=2500)
    cases = [
        (image, lambda: snapshots.check_create(catalog, OWNER, image.id, "kept", limit_bytes=None),
         Refused, f"Image {image.id} already has a snapshot named 'kept' (number 0)"),
        (image, lambda: take(catalog, image, "42"), Refused, "Invalid snapshot name '42'"),
        (image, lambda: take(catalog, image, "a/b"), Refused, "cannot contain '/'"),
        (cdrom, lambda: take(catalog, cdrom, "s"), Refused, f"Cannot take a snapshot of image {cdrom.id}: it is a CDROM"),
        (disabled, lambda: take(catalog, disabled, "s"), Refused, "it is in state DISABLED"),
        (image, lambda: snapshots.begin_change(catalog, OWNER, image.id, "9", Change.REVERT, run_id="r"),
         NotFound, f"Image {image.id} has no snapshot '9'"),
        (shared, lambda: take(catalog, shared, "s", actor=OTHER), PermissionDenied,
         f"User bob has no MANAGE right on image {shared.id}"),
        (image, lambda: snapshots.begin_change(catalog, OTHER, image.id, "kept", Change.FLATTEN, run_id="r"),
         NotFound, f"Image {image.id} does not exist"),
        (image, lambda: snapshots.list_snapshots(catalog, OTHER, image.id), NotFound, f"Image {image.id} does not exist"),
        (image, lambda: take(catalog, image, "over-quota"), Refused,
         "Quota of user alice on all datastores: at most 2.4K (2500 bytes), 2K used, 470B (470 bytes) left, and "
         f"snapshot 'over-quota' of image {image.id} needs"),
        (image, lambda: snapshots.check_create(catalog, OWNER, image.id, "too-big", limit_bytes=2500), Refused,
         f"Datastore default has no room for snapshot 'too-big' of image {image.id}"),
        (image, lambda: take(catalog, image, "too-big", limit=2500), Refused, "Datastore default has no room"),
    ]
    for target, action, kind, message in cases:
        before = (catalog.list(), [catalog.history(i.id) for i in catalog.list()], snapshots_of(catalog, target.id),
                  catalog.used_bytes("default"))
        with pytest.raises(kind) as caught:
            action()
        assert message in str(caught.value)
        assert (catalog.list(), [catalog.history(i.id) for i in catalog.list()], snapshots_of(catalog, target.id),
                catalog.used_bytes("default")) == before
    assert shared.permissions == 0o604 and snapshots.list_snapshots(catalog, OTHER, shared.id) == []


def test_snapshot_bytes_count_until_deleted_or_flattened(fresh_catalog, directory):
    catalog = fresh_catalog
    alice = QuotaSubject(SubjectKind.USER, "alice")
    image = register_image(catalog, "disk", actor=OWNER, size=1000, sha256="a" * 64, persistent=True)
    for name in ("one", "two", "three"):
        take(catalog, image, name)
    assert (catalog.used_bytes("default"), catalog.usage(alice).bytes, catalog.usage(alice).images) == (4000, 4000, 1)
    assert catalog.get(image.id).snapshots == 3
    with pytest.raises(Refused, match="persistent and has snapshots"):
        operations.check_clone(catalog, OWNER, CloneRequest(owner="alice", source_id=image.id, name="c"),
                               limit_bytes=None)
    with pytest.raises(Refused, match="CDROMs have none"):
        operations.change_type(catalog, OWNER, image.id, ImageType.CDROM)

    snapshots.begin_change(catalog, OWNER, image.id, "two", Change.DELETE, run_id="del")
    snapshots.finish_delete(catalog, image.id, 1, run_id="del")
    assert [(s.number, s.parent) for s in snapshots_of(catalog, image.id)] == [(0, None), (2, 0)]  # took its parent
    assert (catalog.used_bytes("default"), catalog.get(image.id).snapshots) == (3000, 2)

    snapshots.begin_change(catalog, OWNER, image.id, "0", Change.FLATTEN, run_id="flat")
    snapshots.finish_flatten(catalog, image.id, 0, run_id="flat")
    assert (catalog.used_bytes("default"), catalog.usage(alice).bytes, catalog.get(image.id).snapshots) == (1000, 1000, 0)
    operations.set_persistent(catalog, OWNER, image.id, False)

    take(catalog, image, "full")  # then the image shrinks to 100 bytes: reverting to "full" grows it by 900
    catalog.transition(image.id, lambda i: {"state": i.state, "size": 100}, message="written by a VM (test)")
    set_quota(catalog, directory, alice, max_bytes=1500)
    for action in (lambda: snapshots.check_change(catalog, OWNER, image.id, "full", Change.REVERT, limit_bytes=None),
                   lambda: snapshots.begin_change(catalog, OWNER, image.id, "full", Change.REVERT, run_id="grow"),
                   lambda: snapshots.begin_change(catalog, ADMIN, image.id, "full", Change.REVERT, limit_bytes=1500,
                                                  run_id="grow")):
        before = catalog.get(image.id), catalog.history(image.id), catalog.usage(alice)
        with pytest.raises(Refused) as caught:
            action()
        assert f"image {image.id} reverted to snapshot 3 (full)" in str(caught.value) and "900B" in str(caught.value)
        assert (catalog.get(image.id), catalog.history(image.id), catalog.usage(alice)) == before
    set_quota(catalog, directory, alice, max_bytes=2000)
    assert snapshots.begin_change(catalog, OWNER, image.id, "full", Change.REVERT, run_id="grow").number == 3


def test_racing_snapshots_never_overrun_a_quota_nor_lock_an_image_twice(pg_catalog):
    """On PostgreSQL, 5 rounds: 12 snapshots of 12 images (on 4 datastores) at once under a quota with
    room for 4 -> exactly 4 taken; 20 snapshots of one image at once -> exactly one takes its lock."""
    catalog = pg_catalog
    directory = Directory(catalog.engine)
    for round_ in range(5):
        owner = Actor(user=f"racer{round_}", group="users")
        subject = QuotaSubject(SubjectKind.USER, owner.user)
        directory.add_user(owner.user)
        images = [register_image(catalog, f"disk{n}", actor=owner, size=1000, sha256="a" * 64,
                                 datastore=f"ds{n % 4}") for n in range(12)]  # the quota's lock, not a datastore's
        set_quota(catalog, directory, subject, max_bytes=16_000)
        outcomes = all_at_once([functools.partial(take, catalog, image, "s", run=f"run-{image.id}", actor=owner)
                                for image in images])
        taken = [o for o in outcomes if not isinstance(o, Exception)]
        assert len(taken) == 4, outcomes
        assert all(isinstance(o, Refused) and f"Quota of user {owner.user}" in str(o)
                   for o in outcomes if o not in taken)
        assert catalog.usage(subject).bytes == 16_000
        assert sum(catalog.get(i.id).snapshots for i in images) == 4

        free = next(i for i in images if catalog.get(i.id).snapshots == 0)
        set_quota(catalog, directory, subject)  # no limit
        outcomes = all_at_once([functools.partial(snapshots.begin_create, catalog, owner, free.id, f"s{n}",
                                                  object_uri=URI.format(free.id, n), limit_bytes=None,
                                                  run_id=f"r{round_}-{n}") for n in range(20)])
        won = [o for o in outcomes if not isinstance(o, Exception)]
        assert len(won) == 1, outcomes
        assert all(isinstance(o, Refused) and "it is in state LOCKED" in str(o) for o in outcomes if o not in won)
        assert [s.state for s in snapshots_of(catalog, free.id)] == [SnapshotState.CREATING]
        assert catalog.get(free.id).flow_run_id == won[0].flow_run_id


# --- through the image API and the CLI ----------------------------------------------------------

def test_snapshot_verbs_through_the_cli_and_the_api(cli, api_as, ready_image, catalog):
    image = ready_image(size=48 * 1024)
    created = cli("snapshot-create", image.id, "before-upgrade", "--wait")
    assert created.exit_code == 0, created.stderr
    assert f"image {image.id} is READY with 1 snapshot(s)" in created.stdout
    listed = json.loads(cli("snapshot-list", image.id, "--json").stdout)
    assert [(s["number"], s["name"], s["sha256"], s["state"]) for s in listed] == [
        (0, "before-upgrade", image.sha256, "READY")]
    table = cli("snapshot-list", image.id).stdout.splitlines()
    assert table[0].split() == ["NUM", "NAME", "PARENT", "ACTIVE", "SIZE", "TIME", "SHA256", "STATE"]
    assert table[1].split()[:4] == ["0", "before-upgrade", "-", "*"]

    again = cli("snapshot-create", image.id, "before-upgrade")
    assert again.exit_code == 1 and "already has a snapshot named 'before-upgrade'" in again.stderr
    hidden = cli("snapshot-list", image.id, user="bob")
    assert hidden.exit_code == 1 and f"Image {image.id} does not exist" in hidden.stderr
    unknown = cli("snapshot-flatten", image.id, "nope")
    assert unknown.exit_code == 1 and "has no snapshot 'nope'" in unknown.stderr

    operations.chmod(catalog, ALICE, image.id, 0o604)  # bob may USE, not MANAGE
    answer = api_as("bob").post(f"/images/{image.id}/snapshots", json={"name": "mine"})
    assert answer.status_code == 403 and "no MANAGE right" in answer.json()["detail"]
    assert api_as("bob").get(f"/images/{image.id}/snapshots").status_code == 200
    assert api_as("alice").post(f"/images/{image.id}/snapshots", json={"name": "7"}).status_code == 422

    assert cli("snapshot-create", image.id, "scratch", "--wait").exit_code == 0
    deleted = cli("snapshot-delete", image.id, "scratch", "--wait")
    assert deleted.exit_code == 0 and f"image {image.id} is READY with 1 snapshot(s)" in deleted.stdout
    reverted = cli("snapshot-revert", image.id, "0", "--wait")
    assert reverted.exit_code == 0, reverted.stderr
    flattened = cli("snapshot-flatten", image.id, "before-upgrade", "--wait")
    assert flattened.exit_code == 0 and f"image {image.id} is READY with 0 snapshot(s)" in flattened.stdout
    assert snapshot_keys(image) == [] and catalog.get(image.id).sha256 == image.sha256


def test_steps_run_again_change_nothing_and_a_dead_run_is_settled(catalog, ready_image):
    """What a crash leaves is made whole by the failure hook (reconcile runs it for a dead run):
    a step run twice charges once; a snapshot copied but never finished is removed, object and
    row; a revert that already overwrote the image object is recorded as such."""
    image = ready_image(size=40 * 1024)
    store = load_datastore(image.datastore)
    used = catalog.used_bytes(image.datastore)
    with get_client(sync_client=True) as client:  # a run of the deployment's flow, lost half-way
        run = client.create_flow_run(deployable()["snapshot-create"],
                                     parameters={"request": request(image.id, "half").model_dump(mode="json")})
        run_id = str(run.id)
        ref = store.snapshot_ref(image.id, run_id)
        begin = functools.partial(snapshots.begin_create, catalog, ALICE, image.id, "half", object_uri=str(ref),
                                  limit_bytes=None, run_id=run_id)
        assert begin() == begin()  # a retried step finds its row: one row, charged once
        assert catalog.used_bytes(image.datastore) == used + image.size
        store.server_copy(ObjectRef.parse(image.datastore, image.source), ref, if_match=image.source_etag,
                          size=image.size)
        client.set_flow_run_state(run.id, Crashed(message="the worker was lost"), force=True)
    settle_run.fn(run_id)  # what the crash automation's reconcile does: the run's own crash hooks
    after = catalog.get(image.id)
    assert (after.state, after.snapshots, after.error.endswith("the worker was lost")) == (S.READY, 0, True)
    assert snapshots_of(catalog, image.id) == [] and snapshot_keys(image) == []
    assert catalog.used_bytes(image.datastore) == used
    settle_run.fn(run_id)  # settled again: nothing changes
    assert catalog.get(image.id) == after

    snapshot_create(request(image.id, "kept"))
    kept = snapshots_of(catalog, image.id)[0]
    vm_written = written_by_a_vm(catalog, catalog.get(image.id), b"new content" * 100)
    snapshots.begin_change(catalog, ALICE, image.id, "kept", Change.REVERT, run_id="revert-run")
    store.server_copy(ObjectRef.parse(kept.datastore, kept.object), ObjectRef.parse(image.datastore, image.source),
                      if_match=kept.etag, size=kept.size)  # copied over the image, then the process died
    settle_failed_run(image.id, "revert-run", "its process died", copying_from="kept")
    reverted = catalog.get(image.id)
    assert (reverted.state, reverted.sha256, reverted.size, reverted.snapshots) == (S.READY, kept.sha256, kept.size, 1)
    assert reverted.source_etag != vm_written.source_etag and holds(reverted, image.datastore, reverted.source)


def test_reconcile_audit_reports_orphan_and_missing_snapshot_objects(catalog, ready_image, new_datastore):
    """Reported, never deleted nor moved: an object in the snapshot area no row claims, and a
    snapshot whose object went missing behind the catalog's back."""
    datastore = new_datastore()
    image = ready_image(datastore=datastore, size=16 * 1024)
    snapshot_create(request(image.id, "lost"))
    lost = snapshots_of(catalog, image.id)[0]
    store = load_datastore(datastore)
    store.delete(ObjectRef.parse(datastore, lost.object))
    stray = store.snapshot_ref(image.id, "left-by-someone")
    store.client().put_object(Bucket=stray.bucket, Key=stray.key, Body=b"stray")
    report = {(r["kind"], r["target"]): r["action"] for r in audit_objects.fn(datastore)}
    assert report[("orphan snapshot object", str(stray))].startswith("reported: no snapshot row claims it")
    assert f"`hcx-image snapshot-delete {image.id} 0` drops it" in report[("missing snapshot object", lost.object)]
    assert store.exists(stray) and snapshots_of(catalog, image.id) == [lost]
