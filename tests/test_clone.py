"""Clone flows against the real SeaweedFS and Prefect harness: server-side and streamed copies,
twenty clones at once, a delete racing clones, refusals that change nothing, and a failed clone
recovered by `retry`, reusing a copy already in place only once it re-hashes right."""

from __future__ import annotations

import io
import os
import functools

import pytest

from blocks.datastore import ObjectRef, S3Datastore, load_datastore
from catalog.model import ImageState, ImageType
from catalog.requests import CloneRequest, DeleteRequest, RetryRequest
from flows.clone import clone
from flows.delete import delete
from flows.retry import retry
from tasks import transfer
from tests.conftest import ALICE, BOB, DENY_SERVER_COPIES, all_at_once

S = ImageState


def clone_request(source_id: int, name: str, actor=ALICE, **fields) -> CloneRequest:
    return CloneRequest(owner=actor.user, group=actor.group, source_id=source_id, name=name, **fields)


def holds_bytes(image) -> bool:
    """The image's object re-hashes to its recorded sha256 (read back from the store)."""
    store = load_datastore(image.datastore)
    return transfer.matches(store, ObjectRef.parse(image.datastore, image.source), size=image.size,
                            sha256=image.sha256)


@pytest.mark.parametrize("persistent, during", [(False, "USED"), (True, "CLONE")])
def test_clone_copies_server_side_and_releases_the_source(catalog, ready_image, shared_source, unique_name,
                                                          persistent, during):
    source = ready_image(persistent=True) if persistent else shared_source
    clone_id = clone(clone_request(source.id, unique_name("copy")))
    copy, after = catalog.get(clone_id), catalog.get(source.id)
    assert copy.state is S.READY
    assert (copy.type, copy.format, copy.size, copy.virtual_size, copy.sha256) == (
        source.type, source.format, source.size, source.virtual_size, source.sha256)
    assert copy.source != source.source and holds_bytes(copy)
    assert (copy.cloning_id, copy.last_operation, copy.persistent) == (None, None, False)
    assert (after.state, after.cloning_ops, after.running_vms, after.cloning_id) == (S.READY, 0, 0, None)
    assert [h["to_state"] for h in catalog.history(source.id)][-2:] == [during, "READY"]
    assert [h["to_state"] for h in catalog.history(clone_id)] == ["LOCKED", "LOCKED", "READY"]


def test_clone_to_another_endpoint_streams_and_verifies(catalog, ready_image, unique_name, new_datastore,
                                                         far_endpoint):
    source = ready_image()
    far = new_datastore(far_endpoint)
    assert not load_datastore("default").same_endpoint(load_datastore(far))
    copy = catalog.get(clone(clone_request(source.id, unique_name("far"), datastore=far, persistent=True)))
    assert (copy.state, copy.datastore, copy.sha256, copy.persistent) == (S.READY, far, source.sha256, True)
    assert copy.source.startswith(f"s3://{far}-images/images/") and holds_bytes(copy)


def test_twenty_concurrent_clones(catalog, ready_image, unique_name):
    """All READY with the source's bytes; the source back to READY with both counters at 0."""
    source = ready_image(persistent=True)
    clone_ids = all_at_once([functools.partial(clone, clone_request(source.id, unique_name(f"c{n}")))
                             for n in range(20)])
    assert all(isinstance(i, int) for i in clone_ids), clone_ids
    copies = [catalog.get(i) for i in clone_ids]
    assert all(c.state is S.READY and c.sha256 == source.sha256 for c in copies)
    assert len({c.source for c in copies}) == 20 and all(holds_bytes(c) for c in copies[:3])
    after = catalog.get(source.id)
    assert (after.state, after.cloning_ops, after.running_vms, after.cloning_id) == (S.READY, 0, 0, None)
    moves = [h for h in catalog.history(source.id) if h["message"].startswith("clone to image")]
    assert len(moves) == 40  # every acquire and every release counted exactly once
    holding, most = 0, 0
    for move in moves:
        holding += 1 if move["message"].endswith("started") else -1
        most = max(most, holding)
    assert holding == 0 and most > 1  # the clones did overlap


def test_a_delete_racing_clones_never_deletes_an_image_being_cloned(catalog, ready_image, unique_name):
    """Either the delete is refused or the clones never start; never a clone of a deleted image.
    (test_lifecycle_rules races the same operations many more times without the flows around them.)"""
    source = ready_image()
    names = [unique_name("racer") for _ in range(3)]
    *states, deleted = all_at_once([
        *(functools.partial(clone, clone_request(source.id, name), return_state=True) for name in names),
        functools.partial(delete, DeleteRequest(owner="alice", image_id=source.id), return_state=True),
    ])
    history = catalog.history(source.id)
    started = [i for i, h in enumerate(history) if h["message"].startswith("clone to image") and "started" in h["message"]]
    deletes = [i for i, h in enumerate(history) if h["to_state"] == "DELETE"]

    if deleted.is_completed():
        assert catalog.find(source.id) is None
        assert history[deletes[0]]["from_state"] == "READY"  # no clone held it
        assert all(i < deletes[0] for i in started)  # none started after
        for state, name in zip(states, names):
            if state.is_failed():
                assert "DELETE" in state.message or "does not exist" in state.message
                assert catalog.name_owner("alice", name) is None
    else:
        assert "active clone operations" in deleted.message
        assert deletes == [] and catalog.get(source.id).state is S.READY
    for state, name in zip(states, names):
        if state.is_completed():
            assert catalog.get(state.result()).state is S.READY
    assert catalog.find(source.id) is None or catalog.get(source.id).cloning_ops == 0


CLONE_REFUSALS = {
    "name taken": lambda src, put, ds, name: (clone_request(src.id, put(S.READY).name), "NAME is already taken by IMAGE"),
    "no room": lambda src, put, ds, name: (clone_request(src.id, name, datastore=ds(limit_bytes=src.size - 1)),
                                           "has no room for this image"),
    # A source one may not use answers as a missing one (whether it exists is its owner's business).
    "no USE right": lambda src, put, ds, name: (clone_request(src.id, name, actor=BOB),
                                               f"Image {src.id} does not exist"),
    "persistent CDROM": lambda src, put, ds, name: (
        clone_request(put(S.READY, type=ImageType.CDROM, source=src.source, source_etag=src.source_etag).id, name,
                      persistent=True), "always non-persistent"),
    "source DISABLED": lambda src, put, ds, name: (
        clone_request(put(S.DISABLED, source=src.source, source_etag=src.source_etag).id, name), "in state DISABLED"),
    "no such source": lambda src, put, ds, name: (clone_request(10**6, name), "Image 1000000 does not exist"),
    "no bytes": lambda src, put, ds, name: (clone_request(put(S.READY, source=None).id, name),
                                            "records no object to clone from"),
}


@pytest.mark.parametrize("case", CLONE_REFUSALS)
def test_refused_clone_changes_nothing(catalog, shared_source, put_image, new_datastore, unique_name,
                                       store_objects, case):
    request, message = CLONE_REFUSALS[case](shared_source, put_image, new_datastore, unique_name())
    stores = [load_datastore("default")] + ([load_datastore(request.datastore)] if request.datastore else [])
    before = (catalog.list(), [catalog.history(i.id) for i in catalog.list()], [store_objects(s) for s in stores])
    state = clone(request, return_state=True)
    assert state.is_failed() and message in state.message
    assert (catalog.list(), [catalog.history(i.id) for i in catalog.list()], [store_objects(s) for s in stores]) == before


def test_failed_clone_recovers_with_retry_reusing_only_a_verified_copy(catalog, ready_image, unique_name,
                                                                        new_datastore, cuttable_proxy, stack_state):
    """Server-side copies are refused (403) on the way to the datastore: the clone fails, the source
    is released anyway. A copy of the wrong bytes at the clone's key is not trusted; the right bytes
    there are reused without copying again; with copies allowed again a retry copies afresh."""
    proxied = new_datastore(cuttable_proxy.endpoint)
    source = ready_image(datastore=proxied)
    cuttable_proxy.deny(DENY_SERVER_COPIES)
    state = clone(clone_request(source.id, unique_name("fails")), return_state=True)
    assert state.is_failed() and cuttable_proxy.denied == 1
    failed = catalog.find_by_upload_id(str(state.state_details.flow_run_id))
    assert failed.state is S.ERROR and f"Error cloning from Image {source.id}: " in failed.error
    assert "AccessDenied" in failed.error
    released = catalog.get(source.id)
    assert (released.state, released.cloning_ops) == (S.READY, 0)

    direct = S3Datastore(endpoint_url=stack_state.s3_endpoint, bucket=f"{proxied}-images",
                         access_key=stack_state.s3_access_key, secret_key=stack_state.s3_secret_key)
    at_key = direct.image_ref(failed.upload_id)
    direct.upload(io.BytesIO(os.urandom(source.size)), at_key)  # same size, other bytes
    assert retry(RetryRequest(owner="alice", image_id=failed.id), return_state=True).is_failed()
    assert cuttable_proxy.denied == 2  # it re-hashed, found other bytes, and tried to copy
    assert catalog.get(failed.id).state is S.ERROR and (catalog.get(source.id).cloning_ops == 0)

    body, _ = direct.open_read(ObjectRef.parse(proxied, source.source))
    with body:
        direct.upload(body, at_key)  # the copy an earlier run completed
    assert retry(RetryRequest(owner="alice", image_id=failed.id)) == failed.id
    assert cuttable_proxy.denied == 2  # reused: no copy was needed
    done = catalog.get(failed.id)
    assert (done.state, done.error, done.sha256) == (S.READY, None, source.sha256) and holds_bytes(done)
    assert (catalog.get(source.id).state, catalog.get(source.id).cloning_ops) == (S.READY, 0)
    history = [h["to_state"] for h in catalog.history(failed.id)]
    assert history == ["LOCKED", "ERROR", "LOCKED", "LOCKED", "ERROR", "LOCKED", "LOCKED", "LOCKED", "READY"]
