"""Delete flows against the real SeaweedFS: DELETE at once (the name is free), every object of the
image removed (incomplete multipart uploads too), the row last; a failed removal leaves the image
in ERROR and `retry` finishes the job; refusals through the CLI change nothing."""

from __future__ import annotations

import pytest

from blocks.datastore import ObjectRef, load_datastore
from catalog import operations
from catalog.model import ImageState
from catalog.requests import CloneRequest, DeleteRequest, RetryRequest
from flows.delete import delete
from flows.retry import retry
from tests.conftest import ADMIN, ALICE, DENY_DELETES

S = ImageState


def object_of(image) -> tuple:
    store = load_datastore(image.datastore)
    return store, ObjectRef.parse(image.datastore, image.source)


def test_delete_frees_the_name_at_once_then_removes_objects_and_row(catalog, ready_image, staging_leftovers):
    image = ready_image()
    store, ref = object_of(image)
    multipart = store.client().create_multipart_upload(Bucket=ref.bucket, Key=ref.key)  # a copy that never ended
    marked = operations.delete(catalog, ALICE, image.id)
    assert (marked.state, catalog.name_owner("alice", image.name)) == (S.DELETE, None)

    removed = delete(DeleteRequest(owner="alice", image_id=image.id))

    assert str(ref) in removed and not store.exists(ref)
    assert multipart["UploadId"] not in [u["UploadId"] for u in store.list_multipart_uploads(ref.bucket, ref.key)]
    assert catalog.find(image.id) is None
    assert [(h["from_state"], h["to_state"]) for h in catalog.history(image.id)][-3:] == [
        ("READY", "DELETE"), ("DELETE", "DELETE"), ("DELETE", None)]
    assert staging_leftovers(store) == []


def test_cli_delete_wait(cli, catalog, ready_image):
    image = ready_image()
    store, ref = object_of(image)
    result = cli("delete", image.id, "--wait")
    assert result.exit_code == 0, result.stderr
    assert f"image {image.id} ({image.name}), its name free again, is DELETE" in result.stdout
    assert f"image {image.id} deleted" in result.stdout
    assert catalog.find(image.id) is None and not store.exists(ref)


@pytest.mark.parametrize("state, args, message", [
    (S.USED, [], "There are 1 VMs using it"),
    (S.CLONE, [], "There are 1 active clone operations"),
    (S.LOCKED, [], "it is LOCKED by a running operation. Wait for it, or as an administrator use --force"),
    (S.LOCKED, ["--force"], "deleting a LOCKED image needs the ADMIN right"),
])
def test_cli_delete_refusals_change_nothing(cli, catalog, put_image, state, args, message):
    image = put_image(state, persistent=state is S.CLONE, running_vms=1 if state is S.USED else 0,
                      cloning_ops=1 if state is S.CLONE else 0)
    before = (catalog.list(), catalog.history(image.id))
    result = cli("delete", image.id, *args)
    assert result.exit_code == 1
    assert message in result.stderr and "FLOW RUN" not in result.stdout
    assert (catalog.list(), catalog.history(image.id)) == before


def test_failed_removal_goes_to_error_and_retry_finishes(catalog, ready_image, new_datastore, cuttable_proxy):
    proxied = new_datastore(cuttable_proxy.endpoint)
    image = ready_image(datastore=proxied)
    store, ref = object_of(image)
    cuttable_proxy.deny(DENY_DELETES)

    state = delete(DeleteRequest(owner="alice", image_id=image.id), return_state=True)

    assert state.is_failed() and cuttable_proxy.denied >= 1
    failed = catalog.get(image.id)
    assert failed.state is S.ERROR
    assert " : Error removing image from datastore: delete s3://" in failed.error and "AccessDenied" in failed.error
    assert catalog.name_owner("alice", image.name) is None  # still free
    cuttable_proxy.deny(None)
    assert store.exists(ref)

    retry(RetryRequest(owner="alice", image_id=image.id))

    assert catalog.find(image.id) is None and not store.exists(ref)


def test_force_deleting_a_locked_clone_releases_its_source(catalog, put_image, unique_name):
    """An administrator removes a clone stuck LOCKED: its source is let go in the same transaction."""
    source = put_image(S.READY)
    request = CloneRequest(owner="alice", source_id=source.id, name=unique_name())
    target = operations.begin_clone(catalog, ALICE, request, object_id=unique_name("obj"), limit_bytes=None,
                                    run_id=None)
    assert catalog.get(source.id).state is S.USED

    delete(DeleteRequest(owner=ADMIN.user, group=ADMIN.group, image_id=target.id, force=True))

    assert catalog.find(target.id) is None
    released = catalog.get(source.id)
    assert (released.state, released.cloning_ops, released.cloning_id) == (S.READY, 0, None)


def test_forced_delete_stops_the_running_upload_and_leaves_no_object(
        catalog, cli, new_datastore, cuttable_proxy, raw_file, unique_name, store_objects):
    """An upload is running in its own process (the CLI's background run), stuck in its server-side
    copy; an administrator force-deletes the LOCKED image. The delete cancels that run and waits for
    its process to end before removing objects: the run ends, the row goes, no object of the image
    is left, and nothing the superseded run did afterwards changed the catalog."""
    from prefect.client.orchestration import get_client

    from tests.conftest import DENY_SERVER_COPIES

    datastore = new_datastore(cuttable_proxy.endpoint, staging_bucket=True)
    cuttable_proxy.hold(DENY_SERVER_COPIES)  # the copy into the image bucket never gets an answer
    name = unique_name("inflight")
    created = cli("create", "--name", name, "--type", "DATABLOCK", "--path", raw_file, "--datastore", datastore)
    assert created.exit_code == 0, created.stderr
    image = catalog.name_owner("alice", name)
    assert image.state is S.LOCKED and image.flow_run_id
    upload_run = image.flow_run_id

    removed = delete(DeleteRequest(owner=ADMIN.user, group=ADMIN.group, image_id=image.id, force=True))
    cuttable_proxy.hold(None)

    with get_client(sync_client=True) as client:
        ended = client.read_flow_run(upload_run).state
    assert ended.is_final() and not ended.is_completed(), ended
    assert catalog.find(image.id) is None
    assert store_objects(load_datastore(datastore)) == []
    assert any(image.upload_id in uri for uri in removed)
    history = catalog.history(image.id)
    deleted_at = next(i for i, h in enumerate(history) if h["to_state"] == "DELETE")
    assert all(h["flow_run_id"] != upload_run for h in history[deleted_at:]), history
