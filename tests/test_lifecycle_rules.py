"""The rules of image-rules.md the state matrix does not reach: variants of a state (persistence,
snapshots, counters, type), rights, names, capacity, and the clone bookkeeping between a source and
its clones. Catalog level, real SQLite; every refusal changes nothing."""

from __future__ import annotations

import functools
import uuid

import pytest

from catalog import operations, rules
from catalog.model import ImageState, ImageType, NotFound, PermissionDenied, Refused
from catalog.requests import CloneRequest
from tests.conftest import ADMIN, ALICE, BOB, all_at_once, catalog_snapshot, register_image

S = ImageState


def copy_done(catalog, target_id: int):
    """The clone's bytes are in place (as the flow records them), then the clone ends in success."""
    catalog.transition(target_id, rules.record, source=f"s3://hcx-images/images/clone-{target_id}")
    return operations.finish_clone(catalog, target_id, run_id=None, error=None)


@pytest.fixture
def refused(catalog):
    """Run `action`, expect a refusal containing `message`, and prove nothing changed."""

    def check(action, message: str, exc_type: type[Exception] = Refused):
        before = catalog_snapshot(catalog)
        with pytest.raises(exc_type) as caught:
            action()
        assert message in str(caught.value)
        assert catalog_snapshot(catalog) == before

    return check


def begin_clone(catalog, source_id: int, *, actor=ALICE, name: str | None = None, **request):
    name = name or f"clone-{uuid.uuid4().hex[:8]}"
    req = CloneRequest(owner=actor.user, source_id=source_id, name=name, **request)
    return operations.begin_clone(catalog, actor, req, object_id=uuid.uuid4().hex, limit_bytes=None,
                                  run_id=None)


# --- clone -----------------------------------------------------------------------------------

def test_persistent_ready_source_goes_to_clone(catalog, put_image):
    source = put_image(S.READY, persistent=True)
    target = begin_clone(catalog, source.id)
    after = catalog.get(source.id)
    assert (after.state, after.cloning_ops, after.cloning_id) == (S.CLONE, 1, target.id)
    assert (target.state, target.cloning_id, target.persistent) == (S.LOCKED, source.id, False)


def test_persistent_image_with_snapshots_cannot_be_cloned(catalog, put_image, refused):
    source = put_image(S.READY, persistent=True, snapshots=2)
    refused(lambda: begin_clone(catalog, source.id), f"Cannot clone image {source.id}: it is persistent and has "
                                                     "snapshots; flatten it first.")


def test_non_persistent_image_with_snapshots_can_be_cloned(catalog, put_image):
    source = put_image(S.READY, snapshots=2)
    assert begin_clone(catalog, source.id).state is S.LOCKED


def test_clone_of_a_cdrom_cannot_be_persistent(catalog, put_image, refused):
    source = put_image(S.READY, type=ImageType.CDROM)
    refused(lambda: begin_clone(catalog, source.id, persistent=True), "A CDROM image is always non-persistent")


def test_clone_name_must_be_free(catalog, put_image, refused):
    source = put_image(S.READY)
    taken = put_image(S.READY)
    refused(lambda: begin_clone(catalog, source.id, name=taken.name), f"NAME is already taken by IMAGE {taken.id}")


def test_clone_source_needs_use_right(catalog, put_image, refused):
    """A source bob may not USE answers as a missing image (no owner, group or bits said)."""
    private = put_image(S.READY)
    refused(lambda: begin_clone(catalog, private.id, actor=BOB), f"Image {private.id} does not exist", NotFound)
    shared = put_image(S.READY, permissions=0o604)  # other: USE
    target = begin_clone(catalog, shared.id, actor=BOB)
    assert (target.owner, target.group, target.permissions) == ("bob", "staff", 0o600)


@pytest.mark.parametrize("persistent, running_vms, ops, during, after", [
    (False, 0, 1, S.USED, S.READY),       # back to READY when both counters are 0
    (False, 0, 2, S.USED, S.USED),        # another clone still copies
    (False, 1, 1, S.USED, S.USED),        # a VM still uses it
    (True, 0, 1, S.CLONE, S.READY),
    (True, 0, 2, S.CLONE, S.CLONE),
])
def test_clone_end_releases_the_source(catalog, put_image, persistent, running_vms, ops, during, after):
    source = put_image(S.READY, persistent=persistent)
    targets = [begin_clone(catalog, source.id) for _ in range(ops)]
    if running_vms:
        catalog.transition(source.id, rules.vm_acquire)
    assert catalog.get(source.id).state is during
    copy_done(catalog, targets[0].id)
    released = catalog.get(source.id)
    assert (released.state, released.cloning_ops, released.running_vms) == (after, ops - 1, running_vms)
    done = catalog.get(targets[0].id)
    assert (done.state, done.cloning_id, done.last_operation, done.error) == (S.READY, None, None, None)
    assert released.cloning_id == (None if ops == 1 else targets[-1].id)


def test_failed_clone_errors_the_new_image_and_releases_the_source(catalog, put_image):
    source = put_image(S.READY)
    target = begin_clone(catalog, source.id)
    operations.finish_clone(catalog, target.id, run_id=None, error="copy s3://a/b: AccessDenied")
    failed, released = catalog.get(target.id), catalog.get(source.id)
    assert failed.state is S.ERROR and failed.cloning_id is None
    assert failed.error.endswith(f" : Error cloning from Image {source.id}: copy s3://a/b: AccessDenied")
    assert (released.state, released.cloning_ops) == (S.READY, 0)
    history = len(catalog.history(source.id))
    operations.finish_clone(catalog, target.id, run_id=None, error="again")  # a hook run twice changes nothing more
    assert len(catalog.history(source.id)) == history and catalog.get(target.id) == failed


def test_retry_of_a_clone_takes_the_source_again(catalog, put_image):
    source = put_image(S.READY, persistent=True)
    target = begin_clone(catalog, source.id)
    operations.finish_clone(catalog, target.id, run_id=None, error="boom")
    retried = operations.retry(catalog, ALICE, target.id)
    assert (retried.state, retried.cloning_id, retried.error) == (S.LOCKED, source.id, None)
    held = catalog.get(source.id)
    assert (held.state, held.cloning_ops, held.cloning_id) == (S.CLONE, 1, target.id)


@pytest.mark.parametrize("source_state", [S.DISABLED, S.DELETE, None])
def test_retry_of_a_clone_whose_source_cannot_be_cloned_is_refused(catalog, put_image, refused, source_state):
    source = put_image(S.READY)
    target = begin_clone(catalog, source.id)
    operations.finish_clone(catalog, target.id, run_id=None, error="boom")
    if source_state is S.DISABLED:
        operations.disable(catalog, ALICE, source.id)
        message = f"Cannot clone image {source.id}, it is in state DISABLED"
    elif source_state is S.DELETE:
        operations.delete(catalog, ALICE, source.id)
        message = f"Cannot clone image {source.id}, it is in state DELETE"
    else:
        operations.delete(catalog, ALICE, source.id)
        operations.remove(catalog, source.id, run_id=None)
        message = f"image {source.id}, which it was cloned from, no longer exists"
    refused(lambda: operations.retry(catalog, ALICE, target.id), message)


def test_a_failed_clone_still_holding_its_source_must_be_retried_or_deleted(catalog, put_image, refused):
    """Its hooks never ran and something else moved it to ERROR: enabling it would leak the source."""
    source = put_image(S.READY)
    target = begin_clone(catalog, source.id)
    catalog.transition(target.id, rules.fail, "the worker died")
    refused(lambda: operations.enable(catalog, ALICE, target.id), "still holds image")
    operations.retry(catalog, ALICE, target.id)  # does not take the source a second time
    assert catalog.get(source.id).cloning_ops == 1
    copy_done(catalog, target.id)
    assert (catalog.get(source.id).state, catalog.get(source.id).cloning_ops) == (S.READY, 0)


def test_removing_a_force_deleted_clone_releases_its_source(catalog, put_image):
    source = put_image(S.READY)
    target = begin_clone(catalog, source.id)
    operations.delete(catalog, ADMIN, target.id, force=True)
    operations.remove(catalog, target.id, run_id=None)
    assert catalog.find(target.id) is None
    assert (catalog.get(source.id).state, catalog.get(source.id).cloning_ops) == (S.READY, 0)


@pytest.mark.parametrize("round_", range(10))
def test_a_delete_racing_clones_wins_only_against_no_clone(catalog, put_image, round_):
    """Twelve clones and a delete start together: either the delete is refused, or every clone that
    started had started and ended before it; no clone is ever registered on a DELETE source."""
    source = put_image(S.READY, persistent=round_ % 2 == 1)

    def clone_and_finish(n: int):
        target = begin_clone(catalog, source.id)
        if n % 3:  # some finish before the delete may run, some hold the source to the end
            copy_done(catalog, target.id)
        return target

    *clones, deleted = all_at_once([*(functools.partial(clone_and_finish, n) for n in range(12)),
                                    lambda: operations.delete(catalog, ALICE, source.id)])
    history = catalog.history(source.id)
    if isinstance(deleted, Exception):
        assert "active clone operations" in str(deleted)
        assert all(not isinstance(c, Exception) for c in clones)
    else:
        at = next(i for i, h in enumerate(history) if h["to_state"] == "DELETE")
        assert history[at]["from_state"] == "READY"
        assert not any("started" in h["message"] for h in history[at:])
        for refusal in (c for c in clones if isinstance(c, Exception)):
            assert "it is in state DELETE" in str(refusal)
    for target in (c for c in clones if not isinstance(c, Exception)):
        assert catalog.get(target.id).cloning_id in (None, source.id)


# --- delete, names ---------------------------------------------------------------------------

def test_delete_of_a_non_persistent_image_being_cloned_names_the_clones(catalog, put_image, refused):
    source = put_image(S.USED, cloning_ops=1)  # non-persistent READY -> USED while cloned, no VM
    refused(lambda: operations.delete(catalog, ALICE, source.id), "There are 1 active clone operations")


def test_force_delete_of_locked_image_by_owner_with_admin_bit(catalog, put_image):
    image = put_image(S.LOCKED, permissions=0o700)
    assert operations.delete(catalog, ALICE, image.id, force=True).state is S.DELETE


def test_deleting_frees_the_name_at_once(catalog, put_image):
    image = put_image(S.READY)
    operations.delete(catalog, ALICE, image.id)
    again = register_image(catalog, image.name)
    assert again.name == image.name and again.id != image.id


def test_failed_delete_keeps_the_name_free_and_enable_takes_it_back(catalog, put_image, refused):
    image = put_image(S.READY)
    operations.delete(catalog, ALICE, image.id)
    failed = catalog.transition(image.id, rules.delete_failed, "AccessDenied")
    assert failed.error.endswith(" : Error removing image from datastore: AccessDenied")
    assert catalog.name_owner("alice", image.name) is None
    assert operations.enable(catalog, ALICE, image.id).state is S.READY
    assert catalog.name_owner("alice", image.name).id == image.id
    # once more, with the name taken meanwhile: enable is refused
    operations.delete(catalog, ALICE, image.id)
    catalog.transition(image.id, rules.delete_failed, "AccessDenied")
    taker = register_image(catalog, image.name)
    refused(lambda: operations.enable(catalog, ALICE, image.id), f"NAME is already taken by IMAGE {taker.id}")
    assert operations.retry(catalog, ALICE, image.id).state is S.DELETE  # a failed delete retries as a delete


def test_rename_to_a_taken_name_is_refused(catalog, put_image, refused):
    image, other = put_image(S.READY), put_image(S.READY)
    refused(lambda: operations.rename(catalog, ALICE, image.id, other.name), f"NAME is already taken by IMAGE {other.id}")
    refused(lambda: operations.rename(catalog, ALICE, image.id, " padded "), "Invalid image name")


# --- persistency, type, attributes -----------------------------------------------------------

@pytest.mark.parametrize("persistent", [True, False])
def test_persistency_of_a_cdrom_cannot_change(catalog, put_image, refused, persistent):
    cdrom = put_image(S.READY, type=ImageType.CDROM)
    refused(lambda: operations.set_persistent(catalog, ALICE, cdrom.id, persistent),
            "CDROM images are always non-persistent")


def test_non_persistent_is_refused_with_snapshots(catalog, put_image, refused):
    image = put_image(S.READY, persistent=True, snapshots=1)
    refused(lambda: operations.set_persistent(catalog, ALICE, image.id, False), "it has snapshots; flatten it first")


def test_chtype_to_cdrom_forces_non_persistent(catalog, put_image):
    image = put_image(S.READY, persistent=True)
    changed = operations.change_type(catalog, ALICE, image.id, ImageType.CDROM)
    assert (changed.type, changed.persistent, changed.dev_prefix) == (ImageType.CDROM, False, "")
    back = operations.change_type(catalog, ALICE, image.id, ImageType.OS)
    assert (back.type, back.persistent) == (ImageType.OS, False)


def test_update_sets_and_unsets_free_attributes(catalog, put_image, refused):
    image = put_image(S.READY, attributes={"A": "1"}, description="old")
    updated = operations.update(catalog, ALICE, image.id, set_attributes={"B": "2"}, unset=["A"])
    assert (updated.attributes, updated.description) == ({"B": "2"}, "old")
    refused(lambda: operations.update(catalog, ALICE, image.id, unset=["NOPE"]), "has no attribute 'NOPE'")
    refused(lambda: operations.update(catalog, ALICE, image.id, set_attributes={"A=B": "x"}), "Invalid attribute name")


def test_retry_needs_a_recorded_operation(catalog, put_image, refused):
    image = put_image(S.ERROR, error="a VM failed")
    refused(lambda: operations.retry(catalog, ALICE, image.id), "records no failed operation to retry")


# --- rights ----------------------------------------------------------------------------------

MANAGE_OPERATIONS = {
    "delete": lambda c, i, a: operations.delete(c, a, i),
    "enable": lambda c, i, a: operations.enable(c, a, i),
    "disable": lambda c, i, a: operations.disable(c, a, i),
    "persistent": lambda c, i, a: operations.set_persistent(c, a, i, True),
    "nonpersistent": lambda c, i, a: operations.set_persistent(c, a, i, False),
    "rename": lambda c, i, a: operations.rename(c, a, i, "stolen"),
    "update": lambda c, i, a: operations.update(c, a, i, description="mine now"),
    "chtype": lambda c, i, a: operations.change_type(c, a, i, ImageType.CDROM),
    "retry": lambda c, i, a: operations.retry(c, a, i),
    "chmod": lambda c, i, a: operations.chmod(c, a, i, 0o640),
}


@pytest.mark.parametrize("op", MANAGE_OPERATIONS)
def test_manage_operations_need_the_manage_right(catalog, put_image, refused, op):
    """Bob may use the image (other USE bit) but not manage it; the admin group may do anything."""
    state = S.ERROR if op in ("enable", "retry") else S.READY
    image = put_image(state, permissions=0o644, last_operation={"op": "upload", "upload_id": "u", "request": {}})
    refused(lambda: MANAGE_OPERATIONS[op](catalog, image.id, BOB), "User bob has no MANAGE right on image",
            PermissionDenied)
    MANAGE_OPERATIONS[op](catalog, image.id, ADMIN)


# --- capacity --------------------------------------------------------------------------------

@pytest.mark.parametrize("used, required, fits", [(0, 100, True), (40, 60, True), (41, 60, False), (0, 101, False)])
def test_capacity_rule(used, required, fits):
    check = lambda: rules.check_capacity(datastore="ds", limit=100, used=used, required=required)  # noqa: E731
    if fits:
        check()
    else:
        with pytest.raises(Refused, match="Datastore ds has no room for this image"):
            check()
    rules.check_capacity(datastore="ds", limit=None, used=10**12, required=10**12)  # no limit


def test_only_an_admin_may_skip_the_capacity_check():
    with pytest.raises(Refused, match="Only an administrator may skip"):
        rules.capacity_limit(100, skip=True, is_admin=False)
    assert rules.capacity_limit(100, skip=True, is_admin=True) is None
    assert rules.capacity_limit(100, skip=False, is_admin=True) == 100


def test_register_refuses_an_image_that_does_not_fit_and_writes_nothing(catalog, refused, unique_name):
    datastore = unique_name("cap")

    def register(size: int):
        return register_image(catalog, unique_name(), datastore=datastore, size=size, limit_bytes=1000)

    register(600)
    refused(lambda: register(401), f"Datastore {datastore} has no room for this image: it needs 401B (401 bytes) "
                                   "and 400B (400 bytes)")
    register(400)
    assert catalog.used_bytes(datastore) == 1000


def test_clone_refused_when_the_target_datastore_is_full(catalog, put_image, refused, unique_name):
    source = put_image(S.READY, size=700, source="s3://hcx-images/images/x", source_etag='"e"')
    request = CloneRequest(owner="alice", source_id=source.id, name=unique_name(), datastore=unique_name("full"))
    refused(lambda: operations.begin_clone(catalog, ALICE, request, object_id=uuid.uuid4().hex, limit_bytes=500,
                                           run_id=None), "has no room for this image")
    refused(lambda: operations.check_clone(catalog, ALICE, request, limit_bytes=500), "has no room for this image")


# --- VMs (image-rules.md "VM acquires image" / "VM releases image") -----------------------------
# No VM operation exists yet; these rules are what the later VM flows will call, checked here
# against the table, through the store.

ACQUIRE_REFUSED_STATES = (S.INIT, S.DISABLED, S.ERROR, S.DELETE, S.CLONE)


@pytest.mark.parametrize("state, persistent, vms, hot_attach, expected", [
    (S.READY, False, 0, False, (S.USED, 1)),
    (S.READY, True, 0, True, (S.USED_PERS, 1)),
    (S.USED, False, 2, True, (S.USED, 3)),
    (S.LOCKED, False, 0, False, (S.LOCKED_USED, 1)),      # the VM waits for the unlock
    (S.LOCKED, True, 0, False, (S.LOCKED_USED_PERS, 1)),
    (S.LOCKED_USED, False, 1, False, (S.LOCKED_USED, 2)),
    (S.LOCKED, False, 0, True, "it is locked"),
    (S.LOCKED_USED, False, 1, True, "it is locked"),
    (S.USED_PERS, True, 1, False, "it is persistent and already in use"),
    *((st, False, 0, False, f"it is in state {st.value}") for st in ACQUIRE_REFUSED_STATES),
])
def test_vm_acquire(catalog, put_image, refused, state, persistent, vms, hot_attach, expected):
    image = put_image(state, persistent=persistent, running_vms=vms)
    if isinstance(expected, str):
        refused(lambda: catalog.transition(image.id, rules.vm_acquire, hot_attach),
                f"Cannot acquire image {image.id}")
        refused(lambda: catalog.transition(image.id, rules.vm_acquire, hot_attach), expected)
        return
    acquired = catalog.transition(image.id, rules.vm_acquire, hot_attach)
    assert (acquired.state, acquired.running_vms) == expected


@pytest.mark.parametrize("state, persistent, vms, ops, failed, expected", [
    (S.USED_PERS, True, 1, 0, False, S.READY),
    (S.USED, False, 2, 0, False, S.USED),               # another VM still uses it
    (S.USED, False, 1, 0, False, S.READY),
    (S.USED, False, 1, 1, False, S.USED),               # a clone still copies it
    (S.LOCKED_USED, False, 2, 0, False, S.LOCKED_USED),
    (S.LOCKED_USED, False, 1, 0, False, S.LOCKED),
    (S.LOCKED_USED_PERS, True, 1, 0, False, S.LOCKED),
    (S.USED, False, 1, 0, True, S.ERROR),               # a VM failed while active: data may be inconsistent
])
def test_vm_release(catalog, put_image, state, persistent, vms, ops, failed, expected):
    image = put_image(state, persistent=persistent, running_vms=vms, cloning_ops=ops)
    released = catalog.transition(image.id, rules.vm_release, failed)
    assert (released.state, released.running_vms, released.cloning_ops) == (expected, vms - 1, ops)
    if failed:
        assert "A VM using the image failed" in released.error


def test_vm_release_without_a_vm_is_refused(catalog, put_image, refused):
    image = put_image(S.READY)
    refused(lambda: catalog.transition(image.id, rules.vm_release), f"Image {image.id} has no VM to release")


# --- counters that used to drift (issue 8): each path ends where the counters say -------------

def test_an_errored_persistent_image_in_use_cannot_be_disabled_and_enables_to_used_pers(catalog, put_image, refused):
    """LOCKED_USED_PERS -> ERROR kept its VM: disable is refused (a VM uses it), enable gives
    USED_PERS with RUNNING_VMS=1, and a second VM is refused: never two VMs on a persistent image."""
    image = put_image(S.LOCKED_USED_PERS, persistent=True, running_vms=1)
    catalog.transition(image.id, rules.fail, "copy failed")
    refused(lambda: operations.disable(catalog, ALICE, image.id), "There are 1 VMs using it")
    enabled = operations.enable(catalog, ALICE, image.id)
    assert (enabled.state, enabled.running_vms) == (S.USED_PERS, 1)
    refused(lambda: catalog.transition(image.id, rules.vm_acquire), "persistent and already in use")


def test_an_image_whose_bytes_never_arrived_cannot_be_enabled(catalog, put_image, refused):
    """A failed empty-image create (or clone) left no object: enable would make a READY image with
    no bytes; it is refused with what to do, from ERROR and from DISABLED alike."""
    image = put_image(S.ERROR, source=None, error="Mon Nov 23 10:00:00 2026 : Error copying image: boom")
    refused(lambda: operations.enable(catalog, ALICE, image.id), "its bytes never reached its datastore")
    operations.disable(catalog, ALICE, image.id)
    refused(lambda: operations.enable(catalog, ALICE, image.id), "`retry` the operation that failed")


def test_a_retried_delete_gives_up_the_name_a_rename_took(catalog, put_image):
    image = put_image(S.READY)
    operations.delete(catalog, ALICE, image.id)
    catalog.transition(image.id, rules.delete_failed, "AccessDenied")
    operations.rename(catalog, ALICE, image.id, "renamed-while-failed")
    assert catalog.name_owner("alice", "renamed-while-failed").id == image.id
    retried = operations.retry(catalog, ALICE, image.id)
    assert (retried.state, retried.name_held) == (S.DELETE, False)
    assert catalog.name_owner("alice", "renamed-while-failed") is None


@pytest.mark.parametrize("state", [S.LOCKED, S.LOCKED_USED, S.LOCKED_USED_PERS, S.DELETE, S.ERROR, S.INIT])
def test_export_only_of_settled_bytes(put_image, state):
    persistent = state is S.LOCKED_USED_PERS
    image = put_image(state, persistent=persistent, running_vms=1 if state in (S.LOCKED_USED, S.LOCKED_USED_PERS) else 0)
    with pytest.raises(Refused, match="its bytes are not settled in its datastore"):
        rules.check_export(image)


@pytest.mark.parametrize("state", [S.READY, S.USED, S.DISABLED])
def test_export_of_settled_bytes_is_allowed(put_image, state):
    rules.check_export(put_image(state, running_vms=1 if state is S.USED else 0))
