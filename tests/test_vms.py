"""VMs using images, through the real prolog and epilog flows on the session's SeaweedFS and Prefect:
persistent disks linked (no byte copied), non-persistent ones copied into the system datastore and
deleted with the VM; the acquire table row by row; release to READY only when no VM and no clone
holds the image; a VM waiting on an image being uploaded; template rules and refusals that change
nothing; the API and CLI verbs, with who may see what."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest
import sqlalchemy as sa

from blocks.datastore import ObjectRef, load_datastore
from catalog import operations, vms
from catalog.model import ImageState, ImageType, NotFound, Refused
from catalog.requests import CloneRequest, VmDisksRequest
from catalog.settings import get_settings
from flows.launcher import deployable
from flows.upload import upload
from flows.vm_epilog import vm_epilog
from flows.vm_prolog import vm_prolog
from tasks import transfer
from tests.conftest import ALICE, BOB, DENY_SERVER_COPIES, catalog_snapshot, flow_run_artifacts, recent_events

S = ImageState
OS, DATABLOCK, CDROM = ImageType.OS, ImageType.DATABLOCK, ImageType.CDROM


def prolog(vm_id: int, *image_ids: int, reported: bool = False, **options):
    """The prolog flow run here; `reported`: with the reporting hooks its deployment has."""
    flow = deployable()["vm-prolog"] if reported else vm_prolog
    return flow(VmDisksRequest(owner="alice", vm_id=vm_id, image_ids=list(image_ids) or None), **options)


def epilog(vm_id: int, *image_ids: int, reported: bool = False, **options):
    flow = deployable()["vm-epilog"] if reported else vm_epilog
    return flow(VmDisksRequest(owner="alice", vm_id=vm_id, image_ids=list(image_ids) or None), **options)


def terminate(catalog, vm_id: int, *, failed: bool = False) -> vms.Vm:
    vms.begin_terminate(catalog, ALICE, vm_id, failed=failed)
    epilog(vm_id)
    return vms.get(catalog, vm_id)


def system_objects() -> set[str]:
    store = load_datastore(get_settings().system_datastore)
    return {f"s3://{store.bucket}/{o['Key']}" for o in store.list_keys(store.bucket, f"{store.prefix}vms/")}


def holds(image, disk: vms.VmDisk) -> bool:
    """The disk's object re-hashes to the image's recorded sha256."""
    ref = ObjectRef.parse(disk.datastore, disk.object)
    return transfer.matches(load_datastore(disk.datastore), ref, size=image.size, sha256=image.sha256)


def vm_rows(catalog) -> tuple:
    with catalog.engine.connect() as conn:
        return (conn.execute(sa.select(vms.vms).order_by(vms.vms.c.id)).all(),
                conn.execute(sa.select(vms.vm_disks).order_by(vms.vm_disks.c.vm_id)).all())


def everything(catalog) -> tuple:
    """What a refusal must leave as it was: image rows and history, VM and disk rows, VM copies."""
    vms.list_vms(catalog, ALICE)  # the VM tables exist
    return catalog_snapshot(catalog), vm_rows(catalog), system_objects()


def test_persistent_disk_is_a_link_non_persistent_a_verified_copy_and_epilog_removes_it(
        catalog, ready_image, unique_name):
    """Two VMs share a non-persistent DATABLOCK (a copy each), one of them boots a persistent OS
    image (a link); a third VM is refused the persistent image in use. Terminating releases: the
    persistent image READY with its data, the non-persistent one USED until its last VM is gone."""
    os_disk = ready_image(persistent=True, type_=OS)
    other_os = ready_image(type_=OS, size=64 * 1024)
    shared = ready_image(size=256 * 1024)
    before = system_objects()

    first = vms.create(catalog, ALICE, unique_name("vm"), [os_disk.id, shared.id])
    assert (first.state, [d.state for d in first.disks]) == (vms.VmState.PENDING, [vms.DiskState.PENDING] * 2)
    assert (catalog.get(os_disk.id).state, catalog.get(os_disk.id).running_vms) == (S.USED_PERS, 1)
    assert (catalog.get(shared.id).state, catalog.get(shared.id).running_vms) == (S.USED, 1)
    assert prolog(first.id) == first.id
    running = vms.get(catalog, first.id)
    link, copy = running.disk(os_disk.id), running.disk(shared.id)
    assert running.state is vms.VmState.RUNNING
    assert (link.mode, link.state, link.datastore, link.object) == (
        vms.DiskMode.LINK, vms.DiskState.READY, os_disk.datastore, os_disk.source)
    assert (copy.mode, copy.state, copy.datastore) == (vms.DiskMode.COPY, vms.DiskState.READY, "system")
    assert copy.object == str(load_datastore("system").vm_disk_ref(first.id, shared.id)) and holds(shared, copy)
    assert system_objects() - before == {copy.object}  # only the copy: the link moved no byte

    second = vms.create(catalog, ALICE, unique_name("vm"), [other_os.id, shared.id])
    assert (catalog.get(shared.id).state, catalog.get(shared.id).running_vms) == (S.USED, 2)
    prolog(second.id)
    unchanged = everything(catalog)
    with pytest.raises(Refused, match=f"Cannot acquire image {os_disk.id}: it is persistent and already in use"):
        vms.create(catalog, ALICE, unique_name("vm"), [os_disk.id])
    assert everything(catalog) == unchanged

    assert terminate(catalog, first.id).state is vms.VmState.TERMINATED
    assert copy.object not in system_objects()
    kept = catalog.get(os_disk.id)
    assert (kept.state, kept.running_vms, kept.source, kept.sha256) == (S.READY, 0, os_disk.source, os_disk.sha256)
    assert (catalog.get(shared.id).state, catalog.get(shared.id).running_vms) == (S.USED, 1)
    terminate(catalog, second.id)
    assert (catalog.get(shared.id).state, catalog.get(shared.id).running_vms) == (S.READY, 0)
    assert system_objects() == before
    assert [h["to_state"] for h in catalog.history(shared.id)][-4:] == ["USED", "USED", "USED", "READY"]
    # The name of a terminated VM is free again.
    again = vms.create(catalog, ALICE, first.name, [os_disk.id])
    vms.begin_terminate(catalog, ALICE, again.id)
    epilog(again.id)


def test_release_reaches_ready_only_when_no_vm_and_no_clone_hold_it(catalog, ready_image, unique_name):
    """A non-persistent image used by a VM and cloned at once: the VM's release leaves it USED
    (CLONING_OPS 1); the clone's end brings it back to READY."""
    image = ready_image(type_=OS, size=64 * 1024)
    vm = vms.create(catalog, ALICE, unique_name("vm"), [image.id])
    prolog(vm.id)
    request = CloneRequest(owner="alice", source_id=image.id, name=unique_name("clone"))
    target = operations.begin_clone(catalog, ALICE, request, object_id=unique_name("obj"), limit_bytes=None,
                                    run_id=None)
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms, catalog.get(image.id).cloning_ops) == (
        S.USED, 1, 1)
    terminate(catalog, vm.id)
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms, catalog.get(image.id).cloning_ops) == (
        S.USED, 0, 1)
    operations.finish_clone(catalog, target.id, error="stopped by the test", run_id=None)
    assert (catalog.get(image.id).state, catalog.get(image.id).cloning_ops) == (S.READY, 0)


def test_terminate_failed_puts_the_persistent_image_in_error_and_keeps_non_persistent_ones(
        catalog, ready_image, unique_name):
    persistent = ready_image(persistent=True, type_=OS, size=64 * 1024)
    shared = ready_image(size=64 * 1024)
    vm = vms.create(catalog, ALICE, unique_name("vm"), [persistent.id, shared.id])
    prolog(vm.id)
    copy = vms.get(catalog, vm.id).disk(shared.id).object
    assert terminate(catalog, vm.id, failed=True).state is vms.VmState.TERMINATED
    failed = catalog.get(persistent.id)
    assert (failed.state, failed.running_vms) == (S.ERROR, 0)
    assert "A VM using the image failed; its data may be inconsistent" in failed.error
    assert (catalog.get(shared.id).state, catalog.get(shared.id).running_vms) == (S.READY, 0)
    assert copy not in system_objects()


# --- the acquire table, row by row -------------------------------------------------------------

# (state, persistent, counters) -> what a deploy does; the refused rows' messages are the rules'.
ACQUIRE_REFUSED = [
    (S.USED_PERS, True, {"running_vms": 1}, "it is persistent and already in use"),
    (S.LOCKED_USED_PERS, True, {"running_vms": 1}, "it is persistent and already in use"),
    (S.INIT, False, {}, "it is in state INIT"),
    (S.DISABLED, False, {}, "it is in state DISABLED"),
    (S.ERROR, False, {}, "it is in state ERROR"),
    (S.DELETE, False, {}, "it is in state DELETE"),
    (S.CLONE, True, {"cloning_ops": 1}, "it is in state CLONE"),
]


@pytest.mark.parametrize("state, persistent, counters, message", ACQUIRE_REFUSED)
def test_deploy_is_refused_with_the_rules_message_and_nothing_changes(catalog, put_image, unique_name,
                                                                       state, persistent, counters, message):
    image = put_image(state, persistent=persistent, **counters)
    unchanged = everything(catalog)
    with pytest.raises(Refused, match=f"image {image.id}.*{message}"):
        vms.create(catalog, ALICE, unique_name("vm"), [image.id])
    assert everything(catalog) == unchanged


@pytest.mark.parametrize("state, persistent, after", [
    (S.READY, False, S.USED), (S.READY, True, S.USED_PERS), (S.USED, False, S.USED),
    (S.LOCKED, False, S.LOCKED_USED), (S.LOCKED, True, S.LOCKED_USED_PERS), (S.LOCKED_USED, False, S.LOCKED_USED),
])
def test_deploy_acquires_per_the_table(catalog, put_image, unique_name, state, persistent, after):
    counted = {"running_vms": 1} if state in (S.USED, S.LOCKED_USED) else {}
    image = put_image(state, persistent=persistent, **counted)
    vm = vms.create(catalog, ALICE, unique_name("vm"), [image.id])
    acquired = catalog.get(image.id)
    assert (acquired.state, acquired.running_vms) == (after, image.running_vms + 1)
    assert vm.state is vms.VmState.PENDING
    # Released by a terminate before its prolog ran: back to where it was.
    vms.begin_terminate(catalog, ALICE, vm.id)
    vms.release_disk(catalog, vm.id, image.id)
    released = catalog.get(image.id)
    assert (released.state, released.running_vms) == (state, image.running_vms)
    assert vms.finish_terminate(catalog, vm.id).state is vms.VmState.TERMINATED


@pytest.fixture(scope="module")
def running_vm(stack_state, tmp_path_factory):
    """One RUNNING VM of alice's (a non-persistent OS disk) for the hot-attach rows; terminated after."""
    from catalog.store import open_catalog
    from tests.conftest import upload_request

    catalog = open_catalog()
    path = tmp_path_factory.mktemp("vm") / "os.raw"
    path.write_bytes(b"\x02" * 64 * 1024)
    image_id = upload(upload_request(f"vm-os-{path.parent.name}", path=str(path), type=OS))
    vm = vms.create(catalog, ALICE, f"attach-{image_id}", [image_id])
    prolog(vm.id)
    assert vms.get(catalog, vm.id).state is vms.VmState.RUNNING
    yield vms.get(catalog, vm.id)
    assert terminate(catalog, vm.id).state is vms.VmState.TERMINATED


@pytest.mark.parametrize("state, persistent, counters, message", [
    (S.LOCKED, False, {}, "it is locked"),
    (S.LOCKED_USED, False, {"running_vms": 1}, "it is locked"),
    (S.USED_PERS, True, {"running_vms": 1}, "it is persistent and already in use"),
    (S.ERROR, False, {}, "it is in state ERROR"),
])
def test_hot_attach_refusals_change_nothing(catalog, put_image, running_vm, state, persistent, counters, message):
    image = put_image(state, persistent=persistent, type=DATABLOCK, **counters)
    unchanged = everything(catalog)
    with pytest.raises(Refused, match=f"image {image.id}.*{message}"):
        vms.attach(catalog, ALICE, running_vm.id, image.id)
    assert everything(catalog) == unchanged


def test_attach_then_detach_copies_and_removes_the_disk(catalog, ready_image, running_vm):
    image = ready_image(size=64 * 1024)
    vms.attach(catalog, ALICE, running_vm.id, image.id)
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms) == (S.USED, 1)
    prolog(running_vm.id, image.id)
    disk = vms.get(catalog, running_vm.id).disk(image.id)
    assert disk.state is vms.DiskState.READY and holds(image, disk)
    unchanged = everything(catalog)
    with pytest.raises(Refused, match="Rule 'exactly one OS disk'.*cannot be detached"):
        vms.begin_detach(catalog, ALICE, running_vm.id, running_vm.disks[0].image_id)
    assert everything(catalog) == unchanged
    vms.begin_detach(catalog, ALICE, running_vm.id, image.id)
    detached = epilog(running_vm.id, image.id, reported=True, return_state=True)
    assert detached.is_completed()
    artifacts = {a.key: json.loads(a.data) for a in flow_run_artifacts(detached.state_details.flow_run_id)}
    assert [(r["id"], r["state"]) for r in artifacts["vm-epilog-images"]] == [(image.id, "READY")]
    assert [r["image"] for r in artifacts["vm-epilog-disks"]] == [d.image_id for d in running_vm.disks]
    after = vms.get(catalog, running_vm.id)
    assert after.state is vms.VmState.RUNNING and after.disk(image.id) is None
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms) == (S.READY, 0)
    assert disk.object not in system_objects()


# --- the template rules -------------------------------------------------------------------------

@pytest.mark.parametrize("types, container, message", [
    ([DATABLOCK], False, "Rule 'exactly one OS disk'.*none is an OS image"),
    ([OS, OS], False, "Rule 'exactly one OS disk'.*are OS images"),
    ([OS, CDROM, CDROM], False, "Rule 'at most one CDROM'"),
    ([OS, DATABLOCK], True, "Rule 'no DATABLOCK on a container'"),
])
def test_template_rules_refuse_before_anything_moves(catalog, put_image, unique_name, types, container, message):
    images = [put_image(S.READY, type=t) for t in types]
    unchanged = everything(catalog)
    with pytest.raises(Refused, match=message):
        vms.create(catalog, ALICE, unique_name("vm"), [i.id for i in images], container=container)
    assert everything(catalog) == unchanged


def test_container_takes_os_and_cdrom(catalog, put_image, unique_name):
    os_image, cdrom = put_image(S.READY, type=OS), put_image(S.READY, type=CDROM)
    vm = vms.create(catalog, ALICE, unique_name("ct"), [os_image.id, cdrom.id], container=True)
    assert vm.container and {d.image_type for d in vm.disks} == {OS, CDROM}
    vms.begin_terminate(catalog, ALICE, vm.id)
    for image in (os_image, cdrom):
        vms.release_disk(catalog, vm.id, image.id)
    assert (catalog.get(os_image.id).state, catalog.get(cdrom.id).state) == (S.READY, S.READY)


def test_images_and_vms_one_may_not_see_answer_as_missing(catalog, put_image, unique_name):
    hidden = put_image(S.READY, type=OS)  # alice's, 600
    unchanged = everything(catalog)
    with pytest.raises(NotFound, match=f"Image {hidden.id} does not exist"):
        vms.create(catalog, BOB, unique_name("vm"), [hidden.id])
    assert everything(catalog) == unchanged
    vm = vms.create(catalog, ALICE, unique_name("vm"), [hidden.id])
    with pytest.raises(NotFound, match=f"VM {vm.name} does not exist"):
        vms.by_name(catalog, BOB, vm.name)
    with pytest.raises(NotFound, match=f"VM {vm.id} does not exist"):
        vms.begin_terminate(catalog, BOB, vm.id)
    assert vms.get(catalog, vm.id).state is vms.VmState.PENDING
    vms.begin_terminate(catalog, ALICE, vm.id)
    vms.release_disk(catalog, vm.id, hidden.id)


# --- waiting on an image being uploaded ----------------------------------------------------------

def _held_upload(catalog, new_datastore, cuttable_proxy, make_request, unique_name, tmp_path, *, persistent: bool):
    """An upload in a thread, held in its copy into the datastore: its image LOCKED."""
    datastore = new_datastore(cuttable_proxy.endpoint, staging_bucket=True)
    cuttable_proxy.hold(DENY_SERVER_COPIES)
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x01" * (96 * 1024))
    name = unique_name("uploading")
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(upload(
        make_request(name, path=str(path), datastore=datastore, type=DATABLOCK, persistent=persistent),
        return_state=True)))
    thread.start()
    while (image := catalog.name_owner("alice", name)) is None or image.state is not S.LOCKED:
        assert thread.is_alive(), outcome
        threading.Event().wait(0.1)
    return image, thread


def _wait_for_disk_state(catalog, vm_id: int, image_id: int, state: vms.DiskState, thread: threading.Thread) -> None:
    while vms.get(catalog, vm_id).disk(image_id).state is not state:
        assert thread.is_alive()
        threading.Event().wait(0.1)


def test_vm_waits_for_the_upload_then_gets_its_disk(catalog, new_datastore, cuttable_proxy, make_request,
                                                    unique_name, tmp_path, running_vm):
    image, uploading = _held_upload(catalog, new_datastore, cuttable_proxy, make_request, unique_name, tmp_path,
                                    persistent=True)
    with pytest.raises(Refused, match=f"Cannot acquire image {image.id}: it is locked"):
        vms.attach(catalog, ALICE, running_vm.id, image.id)
    os_disk = running_vm.disks[0].image_id  # non-persistent: a second VM may use it
    vm = vms.create(catalog, ALICE, unique_name("vm"), [os_disk, image.id])
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms) == (S.LOCKED_USED_PERS, 1)
    booting = threading.Thread(target=prolog, args=(vm.id,))
    booting.start()
    _wait_for_disk_state(catalog, vm.id, image.id, vms.DiskState.WAITING, booting)
    assert vms.get(catalog, vm.id).state is vms.VmState.PENDING
    cuttable_proxy.hold(None)  # the copy goes through (retried): the upload finishes
    uploading.join()
    booting.join()
    uploaded = catalog.get(image.id)
    assert (uploaded.state, uploaded.running_vms) == (S.USED_PERS, 1)
    started = vms.get(catalog, vm.id)
    assert started.state is vms.VmState.RUNNING
    assert (started.disk(image.id).state, started.disk(image.id).object) == (vms.DiskState.READY, uploaded.source)
    terminate(catalog, vm.id)
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms) == (S.READY, 0)


def test_vm_waiting_on_an_upload_that_fails_ends_failed_and_releases_it(
        catalog, new_datastore, cuttable_proxy, make_request, unique_name, tmp_path, running_vm):
    """Its OS disk was copied already: the copy goes too, and both images are released."""
    image, uploading = _held_upload(catalog, new_datastore, cuttable_proxy, make_request, unique_name, tmp_path,
                                    persistent=False)
    os_disk = running_vm.disks[0].image_id
    vm = vms.create(catalog, ALICE, unique_name("vm"), [os_disk, image.id])
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms) == (S.LOCKED_USED, 1)
    before = system_objects()
    booting: list = []
    thread = threading.Thread(target=lambda: booting.append(prolog(vm.id, reported=True, return_state=True)))
    thread.start()
    _wait_for_disk_state(catalog, vm.id, image.id, vms.DiskState.WAITING, thread)
    cuttable_proxy.deny(DENY_SERVER_COPIES)  # the copy is refused (403): the upload fails
    cuttable_proxy.hold(None)
    uploading.join()
    thread.join()
    assert booting[0].is_failed()
    failed = vms.get(catalog, vm.id)
    assert failed.state is vms.VmState.FAILED and failed.disks == ()
    assert f"Image {image.id} went to ERROR while the VM waited for it" in failed.error
    after = catalog.get(image.id)
    assert (after.state, after.running_vms, after.cloning_ops) == (S.ERROR, 0, 0)
    assert catalog.get(os_disk).running_vms == 1  # running_vm's only
    assert system_objects() == before
    run_id = booting[0].state_details.flow_run_id
    artifacts = {a.key: a.data for a in flow_run_artifacts(run_id)}
    assert "went to ERROR while the VM waited" in artifacts["vm-prolog-failure"]
    assert sorted(r["id"] for r in json.loads(artifacts["vm-prolog-images"])) == sorted([os_disk, image.id])
    assert json.loads(artifacts["vm-prolog-disks"])[0]["note"].startswith("FAILED: ")
    assert [e.payload["state"] for e in recent_events("hcx.vm.failed", f"hcx.vm.{vm.id}")] == ["FAILED"]
    assert terminate(catalog, vm.id).state is vms.VmState.TERMINATED  # nothing left to release


# --- races on PostgreSQL -------------------------------------------------------------------------

def test_fifty_concurrent_creates_on_one_persistent_image_one_wins_on_postgresql(pg_catalog):
    """50 `vm create` at once on one persistent image, three rounds on PostgreSQL: exactly one VM
    each time, 49 refused with the rules' message and nothing of theirs written, RUNNING_VMS = 1."""
    from tests.conftest import all_at_once, register_image

    image = register_image(pg_catalog, "shared-os", persistent=True, size=1024)
    for round_ in range(3):
        results = all_at_once([lambda i=i: vms.create(pg_catalog, ALICE, f"race-{round_}-{i}", [image.id])
                               for i in range(50)])
        won = [r for r in results if isinstance(r, vms.Vm)]
        refused = [r for r in results if not isinstance(r, vms.Vm)]
        assert len(won) == 1 and len(refused) == 49, [r for r in refused if not isinstance(r, Refused)]
        assert all(f"Cannot acquire image {image.id}: it is persistent and already in use" in str(r) for r in refused)
        held = pg_catalog.get(image.id)
        assert (held.state, held.running_vms) == (S.USED_PERS, 1)
        live = [vm for vm in vms.list_vms(pg_catalog, ALICE)]
        assert [vm.id for vm in live] == [won[0].id] and len(vm_rows(pg_catalog)[1]) == 1
        assert sum("acquired by VM" in h["message"] for h in pg_catalog.history(image.id)) == round_ + 1
        vms.begin_terminate(pg_catalog, ALICE, won[0].id)
        vms.release_disk(pg_catalog, won[0].id, image.id)
        vms.finish_terminate(pg_catalog, won[0].id)
        assert (pg_catalog.get(image.id).state, pg_catalog.get(image.id).running_vms) == (S.READY, 0)


def test_concurrent_creates_count_every_vm_and_one_name_wins_on_postgresql(pg_catalog):
    """30 VMs at once on one non-persistent image all count (RUNNING_VMS = 30); 20 at once under one
    name: one VM, the others refused by name, their acquisitions undone with them."""
    from tests.conftest import all_at_once, register_image

    image = register_image(pg_catalog, "np-os", size=1024)
    results = all_at_once([lambda i=i: vms.create(pg_catalog, ALICE, f"many-{i}", [image.id]) for i in range(30)])
    assert all(isinstance(r, vms.Vm) for r in results), results
    assert (pg_catalog.get(image.id).state, pg_catalog.get(image.id).running_vms) == (S.USED, 30)
    results = all_at_once([lambda: vms.create(pg_catalog, ALICE, "one-name", [image.id]) for _ in range(20)])
    won = [r for r in results if isinstance(r, vms.Vm)]
    assert len(won) == 1
    assert all(isinstance(r, Refused) and f"VM name 'one-name' is already taken by VM {won[0].id}" in str(r)
               for r in results if r is not won[0])
    assert pg_catalog.get(image.id).running_vms == 31 and len(vm_rows(pg_catalog)[1]) == 31


# --- the API and the CLI ---------------------------------------------------------------------------

@pytest.fixture
def pg_image_api(pg_catalog, stack_state, tmp_path):
    """The image API (`python -m api`, real HTTP, its own flow-run processes) over a PostgreSQL
    catalog and the session's Prefect API, with no system datastore; (its URL, a token of alice and of bob)."""
    from prefect.settings import PREFECT_API_URL

    from catalog.identity import Directory
    from cli.stack import free_port
    from tests.conftest import REPO_ROOT, SESSION_USERS

    directory = Directory(pg_catalog.engine)
    directory.add_group("staff")
    tokens = {}
    for user in ("alice", "bob"):
        directory.ensure_user(user, SESSION_USERS[user])
        tokens[user] = directory.issue_token(user)
    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "HCX_HOME": str(tmp_path),
           "HCX_DATABASE_URL": pg_catalog.engine.url.render_as_string(hide_password=False),
           "HCX_SYSTEM_DATASTORE": "no-such-system"}  # a setup without one: persistent disks need none
    with open(tmp_path / "api.log", "ab") as log:
        api = subprocess.Popen([sys.executable, "-m", "api", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT)
    try:
        while not _answers(f"{url}/health"):
            assert api.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
            threading.Event().wait(0.2)
        yield url, tokens
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _run_ended(client: httpx.Client, run_id: str) -> dict:
    while not (run := client.get(f"/runs/{run_id}").json())["final"]:
        threading.Event().wait(0.2)
    return run


def test_fifty_concurrent_creates_through_the_api_on_postgresql(pg_image_api, pg_catalog):
    """50 `POST /vms` at once on one persistent image, through the image API on PostgreSQL: one
    202, 49 × 409 with the rules' message, RUNNING_VMS = 1; the winner's prolog links the image.
    Bob may neither use alice's image nor see her VM (404, as if missing); nothing of his is written."""
    from tests.conftest import all_at_once, register_image

    url, tokens = pg_image_api
    image = register_image(pg_catalog, "shared-os", persistent=True, size=1024)
    alice, bob = (httpx.Client(base_url=f"{url}/api/v1", timeout=60, headers={"Authorization": f"Bearer {tokens[u]}"})
                  for u in ("alice", "bob"))
    with alice, bob:
        answers = all_at_once([lambda i=i: alice.post("/vms", json={"name": f"race-{i}", "disks": [image.id]})
                               for i in range(50)])
        assert sorted(a.status_code for a in answers) == [202] + [409] * 49, [a.text for a in answers]
        assert all(a.json()["detail"] == f"Cannot acquire image {image.id}: it is persistent and already in use."
                   for a in answers if a.status_code == 409)
        winner = next(a.json() for a in answers if a.status_code == 202)
        held = pg_catalog.get(image.id)
        assert (held.state, held.running_vms) == (S.USED_PERS, 1) and len(vm_rows(pg_catalog)[0]) == 1
        name = winner["vm"]["name"]

        unchanged = vm_rows(pg_catalog), catalog_snapshot(pg_catalog)
        assert bob.post("/vms", json={"name": "mine", "disks": [image.id]}).json() == {
            "detail": f"Image {image.id} does not exist: `hcx-image list` shows the images you can see."}
        assert bob.get(f"/vms/{name}").status_code == 404
        assert bob.post(f"/vms/{name}/terminate").status_code == 404
        assert bob.get("/vms").json() == []
        assert (vm_rows(pg_catalog), catalog_snapshot(pg_catalog)) == unchanged

        copied = register_image(pg_catalog, "np-data", type_=DATABLOCK, size=1024)
        refused = alice.post("/vms", json={"name": "needs-copies", "disks": [copied.id]})
        assert refused.status_code == 409 and refused.json()["detail"].startswith(
            "Non-persistent disks are copied into the system datastore 'no-such-system', which does not exist")
        assert vm_rows(pg_catalog) == unchanged[0]
        assert [h["to_state"] for h in pg_catalog.history(copied.id)] == ["READY"]

        assert _run_ended(alice, winner["flow_run_id"])["state_type"] == "COMPLETED"
        shown = alice.get(f"/vms/{name}").json()
        assert shown["state"] == "RUNNING" and [(d["mode"], d["object"]) for d in shown["disks"]] == [
            ("link", image.source)]
        ended = alice.post(f"/vms/{name}/terminate")
        assert ended.status_code == 202 and _run_ended(alice, ended.json()["flow_run_id"])["state_type"] == "COMPLETED"
        assert (pg_catalog.get(image.id).state, pg_catalog.get(image.id).running_vms) == (S.READY, 0)


def test_cli_vm_verbs(cli, catalog, ready_image, unique_name):
    os_image, data = ready_image(type_=OS, size=64 * 1024), ready_image(size=64 * 1024)
    name = unique_name("cli vm?")  # a space and a '?' travel as one path segment
    refused = cli("vm", "create", "a/b", "--disk", os_image.id)
    assert refused.exit_code == 1 and "Invalid VM name 'a/b': it contains '/'" in refused.stderr
    refused = cli("vm", "create", name, "--disk", data.id)
    assert refused.exit_code == 1 and "Rule 'exactly one OS disk'" in refused.stderr
    created = cli("vm", "create", name, "--disk", os_image.id, "--disk", data.id, "--wait")
    assert created.exit_code == 0, created.stderr
    assert f"({name}) is RUNNING" in created.stdout
    shown = __import__("json").loads(cli("vm", "show", name, "--json").stdout)
    assert shown["state"] == "RUNNING" and [(d["image_id"], d["mode"], d["state"]) for d in shown["disks"]] == [
        (os_image.id, "copy", "READY"), (data.id, "copy", "READY")]
    assert all(d["object"].startswith("s3://hcx-system/vms/") for d in shown["disks"])
    listed = cli("vm", "list")
    assert name in listed.stdout and "RUNNING" in listed.stdout
    detached = cli("vm", "detach", name, data.id, "--wait")
    assert detached.exit_code == 0, detached.stderr
    assert (catalog.get(data.id).state, catalog.get(data.id).running_vms) == (S.READY, 0)
    attached = cli("vm", "attach", name, data.id, "--wait")
    assert attached.exit_code == 0, attached.stderr
    assert catalog.get(data.id).state is S.USED
    terminated = cli("vm", "terminate", name, "--wait")
    assert terminated.exit_code == 0, terminated.stderr
    assert "is TERMINATED" in terminated.stdout
    assert [catalog.get(i).state for i in (os_image.id, data.id)] == [S.READY, S.READY]
    assert name not in cli("vm", "list", "--json").stdout


def test_a_failed_epilog_keeps_what_it_holds_and_terminating_again_finishes(
        catalog, ready_image, unique_name, new_datastore, cuttable_proxy, monkeypatch):
    """The system datastore refuses deletes: the epilog fails, the VM stays EPILOG with the reason,
    its disk and the image's count kept (nothing released over a copy still there); terminating
    again once deletes work finishes."""
    from tests.conftest import DENY_DELETES

    monkeypatch.setattr(get_settings(), "system_datastore", new_datastore(cuttable_proxy.endpoint))
    image = ready_image(type_=OS, size=64 * 1024)
    vm = vms.create(catalog, ALICE, unique_name("vm"), [image.id])
    prolog(vm.id)
    copy = vms.get(catalog, vm.id).disk(image.id)
    cuttable_proxy.deny(DENY_DELETES)
    vms.begin_terminate(catalog, ALICE, vm.id)
    assert epilog(vm.id, return_state=True).is_failed()
    stuck = vms.get(catalog, vm.id)
    assert stuck.state is vms.VmState.EPILOG and "Epilog failed" in stuck.error and "AccessDenied" in stuck.error
    assert stuck.disk(image.id).state is vms.DiskState.DETACHING and holds(image, copy)
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms) == (S.USED, 1)
    cuttable_proxy.deny(None)
    assert terminate(catalog, vm.id).state is vms.VmState.TERMINATED
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms) == (S.READY, 0)
    assert not load_datastore(copy.datastore).exists(ObjectRef.parse(copy.datastore, copy.object))


def test_without_a_system_datastore_the_prolog_fails_cleanly(catalog, put_image, unique_name, monkeypatch):
    monkeypatch.setattr(get_settings(), "system_datastore", "no-such-system")
    image = put_image(S.READY, type=OS)
    vm = vms.create(catalog, ALICE, unique_name("vm"), [image.id])
    assert prolog(vm.id, return_state=True).is_failed()
    failed = vms.get(catalog, vm.id)
    assert failed.state is vms.VmState.FAILED and "The system datastore 'no-such-system' does not exist" in failed.error
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms) == (S.READY, 0)


def test_vms_taking_the_same_images_in_opposite_orders_all_count_on_postgresql(pg_catalog):
    """20 VMs at once, half listing their disks OS-then-DATABLOCK, half the other way round: no
    deadlock, every VM counted on both images."""
    from tests.conftest import all_at_once, register_image

    os_image = register_image(pg_catalog, "os", size=1024)
    data = register_image(pg_catalog, "data", type_=DATABLOCK, size=1024)
    orders = [[os_image.id, data.id], [data.id, os_image.id]]
    results = all_at_once([lambda i=i: vms.create(pg_catalog, ALICE, f"vm-{i}", orders[i % 2]) for i in range(20)])
    assert all(isinstance(r, vms.Vm) for r in results), [r for r in results if not isinstance(r, vms.Vm)]
    assert [pg_catalog.get(i).running_vms for i in (os_image.id, data.id)] == [20, 20]


def test_terminating_a_vm_that_waits_on_a_locked_image_ends_its_prolog_and_releases_it(
        catalog, put_image, unique_name):
    """The image stays LOCKED (its operation never ends here): the VM waits; terminating it
    releases the image (LOCKED_USED -> LOCKED) and the waiting prolog ends without making a disk."""
    image = put_image(S.LOCKED, type=OS)
    vm = vms.create(catalog, ALICE, unique_name("vm"), [image.id])
    before = system_objects()
    booting: list = []
    thread = threading.Thread(target=lambda: booting.append(prolog(vm.id, return_state=True)))
    thread.start()
    _wait_for_disk_state(catalog, vm.id, image.id, vms.DiskState.WAITING, thread)
    assert terminate(catalog, vm.id).state is vms.VmState.TERMINATED
    thread.join()
    assert booting[0].is_completed()
    assert (catalog.get(image.id).state, catalog.get(image.id).running_vms) == (S.LOCKED, 0)
    assert vms.get(catalog, vm.id).state is vms.VmState.TERMINATED and system_objects() == before
